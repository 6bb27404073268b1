"""The `neoj` command line. Only this module prints; the library logs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .checks import check_utf8_text, prepare_output_dir, read_stdin
from .cli_options import (CONSTRAINT_FILE_ARGUMENTS, add_constraint_args, add_model_args, add_quantize_args,
                          add_sampling_args, add_speculative_args, add_tp_arg, check_generation_options, check_speculative_args,
                          constraint_from_args, load_from_args, sampling_options)
from .errors import NeojError
from .threads import set_thread_count

EPILOG = """models: a local checkpoint directory, a Hugging Face Hub id (EleutherAI/gpt-neo-125m,
EleutherAI/gpt-j-6b, ...), builtin (the small model shipped inside neoj), or random:PRESET for random
weights of a published shape (random:gpt-neo-125m, random:gpt-neo-1.3b, random:gpt-neo-2.7b, random:gpt-j-6b).
With no --model, builtin is used (a directory named builtin in the current directory wins: write ./builtin
to be explicit). Offline, set HF_HUB_OFFLINE=1: models already in the Hugging Face cache load without asking."""


# Arguments that name files, directories or models: kept as the bytes the shell gave (a non-UTF-8 file name
# is a valid file name). Every other string argument is text for the model and must be UTF-8.
PATH_ARGUMENTS = frozenset({"model", "adapter", "out", "input", "output", "data", "val_data", "context", "file",
                            "examples", "prompts", "load", "config", "base", "draft_model"})
# How an error names an argument whose option string is not its destination's name.
ARGUMENT_NAMES = {"prompt": "the PROMPT argument", "text": "the TEXT argument", "question": "the QUESTION argument",
                  "source": "--from", "repo_id": "the REPO_ID argument"}
OVERWRITE_HELP = ("write into --out even if it already holds files: the model, adapter and training files there "
                  "are deleted before the new ones are written (other files are kept)")
def check_text_args(args) -> None:
    """Raises NeojError when a text argument (a prompt, --stop, --system, ...) holds bytes that are not UTF-8.

    On Linux such bytes reach sys.argv as lone surrogates, which the tokenizer rejects with a TypeError;
    arguments that name files or models (PATH_ARGUMENTS) may hold any bytes and are not checked.
    """
    for name, value in sorted(vars(args).items()):
        if name in PATH_ARGUMENTS or name in CONSTRAINT_FILE_ARGUMENTS or name == "func":
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                where = ARGUMENT_NAMES.get(name, "--" + name.replace("_", "-"))
                check_utf8_text(item, where if where.startswith("the ") else f"the {where} argument")


def cmd_generate(args) -> int:
    if args.prompt is None:
        raise NeojError("give a PROMPT, or - to read it from standard input")
    check_generation_options(args)
    constraint = constraint_from_args(args)  # a bad schema or grammar fails before the model loads
    prompt = read_stdin() if args.prompt == "-" else args.prompt
    options = {**sampling_options(args), "constraint": constraint}
    lm = load_from_args(args)
    out = sys.stdout
    if args.num_return_sequences == 1:
        if args.echo:
            out.write(prompt)
        for piece in lm.stream(prompt, **options):
            out.write(piece)
            out.flush()
        out.write("\n")
    else:
        for i, text in enumerate(lm.generate(prompt, **options)):
            out.write(f"--- sequence {i + 1} ---\n{prompt if args.echo else ''}{text}\n")
    return 0


def cmd_download(args) -> int:
    from .weights import download

    path = download(args.repo_id, revision=args.revision)
    print(path)
    return 0


def _format_bytes(n: float) -> str:
    """Returns a byte count for people: "512 B", "1.5 KiB", ..., up to TiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def cmd_info(args) -> int:
    from .memory import memory_table, resolve_config

    cfg, source = resolve_config(args.model, revision=args.revision)
    args.context = min(args.context or cfg.n_positions, cfg.n_positions)
    rows = memory_table(cfg, context=args.context, batch=args.batch, group_size=args.group_size)
    info = {
        "model": args.model, "source": str(source), "model_type": cfg.model_type,
        "parameters": cfg.num_parameters(), "layers": cfg.n_layers, "hidden_size": cfg.hidden_size,
        "heads": cfg.n_heads, "context": cfg.n_positions, "vocab_size": cfg.vocab_size,
        "positions": "learned" if cfg.learned_positions else f"rotary (first {cfg.rotary_dim} dims per head)",
        "attention_layers": "".join("G" if k == "global" else "L" for k in cfg.attention_layers),
        "window_size": cfg.window_size if "local" in cfg.attention_layers else None,
        "block": "parallel attention + MLP" if cfg.parallel_block else "sequential pre-LN",
        "memory": rows,
    }
    if args.train:
        from .memory import training_table

        seq_len = args.context  # the training blocks' length: --context, at most the model's context
        targets = tuple(args.lora_targets)
        info["training"] = {"batch": args.batch, "seq_len": seq_len, "lora_r": args.lora_r,
                            "lora_targets": list(targets),
                            "modes": training_table(cfg, args.batch, seq_len, args.lora_r, targets)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}  ({cfg.model_type}, {cfg.num_parameters() / 1e6:,.1f}M parameters)")
    for key in ("layers", "hidden_size", "heads", "context", "vocab_size", "positions", "block"):
        print(f"  {key:<17}{info[key]}")
    if info["window_size"]:
        print(f"  {'attention':<17}{info['attention_layers']} (G global, L local, window {info['window_size']})")
    print(f"\n  memory for batch {args.batch} at {args.context} tokens of context:")
    print(f"  {'dtype':<17}{'weights':>12}{'KV cache':>12}{'total':>12}")
    for row in rows:
        print(f"  {row['dtype']:<17}{_format_bytes(row['weights_bytes']):>12}"
              f"{_format_bytes(row['kv_cache_bytes']):>12}{_format_bytes(row['total_bytes']):>12}")
    from .api import available_memory, resolve_device
    from .memory import memory_limit

    free = memory_limit(available_memory(resolve_device("auto")))
    print(f"\n  available now: {_format_bytes(free)}; int8/int4 compute in bfloat16 (--group-size "
          f"{args.group_size}); loading also needs about 0.6 GiB for the runtime")
    if args.train:
        t = info["training"]
        print(f"\n  training memory for a micro-batch of {t['batch']} x {t['seq_len']} tokens (fp32 weights, "
              f"AdamW; LoRA rank {t['lora_r']} on {' '.join(t['lora_targets'])}):")
        print(f"  {'mode':<27}{'weights':>10}{'grads+adam':>12}{'activations':>13}{'total':>11}")
        for row in t["modes"]:
            print(f"  {row['mode']:<27}{_format_bytes(row['weights_bytes']):>10}"
                  f"{_format_bytes(row['gradients_bytes'] + row['optimizer_bytes']):>12}"
                  f"{_format_bytes(row['activations_bytes']):>13}{_format_bytes(row['total_bytes']):>11}")
        print("  totals include the loss's logits chunk and 0.6 GiB runtime; a GPU adds its CUDA context")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import QuantSpec, quantize_checkpoint
    from .weights import resolve_model_dir

    spec = QuantSpec(args.quantize, args.group_size)
    out = prepare_output_dir(args.out, overwrite=args.overwrite)  # before a model is resolved or downloaded
    source = resolve_model_dir(args.model, revision=args.revision)
    import torch

    files = quantize_checkpoint(source, out, spec, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    total = sum((out / f).stat().st_size for f in files)
    print(f"wrote {args.quantize} checkpoint to {args.out} ({_format_bytes(total)}): {', '.join(files)}")
    return 0


def cmd_serve(args) -> int:
    from .adapters import split_adapter_specs
    from .server import serve
    from .server.listen import bind_listening_socket

    api_key = args.api_key or os.environ.get("NEOJ_API_KEY") or None
    # --adapter DIR merges one adapter into the weights; --adapter NAME=DIR serves it as model NAME.
    args.adapter, adapters = split_adapter_specs(args.adapter or [])
    check_speculative_args(args)  # a bad value fails before the port is bound
    if args.tp and adapters:
        raise NeojError("--adapter NAME=DIR is not served with --tp (the adapters would need splitting too); serve "
                        "adapters on one process, or merge one into the model (neoj merge) and serve that")
    follower = bool(args.tp) and os.environ.get("RANK", "0") != "0"  # rank 0 serves HTTP, the others follow it
    # A bad or busy port fails now, not after loading.
    sock = None if follower else bind_listening_socket(args.host, args.port)
    lm = load_from_args(args)
    if follower:
        from .server import follow_engine

        follow_engine(lm, max_batch=args.max_batch, max_queue=args.max_queue)
        return 0
    # Clients name the model by its Hub id, or by the directory's name (a served path is not disclosed).
    model = args.model
    model_id = args.model_id or (Path(model).name if model and Path(model).exists() else model) or lm.name
    serve(lm, host=args.host, port=args.port, api_key=api_key, model_id=model_id, max_batch=args.max_batch,
          max_queue=args.max_queue, chat_template=args.chat_template, sock=sock, adapters=adapters,
          allow_origins=args.allow_origin or ())
    return 0


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"neoj {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what neoj is doing to stderr")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback (for a bug report) instead of one line")
    parser.add_argument("--threads", type=int, default=None, dest="cpu_threads", metavar="N",
                        help="CPU threads for the model (default: one per core, or OMP_NUM_THREADS); on a machine "
                        "busy with other work, the cores left free")


