"""int8 few-row products: neoj's row kernel (one ISA variant) against aten._weight_int8pack_mm, weight by weight.

For the linear layers of GPT-Neo-125M, GPT-Neo-1.3B and GPT-J-6B (random int8 weights, per-row fp32
scales) and 1 to 16 activation rows: the time of one product with the weights out of cache (enough
copies of each weight are rotated to exceed the last-level cache, as in a decode step where every
layer's weights are read once), as GB/s of weight bytes; next to it the read bandwidth of a plain sum
over the same copies. PyTorch's op gets bf16 activations (its fast form); neoj's gets fp32. Beside them,
fbgemm's dynamic int8 linear (`quantized::linear_dynamic`, what torch.ao's dynamic quantization and
CTranslate2-like engines do): it quantizes the activations to 7 bits per call, with one scale for the
whole (rows, in) matrix, so it is both coarser than neoj's 15 bits per 256 values and dependent on the
other rows of a batch. Accuracy: the relative error of each against the exact (fp64) product. Rounds
are interleaved; medians reported.

    python bench/bench_int8_kernel.py                # this CPU's best variant: writes its section of BENCHMARKS.md
    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python bench/bench_int8_kernel.py --isa avx2
                                                     # an AVX2-only CPU: every library held to AVX2, a section of its own
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_int8_kernel`
from report import REPO, cpu_flags, cpu_model, date_line, loadavg, section_markers, write_section  # noqa: E402

import torch  # noqa: E402

from neoj import rowmatmul  # noqa: E402

NAME = "bench_int8_kernel"  # its section's markers: section_markers(NAME), or markers(NAME, isa)
SHAPES = [  # (model, layer, out, in)
    ("125M", "q/k/v/out_proj", 768, 768), ("125M", "fc_in", 3072, 768), ("125M", "fc_out", 768, 3072),
    ("125M", "lm_head", 50257, 768), ("1.3B", "q/k/v/out_proj", 2048, 2048), ("1.3B", "fc_in", 8192, 2048),
    ("1.3B", "fc_out", 2048, 8192), ("6B", "q/k/v/out_proj", 4096, 4096), ("6B", "fc_in", 16384, 4096),
    ("6B", "fc_out", 4096, 16384), ("6B", "lm_head", 50400, 4096),
]
ROWS = (1, 2, 4, 8, 16)


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


def measure(kernels, out: int, inn: int, rounds: int, cold_bytes: int) -> dict:
    copies = max(2, -(-cold_bytes // (out * inn)))
    weights = [(torch.randint(-127, 128, (out, inn), dtype=torch.int8), torch.rand(out) / 64) for _ in range(copies)]
    bf16_scales = [s.bfloat16() for _, s in weights]
    packed = [fbgemm_pack(q, s) for q, s in weights]
    items = list(range(copies))
    repeats = max(8, min(60, int(2e9 // (out * inn))))
    result = {"copies": copies}
    for m in ROWS:
        x = torch.randn(m, inn)
        xb = x.bfloat16()
        theirs, ours, reads, fb = [], [], [], []
        for _ in range(rounds):
            theirs.append(median_time(lambda i: torch.ops.aten._weight_int8pack_mm(xb, weights[i][0], bf16_scales[i]),
                                      items, repeats))
            ours.append(median_time(lambda i: kernels.int8(x, *weights[i]), items, repeats))
            reads.append(median_time(lambda i: weights[i][0].view(torch.int64).sum(), items, repeats))
            if packed[0] is not None:
                fb.append(median_time(lambda i: torch.ops.quantized.linear_dynamic(x, packed[i], True), items, repeats))
        q, s = weights[0]
        exact = x.double() @ (q.double() * s.double()[:, None]).t()
        err = lambda y: ((y.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        gb = out * inn / 1e9
        result[m] = {
            "int8pack_gbs": gb / statistics.median(theirs), "neoj_gbs": gb / statistics.median(ours),
            "sum_gbs": gb / statistics.median(reads),
            "int8pack_err": err(torch.ops.aten._weight_int8pack_mm(xb, q, bf16_scales[0]).float()),
            "neoj_err": err(kernels.int8(x, q, s)),
            "fbgemm_gbs": gb / statistics.median(fb) if fb else None,
            "fbgemm_err": err(torch.ops.quantized.linear_dynamic(x, packed[0], True)) if fb else None,
        }
    return result


def fbgemm_pack(q: torch.Tensor, scales: torch.Tensor):
    """Returns fbgemm's packed form of int8 weights q (out, in) with per-row scales, or None where this torch
    has no fbgemm (ARM builds, for one)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "fbgemm"
    qt = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qt, None)


