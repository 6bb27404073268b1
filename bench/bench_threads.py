"""How many CPU threads, and which OpenMP wait policy, decode fastest: alone, and beside other work.

A user's machine is rarely idle. With as many threads as cores, every parallel region of a decode step
(a few hundred per token) ends at a barrier that waits for the slowest thread; when another program holds
one of the cores, that thread is descheduled and the barrier waits a scheduler time slice. This script
measures it: greedy decode tokens/s of `neoj generate`'s path for each thread setting, on an idle machine
and with N busy processes beside it (plain Python loops, one per core it takes), interleaved over rounds,
each measurement in a fresh process (OMP_* variables are read once, when the OpenMP runtime starts).

    python bench/bench_threads.py                 # writes the bench_threads section of BENCHMARKS.md
    python bench/bench_threads.py --quick --out -  # smoke test, prints the section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# report.py (also under `python -m bench.bench_threads`); it imports neither neoj nor torch, so the worker still
# imports neoj first.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_flags, date_line, section_markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_threads")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")  # listed on the Machine line
# name -> environment of the measuring process
SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads, OMP_WAIT_POLICY=ACTIVE (always spin)": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "neoj's default": {},
}


def worker(model: str, tokens: int) -> None:
    """Runs in a fresh process: loads MODEL in float32 and prints decode tokens/s and the threads used."""
    import neoj  # first, as `neoj` itself does: it sets its OpenMP policy before torch starts

    import torch

    lm = neoj.load(model, dtype="float32")
    lm.generate("The list type", max_new_tokens=8, temperature=0, stop_at_eos=False)  # warm-up
    start = time.perf_counter()
    lm.generate("The list type", max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": tokens / seconds, "threads": torch.get_num_threads()}))


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def measure(model: str, tokens: int, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, __file__, "--worker", model, "--tokens", str(tokens)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(args) -> dict:
    results: dict = {}
    for r in range(args.rounds):
        for model in args.models:
            for busy in (0, args.busy):
                others = busy_processes(busy)
                try:
                    for name, env in SETTINGS.items():
                        got = measure(model, args.tokens, env)
                        results.setdefault((model, busy, name), []).append(got)
                        print(f"round {r + 1}: {model}, {busy} busy, {name}: {got['tokens_per_s']:.1f} tok/s "
                              f"({got['threads']} threads)", file=sys.stderr)
                finally:
                    for p in others:
                        p.kill()
                        p.wait()
    return results


def section(results: dict, args) -> str:
    quick = " --quick" if args.quick else ""
    lines = [SECTION_BEGIN, "## Threads on a shared machine: decode tokens/s by thread setting (CPU)", "",
             f"- Machine: {platform.machine()}, {os.cpu_count()} cores, ISA: "
             f"{' '.join(cpu_flags(FLAGS)) or platform.machine()}; load average at start {os.getloadavg()[0]:.2f}",
             date_line(),
             f"- Command: `python bench/bench_threads.py{quick}`",
             f"- Greedy decode of {args.tokens} tokens (float32), each in a fresh process, median of {args.rounds} "
             f"interleaved rounds; 'busy' = {args.busy} plain Python loop(s) running beside it, as another "
             "program would. Ratio: against 1 thread in the same conditions.", "",
             "| model | other work | setting | threads | tokens/s | vs 1 thread |",
             "|---|---|---|---:|---:|---:|"]
    for model in args.models:
        for busy in (0, args.busy):
            base = statistics.median(x["tokens_per_s"] for x in results[(model, busy, "1 thread")])
            for name in SETTINGS:
                runs = results[(model, busy, name)]
                tps = statistics.median(x["tokens_per_s"] for x in runs)
                lines.append(f"| {model} | {'idle' if not busy else f'{busy} busy'} | {name} | {runs[0]['threads']} | "
                             f"{tps:.1f} | {tps / base:.2f}x |")
    lines += ["", "neoj's default: one thread per core; when it is imported (before torch) neoj watches the CPUs "
              "for 50 ms and asks for OpenMP threads that sleep at a barrier (OMP_WAIT_POLICY=PASSIVE) only if "
              "other work holds about a core, else it leaves libgomp's default (a short spin, then sleep); a policy "
              "the user set wins. `--threads N` (or OMP_NUM_THREADS) sets the count.", SECTION_END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["builtin", "random:gpt-neo-125m"])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per measurement (64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--busy", type=int, default=1, help="busy processes in the loaded condition (1)")
    parser.add_argument("--quick", action="store_true", help="builtin model, 16 tokens, 1 round")
    parser.add_argument("--out", default="BENCHMARKS.md", help="file to write the section to (- prints it)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.tokens)
        return
    if args.quick:
        args.models, args.tokens, args.rounds = ["builtin"], 16, 1
    write_section(args.out, section(run(args), args), SECTION_BEGIN, SECTION_END)


if __name__ == "__main__":
    main()