def _add_generate_command(sub) -> None:
    parser = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                            description="Generate a continuation of PROMPT and stream it to standard output.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt, or - to read standard input")
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to apply")
    add_model_args(parser)
    add_tp_arg(parser)
    add_speculative_args(parser)
    add_sampling_args(parser)
    add_constraint_args(parser)
    parser.set_defaults(func=cmd_generate)


def _add_serve_command(sub) -> None:
    parser = sub.add_parser("serve", help="serve the model over HTTP (OpenAI, HF Inference API and TGI routes)",
                            description="Serve MODEL over HTTP with continuous batching: OpenAI /v1/completions, "
                            "/v1/chat/completions, /v1/models, /v1/embeddings; the HF Inference API (POST "
                            "/models/ID and POST /); TGI /generate, /generate_stream, /info; /health, /metrics and "
                            "a playground page at /. Binds 127.0.0.1 unless --host says otherwise.",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_tp_arg(parser)
    parser.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                        help="LoRA adapter directory (PEFT format): DIR is merged into the model for every request; "
                        "NAME=DIR (repeatable) is served as model NAME, its requests batched with the base model's")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint "
                        "but /health (or set NEOJ_API_KEY)")
    parser.add_argument("--model-id", default=None, help="the id clients name the model by (default: --model)")
    parser.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. https://lite.koboldai.net, or *) call the server from "
                             "a browser (CORS; repeatable). Default: none")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting beyond the batch before new ones get 503 (default 64)")
    parser.add_argument("--chat-template", default="plain",
                        help="how chat messages become a prompt for a base model: plain (default) or dolly")
    add_speculative_args(parser)
    parser.set_defaults(func=cmd_serve)


