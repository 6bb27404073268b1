"""Command-line options shared by the neoj command and its task and training subcommands: the model,
quantization and sampling options (generate's, and the task subcommands'), prefix caching and speculative
decoding, their checks, and loading the model they name. Both cli.py and tasks/cli.py build on this module, so
neither imports the other's internals."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .checks import decode_escapes
from .errors import GenerationError, NeojError

STOP_HELP = (r"stop when TEXT is generated (not printed); repeatable. Backslash escapes are understood: "
             r"--stop '\n\n' stops at a blank line (also \t, \r, \\ for a backslash, \xNN, \uNNNN)")


def stop_text(value: str) -> str:
    """argparse type of --stop: the text with its backslash escapes decoded (see checks.decode_escapes)."""
    try:
        return decode_escapes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Adds --model, --dtype, --device, --revision, --device-map, --quantize, --group-size and --no-memory-check."""
    parser.add_argument("--model", "-m", default=None, help="checkpoint directory, Hub id, builtin, or random:PRESET "
                        "(default: builtin)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and compute dtype (default auto: bfloat16 on CPUs with native bf16 and on "
                        "recent GPUs, else float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="place the layers across devices: auto (split by free memory), or layer ranges such as "
                        "0-13:cuda:0,14-27:cuda:1 (a GPU's layers may also go to cpu)")
    add_quantize_args(parser)
    parser.add_argument("--no-memory-check", action="store_true",
                        help="load even if the memory plan says the model will not fit")


def add_tp_arg(parser: argparse.ArgumentParser) -> None:
    """Adds --tp N: the model split over the N processes torchrun started."""
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallelism: split the model over N processes started by torchrun "
                        "(torchrun --nproc-per-node N -m neoj ... --tp N); NCCL between GPUs, gloo on CPU")


def add_quantize_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Adds --quantize (int8, int4) and --group-size."""
    parser.add_argument("--quantize", "-q", default=None, choices=["int8", "int4"], required=required,
                        help="weight-only quantization of every linear layer and the LM head, done while loading: "
                        "int8 (per output channel, about 1/4 of fp32) or int4 (per group, about 1/7)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                        help="int4: weights sharing one scale and zero (default 128; smaller = more accurate, larger)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Adds the generation group: --max-new-tokens, --temperature, --top-k, --top-p, --stop, --seed, ..."""
    g = parser.add_argument_group("generation")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off; default 0.95)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction of the most likely one's probability (0 = off)")
    g.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling's mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' penalty (1 = off)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", type=stop_text, help=STOP_HELP)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--num-return-sequences", type=int, default=1, help="independent samples per prompt")
    g.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt too long for the context instead of failing")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|>")


def sampling_options(args) -> dict:
    """Returns the GenerationParams keyword arguments that the sampling options of `args` give."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
                num_return_sequences=args.num_return_sequences, truncate=args.truncate,
                stop_at_eos=not args.ignore_eos, min_p=args.min_p, typical_p=args.typical_p)


# The structured-output options that name files (kept as the shell's bytes, not checked as UTF-8 text).
CONSTRAINT_FILE_ARGUMENTS = frozenset({"json_schema", "grammar"})


def add_constraint_args(parser: argparse.ArgumentParser) -> None:
    """Adds the structured-output group: --json-schema FILE, --json, --regex RE, --choice TEXT, --grammar FILE."""
    g = parser.add_argument_group("structured output (at most one)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", default=None,
                   help="the output is JSON valid under the JSON schema in FILE")
    g.add_argument("--json", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", metavar="RE", default=None, help="the whole output matches the regular expression RE")
    g.add_argument("--choice", metavar="TEXT", action="append", default=None,
                   help="the output is exactly one of the --choice texts (repeat it for each)")
    g.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output derives from the grammar in FILE: llguidance's Lark syntax (rule start), or "
                   "llama.cpp's GBNF (rule root) when FILE ends in .gbnf")


def constraint_from_args(args):
    """Returns the Constraint the structured-output options of `args` ask for (None without one); raises
    NeojError naming the option and the input that is unreadable or invalid."""
    from .constraint import Constraint, ConstraintError

    try:
        if getattr(args, "json", False):
            return Constraint("json")
        if getattr(args, "regex", None) is not None:
            return Constraint("regex", args.regex)
        if getattr(args, "choice", None):
            return Constraint("choice", list(args.choice))
    except ConstraintError as exc:
        option = "--regex" if getattr(args, "regex", None) is not None else "--choice"
        raise NeojError(f"{option}: {exc}") from None
    for option, path in (("--json-schema", getattr(args, "json_schema", None)),
                         ("--grammar", getattr(args, "grammar", None))):
        if path is not None:
            return _constraint_file(option, Path(path))
    return None


def _constraint_file(option: str, path: Path):
    """Returns the Constraint of a --json-schema or --grammar file; raises NeojError naming the file."""
    from .constraint import Constraint, ConstraintError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NeojError(f"{option} {path}: cannot read it: {reason}") from None
    try:
        if option == "--json-schema":
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as exc:
                raise NeojError(f"{option} {path}: not JSON: {exc}") from None
            return Constraint("json_schema", schema)
        return Constraint("gbnf" if path.suffix.lower() == ".gbnf" else "lark", text)
    except ConstraintError as exc:
        raise NeojError(f"{option} {path}: {exc}") from None


def add_task_args(parser: argparse.ArgumentParser, max_new_tokens: int | str | None, temperature: float = 0.0,
                  progress: bool = True, generation: bool = True) -> None:
    """Adds the options of the task subcommands (summarize, ask, ...): the model, --prompts, --no-progress and
    the generation group; max_new_tokens: an int default, or the help text saying how the task picks it."""
    add_model_args(parser)
    if generation:
        add_speculative_args(parser)
    else:  # scoring tasks (classify) reuse few-shot prefixes too, but have nothing to speculate
        add_prefix_cache_arg(parser.add_argument_group("prefix caching"))
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="JSON or TOML file overriding prompt templates by name (see neoj/tasks/prompts.py)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if not generation:
        return
    g = parser.add_argument_group("generation")
    default = max_new_tokens if isinstance(max_new_tokens, int) else None
    g.add_argument("--max-new-tokens", "-n", type=int, default=default,
                   help=f"tokens to generate (default {max_new_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=temperature,
                   help=f"0 = greedy (default {temperature:g})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off, the default)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' penalty (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")


def task_sampling_options(args) -> dict:
    """Returns the sampling keyword arguments that add_task_args' generation options of `args` give."""
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


