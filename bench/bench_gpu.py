#!/usr/bin/env python
"""GPU decode benchmark: neoj against transformers on the GPT-J-6B shape, on one CUDA device, in one run.

Random weights (28 layers, hidden 4096, 16 heads, rotary 64, vocab 50400) made on the GPU. Measured:

  * greedy decode tokens/s at batch 1 and 8 after a 128-token prompt (prefill excluded; the median
    time between consecutive tokens): neoj bf16, int8 (its Triton kernel), int4 (tinygemm, group 128),
    each with its CUDA-graphed decode step and, for bf16, without (NEOJ_CUDA_GRAPHS=0); transformers
    fp16 and bf16 (eager, its default dynamic cache);
  * memory-bandwidth utilization (MBU): bytes a step must read (weights + the KV cache) per second,
    over the device-to-device copy rate measured here (read + write) and over the datasheet's;
  * the int8 layer paths of neoj.linear (Triton kernel, _weight_int8pack_mm, dequantize + matmul)
    and bf16 F.linear on GPT-J's four weight shapes at 1 and 8 rows: GB/s of weights read.

    python bench/bench_gpu.py                        # writes the section of BENCHMARKS.md
    python bench/bench_gpu.py --out section.md --json results.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_gpu`
from report import REPO, logger, section_markers, write_section  # noqa: E402

sys.path.insert(0, str(REPO / "src"))
importlib.import_module("neoj")  # before torch: importing neoj sets the OpenMP policy
import torch  # noqa: E402

from neoj.api import prepare_for_inference  # noqa: E402
from neoj.config import preset  # noqa: E402
from neoj.generate import stream_batch  # noqa: E402
from neoj.quantize import QuantSpec, decode_read_bytes, quantize_model  # noqa: E402
from neoj.sampling import GenerationParams  # noqa: E402
from neoj.tokenizer import Tokenizer  # noqa: E402
from neoj.weights import random_model  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_gpu")
DATASHEET_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}
PROMPT = 128


log = logger("bench_gpu")


def copy_bandwidth() -> float:
    """Returns the device-to-device copy rate in bytes/s (read + write), median of 10 copies of 2 GiB."""
    a = torch.empty(1 << 30, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * (2 << 30) / statistics.median(times[3:])


def kv_bytes(cfg, batch: int, keys: int, elem: int) -> int:
    return 2 * cfg.n_layers * batch * cfg.hidden_size * keys * elem


def neoj_decode(model, tokenizer, batch: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Returns (median seconds per decode step, tokens) for greedy decoding of batch random prompts."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, 50000, (batch, PROMPT), generator=g).tolist()
    params = GenerationParams(temperature=0, max_new_tokens=new_tokens, stop_at_eos=False)
    stamps = []
    gen = stream_batch(model, tokenizer, prompts, params)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            tokens = [c.token_ids for c in stop.value]
            break
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step also records the graph
    return statistics.median(steps), tokens


def replay_ms(model, batch: int, keys: int) -> float:
    """Returns the GPU time of one graphed decode step alone (median of 20 replays), without the host's
    sampling and bookkeeping: what the step costs the GPU."""
    from neoj.cuda_graph import GraphedDecodeStep
    from neoj.kv_cache import KVCache

    cache = KVCache.for_model(model, batch, keys)
    with torch.inference_mode():
        model(torch.randint(0, 50000, (batch, PROMPT), device="cuda"), None, cache)
        step = GraphedDecodeStep(model, cache)
        tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
        positions = torch.full((batch, 1), PROMPT, device="cuda")
        step(tokens, positions)  # records
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def hf_decode(model, batch: int, new_tokens: int) -> float:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 50000, (batch, PROMPT), generator=g).to("cuda")
    streamer = Stamps()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=50256, streamer=streamer)
    t = streamer.times[1:]
    return statistics.median(b - a for a, b in zip(t[1:], t[2:]))


def neoj_rows(cfg, tokenizer, args, bw: float) -> list[dict]:
    rows = []
    variants = [("bf16", None, True), ("bf16", None, False), ("int8", "int8", True), ("int4", "int4", True)]
    for label, scheme, graphs in variants:
        name = f"neoj {label}" + ("" if graphs else " (no CUDA graph)")
        try:
            log(f"building {name}")
            torch.cuda.empty_cache()
            model = prepare_for_inference(random_model(cfg, dtype=torch.bfloat16, device="cuda"))
            if scheme:
                model = quantize_model(model, QuantSpec.parse(scheme, 128 if scheme == "int4" else None))
                torch.cuda.empty_cache()
            weights = decode_read_bytes(model)
            os.environ["NEOJ_CUDA_GRAPHS"] = "1" if graphs else "0"
            neoj_decode(model, tokenizer, 1, 8)  # warm-up: cuBLAS, Triton compiles and autotuning
            for batch in args.batches:
                step, _ = neoj_decode(model, tokenizer, batch, args.new_tokens)
                read = weights + kv_bytes(cfg, batch, PROMPT + args.new_tokens, 2)
                gpu_ms = replay_ms(model, batch, PROMPT + args.new_tokens) if graphs else None
                rows.append(dict(impl=name, batch=batch, tok_s=batch / step, step_ms=step * 1e3, gpu_ms=gpu_ms,
                                 weight_gb=weights / 1e9, mbu=read / step / bw))
                log(f"{name} b{batch}: {batch / step:.1f} tok/s, MBU {read / step / bw:.0%}, graph {gpu_ms} ms")
            del model
        except Exception as exc:  # one failing variant must not lose the others' numbers
            traceback.print_exc()
            rows.append(dict(impl=name, error=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            os.environ.pop("NEOJ_CUDA_GRAPHS", None)
    return rows


def hf_rows(cfg, args, bw: float) -> list[dict]:
    rows = []
    try:
        import transformers
        from transformers import GPTJConfig, GPTJForCausalLM
    except ImportError as exc:
        return [dict(impl="transformers", error=str(exc))]
    hf_cfg = GPTJConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.hidden_size,
                        n_layer=cfg.n_layers, n_head=cfg.n_heads, rotary_dim=cfg.rotary_dim)
    for dtype in (torch.float16, torch.bfloat16):
        name = f"transformers {transformers.__version__} {str(dtype).split('.')[-1]}"
        try:
            log(f"building {name}")
            torch.cuda.empty_cache()
            default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device("cuda"):
                    model = GPTJForCausalLM(hf_cfg).eval()
            finally:
                torch.set_default_dtype(default)
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) - \
                model.transformer.wte.weight.numel() * 2
            hf_decode(model, 1, 8)
            for batch in args.batches:
                step = hf_decode(model, batch, args.new_tokens)
                read = weights + kv_bytes(cfg, batch, PROMPT + args.new_tokens, 2)
                rows.append(dict(impl=name, batch=batch, tok_s=batch / step, step_ms=step * 1e3,
                                 weight_gb=weights / 1e9, mbu=read / step / bw))
                log(f"{name} b{batch}: {batch / step:.1f} tok/s, MBU {read / step / bw:.0%}")
            del model
        except Exception as exc:
            traceback.print_exc()
            rows.append(dict(impl=name, error=f"{type(exc).__name__}: {exc}"[:300]))
    return rows


def layer_rows() -> list[dict]:
    """GB/s of weights read by each int8 path and bf16 F.linear on GPT-J-6B's weight shapes."""
    import torch.nn.functional as F

    from neoj import linear
    from neoj.quantize import QuantLinear, quantize_weight

    rows = []
    spec = QuantSpec.parse("int8")
    for out, inn in ((4096, 4096), (16384, 4096), (4096, 16384), (50400, 4096)):
        w = torch.randn(out, inn, device="cuda", dtype=torch.bfloat16) * 0.02
        layer = QuantLinear(quantize_weight(w, spec), spec, None, "cuda")
        for n in (1, 8):
            x = torch.randn(n, inn, device="cuda", dtype=torch.bfloat16)
            paths = {"bf16 F.linear": (lambda: F.linear(x, w), out * inn * 2)}
            for path in ("triton_int8", "int8pack_cuda", "int8_dequant"):
                paths[f"int8 {path}"] = (lambda p=path: linear.IMPLS[p](layer, x), out * inn)
            for label, (fn, nbytes) in paths.items():
                try:
                    for _ in range(3):
                        fn()
                    graph = torch.cuda.CUDAGraph()  # timed as replays, as decode runs them
                    with torch.cuda.graph(graph):
                        for _ in range(20):
                            fn()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    times = []
                    for _ in range(5):
                        start.record()
                        graph.replay()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end) / 1e3 / 20)
                    t = statistics.median(times)
                    rows.append(dict(shape=f"{out}x{inn}", rows=n, path=label, us=t * 1e6, gbs=nbytes / t / 1e9))
                except Exception as exc:
                    rows.append(dict(shape=f"{out}x{inn}", rows=n, path=label, error=f"{type(exc).__name__}: "
                                                                                    f"{exc}"[:200]))
    return rows


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "?"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return dict(gpu=props.name, memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                driver=driver, cuda=torch.version.cuda, torch=torch.__version__, triton=triton_version,
                python=platform.python_version(), cpu=platform.processor() or platform.machine())