def _add_download_command(sub) -> None:
    parser = sub.add_parser("download", help="download a checkpoint from the Hugging Face Hub into the HF cache",
                            description="Download REPO_ID (config, tokenizer, weights: safetensors when the repo "
                            "has them) into the standard Hugging Face cache, with a progress bar, and print its "
                            "directory.")
    parser.add_argument("repo_id", help="e.g. EleutherAI/gpt-neo-125m")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (e.g. float16 for GPT-J)")
    parser.set_defaults(func=cmd_download)


def _add_info_command(sub) -> None:
    parser = sub.add_parser("info", help="show a model's architecture, size and memory needs",
                            description="Show the architecture, parameter count and memory needed per dtype of "
                            "MODEL (a directory, Hub id or preset name such as gpt-j-6b). Reads only config.json.")
    parser.add_argument("model", help="checkpoint directory, Hub id, or preset (gpt-neo-125m, gpt-j-6b, ...)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens of KV cache to plan for (default: the model's whole context)")
    parser.add_argument("--batch", type=int, default=1, help="sequences at once to plan for (default 1)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size to plan for (default 128)")
    parser.add_argument("--train", action="store_true",
                        help="also plan training memory per mode (full fp32, full bf16, with checkpointing, LoRA) "
                        "for --batch blocks of --context tokens")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank to plan for with --train (default 8)")
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"],
                        help="LoRA target modules to plan for with --train (default q_proj v_proj)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_info)


def _add_quantize_command(sub) -> None:
    parser = sub.add_parser("quantize", help="write an int8 or int4 copy of a checkpoint that loads directly",
                            description="Quantize every linear layer and the LM head of MODEL (a directory or Hub "
                            "id) and write a checkpoint to OUT: safetensors shards plus quantization.json naming "
                            "the scheme. The source is read one tensor at a time, so a model larger than RAM in "
                            "full precision can be quantized. `neoj generate --model OUT` (and serve, and "
                            "neoj.load) then load it quantized, with no --quantize.")
    parser.add_argument("model", help="checkpoint directory or Hub id (full precision)")
    parser.add_argument("--out", "-o", required=True, help="new directory for the quantized checkpoint")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_quantize_args(parser, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the tensors left unquantized: embeddings, layer norms, biases "
                        "(default bfloat16)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="neoj", description="Run, serve, fine-tune and evaluate GPT-Neo and GPT-J locally.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in (_add_generate_command, _add_serve_command, _add_download_command, _add_info_command,
                        _add_quantize_command):
        add_command(sub)
    from .train.cli import add_train_commands

    add_train_commands(sub)
    from .tasks.cli import add_task_commands

    add_task_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the process exit code.

    Every error is one line on stderr, "neoj: error: ...", with exit status 1 (130 after Ctrl-C); with
    --debug the exception propagates instead, so Python prints its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="neoj: %(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it prints its own warnings: not each one twice
    if not args.command:
        parser.print_help()
        return 2
    try:
        check_text_args(args)
        set_thread_count(args.cpu_threads)
        quiet_other_ranks(args)
        return args.func(args)
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, Exception) as exc:
        if args.debug:
            raise
        if isinstance(exc, KeyboardInterrupt):
            print("\nneoj: interrupted", file=sys.stderr)
            return 130
        print(f"neoj: error: {_describe(exc)}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:  # a command that joined torchrun's processes leaves them
            from .distributed import leave_processes

            leave_processes()


def quiet_other_ranks(args) -> None:
    """Under tensor parallelism every rank runs the command and computes the same text: only rank 0 prints it
    (the others' standard output goes to /dev/null; errors still reach stderr)."""
    if getattr(args, "tp", None) and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")


def _describe(exc: Exception) -> str:
    """Returns the one-line text main prints for an exception: the message of neoj's own errors, else
    the system's reason for an I/O failure, else the exception type and a pointer to --debug."""
    if isinstance(exc, NeojError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    first_line = next(iter(str(exc).strip().splitlines()), "")
    return (f"unexpected {type(exc).__name__}: {first_line}; this is a bug in neoj: run the command again as "
            "neoj --debug ... to see where, and report it")