GENERATION_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop", "seed",
                      "num_return_sequences", "min_p", "typical_p")


def check_generation_options(args) -> None:
    """Raises NeojError naming the command-line option (--top-p, ...) whose value is out of range.

    Called before a model is loaded or an output file opened, so a typo fails at once and blames the
    option, not the data. Options a command does not have, or leaves to the task (None), are skipped.
    """
    from .sampling import GenerationParams

    check_speculative_args(args)
    given = {name: getattr(args, name) for name in GENERATION_OPTIONS if getattr(args, name, None) is not None}
    try:
        GenerationParams.from_kwargs(**given)
    except GenerationError as exc:
        message = str(exc)
        bad = re.match(r"(\w+)=(.*?) (must .*)", message)
        if bad:
            message = f"--{bad[1].replace('_', '-')} {bad[3]} (got {bad[2]})"
        elif message.startswith("stop sequences"):
            message = "--stop must not be empty"
        raise NeojError(message) from None


def load_from_args(args):
    """Returns the LanguageModel that --model, --dtype, --device, --quantize, ... of `args` name, with the prefix
    cache and the speculation that --prefix-cache-mb, --prompt-lookup, --draft-model, ... ask for (where the
    command has those options)."""
    from .api import load

    check_speculative_args(args)  # a bad value fails before the model loads
    lm = load(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
              adapter=getattr(args, "adapter", None), quantize=args.quantize, group_size=args.group_size,
              check_memory=not args.no_memory_check, tp=getattr(args, "tp", None),
              device_map=getattr(args, "device_map", None))
    if hasattr(args, "prefix_cache_mb"):
        from .engine import PrefixCache

        lm.prefix_cache = PrefixCache.megabytes(args.prefix_cache_mb)
        if hasattr(args, "prompt_lookup"):
            lm.speculative = speculative_from_args(args, lm)
    return lm


# ---- prefix caching and speculative decoding ----

DRAFT_SELF = "self"  # --draft-model self: the model's own checkpoint, loaded again quantized
SPECULATIVE_HELP = (
    "Prefix caching keeps the keys and values of recent prompts and reuses them for a prompt that\n"
    "starts the same way (a chat's history, few-shot examples, a system prompt). Speculative decoding\n"
    "guesses a few tokens ahead and has the model check them all in one step: the text is what the\n"
    "model alone writes (greedy) or follows its distribution (sampling); only the speed changes. It\n"
    "pays on repetitive text (prompt lookup: code, quoted documents, extraction) or with a good small\n"
    "draft model, and turns itself off while it does not.")


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    """Adds the prefix-caching and speculative-decoding group: --prefix-cache-mb, --prompt-lookup,
    --draft-model, --draft-quantize and --num-speculative-tokens."""
    g = parser.add_argument_group("prefix caching and speculative decoding", SPECULATIVE_HELP)
    add_prefix_cache_arg(g)
    method = g.add_mutually_exclusive_group()
    method.add_argument("--prompt-lookup", action="store_true",
                        help="speculate by prompt lookup: propose what followed the last few tokens where they "
                        "appeared earlier in the prompt or the output (no second model)")
    method.add_argument("--draft-model", default=None, metavar="NAME",
                        help="speculate with a draft model that shares the tokenizer: a checkpoint directory, Hub "
                        "id, builtin or random:PRESET (e.g. EleutherAI/gpt-neo-125m for a larger GPT-Neo or GPT-J), "
                        f"loaded with --dtype and --device; '{DRAFT_SELF}' loads the model's own checkpoint again, "
                        "quantized (see --draft-quantize), as its draft")
    g.add_argument("--draft-quantize", default=None, choices=["int8", "int4"],
                   help=f"quantize the draft model as it loads (default int4 for --draft-model {DRAFT_SELF}, none "
                   "otherwise)")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens guessed per step, 1 to 16 (default: 5 for --prompt-lookup, 4 for --draft-model)")


