#!/usr/bin/env python
"""Many LoRA adapters in one batch: decode tokens/s at batch 8 with 0, 1 and 4 distinct adapters in the batch.

On the GPT-Neo-125M shape (random weights, float32), the engine decodes 8 greedy rows together:

- base alone: the model with no adapter loaded (no wrappers at all);
- 0 adapters in the batch: 4 adapters loaded (r=8 on q_proj and v_proj), every row on the base model;
- 1 adapter: all 8 rows on the same adapter;
- 4 adapters: 2 rows on each of 4 adapters.

Only decode steps are timed (the prompts are prefilled first): new tokens of all rows / seconds. The
configurations are interleaved over rounds, in one process (the two models stay loaded); the best round
per configuration is compared (other programs on the machine only ever slow a round down).

    python bench/bench_adapters.py                 # writes the bench_adapters section of BENCHMARKS.md
    python bench/bench_adapters.py --quick --out -  # smoke test, prints the section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_adapters`
from report import cpu_flags, date_line, section_markers, write_section  # noqa: E402

import neoj  # noqa: E402  (before torch: neoj sets its OpenMP wait policy first)

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from neoj.engine import Engine  # noqa: E402
from neoj.sampling import GenerationParams  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_adapters")
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")  # listed on the Machine line
BATCH = 8
PROMPTS = ["The list type", "To open a file for", "def fibonacci(n):", "The following example",
           "In the beginning", "Python is a", "A dictionary maps", "The tuple type"]
# configuration -> the adapter of each of the 8 rows
CONFIGS = {
    "base alone (no adapter loaded)": [None] * BATCH,
    "0 adapters in the batch (4 loaded)": [None] * BATCH,
    "1 adapter (8 rows)": ["a0"] * BATCH,
    "4 adapters (2 rows each)": [f"a{i % 4}" for i in range(BATCH)],
}


def write_adapter(directory: Path, cfg, r: int, seed: int) -> None:
    """Writes a PEFT LoRA adapter of rank r on q_proj and v_proj with random A and B (as a trained one)."""
    gen = torch.Generator().manual_seed(seed)
    c = cfg.hidden_size
    tensors = {}
    for layer in range(cfg.n_layers):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.transformer.h.{layer}.attn.attention.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, c, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(c, r, generator=gen) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def decode_tokens_per_s(lm, adapters: list[str | None], tokens: int) -> float:
    """Returns the decode tokens/s of BATCH greedy rows decoded together (prefill not timed)."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=BATCH)
    for prompt, adapter in zip(PROMPTS, adapters):
        params = GenerationParams(max_new_tokens=tokens, temperature=0, stop_at_eos=False, adapter=adapter)
        engine.submit([lm.tokenizer.encode(prompt)], params, lambda event: None)
    with torch.inference_mode():
        engine.admit()  # every prompt prefilled, first tokens chosen
        assert len(engine.running) == BATCH
        start = time.perf_counter()
        while engine.running:
            engine.decode()
        seconds = time.perf_counter() - start
    return BATCH * (tokens - 1) / seconds


def run(args) -> dict[str, list[float]]:
    base = neoj.from_config("gpt-neo-125m", dtype="float32", device="cpu")
    served = neoj.from_config("gpt-neo-125m", dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(4):
            write_adapter(Path(tmp) / f"a{i}", served.config, args.rank, seed=i)
            served.load_adapter(f"a{i}", Path(tmp) / f"a{i}")
    models = {name: base if name.startswith("base") else served for name in CONFIGS}
    for name, rows in CONFIGS.items():  # warm-up: kernels built, caches and allocator settled
        decode_tokens_per_s(models[name], rows, 4)
    results: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, rows in CONFIGS.items():
            results[name].append(decode_tokens_per_s(models[name], rows, args.tokens))
            print(f"round {r + 1}: {name}: {results[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return results


def section(results: dict[str, list[float]], args, load: float) -> str:
    quick = " --quick" if args.quick else ""
    base = max(results["base alone (no adapter loaded)"])
    lines = [SECTION_BEGIN, "## Many LoRA adapters in one batch: decode tokens/s (CPU, bench/bench_adapters.py)", "",
             f"- Machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
             f"ISA: {' '.join(cpu_flags(FLAGS)) or platform.machine()}; load average at start {load:.2f}",
             date_line(),
             f"- Command: `python bench/bench_adapters.py{quick}`",
             f"- GPT-Neo-125M shape, random weights, float32; {BATCH} greedy rows decoded together by the engine, "
             f"{args.tokens} new tokens each, decode steps only; adapters r={args.rank} on q_proj and v_proj "
             f"(every layer); {args.rounds} interleaved rounds. Other programs slow a round down, never up: the best "
             "round is the estimate compared, the median and range show the noise.", "",
             "| batch of 8 rows | tokens/s (best) | median [range] | best vs base alone |", "|---|---:|---:|---:|"]
    for name, values in results.items():
        best, mid = max(values), statistics.median(values)
        lines.append(f"| {name} | {best:.1f} | {mid:.1f} [{min(values):.1f}-{best:.1f}] | {best / base:.2f}x |")
    lines += ["", "Rows with no adapter cost nothing extra: the wrappers return the base layer's output when no row "
              "of the step has an adapter. With one adapter in the step, each wrapped layer adds two rank-r products "
              "on its rows; with several, one gather of every row's A and B and two batched products (neoj.adapters).",
              SECTION_END]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per row (32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (8)")
    parser.add_argument("--quick", action="store_true", help="8 tokens, 1 round")
    parser.add_argument("--out", default="BENCHMARKS.md", help="file to write the section to (- prints it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.rounds = 8, 1
    load = os.getloadavg()[0]
    write_section(args.out, section(run(args), args, load), SECTION_BEGIN, SECTION_END)


if __name__ == "__main__":
    main()
