"""The training subcommands of the `neoj` command line: finetune, train, merge, eval perplexity.

neoj.cli.build_parser calls add_train_commands(subparsers). Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..checks import clear_model_files, prepare_output_dir, same_directory
from ..cli_options import add_tp_arg
from ..errors import NeojError
from .checkpoint import CHECKPOINT

TRAIN_EPILOG = """data: .txt files (each one document), or .jsonl with a "text" field per line, or .jsonl with
"prompt" and "completion" fields (the loss is on the completion only). Every record is checked before
training starts. Checkpoints go to OUT/checkpoint.pt every --save-every steps; after a crash or Ctrl-C
run the same command with --resume to continue exactly where it stopped. OUT must be new or empty: a
directory with files in it is refused, unless --resume continues the run there or --overwrite is given.

multi-process: torchrun --nproc-per-node N -m neoj finetune ...   (DDP; add --fsdp to shard the model)
multi-node:    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
                        --nproc-per-node N -m neoj finetune ..."""


OVERWRITE_HELP = ("write into --out even if it already holds files: the model, adapter and training files there "
                  "(an earlier run's checkpoint included) are deleted when the command starts; other files are kept")
# What a run killed before its first checkpoint leaves in OUT: --resume may start over there.
RUN_FILES = ("train_log.jsonl",)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(args, source: str | None = None) -> None:
    """Refuses an --out that holds a user's files, before any data or model is read.

    OUT may be missing or empty; with --resume, it may be the directory of the run to continue (it holds
    checkpoint.pt, or only the log of a run killed before its first checkpoint); with --overwrite, the
    model and training files in it are deleted first. `source`, the model fine-tuned, is never OUT.
    """
    out = Path(args.out).expanduser()
    if args.resume and args.overwrite:
        raise NeojError("give --resume (continue the run in --out) or --overwrite (start a new one there), not both")
    if source is not None and same_directory(source, out):
        raise NeojError(f"--out {out} is the model being trained; write to a new directory")
    has_checkpoint = (out / CHECKPOINT).is_file()
    # One process probes a missing OUT by creating and removing it again; the processes of a torchrun job
    # check it at the same time, so there it is created and kept (the run makes it anyway).
    keep = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.resume:
        if out.is_dir() and not has_checkpoint:
            others = sorted(entry.name for entry in out.iterdir()
                            if entry.name not in RUN_FILES and ".tmp." not in entry.name)
            if others:
                raise NeojError(f"--out {out} holds no {CHECKPOINT} to resume from, but other files "
                                f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); give the directory "
                                "of the run to continue, or drop --resume and choose a new directory")
        prepare_output_dir(out, overwrite=True, create=keep)  # only that it can be written
        return
    if has_checkpoint and not args.overwrite:
        raise NeojError(f"--out {out} holds an earlier training run ({CHECKPOINT}); pass --resume to continue it, "
                        "or --overwrite to start a new run there (nothing was written)")
    prepare_output_dir(out, overwrite=args.overwrite, create=keep)
    if args.overwrite:  # every process: each must find no checkpoint.pt when its Trainer starts
        clear_model_files(out)


def _add_run_args(parser: argparse.ArgumentParser, lr: float, weight_decay: float, beta2: float) -> None:
    parser.add_argument("--data", "-d", nargs="+", required=True, metavar="FILE", help="training data files")
    parser.add_argument("--out", "-o", required=True, help="output directory (model, checkpoints, logs)")
    parser.add_argument("--val-data", nargs="+", default=None, metavar="FILE",
                        help="validation files (default: hold out --val-fraction of the documents)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="documents held out for validation (0.05)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: context, at most 1024)")
    parser.add_argument("--batch-size", "-b", type=int, default=8, help="blocks per micro-batch per process (8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (1)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate ({lr:g})")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of the peak (0.1)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default 5%% of steps, <= 100)")
    parser.add_argument("--weight-decay", type=float, default=weight_decay,
                        help=f"AdamW weight decay ({weight_decay:g})")
    parser.add_argument("--adam-beta2", type=float, default=beta2, help=f"AdamW beta2 ({beta2:g})")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (1.0; 0 = off)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order, split and init (0)")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (500; 0 = at the end)")
    parser.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default --save-every)")
    parser.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per periodic check (64; "
                        "the final check uses all)")
    parser.add_argument("--log-every", type=int, default=10, help="write OUT/train_log.jsonl every N steps (10)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--autocast", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters across processes (torchrun) with FSDP")
    parser.add_argument("--save-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved weights (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    g.add_argument("--lora-r", type=int, default=8, help="rank (8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="scale numerator: update * alpha / r (16)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input (0.05)")
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"], metavar="NAME",
                   help="linear layers to adapt, by name suffix (q_proj v_proj; also k_proj, out_proj, c_fc, ...)")


def _train_args(args, model=None, config=None):
    from .args import TrainArgs

    return TrainArgs(
        data=args.data, out=args.out, model=model, config=config, val_data=args.val_data,
        val_fraction=args.val_fraction, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        adam_betas=(0.9, args.adam_beta2), clip=args.clip, grad_checkpointing=args.grad_checkpointing,
        seed=args.seed, save_every=args.save_every, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
        log_every=args.log_every, resume=args.resume, device=args.device, autocast=args.autocast,
        fsdp=args.fsdp, lora=getattr(args, "lora", False), lora_r=getattr(args, "lora_r", 8),
        lora_alpha=getattr(args, "lora_alpha", 16.0), lora_dropout=getattr(args, "lora_dropout", 0.05),
        lora_targets=getattr(args, "lora_targets", ["q_proj", "v_proj"]), save_dtype=args.save_dtype,
        progress=not args.no_progress,
    )


def _printer(args):
    """Returns the event callback that reports a run on stderr."""
    def on_event(event: dict) -> None:
        if not _is_main():
            return
        from tqdm.auto import tqdm

        kind = event["event"]
        if kind == "start":
            tqdm.write(f"neoj: {event['train_blocks']} training blocks of {event['seq_len']} tokens, "
                       f"{event['val_blocks']} validation blocks; global batch {event['global_batch']}; "
                       f"{event['trainable_parameters']:,} trainable parameters; "
                       f"step {event['step']} of {event['max_steps']}", file=sys.stderr)
        elif kind == "eval":
            label = "final validation" if event.get("final") else "validation"
            tqdm.write(f"neoj: step {event['step']}: {label} loss {event['val_loss']:.4f}, "
                       f"perplexity {event['val_perplexity']:.3f}", file=sys.stderr)
        elif kind == "checkpoint_failed":
            tqdm.write(f"neoj: warning: {event['error']}; the previous checkpoint is intact", file=sys.stderr)
    return on_event


def _run(args, model=None, config=None) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .loop import train

    result = train(_train_args(args, model=model, config=config), on_event=_printer(args))
    if not _is_main():
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"neoj: interrupted at step {result.step} of {result.max_steps}; checkpoint saved in {result.out}. "
              "Run the same command with --resume to continue.", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        val = (f", validation loss {result.val_loss:.4f} (perplexity {result.val_perplexity:.3f})"
               if result.val_loss is not None else "")
        # A resumed run that was already finished takes no step, so has no training loss of its own.
        loss = f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no step left to take"
        print(f"trained {result.step} steps ({result.tokens:,} tokens) in {result.wall_seconds:.0f} s: "
              f"{loss}{val}. Model written to {result.out}")
    return 0


def cmd_finetune(args) -> int:
    model = args.model
    if model is None:
        from ..api import builtin_model_dir

        builtin = builtin_model_dir()
        if builtin is None:
            raise NeojError("give --model: this install has no built-in model to fine-tune")
        model = str(builtin)
    prepare_run_dir(args, source=model)
    return _run(args, model=model)


def cmd_train(args) -> int:
    prepare_run_dir(args)
    return _run(args, config=args.config)


def cmd_merge(args) -> int:
    from .merge import merge_adapter

    merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base}: written to {args.out}")
    return 0


def cmd_eval_perplexity(args) -> int:
    from ..api import load
    from .evaluate import file_tokens, perplexity

    # Under --tp every rank computes the same perplexity; neoj.cli keeps the other ranks' output quiet.
    lm = load(args.model, dtype="auto" if args.quantize else args.dtype, device=args.device, adapter=args.adapter,
              quantize=args.quantize, group_size=args.group_size, tp=args.tp)
    ids, weights = file_tokens(args.data, lm.tokenizer)
    result = perplexity(lm.model, ids, weights, max_length=args.max_length, stride=args.stride,
                        progress=not args.no_progress)
    result = {"model": args.model or "builtin", "data": args.data, **result}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens "
              f"(loss {result['nll']:.4f}, window {result['max_length']}, stride {result['stride']})")
    return 0


def add_train_commands(sub) -> None:
    """Registers finetune, train, merge and eval on the `neoj` subcommand parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = sub.add_parser("finetune", help="fine-tune a model on your text (full or LoRA), resumable",
                            description="Fine-tune MODEL on data files. Writes a transformers-format checkpoint "
                            "(or, with --lora, a PEFT adapter) to OUT.", epilog=TRAIN_EPILOG, formatter_class=fmt)
    parser.add_argument("--model", "-m", default=None, help="checkpoint directory or Hub id (default: built-in model)")
    _add_run_args(parser, lr=5e-5, weight_decay=0.0, beta2=0.999)
    _add_lora_args(parser)
    parser.set_defaults(func=cmd_finetune)

    parser = sub.add_parser("train", help="train a model from random weights",
                            description="Train a model of a preset shape or config.json from random initialisation, "
                            "with the same loop as finetune.", epilog=TRAIN_EPILOG, formatter_class=fmt)
    parser.add_argument("--config", "-c", required=True, help="preset (gpt-neo-125m, ...) or config.json path")
    _add_run_args(parser, lr=6e-4, weight_decay=0.1, beta2=0.95)
    parser.set_defaults(func=cmd_train)

    parser = sub.add_parser("merge", help="fold a LoRA adapter into a model's weights",
                            description="Write BASE with the LoRA ADAPTER merged in, as a plain checkpoint.")
    parser.add_argument("base", help="base model: checkpoint directory or Hub id")
    parser.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", "-o", required=True, help="new directory for the merged model")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it already holds files: the model, adapter and training files "
                        "there are deleted before the merged model is written (other files are kept)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written weights (default: the base checkpoint's)")
    parser.set_defaults(func=cmd_merge)

    parser = sub.add_parser("eval", help="evaluate a model (perplexity)", description="Evaluate a model.")
    esub = parser.add_subparsers(dest="eval_command", metavar="METRIC", required=True)
    e = esub.add_parser("perplexity", help="sliding-window perplexity over text files",
                        description="Perplexity of MODEL over data files (documents joined by <|endoftext|>), "
                        "scored with a sliding window: each window of --max-length tokens scores the tokens "
                        "not scored before, with the rest as context.")
    e.add_argument("--model", "-m", default=None, help="checkpoint directory or Hub id (default: built-in)")
    e.add_argument("--adapter", default=None, help="LoRA adapter directory to apply")
    e.add_argument("--data", "-d", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl files")
    e.add_argument("--max-length", type=int, default=None, help="window length (default: the model's context)")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default half a window)")
    e.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    e.add_argument("--quantize", "-q", default=None, choices=["int8", "int4"],
                   help="evaluate the model quantized (computing in bfloat16), to measure what quantizing costs")
    e.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group size (128)")
    add_tp_arg(e)
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval_perplexity)
