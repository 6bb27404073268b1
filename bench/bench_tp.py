#!/usr/bin/env python
"""Tensor parallelism: decode tokens/s and prefill time of one model split over N processes, against one process.

CPU (default): a random GPT-Neo-125M (`--model random:gpt-neo-125m`, float32) run plain in one process with
every thread the split runs use, and split over `--tp` processes (torchrun, gloo) with `--threads-per-rank` threads
each. GPU (`--device cuda`): plain, then `--tp 1` (the split code path with nothing to split: its overhead), then
every `--tp` N that fits the GPUs there are (NCCL).

Each setup runs in processes of its own (this script with --worker, under torchrun for N > 1): it loads the model,
warms up, then per repeat times a prefill (generate one token after a `--prompt-tokens`-token prompt) and a greedy
generation of `--new-tokens` tokens (no stop at end-of-text); decode tokens/s = (new tokens - 1) / (generation
time - prefill time). Medians of `--repeats`.

    python bench/bench_tp.py                          # writes the bench_tp section of BENCHMARKS.md
    python bench/bench_tp.py --quick --out -          # smoke test, prints the section
    python bench/bench_tp.py --device cuda --model random:gpt-j-6b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_tp`
from report import (REPO, cpu_description, date_line, loadavg, logger, section_markers, shared_note,  # noqa: E402
                    write_section)

SECTION_BEGIN, SECTION_END = section_markers("bench_tp")
RUN_TIMEOUT_S = 3600
log = logger("bench_tp")


# ---------------------------------------------------------------------------------------------
# The worker: one setup, in this process (and its torchrun peers)


def worker(args) -> None:
    """Loads the model as the setup says, times prefill and decode; rank 0 writes the medians to args.result."""
    import neoj  # before torch: neoj sets its OpenMP wait policy first

    import torch

    torch.set_num_threads(args.threads)
    tp = None if args.setup == "plain" else args.setup_tp
    lm = neoj.load(args.model, dtype=args.dtype, device=args.device, tp=tp)
    lm.prefix_cache = None  # every repeat prefills its prompt
    prompt = lm.tokenizer.decode([(17 * i + 5) % 50000 for i in range(args.prompt_tokens)])
    options = dict(temperature=0, stop_at_eos=False)

    def timed(tokens: int) -> float:
        sync(lm.device)
        start = time.perf_counter()
        lm.generate(prompt, max_new_tokens=tokens, **options)
        sync(lm.device)
        return time.perf_counter() - start

    timed(2), timed(args.new_tokens)  # warm-up: kernels chosen, compiled, caches allocated
    prefill, decode = [], []
    for _ in range(args.repeats):
        first = timed(1)
        whole = timed(args.new_tokens)
        prefill.append(first)
        decode.append((args.new_tokens - 1) / max(whole - first, 1e-9))
    tensor_parallel = getattr(lm.model, "tensor_parallel", None)
    if tensor_parallel is None or tensor_parallel.main:
        Path(args.result).write_text(json.dumps({
            "prefill_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_all": prefill, "decode_all": decode, "params": lm.model.num_parameters(),
            "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device), "repr": repr(lm)}))
    if tensor_parallel is not None and tensor_parallel.world > 1:
        from neoj.distributed import leave_processes

        leave_processes()


def sync(device) -> None:
    """Waits for the GPU's queued work (a no-op on the CPU), so wall times measure it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The parent: one worker launch per setup


def setups(args) -> list[tuple[str, int, int]]:
    """Returns (setup, processes, threads per process) to run: plain, [tp 1 on a GPU], then each --tp."""
    out = [("plain", 1, args.threads_per_rank * max(args.tp) if args.device == "cpu" else args.threads_per_rank)]
    if args.device != "cpu":
        out.append(("tp", 1, args.threads_per_rank))
        gpus = cuda_device_count()
        out += [("tp", n, args.threads_per_rank) for n in args.tp if 1 < n <= gpus]
    else:
        out += [("tp", n, args.threads_per_rank) for n in args.tp if n > 1]
    return out


def cuda_device_count() -> int:
    """Returns the number of GPUs, asked in a child process (the parent never imports torch)."""
    code = "import torch; print(torch.cuda.device_count())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return int(run.stdout.strip() or 0)