def add_prefix_cache_arg(group) -> None:
    """Adds --prefix-cache-mb to a parser or argument group."""
    from .engine.prefix_cache import DEFAULT_PREFIX_CACHE_MB

    group.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB, metavar="MB",
                       help=f"memory for reused prompt prefixes, taken only as prompts are stored (default "
                       f"{DEFAULT_PREFIX_CACHE_MB}; 0 turns prefix caching off)")


def check_speculative_args(args) -> None:
    """Raises NeojError naming the prefix-caching or speculative option whose value is out of range or given
    without the option it refines; commands without these options pass."""
    from .engine import Speculative

    if not hasattr(args, "prefix_cache_mb"):
        return
    if not args.prefix_cache_mb >= 0 or args.prefix_cache_mb == float("inf"):
        raise NeojError(f"--prefix-cache-mb must be 0 (off) or a positive size in MiB (got {args.prefix_cache_mb:g})")
    if not hasattr(args, "num_speculative_tokens"):
        return
    k = args.num_speculative_tokens
    if k is not None:
        if not 1 <= k <= Speculative.MAX_TOKENS:
            raise NeojError(f"--num-speculative-tokens must be between 1 and {Speculative.MAX_TOKENS} (got {k})")
        if not (args.prompt_lookup or args.draft_model):
            raise NeojError("--num-speculative-tokens needs --prompt-lookup or --draft-model")
    if args.draft_quantize is not None and not args.draft_model:
        raise NeojError("--draft-quantize needs --draft-model")


def speculative_from_args(args, lm):
    """Returns the Speculative that --prompt-lookup or --draft-model (with --num-speculative-tokens) ask for
    for the LanguageModel `lm`, or None; raises NeojError when the draft cannot be loaded or does not share
    lm's tokenizer."""
    from .engine import Speculative

    check_speculative_args(args)
    k = args.num_speculative_tokens or 0
    if args.prompt_lookup:
        return Speculative(method="prompt_lookup", num_tokens=k)
    if not args.draft_model:
        return None
    draft = load_draft(args, lm)
    return Speculative(method="draft", num_tokens=k, draft=draft)


def load_draft(args, lm):
    """Returns the draft LanguageModel --draft-model names, loaded with --dtype and --device (and quantized by
    --draft-quantize; 'self': lm's own checkpoint, int4 by default); raises NeojError saying why it is unusable."""
    from .api import load

    is_self = args.draft_model == DRAFT_SELF
    name = args.model if is_self else args.draft_model
    quantize = args.draft_quantize or ("int4" if is_self else None)
    where = f"--draft-model {args.draft_model}"
    if is_self and lm.quantization is not None and lm.quantization.scheme == quantize:
        raise NeojError(f"{where}: the model is already {quantize}, so its {quantize} copy would be the model "
                        "itself; use --draft-quantize int4 for an int8 model, or name a smaller --draft-model")
    try:
        draft = load(name, dtype=args.dtype, device=args.device, revision=args.revision if is_self else None,
                     adapter=getattr(args, "adapter", None) if is_self else None, quantize=quantize,
                     group_size=args.group_size, check_memory=not args.no_memory_check)
    except NeojError as exc:
        raise NeojError(f"{where}: cannot load it: {exc}") from None
    check_draft(draft, lm, where)
    return draft


def check_draft(draft, lm, where: str = "the draft model") -> None:
    """Raises NeojError when `draft` cannot guess tokens for `lm`: a tokenizer of another vocabulary, or an
    output layer shorter than lm's tokenizer (GPT-Neo and GPT-J share the GPT-2 tokenizer's 50257 ids; GPT-J
    pads its output layer to 50400, which is fine)."""
    needed = lm.tokenizer.vocab_size
    if draft.config.vocab_size < needed:
        raise NeojError(f"{where}: its vocabulary has {draft.config.vocab_size} token ids, but the model's tokenizer "
                        f"has {needed}; a draft must share the model's tokenizer (GPT-Neo and GPT-J share the "
                        "GPT-2 tokenizer's 50257 ids)")
    probe = "Speculative decoding: def f(x):\n    return x  # ok"
    if draft.tokenizer.vocab_size != needed or draft.tokenizer.encode(probe) != lm.tokenizer.encode(probe):
        raise NeojError(f"{where}: its tokenizer differs from the model's ({draft.tokenizer.vocab_size} tokens, "
                        f"not {needed}); a draft must share the model's tokenizer")
    if draft.device != lm.device:
        raise NeojError(f"{where}: it is on {draft.device}, the model on {lm.device}; load both on one --device")
