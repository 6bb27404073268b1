#!/usr/bin/env python
"""Huge pages A/B: neoj with its weights in huge pages (the default) against NEOJ_HUGE_PAGES=0, paired bursts.

neoj moves a CPU model's large weights into memory advised for 2 MB pages after loading (neoj.huge_pages);
NEOJ_HUGE_PAGES=0 keeps them where loading put them (a full-precision checkpoint memory-mapped, quantized
weights in plain anonymous memory). The two stay loaded side by side, each in its own process held to the same
ISA, and take turns at bursts of greedy decode as in bench_paired (its workers, checkpoints and pairing); the
table reports the median ratio on / off of adjacent bursts and its quartiles. Writes a marked section of
BENCHMARKS.md.

    python bench/bench_huge_pages.py                 # AVX2 (held) and this CPU's best; fp32 and int8; batch 1
    python bench/bench_huge_pages.py --isa avx2 --batches 1 8
    python bench/bench_huge_pages.py --quick --out -  # smoke test: 2-layer models, 2 bursts, prints the section
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -m bench.bench_huge_pages`
import bench_paired as paired  # noqa: E402
import bench_portable as portable  # noqa: E402
from report import cpu_description, loadavg, logger, section_markers  # noqa: E402

log = logger("bench_huge_pages")
SCHEMES = ("fp32", "int8")
NOTE = ("Only floating-point tensors move (neoj.huge_pages): the int8 rows run the same configuration on both sides "
        "and show the method's noise. A fp32 checkpoint loaded as fp32 (AVX2 rows) is memory-mapped when it stays "
        "put; loaded as bf16 (the avx512_vnni rows, where auto picks bf16) it is converted into anonymous memory "
        "either way. Tokens/s medians are per side over both rounds, whose levels can differ; the ratio is of "
        "adjacent bursts.")


def without_huge_pages(spec: dict) -> dict:
    """Returns the same neoj worker with NEOJ_HUGE_PAGES=0."""
    return {**spec, "name": spec["name"] + " NEOJ_HUGE_PAGES=0", "env": {**spec["env"], "NEOJ_HUGE_PAGES": "0"}}


def render(results: list, meta: dict, args) -> str:
    begin, end = section_markers("bench_huge_pages")
    lines = [begin, f"## Huge pages A/B: neoj's weights in huge pages against NEOJ_HUGE_PAGES=0 (CPU, {args.threads} "
             "threads)", "",
             f"- Machine: {meta['cpu'][0]}; ISA flags: {meta['cpu'][1]}; load average at start {meta['load_start']}, "
             f"at end {meta['load_end']}; transparent huge pages: {meta['thp']}",
             f"- Date: {meta['date']} (took {meta['minutes']:.0f} min); {meta['versions']}",
             f"- Command: `python bench/bench_huge_pages.py{meta['options']}`",
             "- GPT-J arch 2048x16 (bench_portable's checkpoints). Each pair: two neoj processes loaded side by side, "
             "held to the ISA as in bench_paired, one with NEOJ_HUGE_PAGES=0, taking turns at bursts of "
             f"{args.tokens} greedy tokens per row after a {args.prompt}-token prompt, {args.bursts} bursts each, "
             "order swapped every pair, in two rounds of fresh processes started in either order; ratio = on / off "
             "of adjacent bursts. neoj's compute dtype is auto (bf16 only where the CPU has bf16 instructions and no "
             "cap).", "",
             "| ISA | neoj weights | batch | huge pages tok/s (median) | NEOJ_HUGE_PAGES=0 tok/s (median) | "
             "ratio (median) | ratio quartiles |",
             "|---|---|---:|---:|---:|---:|---|"]
    for isa, scheme, per_batch in results:
        for rows, r in per_batch.items():
            q1, q3 = paired.quartiles(r["ratios"])
            lines.append(f"| {isa} | {scheme} | {rows} | {statistics.median(r['first']):.2f} | "
                         f"{statistics.median(r['second']):.2f} | {statistics.median(r['ratios']):.3f}x | "
                         f"{q1:.2f}-{q3:.2f} |")
    lines += ["", NOTE]
    return "\n".join(lines + [end]) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    paired.add_pair_options(p, [1])
    return paired.quick_defaults(p.parse_args(argv))


def thp_setting() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return "unavailable"


def main(argv=None) -> None:
    args = parse_args(argv)
    isas, specs = paired.worker_specs(args)
    start, load_start, versions = time.time(), loadavg(), portable.versions()
    results = []
    for isa in isas:
        for scheme in SCHEMES:
            spec = specs[f"neoj {scheme} {isa}"]
            log(f"pair: {spec['name']} / NEOJ_HUGE_PAGES=0")
            results.append((isa, scheme, paired.run_pair(spec, without_huge_pages(spec), args)))
    meta = {"cpu": cpu_description(), "load_start": load_start, "load_end": loadavg(), "thp": thp_setting(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - start) / 60,
            "options": paired.command_options(args, parse_args([])), "versions": versions}
    paired.publish(args, render(results, meta, args), "bench_huge_pages")


if __name__ == "__main__":
    main()
