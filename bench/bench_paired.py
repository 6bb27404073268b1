#!/usr/bin/env python
"""Paired decode: neoj against CTranslate2 in alternating bursts of two live processes (GPT-J arch, CPU).

bench_portable runs each configuration in a process of its own, a minute or more apart; on a shared machine
the memory bandwidth moves by 1.5x within minutes, more than the margins its targets ask about. Here the two
engines stay loaded side by side, each in its own process held to the same ISA, and take turns: a burst of
greedy decode in one, then the same in the other (the order swapped every pair), while the waiting one idles.
Each adjacent pair gives a ratio; the table reports the median ratio, its quartiles, and each engine's median
tokens/s. Same checkpoints and engines as bench_portable (its --workdir); writes a marked section of
BENCHMARKS.md.

    python bench/bench_paired.py                    # AVX2 (held) and this CPU's best; fp32 and int8; batch 1, 8
    python bench/bench_paired.py --isa avx2 --bursts 16
    python bench/bench_paired.py --quick --out -    # smoke test: 2-layer models, 2 bursts, prints the section
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -m bench.bench_paired`
import bench_portable as portable  # noqa: E402
from report import REPO, cpu_description, loadavg, logger, section_markers, write_section  # noqa: E402

log = logger("bench_paired")
PAIRS = (("fp32", "float32"), ("int8", "int8"))  # (neoj weights, CTranslate2 compute type)
READY = "READY"
IDLE_S = 0.3  # between bursts: a process's OpenMP threads stop spinning before the other one starts


def serve(spec: dict) -> None:
    """Worker: loads one engine, then answers "rows tokens" lines on stdin with a decode rate, until EOF."""
    if spec["engine"] == "neoj":  # before torch: neoj's threading default, as its command line gets it
        importlib.import_module("neoj")
    import torch

    torch.set_num_threads(spec["threads"])
    runner = portable.Runner(spec)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50256, (8, spec["prompt"]), generator=gen).tolist()
    for rows in (1, 8):
        runner.decode_rate(prompts[:rows], 4)  # warm-up: first-call allocations, kernel choices
    print(READY, flush=True)
    for line in sys.stdin:
        rows, tokens = (int(v) for v in line.split())
        print(portable.RESULT_TAG + json.dumps(runner.decode_rate(prompts[:rows], tokens)), flush=True)


class Worker:
    """One live engine process, driven a burst at a time."""

    def __init__(self, spec: dict, timeout: float):
        self.name, self.timeout = spec["name"], timeout
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=portable.worker_env(spec["env"]))
        self._read_until(lambda ln: ln == READY)

    def _read_until(self, done):
        deadline = time.monotonic() + self.timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"worker {self.name} stopped or timed out (exit {self.proc.poll()})")
            line = line.strip()
            if done(line):
                return line

    def burst(self, rows: int, tokens: int) -> float:
        """Returns the decode tokens/s (all rows) of one greedy generation of `tokens` per row."""
        self.proc.stdin.write(f"{rows} {tokens}\n")
        self.proc.stdin.flush()
        line = self._read_until(lambda ln: ln.startswith(portable.RESULT_TAG))
        return float(line[len(portable.RESULT_TAG):])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def run_pair(first: dict, second: dict, args) -> dict:
    """Alternates bursts of two engine processes (specs `first` and `second`); returns per batch the rates of
    each ("first", "second") and the pair ratios first / second.

    The bursts run in two rounds of fresh processes, started in one order and then the other: on a VM the
    process started first was 15% slower than its twin in some runs (two identical neoj processes, int8) and
    not in others, so each side gets both starts and half the bursts of each."""
    out = {rows: {"first": [], "second": [], "ratios": []} for rows in args.batches}
    for start_order in ((0, 1), (1, 0)):
        specs = [(first, second)[i] for i in start_order]
        workers = []
        try:
            for spec in specs:
                workers.append(Worker(spec, args.timeout))
            by_side = {start_order[0]: workers[0], start_order[1]: workers[1]}
            for rows in args.batches:
                for i in range(-(-args.bursts // 2)):
                    rates = {}
                    for side in ((0, 1) if i % 2 == 0 else (1, 0)):  # a drifting bandwidth favours neither side
                        time.sleep(IDLE_S)
                        rates[side] = by_side[side].burst(rows, args.tokens)
                    out[rows]["first"].append(rates[0])
                    out[rows]["second"].append(rates[1])
                    out[rows]["ratios"].append(rates[0] / rates[1])
        finally:
            for w in workers:
                w.close()
    for rows, r in out.items():
        log(f"  {first['name']} / {second['name']} batch {rows}: median ratio {statistics.median(r['ratios']):.3f} ("
            + ", ".join(f"{x:.2f}" for x in r["ratios"]) + ")")
    return out


def render(results: list, meta: dict, args) -> str:
    begin, end = section_markers("bench_paired")
    lines = [begin, "## Paired decode: neoj vs CTranslate2, alternating bursts of two live processes (CPU, "
             f"{args.threads} threads)", "",
             f"- Machine: {meta['cpu'][0]}; ISA flags: {meta['cpu'][1]}; load average at start {meta['load_start']}, "
             f"at end {meta['load_end']}",
             f"- Date: {meta['date']} (took {meta['minutes']:.0f} min); {meta['versions']}",
             f"- Command: `python bench/bench_paired.py{meta['options']}`",
             f"- GPT-J arch 2048x16 (bench_portable's checkpoints). Each pair: neoj and CTranslate2 loaded side by side, "
             f"each in its own process held to the ISA (avx2: {', '.join(f'{k}={v}' for k, v in portable.AVX2_CAPS.items())}, "
             f"NEOJ_ISA=avx2), taking turns at bursts of {args.tokens} greedy tokens per row after a {args.prompt}-token "
             f"prompt, {args.bursts} bursts each, order swapped every pair, in two rounds of fresh processes "
             "started in either order; ratio = neoj / CTranslate2 of adjacent bursts. neoj's compute dtype is auto "
             "(bf16 only where the CPU has bf16 instructions and no cap).", "",
             "| ISA | neoj weights | CTranslate2 compute | batch | neoj tok/s (median) | CT2 tok/s (median) | "
             "ratio (median) | ratio quartiles |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for isa, scheme, ctype, per_batch in results:
        for rows, r in per_batch.items():
            q1, q3 = quartiles(r["ratios"])
            lines.append(f"| {isa} | {scheme} | {ctype} | {rows} | {statistics.median(r['first']):.2f} | "
                         f"{statistics.median(r['second']):.2f} | {statistics.median(r['ratios']):.3f}x | "
                         f"{q1:.2f}-{q3:.2f} |")
    lines += ["", "Issue 14's targets at batch 1 and 8 (AVX2): neoj int8 >= 1.2x CTranslate2 int8, neoj fp32 >= 1.0x "
              "CTranslate2 fp32.", end]
    return "\n".join(lines) + "\n"


def command_options(args, defaults=None) -> str:
    """Returns the options a section's Command line repeats: those that differ from the defaults (this script's,
    or those given: the parsed defaults of a script that shares these options)."""
    opts = "".join(f" --isa {i}" for i in (args.isa or []))
    if args.quick:
        return " --quick" + opts
    defaults = defaults or parse_args([])
    for name in ("bursts", "tokens", "prompt", "threads"):
        if getattr(args, name) != getattr(defaults, name):
            opts += f" --{name} {getattr(args, name)}"
    return opts + (" --batches " + " ".join(map(str, args.batches)) if args.batches != defaults.batches else "")


def add_pair_options(p: argparse.ArgumentParser, batches: list[int]) -> None:
    """Adds the options every paired benchmark takes (this one's and bench_huge_pages's)."""
    p.add_argument("--isa", action="append", help="avx2 or the CPU's best (repeatable; default: both)")
    p.add_argument("--bursts", type=int, default=10, help="bursts per process and batch")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per row per burst")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=batches, choices=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds a worker may take to load or to answer")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "neoj-bench" / "portable"))
    p.add_argument("--quick", action="store_true", help="2-layer models, 2 bursts, 6 tokens")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="file to write the section into, or -")


def quick_defaults(args):
    """Applies --quick: 2 bursts of 6 tokens on bench_portable's 2-layer checkpoints."""
    if args.quick:
        args.bursts, args.tokens = 2, 6
        args.workdir = args.workdir + "-quick"  # as bench_portable --quick
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pair_options(p, [1, 8])
    p.add_argument("--serve", help=argparse.SUPPRESS)
    return quick_defaults(p.parse_args(argv))


