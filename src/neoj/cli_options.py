"""Command-line options shared by the neoj command and its task and training subcommands: the model,
quantization and sampling options (generate's, and the task subcommands'), their checks, and loading the
model they name. Both cli.py and tasks/cli.py build on this module, so neither imports the other's internals."""

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
    """Adds --model, --dtype, --device, --revision, --quantize, --group-size and --no-memory-check."""
    parser.add_argument("--model", "-m", default=None, help="checkpoint directory, Hub id, builtin, or random:PRESET "
                        "(default: builtin)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and compute dtype (default auto: bfloat16 on CPUs with native bf16 and on "
                        "recent GPUs, else float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    add_quantize_args(parser)
    parser.add_argument("--no-memory-check", action="store_true",
                        help="load even if the memory plan says the model will not fit")


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
    """Returns the LanguageModel that --model, --dtype, --device, --quantize, ... of `args` name."""
    from .api import load

    return load(args.model, dtype=args.dtype, device=args.device, revision=args.revision,
                adapter=getattr(args, "adapter", None), quantize=args.quantize, group_size=args.group_size,
                check_memory=not args.no_memory_check)