def render(info: dict, bw: float, decode: list[dict], layers: list[dict], command: str) -> str:
    sheet = next((v for k, v in DATASHEET_TBS.items() if k in info["gpu"]), None)
    lines = [SECTION_BEGIN, "## GPU decode (bench/bench_gpu.py)", "",
             f"{_dt.date.today()}, {info['gpu']} ({info['memory_gib']:.0f} GiB, {info['sms']} SMs), driver "
             f"{info['driver']}, CUDA {info['cuda']}, torch {info['torch']}, Triton {info['triton']}, Python "
             f"{info['python']}. Command: `{command}`.", "",
             f"GPT-J-6B shape, random weights, greedy, {PROMPT}-token prompts; tok/s over all rows from the median "
             f"time between tokens. MBU: (weights + KV cache read per step) / step time / {bw / 1e12:.2f} TB/s, "
             "the device-to-device copy rate measured in this run"
             + (f" (the datasheet's {sheet} TB/s would give {bw / 1e12 / sheet:.0%} of these figures)." if sheet
                else "."), "",
             "ms/step is the wall time between tokens; graph ms the GPU time of the recorded step alone "
             "(CUDA events around a replay, no sampling or host work).", "",
             "| engine | batch | tok/s | ms/step | graph ms | weights GB | MBU |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in decode:
        if "error" in r:
            lines.append(f"| {r['impl']} | | failed: {r['error']} | | | | |")
        else:
            graph = f"{r['gpu_ms']:.2f}" if r.get("gpu_ms") else ""
            lines.append(f"| {r['impl']} | {r['batch']} | {r['tok_s']:.1f} | {r['step_ms']:.2f} | {graph} | "
                         f"{r['weight_gb']:.2f} | {r['mbu']:.0%} |")
    lines += ["", "int8 layer paths (neoj.linear) and bf16 F.linear, GPT-J-6B weight shapes, timed as CUDA-graph "
              "replays (20 calls each, median of 5): GB/s of weights read.", "",
              "| weight | rows | path | us | GB/s |", "|---|---:|---|---:|---:|"]
    for r in layers:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['path']} | failed: {r['error']} | |")
        else:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['path']} | {r['us']:.1f} | {r['gbs']:.0f} |")
    return "\n".join(lines + ["", SECTION_END, ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="file whose bench_gpu section is written")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: neoj, transformers, layers")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    skip = set(args.skip.split(","))
    info = machine()
    log(f"{info}")
    bw = copy_bandwidth()
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    cfg = preset("gpt-j-6b")
    tokenizer = Tokenizer.from_dir()
    layers = [] if "layers" in skip else layer_rows()
    decode = [] if "neoj" in skip else neoj_rows(cfg, tokenizer, args, bw)
    decode += [] if "transformers" in skip else hf_rows(cfg, args, bw)
    command = "python bench/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(info, bw, decode, layers, command.strip())
    if args.out != "-":  # "-": the print below is the section
        write_section(args.out, section, SECTION_BEGIN, SECTION_END)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=info, copy_bandwidth=bw, decode=decode, layers=layers),
                                              indent=1))
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