def worker_specs(args) -> tuple[list[str], dict]:
    """Returns the ISAs to run (--isa, else AVX2 and this CPU's best) and bench_portable's worker specs by name,
    after making its checkpoints where they are missing."""
    from neoj import rowmatmul

    work = Path(args.workdir)
    portable.prepare_checkpoints(work, args.quick)
    native = rowmatmul.supported_variants()[0].name if rowmatmul.supported_variants() else "none"
    isas = args.isa or ["avx2"] + ([native] if native not in ("avx2", "none") else [])
    spec_args = argparse.Namespace(threads=args.threads, tokens=args.tokens, prompt=args.prompt, repeats=1,
                                   long_prompt=0)
    return isas, {s["name"]: s for s in portable.configurations(work, native, spec_args)}


def publish(args, text: str, section: str) -> None:
    """Writes a section into --out (or prints it for -)."""
    write_section(args.out, text, *section_markers(section))
    if args.out != "-":
        log(f"wrote {args.out}")
        print(text, end="")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve:
        serve(json.loads(args.serve))
        return
    isas, specs = worker_specs(args)
    start, load_start, versions = time.time(), loadavg(), portable.versions()
    results = []
    for isa in isas:
        for scheme, ctype in PAIRS:
            log(f"pair: neoj {scheme} / ct2 {ctype}, {isa}")
            results.append((isa, scheme, ctype, run_pair(specs[f"neoj {scheme} {isa}"], specs[f"ct2 {ctype} {isa}"],
                                                         args)))
    meta = {"cpu": cpu_description(), "load_start": load_start, "load_end": loadavg(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - start) / 60,
            "options": command_options(args), "versions": versions}
    publish(args, render(results, meta, args), "bench_paired")


if __name__ == "__main__":
    main()
