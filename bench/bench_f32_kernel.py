"""fp32 few-row products: neoj's row kernel (one ISA variant) against oneDNN's linear and F.linear, weight by weight.

For the linear layers of GPT-Neo-125M, GPT-Neo-1.3B and GPT-J-6B (random fp32 weights) and 1 to 32
activation rows (a decode step of that many sequences): the time of one product with the weights out of
cache (copies of each weight rotated past the last-level cache, as in a decode step that reads every
layer once), as GB/s of weight bytes, beside a plain sum over the same copies (the bandwidth available).
`F.linear` is what transformers runs; before its own kernel, neoj ran a blocked matrix-vector product
(linear.blocked_matvec) for one row and oneDNN's linear (torch.ops.mkldnn._linear_pointwise) for 2-64.
Rounds are interleaved; medians reported.

    python bench/bench_f32_kernel.py                # this CPU's best variant: writes its section of BENCHMARKS.md
    python bench/bench_f32_kernel.py --isa avx2     # another variant this CPU runs: a section of its own
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also under `python -m bench.bench_f32_kernel`
from bench_int8_kernel import median_time, run_kernel_bench, section_head  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neoj.linear import blocked_matvec  # noqa: E402

NAME = "bench_f32_kernel"  # its section's markers: markers(NAME, isa)
ROWS = (1, 2, 4, 8, 16, 32)


def measure(kernels, out: int, inn: int, rounds: int, cold_bytes: int) -> dict:
    copies = max(2, -(-cold_bytes // (4 * out * inn)))
    weights = [torch.randn(out, inn) for _ in range(copies)]
    items = list(range(copies))
    repeats = max(8, min(60, int(2e9 // (4 * out * inn))))
    gb = 4 * out * inn / 1e9
    result = {}
    for m in ROWS:
        x = torch.randn(m, inn)
        times = {"linear": [], "onednn": [], "neoj": [], "sum": []} | ({"blocked": []} if m == 1 else {})
        with torch.inference_mode():
            for _ in range(rounds):
                times["linear"].append(median_time(lambda i: F.linear(x, weights[i]), items, repeats))
                times["onednn"].append(median_time(
                    lambda i: torch.ops.mkldnn._linear_pointwise(x, weights[i], None, "none", [], ""), items, repeats))
                times["neoj"].append(median_time(lambda i: kernels.f32(x, weights[i]), items, repeats))
                times["sum"].append(median_time(lambda i: weights[i].sum(), items, repeats))
                if m == 1:
                    times["blocked"].append(median_time(lambda i: blocked_matvec(x[0], weights[i], None), items, repeats))
            exact = x.double() @ weights[0].double().t()
            err = (kernels.f32(x, weights[0]).double() - exact).norm() / exact.norm()
        result[m] = {k: gb / statistics.median(v) for k, v in times.items()} | {"err": err.item()}
        result[m]["before"] = result[m].get("blocked", result[m]["onednn"])
    return result


def section(results: list, args, load: str, kernels) -> str:
    lines, end = section_head(NAME, f"## fp32 few-row kernel: neoj ({kernels.name}) vs oneDNN's linear and F.linear "
                              "(CPU)", args, load)
    lines += [f"- GB/s of fp32 weights per product, weights out of cache (copies rotated past {args.cold_mb} MB), "
              f"median of {args.rounds} interleaved rounds. `sum` is a plain read of the same bytes. Speed-up: neoj "
              "over what neoj ran before (the blocked matrix-vector product at one row, oneDNN at more). Error: "
              "neoj's, relative to the exact fp64 product.", "",
              "| model | layer | out x in | rows | F.linear GB/s | blocked matvec GB/s | oneDNN GB/s | neoj GB/s | "
              "speed-up | sum GB/s | error |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, layer, out, inn), r in results:
        for m in ROWS:
            x = r[m]
            blocked = f"{x['blocked']:.1f}" if "blocked" in x else "-"
            lines.append(f"| {model} | {layer} | {out}x{inn} | {m} | {x['linear']:.1f} | {blocked} | {x['onednn']:.1f} | "
                         f"{x['neoj']:.1f} | {x['neoj'] / x['before']:.2f}x | {x['sum']:.1f} | {x['err']:.1e} |")
    lines += ["", "Which product neoj's fp32 decode layers run for each row count and ISA: `neoj.linear.RULES` "
              "(rowmatmul_f32, blocked_matvec and onednn_linear rules).", end]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_kernel_bench(argv, __doc__, "fp32", measure, lambda r: r["neoj"] / r["before"], section, NAME)


if __name__ == "__main__":
    main()