def caps_line() -> str:
    """Returns the ISA caps this process runs under (the environment variables libraries read)."""
    caps = [f"{k}={os.environ[k]}" for k in ("NEOJ_ISA", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS",
                                             "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ]
    return "- ISA caps: " + (", ".join(caps) if caps else "none (each library uses the CPU's best)")


def section_head(name: str, title: str, args, load: str) -> tuple[list[str], str]:
    """Returns a kernel benchmark section's first lines (its begin marker, title, machine, date, command and
    ISA caps) and its end marker."""
    begin, end = markers(name, args.isa)
    return [begin, title, "", f"- Machine: {machine_line()}, {torch.get_num_threads()} threads; load average at "
            f"start {load}", date_line(), f"- Command: `python bench/{name}.py{command_options(args)}`",
            caps_line()], end


def section(results: list, args, load: str, kernels) -> str:
    lines, end = section_head(NAME, f"## int8 decode kernel: neoj ({kernels.name}) vs aten._weight_int8pack_mm (CPU)",
                              args, load)
    lines += ["- GB/s of int8 weights per product, weights out of cache (copies rotated past "
             f"{args.cold_mb} MB), median of {args.rounds} interleaved rounds. `sum` is a plain read of the same "
             "bytes: the bandwidth available. Error: relative to the exact fp64 product (bf16 activations for "
             "PyTorch's op, 15-bit per 256-value block for neoj's, 7-bit per call for fbgemm's dynamic linear, "
             "whose rows also depend on each other).", "",
             "| model | layer | out x in | rows | _weight_int8pack_mm GB/s | neoj GB/s | speed-up | fbgemm dynamic "
             "GB/s | sum GB/s | error int8pack | error neoj | error fbgemm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, layer, out, inn), r in results:
        for m in ROWS:
            x = r[m]
            fb = (f"{x['fbgemm_gbs']:.1f}", f"{x['fbgemm_err']:.1e}") if x.get("fbgemm_gbs") else ("—", "—")
            lines.append(f"| {model} | {layer} | {out}x{inn} | {m} | {x['int8pack_gbs']:.1f} | {x['neoj_gbs']:.1f} | "
                         f"{x['neoj_gbs'] / x['int8pack_gbs']:.2f}x | {fb[0]} | {x['sum_gbs']:.1f} | "
                         f"{x['int8pack_err']:.1e} | {x['neoj_err']:.1e} | {fb[1]} |")
    lines += ["", "Which product neoj runs for each row count and ISA: `neoj.linear.RULES` (rowmatmul_int8 rules).",
              end]
    return "\n".join(lines) + "\n"


def markers(name: str, isa: str | None) -> tuple[str, str]:
    """Returns a kernel benchmark's section markers: the plain ones for this CPU's best variant, one pair per
    forced ISA (`<!-- NAME[avx2]:begin -->`)."""
    return section_markers(name, f"[{isa}]" if isa else "")


def machine_line() -> str:
    """Returns the CPU model and its SIMD features, for a section's Machine line."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "asimd", "asimddp")
    return f"{cpu_model() or platform.machine()} ({', '.join(cpu_flags(wanted))})"


def command_options(args) -> str:
    """Returns the options a section's Command line repeats (those that differ from the defaults)."""
    opts = f" --isa {args.isa}" if args.isa else ""
    opts += f" --rounds {args.rounds}" if args.rounds != 3 else ""
    return opts + (f" --threads {args.threads}" if args.threads != 2 else "")


def run_kernel_bench(argv, doc: str, kind: str, measure, speedup, section, name: str = NAME) -> None:
    """The command line shared by the kernel benchmarks: measure every shape with one kernel variant (--isa,
    else this CPU's best), print speed-ups per row count (speedup(result of one row count)), write
    section(results, args, load, kernels) between markers(name, isa) (markers of its own for a forced ISA)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", choices=[v.name for v in rowmatmul.VARIANTS],
                   help="measure this kernel variant (NEOJ_ISA's names) instead of this CPU's best")
    p.add_argument("--cold-mb", type=int, default=160, help="bytes of weight copies rotated per shape")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="file to write the section to (- prints it)")
    args = p.parse_args(argv)
    try:
        kernels = rowmatmul.load(args.isa) if args.isa else rowmatmul.kernels()
    except rowmatmul.BuildError as exc:
        sys.exit(f"neoj's {kind} kernel {args.isa} is not available here: {exc}")
    if kernels is None:
        sys.exit(f"neoj's {kind} kernel is not available here (no variant for this CPU, or no C compiler)")
    torch.set_num_threads(args.threads)
    load = loadavg()
    results = []
    for shape in SHAPES:
        r = measure(kernels, shape[2], shape[3], args.rounds, args.cold_mb << 20)
        print(shape, {m: round(speedup(v), 2) for m, v in r.items() if isinstance(m, int)}, flush=True)
        results.append((shape, r))
    write_section(args.out, section(results, args, load, kernels), *markers(name, args.isa))
    if args.out != "-":
        print(f"wrote {args.out}")


def main(argv=None) -> None:
    run_kernel_bench(argv, __doc__, "int8", measure, lambda r: r["neoj_gbs"] / r["int8pack_gbs"], section)


if __name__ == "__main__":
    main()
