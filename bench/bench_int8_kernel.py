"""int8 few-row products: neoj's VNNI kernel against aten._weight_int8pack_mm, weight by weight.

For the linear layers of GPT-Neo-125M, GPT-Neo-1.3B and GPT-J-6B (random int8 weights, per-row fp32
scales) and 1, 2, 4 and 8 activation rows: the time of one product with the weights out of cache (enough
copies of each weight are rotated to exceed the last-level cache, as in a decode step where every
layer's weights are read once), as GB/s of weight bytes; next to it the read bandwidth of a plain sum
over the same copies. PyTorch's op gets bf16 activations (its fast form); neoj's gets fp32. Accuracy:
the relative error of each against the exact (fp64) product. Rounds are interleaved; medians reported.

    python bench/bench_int8_kernel.py                # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from neoj import rowmatmul

SECTION_BEGIN = "<!-- bench_int8_kernel:begin -->"
SECTION_END = "<!-- bench_int8_kernel:end -->"
SHAPES = [  # (model, layer, out, in)
    ("125M", "q/k/v/out_proj", 768, 768), ("125M", "fc_in", 3072, 768), ("125M", "fc_out", 768, 3072),
    ("125M", "lm_head", 50257, 768), ("1.3B", "q/k/v/out_proj", 2048, 2048), ("1.3B", "fc_in", 8192, 2048),
    ("1.3B", "fc_out", 2048, 8192), ("6B", "q/k/v/out_proj", 4096, 4096), ("6B", "fc_in", 16384, 4096),
    ("6B", "fc_out", 4096, 16384), ("6B", "lm_head", 50400, 4096),
]
ROWS = (1, 2, 4, 8)


def median_time(fn, items, repeats: int) -> float:
    for item in items[:2]:
        fn(item)
    times = []
    for i in range(repeats):
        item = items[i % len(items)]
        t = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(out: int, inn: int, rounds: int, cold_bytes: int) -> dict:
    copies = max(2, -(-cold_bytes // (out * inn)))
    weights = [(torch.randint(-127, 128, (out, inn), dtype=torch.int8), torch.rand(out) / 64) for _ in range(copies)]
    bf16_scales = [s.bfloat16() for _, s in weights]
    items = list(range(copies))
    repeats = max(8, min(60, int(2e9 // (out * inn))))
    result = {"copies": copies}
    for m in ROWS:
        x = torch.randn(m, inn)
        xb = x.bfloat16()
        theirs, ours, reads = [], [], []
        for _ in range(rounds):
            theirs.append(median_time(lambda i: torch.ops.aten._weight_int8pack_mm(xb, weights[i][0], bf16_scales[i]),
                                      items, repeats))
            ours.append(median_time(lambda i: rowmatmul.int8_rowmatmul(x, *weights[i]), items, repeats))
            reads.append(median_time(lambda i: weights[i][0].view(torch.int64).sum(), items, repeats))
        q, s = weights[0]
        exact = x.double() @ (q.double() * s.double()[:, None]).t()
        err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        gb = out * inn / 1e9
        result[m] = {
            "int8pack_gbs": gb / statistics.median(theirs), "neoj_gbs": gb / statistics.median(ours),
            "sum_gbs": gb / statistics.median(reads),
            "int8pack_err": err(torch.ops.aten._weight_int8pack_mm(xb, q, bf16_scales[0]).float()),
            "neoj_err": err(rowmatmul.int8_rowmatmul(x, q, s)),
        }
    return result


def section(results: list, args, load: str) -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [SECTION_BEGIN, "## int8 decode kernel: neoj (AVX512-VNNI) vs aten._weight_int8pack_mm (CPU)", "",
             f"- Machine: {platform.machine()}, {torch.get_num_threads()} threads; load average at start {load}",
             f"- Date: {datetime.date.today()}; torch {torch.__version__}; neoj git {rev}",
             f"- Command: `python bench/bench_int8_kernel.py{' --rounds ' + str(args.rounds) if args.rounds != 3 else ''}`",
             "- GB/s of int8 weights per product, weights out of cache (copies rotated past "
             f"{args.cold_mb} MB), median of {args.rounds} interleaved rounds. `sum` is a plain read of the same "
             "bytes: the bandwidth available. Error: relative to the exact fp64 product (bf16 activations for "
             "PyTorch's op, 15-bit per 256-value block for neoj's).", "",
             "| model | layer | out x in | rows | _weight_int8pack_mm GB/s | neoj GB/s | speed-up | sum GB/s | "
             "error int8pack | error neoj |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, layer, out, inn), r in results:
        for m in ROWS:
            x = r[m]
            lines.append(f"| {model} | {layer} | {out}x{inn} | {m} | {x['int8pack_gbs']:.1f} | {x['neoj_gbs']:.1f} | "
                         f"{x['neoj_gbs'] / x['int8pack_gbs']:.2f}x | {x['sum_gbs']:.1f} | {x['int8pack_err']:.1e} | "
                         f"{x['neoj_err']:.1e} |")
    lines += ["", "neoj uses its kernel where rows x in_features <= 8192 and in_features is a multiple of 256 "
              "(`VNNI_MAX_ELEMENTS` in quantize.py); other products keep `_weight_int8pack_mm`.", SECTION_END]
    return "\n".join(lines) + "\n"


def write_section(out: str, text: str, begin: str = SECTION_BEGIN, end: str = SECTION_END) -> None:
    """Replaces the section between the begin and end markers in `out`, or appends it."""
    path = Path(out)
    doc = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in doc and end in doc:
        before, rest = doc.split(begin, 1)
        doc = before + text.rstrip("\n") + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def run_kernel_bench(argv, doc: str, available: bool, unavailable: str, measure, speedup, section,
                     begin: str = SECTION_BEGIN, end: str = SECTION_END) -> None:
    """The command line shared by the kernel benchmarks: measure every shape, print speed-ups per row count
    (speedup(result of one row count)), write section(results, args, load) between begin and end."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold-mb", type=int, default=160, help="bytes of weight copies rotated per shape")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    if not available:
        sys.exit(unavailable)
    torch.set_num_threads(args.threads)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    results = []
    for shape in SHAPES:
        r = measure(shape[2], shape[3], args.rounds, args.cold_mb << 20)
        print(shape, {m: round(speedup(v), 2) for m, v in r.items() if isinstance(m, int)}, flush=True)
        results.append((shape, r))
    write_section(args.out, section(results, args, load), begin, end)
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    run_kernel_bench(argv, __doc__, rowmatmul.available(),
                     "neoj's int8 kernel is not available here (needs AVX512-VNNI and a C compiler)",
                     measure, lambda r: r["neoj_gbs"] / r["int8pack_gbs"], section)


if __name__ == "__main__":
    main()
