#!/usr/bin/env python
"""Batch jobs across processes: `neoj batch` end to end on one process against torchrun ranks on one machine.

Both setups run the same command line on the same generated prompts file, each run to a fresh output:

  * 1 process:  python -m neoj --threads R*T batch --model M -i prompts.jsonl -o out.jsonl ...
  * R ranks:    python -m torch.distributed.run --standalone --nproc-per-node R -m neoj --threads T batch ...

so both use R*T CPU threads in all (default R=2, T=1). Each run is timed from launch to exit: Python and torch
start-up, model load, rendezvous, generation, and rank 0's wait and merge. The setups alternate (their order
flips every repeat, after one untimed warm-up run of each), and the table shows medians. With --seed the
output must not depend on the number of ranks: every run's output is compared byte for byte with the first.

    python bench/bench_batch_ranks.py                  # prints the section (16 records, -n 32, 3 repeats)
    python bench/bench_batch_ranks.py --write          # ... and writes it into BENCHMARKS.md
    python bench/bench_batch_ranks.py --records 4 --tokens 4 --repeats 1   # smoke test
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_batch_ranks`
from report import REPO, cpu_description, date_line, loadavg, logger  # noqa: E402
from report import section_markers, shared_note, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_batch_ranks")
RUN_TIMEOUT_S = 3600
log = logger("bench_batch_ranks")

TOPICS = ("the sea", "a library", "winter mornings", "an old bridge", "trains", "a garden", "the moon", "bread")


def write_prompts(path: Path, records: int) -> None:
    """Writes `records` prompts with ids to a JSONL file, the way a user's batch input looks."""
    with open(path, "w") as f:
        for i in range(records):
            prompt = f"Write one sentence about {TOPICS[i % len(TOPICS)]} (note {i}):"
            f.write(json.dumps({"id": f"rec-{i}", "prompt": prompt}) + "\n")


def command(args, ranks: int, inp: Path, out: Path, tokens: int) -> list[str]:
    """Returns the command line of one run: one process with ranks*threads threads, or torchrun with `ranks`."""
    threads = args.threads_per_rank if ranks > 1 else args.threads_per_rank * args.ranks
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "neoj", "--threads", str(threads), "batch", "--model", args.model, "--dtype", args.dtype,
            "--device", "cpu", "-i", str(inp), "-o", str(out), "--no-progress", "-n", str(tokens), "--seed",
            str(args.seed), "--temperature", str(args.temperature), "--batch-size", str(args.batch_size)]


def run_once(args, ranks: int, inp: Path, out: Path, tokens: int | None = None) -> float:
    """Runs `neoj batch` once into a fresh output; returns its wall time in seconds."""
    cmd = command(args, ranks, inp, out, tokens or args.tokens)
    threads = cmd[cmd.index("--threads") + 1]
    env = {**os.environ, "OMP_NUM_THREADS": threads}  # torchrun would set 1 itself; the single process gets its own
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"bench_batch_ranks: {' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    if not out.is_file():
        raise SystemExit(f"bench_batch_ranks: {' '.join(cmd)} wrote no {out}:\n{run.stderr[-3000:]}")
    return seconds


def completion_tokens(path: Path) -> int:
    """Returns the tokens generated in a batch output (the sum of its completion_tokens)."""
    return sum(json.loads(line).get("completion_tokens", 0) for line in path.read_text().splitlines() if line)


def measure(args) -> dict:
    """Runs both setups, alternating, --repeats times each; returns their wall times and how the outputs compare."""
    setups = (1, args.ranks)
    times: dict[int, list[float]] = {n: [] for n in setups}
    with tempfile.TemporaryDirectory(prefix="bench-batch-ranks-") as tmp:
        tmp = Path(tmp)
        inp = tmp / "prompts.jsonl"
        write_prompts(inp, args.records)
        warm = tmp / "warm.jsonl"
        write_prompts(warm, min(args.records, 2 * args.ranks))
        for n in setups:  # untimed: the first start pays for cold caches (files, compiled kernels)
            log(f"warm-up: {label(n, args)}")
            run_once(args, n, warm, tmp / f"warm-{n}.jsonl", tokens=2)
        reference: bytes | None = None
        identical, runs = True, 0
        for r in range(args.repeats):
            for n in setups if r % 2 == 0 else setups[::-1]:
                out = tmp / f"out-{n}-{r}.jsonl"
                seconds = run_once(args, n, inp, out)
                data = out.read_bytes()
                if reference is None:
                    reference, tokens = data, completion_tokens(out)
                same = data == reference
                identical &= same
                runs += 1
                times[n].append(seconds)
                log(f"repeat {r + 1}/{args.repeats}, {label(n, args)}: {seconds:.2f} s, "
                    f"{args.records / seconds:.2f} records/s{'' if same else ', OUTPUT DIFFERS from the first run'}")
                out.unlink()
    return {"times": times, "identical": identical, "runs": runs, "tokens": tokens}


