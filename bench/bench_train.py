#!/usr/bin/env python
"""Training benchmark: tokens/s of one training step, neoj against transformers' Trainer, in one run.

Both train the GPT-Neo-125M shape from random weights in float32 on CPU with the same batch size,
sequence length, optimizer (torch AdamW) and gradient clipping (1.0), on the same random token blocks.
Each implementation runs in its own fresh process so its peak RSS (VmHWM) is its own:

  * neoj: the `neoj train` loop (neoj.train.loop.Trainer.train_step: fused LM-head loss, AdamW, clipping),
  * transformers: Trainer.train() on GPTNeoForCausalLM (full logits, torch AdamW, max_grad_norm 1.0).

The first step of each is a warm-up and is not timed. Results go into a marked section of BENCHMARKS.md.

    python bench/bench_train.py             # full run (batch 4 x 512 tokens, 4 timed steps; ~15 min on 2 cores)
    python bench/bench_train.py --quick     # smoke test (batch 1 x 64 tokens, 2 steps), prints the section
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_train`
from report import REPO, logger, section_markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_train")
RESULT_TAG = "BENCH_RESULT "
SHAPE = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 768,
         "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]], "window_size": 256}


log = logger("bench_train")


def peak_rss() -> int:
    """Returns this process's peak resident set size in bytes (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def blocks(n: int, seq_len: int, seed: int = 0):
    import torch

    return torch.randint(0, 50257, (n, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Workers (each in a fresh process)


def worker_neoj(cfg: dict) -> dict:
    import torch

    from neoj.train.loop import TrainArgs, Trainer

    torch.set_num_threads(cfg["threads"])
    tmp = Path(cfg["tmp"]) / "neoj"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(SHAPE))
    data = tmp / "data.txt"
    data.write_text("x")  # replaced by random blocks below: only the loop is measured
    steps = cfg["steps"] + 1
    args = TrainArgs(data=[str(data)], out=str(tmp / "out"), config=str(tmp / "config.json"),
                     seq_len=cfg["seq_len"], batch_size=cfg["batch"], max_steps=steps, lr=5e-5, warmup_steps=0,
                     weight_decay=0.0, clip=1.0, save_every=0, progress=False, val_fraction=0, device="cpu",
                     autocast="off")
    trainer = Trainer(args)
    from neoj.train.data import BlockOrder, Blocks

    ids = blocks(cfg["batch"] * steps, cfg["seq_len"])
    trainer.data.train = Blocks(ids, torch.ones_like(ids, dtype=torch.uint8))
    trainer.order = BlockOrder(len(ids), 0, shuffle=False)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = trainer.train_step()
        times.append(time.perf_counter() - t)
    return {"impl": "neoj", "step_seconds": times[1:], "loss": loss, "peak_rss": peak_rss()}


def worker_transformers(cfg: dict) -> dict:
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    shape = {k: v for k, v in SHAPE.items() if k != "model_type"}
    model = GPTNeoForCausalLM(GPTNeoConfig(**shape))
    steps = cfg["steps"] + 1
    ids = blocks(cfg["batch"] * steps, cfg["seq_len"])

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    times, start = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            start[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - start[0])

    targs = TrainingArguments(
        output_dir=str(Path(cfg["tmp"]) / "hf"), per_device_train_batch_size=cfg["batch"], max_steps=steps,
        learning_rate=5e-5, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        lr_scheduler_type="cosine", use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Data(), callbacks=[Timer()])
    out = trainer.train()
    return {"impl": "transformers", "step_seconds": times[1:], "loss": out.training_loss, "peak_rss": peak_rss()}


# ---------------------------------------------------------------------------------------------
# Orchestration and the table


def run_worker(impl: str, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps({**cfg, "impl": impl})]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    log(f"{impl}: batch {cfg['batch']} x {cfg['seq_len']} tokens, {cfg['steps']} timed steps")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            tokens = cfg["batch"] * cfg["seq_len"]
            res["tokens_per_s"] = tokens * len(res["step_seconds"]) / sum(res["step_seconds"])
            log(f"{impl}: {res['tokens_per_s']:.1f} tokens/s, peak RSS {res['peak_rss'] / 2**30:.2f} GiB")
            return res
    raise SystemExit(f"{impl} worker failed:\n{proc.stderr[-4000:]}")


def section(cfg: dict, results: dict[str, dict]) -> str:
    n, t = results["neoj"], results["transformers"]
    ratio = n["tokens_per_s"] / t["tokens_per_s"]
    import torch
    import transformers

    lines = [
        SECTION_BEGIN,
        "## Training throughput (bench/bench_train.py)",
        "",
        f"GPT-Neo-125M shape, random init, float32 on CPU, batch {cfg['batch']} x {cfg['seq_len']} tokens, "
        f"{cfg['steps']} timed steps after 1 warm-up step, {cfg['threads']} threads, each implementation in a fresh "
        f"process. Same data, AdamW, clipping 1.0.{' **Quick mode** (smoke test, not a measurement).' if cfg['quick'] else ''}",
        "",
        "| implementation | tokens/s | s/step | peak RSS |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in (("neoj (`neoj train` loop)", n), ("transformers Trainer", t)):
        sps = sum(r["step_seconds"]) / len(r["step_seconds"])
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {sps:.2f} | {r['peak_rss'] / 2**30:.2f} GiB |")
    lines += [
        "",
        f"neoj / transformers tokens/s: **{ratio:.2f}x**; peak RSS {n['peak_rss'] / t['peak_rss']:.2f}x.",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "- neoj computes the LM head and cross-entropy chunk by chunk (never all the logits at once), which is "
        "where most of its memory saving comes from at 50257 vocabulary entries.",
        f"- Command: `python bench/bench_train.py{' --quick' if cfg['quick'] else ''} --batch {cfg['batch']} "
        f"--seq-len {cfg['seq_len']} --steps {cfg['steps']} --threads {cfg['threads']}`",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (prints the section)")
    p.add_argument("--batch", type=int, default=None, help="blocks per step (default 4; --quick 1)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default 512; --quick 64)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 4; --quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=None, help="markdown file to write the section into (default BENCHMARKS.md; "
                   "--quick: '-' = stdout)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        fn = worker_neoj if cfg["impl"] == "neoj" else worker_transformers
        print(RESULT_TAG + json.dumps(fn(cfg)), flush=True)
        return
    import tempfile

    q = args.quick
    cfg = {"batch": args.batch or (1 if q else 4), "seq_len": args.seq_len or (64 if q else 512),
           "steps": args.steps or (2 if q else 4), "threads": args.threads, "quick": q}
    with tempfile.TemporaryDirectory() as tmp:
        cfg["tmp"] = tmp
        results = {impl: run_worker(impl, cfg) for impl in ("neoj", "transformers")}
    write_section(args.out or ("-" if q else str(REPO / "BENCHMARKS.md")), section(cfg, results), SECTION_BEGIN,
                  SECTION_END, log)


if __name__ == "__main__":
    main()