def launch(args, setup: str, processes: int, threads: int) -> dict:
    """Runs one setup's worker (under torchrun for more than one process); returns what it measured."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker_args = [str(Path(__file__).resolve()), "--worker", "--setup", setup, "--setup-tp", str(processes),
                       "--threads", str(threads), "--result", str(result), "--model", args.model, "--dtype",
                       args.dtype, "--device", args.device, "--prompt-tokens", str(args.prompt_tokens),
                       "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        if setup == "tp" and processes > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   *worker_args]
        else:
            cmd = [sys.executable, *worker_args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log(f"{setup} x{processes}, {threads} thread(s) each: {' '.join(cmd[1:4])} ...")
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
        if run.returncode != 0:
            raise SystemExit(f"bench_tp: the {setup} x{processes} run failed:\n{run.stderr[-3000:]}")
        out = json.loads(result.read_text())
    log(f"  prefill {out['prefill_s'] * 1000:.1f} ms, decode {out['decode_tok_s']:.1f} tok/s ({out['repr']})")
    return out


def label(setup: str, processes: int) -> str:
    """Returns the table's name of a setup."""
    return "plain (one process, no split)" if setup == "plain" else f"--tp {processes}"


def render(args, runs: list[tuple[tuple[str, int, int], dict]], load: str) -> str:
    """Returns the bench_tp section of BENCHMARKS.md: machine, date, command, then one row per setup."""
    model, isa = cpu_description()
    argv = " ".join(sys.argv[1:])
    where = "CPU, gloo" if args.device == "cpu" else "GPU, NCCL"
    base = runs[0][1]  # plain
    lines = [SECTION_BEGIN, f"## Tensor parallelism: decode tokens/s and prefill, split over processes ({where})", "",
             f"- Machine: {platform.machine()}, {model}, {os.cpu_count()} cores, ISA: {isa}; load average at start "
             f"{load}" + (f"; {base['device']}" if args.device != "cpu" else ""),
             date_line(),
             f"- Command: `python bench/bench_tp.py{(' ' + argv) if argv else ''}`",
             *shared_note(load, "the setups ran one after the other, so their times and ratios both carry that "
                          "noise."),
             f"- Model: {args.model} ({base['params'] / 1e6:.0f}M parameters in one process), {base['dtype']}. "
             f"Prompt of {args.prompt_tokens} tokens, greedy, {args.new_tokens} new tokens, no prefix cache; "
             f"medians of {args.repeats} repeats after a warm-up. Decode tokens/s = (new tokens - 1) / (generation "
             "time - prefill time); prefill = the time to generate one token. Each split process holds 1/N of every "
             "layer and exchanges two all-reduces per layer and one all-gather of the logits per step.", "",
             "| setup | processes x threads | prefill (ms) | decode (tok/s) | decode vs plain | prefill vs plain |",
             "|---|---:|---:|---:|---:|---:|"]
    for (setup, processes, threads), out in runs:
        lines.append(f"| {label(setup, processes)} | {processes} x {threads} | {out['prefill_s'] * 1000:.1f} | "
                     f"{out['decode_tok_s']:.1f} | {out['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                     f"{base['prefill_s'] / out['prefill_s']:.2f}x |")
    if args.device == "cpu":
        lines += ["", "- On one CPU the split processes share its cores and memory bandwidth: the split gains nothing "
                  "there but smaller matrices per process and pays for every collective, so these rows measure that "
                  "overhead. Tensor parallelism is for a model that does not fit one device, or for several GPUs."]
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:gpt-neo-125m", help="model to load (default random:gpt-neo-125m)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--tp", type=int, nargs="+", default=[2], help="process counts to split over (default 2)")
    parser.add_argument("--threads-per-rank", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="CPU threads per split process (default: half the cores); plain gets tp times as many")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke test: 16-token prompt, 8 new tokens, 1 repeat")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update, or - to print")
    # the worker's own arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--setup-tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = 16, 8, 1
    load = loadavg()
    runs = [(s, launch(args, *s)) for s in setups(args)]
    write_section(args.out, render(args, runs, load), SECTION_BEGIN, SECTION_END, log)


if __name__ == "__main__":
    main()
