"""int4 few-row products: neoj's int4 row kernel against tinygemm (aten._weight_int4pack_mm_for_cpu) and
neoj's own int8 kernel, weight by weight.

For the linear layers of GPT-Neo-125M, GPT-Neo-1.3B and GPT-J-6B (random weights quantized to int4 in groups
of 128, neoj's portable form) and 1 to 16 activation rows: the time of one product with the weights out of
cache (copies rotated past the last-level cache, as in a decode step), as GB/s of int4 weight bytes (half a
byte per weight); beside it the speed of neoj's int8 kernel on the same shape, which reads twice the bytes
(int4 / int8 above 1: int4 is faster). tinygemm gets bf16 activations (its fast form, what neoj used for CPU
int4 before its own kernel); neoj's get fp32. Error: relative to the exact fp64 product with the dequantized
weight. Which layout and kernel a CPU uses: `neoj.linear.INT4_KERNEL_ISAS` and the rowmatmul_int4 rule.

    python bench/bench_int4_kernel.py                # this CPU's best variant: writes its section of BENCHMARKS.md
    ATEN_CPU_CAPABILITY=avx2 python bench/bench_int4_kernel.py --isa avx2
                                                     # an AVX2-only CPU: every library held to AVX2, a section of its own
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the int8 benchmark's helpers, report.py
from bench_int8_kernel import ROWS, median_time, run_kernel_bench, section_head  # noqa: E402

import torch  # noqa: E402

from neoj import linear  # noqa: E402
from neoj.quantize import QuantLinear, QuantSpec, dequantize, quantize_weight  # noqa: E402

NAME = "bench_int4_kernel"
GROUP = 128


def tinygemm_layer(parts: dict) -> QuantLinear:
    """Returns a QuantLinear holding `parts` in tinygemm's packed form (as on CPUs outside INT4_KERNEL_ISAS)."""
    chosen = linear.int4_kernel_on_cpu
    linear.int4_kernel_on_cpu = lambda: False
    try:
        return QuantLinear(parts, QuantSpec("int4", GROUP), None)
    finally:
        linear.int4_kernel_on_cpu = chosen


def measure(kernels, out: int, inn: int, rounds: int, cold_bytes: int) -> dict:
    copies = max(2, -(-cold_bytes // (out * inn // 2)))
    spec = QuantSpec("int4", GROUP)
    parts = [quantize_weight(torch.randn(out, inn) / 30, spec) for _ in range(copies)]
    packed = [tinygemm_layer(p) for p in parts]
    int8 = [kernels.bind_int8(torch.randint(-127, 128, (out, inn), dtype=torch.int8), torch.rand(out) / 64)
            for _ in range(max(2, copies // 2))]  # the same weight bytes rotated: as far out of cache
    # Bound once, as a layer holds them: each call then pays only the product, as in a decode step.
    int4 = [kernels.bind_int4(p["qweight"], p["scales"], p["mins"]) for p in parts]
    items = list(range(copies))
    repeats = max(8, min(60, int(2e9 // (out * inn))))
    result = {"copies": copies}
    for m in ROWS:
        x = torch.randn(m, inn)
        xb = x.bfloat16()
        tiny, ours, eight = [], [], []
        for _ in range(rounds):
            tiny.append(median_time(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, packed[i].qweight, GROUP, packed[i].scales_zeros), items, repeats))
            ours.append(median_time(lambda i: int4[i](x), items, repeats))
            eight.append(median_time(lambda i: int8[i % len(int8)](x), items, repeats))
        exact = x.double() @ dequantize(parts[0], spec).double().t()
        err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        gb = out * inn / 2 / 1e9
        tg = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed[0].qweight, GROUP, packed[0].scales_zeros)
        result[m] = {
            "tinygemm_gbs": gb / statistics.median(tiny), "neoj_gbs": gb / statistics.median(ours),
            "vs_int8": statistics.median(eight) / statistics.median(ours),
            "tinygemm_err": err(tg[:, :out].float()),
            "neoj_err": err(int4[0](x)),
        }
    return result


def section(results: list, args, load: str, kernels) -> str:
    lines, end = section_head(NAME, f"## int4 decode kernel: neoj ({kernels.name}) vs tinygemm and neoj's int8 (CPU)",
                              args, load)
    lines += [f"- GB/s of int4 weights (half a byte each, group {GROUP}) per product, weights out of cache (copies "
             f"rotated past {args.cold_mb} MB), median of {args.rounds} interleaved rounds. int4 / int8: neoj's int4 "
             "product's speed over neoj's int8 product of the same shape (twice the bytes). Error: relative to the "
             "exact fp64 product with the dequantized weight (bf16 activations for tinygemm, 8-bit per weight group "
             "for neoj; the int4 weights' own rounding is some 10% of the product).", "",
             "| model | layer | out x in | rows | tinygemm GB/s | neoj int4 GB/s | speed-up | int4 / int8 | "
             "error tinygemm | error neoj |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, layer, out, inn), r in results:
        for m in ROWS:
            x = r[m]
            lines.append(f"| {model} | {layer} | {out}x{inn} | {m} | {x['tinygemm_gbs']:.1f} | {x['neoj_gbs']:.1f} | "
                         f"{x['neoj_gbs'] / x['tinygemm_gbs']:.2f}x | {x['vs_int8']:.2f}x | {x['tinygemm_err']:.1e} | "
                         f"{x['neoj_err']:.1e} |")
    lines += ["", f"Where CPU int4 layers use neoj's kernel: `neoj.linear.INT4_KERNEL_ISAS` = "
              f"{', '.join(linear.INT4_KERNEL_ISAS)} (elsewhere tinygemm's packed form), rowmatmul_int4 rule.", end]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_kernel_bench(argv, __doc__, "int4", measure, lambda r: r["neoj_gbs"] / r["tinygemm_gbs"], section, NAME)


if __name__ == "__main__":
    main()