def label(ranks: int, args) -> str:
    """Returns the table's name of a setup."""
    if ranks == 1:
        return f"1 process, --threads {args.ranks * args.threads_per_rank}"
    return f"torchrun, {ranks} ranks, --threads {args.threads_per_rank} each"


def render(args, result: dict, load: str) -> str:
    """Returns the section of BENCHMARKS.md: machine, date, command, one row per setup, whether outputs matched."""
    model, isa = cpu_description()
    argv = " ".join(sys.argv[1:])
    times = result["times"]
    base = statistics.median(times[1])
    lines = [SECTION_BEGIN, "## Batch jobs across processes: `neoj batch` on one process vs torchrun ranks (CPU)", "",
             f"- Machine: {platform.machine()}, {model}, {os.cpu_count()} cores, ISA: {isa or '?'}; load average at "
             f"start {load}",
             date_line(),
             f"- Command: `python bench/bench_batch_ranks.py{(' ' + argv) if argv else ''}`",
             *shared_note(load, "the times carry that noise; the setups alternated, so their ratio carries less "
                          "of it."),
             f"- `neoj batch --model {args.model} --dtype {args.dtype} -n {args.tokens} --seed {args.seed} "
             f"--temperature {args.temperature:g} --batch-size {args.batch_size}` over {args.records} prompts "
             f"({result['tokens']} tokens generated in all). Wall time from launch to exit (start-up, model load, "
             f"rendezvous, generation, merge), median of {args.repeats} run{'s' if args.repeats > 1 else ''} per "
             "setup, the setups alternating after one untimed warm-up run each; every run writes a fresh output.", "",
             "| setup | processes x threads | wall time (s) | records/s | tokens/s | vs 1 process | runs (s) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for n, runs in times.items():
        wall = statistics.median(runs)
        threads = args.threads_per_rank if n > 1 else args.ranks * args.threads_per_rank
        lines.append(f"| {label(n, args)} | {n} x {threads} | {wall:.2f} | {args.records / wall:.2f} | "
                     f"{result['tokens'] / wall:.1f} | {base / wall:.2f}x | {', '.join(f'{t:.2f}' for t in runs)} |")
    verdict = "yes" if result["identical"] else "**no**"
    lines += ["", f"- Outputs byte-identical across all {result['runs']} timed runs (both setups): {verdict}.",
              "- Every rank loads its own copy of the model and takes every R-th record, so on one machine the ranks "
              "share its cores and memory bandwidth; the ratio shows what splitting the records over processes costs "
              "or gains there against one process with as many threads.", SECTION_END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin", help="model to load (default builtin)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or auto")
    parser.add_argument("--records", type=int, default=16, help="prompts in the generated input (default 16)")
    parser.add_argument("--tokens", "-n", type=int, default=32, help="new tokens per record (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each setup (default 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="neoj batch --batch-size (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="neoj batch --seed (default 1)")
    parser.add_argument("--temperature", type=float, default=0.8, help="neoj batch --temperature (default 0.8)")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="--threads of each rank (default 1); the single process gets ranks times as many")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md (else print it)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="the file --write updates")
    args = parser.parse_args(argv)
    if min(args.records, args.tokens, args.repeats, args.batch_size, args.threads_per_rank) < 1 or args.ranks < 2:
        parser.error("--records, --tokens, --repeats, --batch-size and --threads-per-rank must be at least 1, "
                     "--ranks at least 2")
    load = loadavg()
    text = render(args, measure(args), load)
    write_section(args.out if args.write else "-", text, SECTION_BEGIN, SECTION_END, log)


if __name__ == "__main__":
    main()
