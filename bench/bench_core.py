#!/usr/bin/env python
"""Core CPU benchmark: neoj against transformers on GPT-Neo shapes, in one run.

For each shape (GPT-Neo-125M, GPT-Neo-1.3B, random weights), dtype (float32, bfloat16) and
implementation (neoj, transformers eager) it measures, each (impl, shape, dtype) in fresh processes:

  * greedy decode tokens/s at batch 1 and batch 8 (after a short prompt, prefill excluded),
  * prefill tokens/s for a 512-token prompt,
  * load time from the saved checkpoint directory to a ready model + tokenizer,
  * peak RSS during load (VmHWM) and the loaded model's weight bytes.

It then writes (or replaces) a marked section of BENCHMARKS.md. Progress goes to stderr.

    python bench/bench_core.py                      # full default run (~15 min on 2 cores)
    python bench/bench_core.py --quick              # smoke test: 125M, tiny settings, prints the section

The random checkpoints are created once with transformers (GPTNeoConfig, save_pretrained, fp32
safetensors, as EleutherAI publishes them) under ~/.cache/neoj-bench/<shape> and reused.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_core`
from report import REPO, cpu_flags, cpu_model, git_rev, loadavg, logger, package_version  # noqa: E402
from report import section_markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_core")
RESULT_TAG = "BENCH_RESULT "
IMPLS = ("neoj", "transformers")
DTYPES = ("float32", "bfloat16")

# Published GPT-Neo shapes (EleutherAI/gpt-neo-125m and gpt-neo-1.3B config.json).
SHAPES = {
    "125m": {"title": "GPT-Neo-125M", "hidden_size": 768, "num_layers": 12, "num_heads": 12,
             "attention_types": [[["global", "local"], 6]]},
    "1.3b": {"title": "GPT-Neo-1.3B", "hidden_size": 2048, "num_layers": 24, "num_heads": 16,
             "attention_types": [[["global", "local"], 12]]},
}
COMMON_SHAPE = {"vocab_size": 50257, "max_position_embeddings": 2048, "window_size": 256}
CHECKPOINT_STAMP = "neoj-bench-shape.json"
# The CPU features the Machine line lists.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")

log = logger("bench_core")


# ---------------------------------------------------------------------------------------------
# Process memory


def proc_status_kb(field: str) -> int:
    """Returns a /proc/self/status field (VmRSS, VmHWM, ...) in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def model_bytes(module) -> tuple[int, int]:
    """Returns (parameter bytes, buffer bytes) of a module, a tensor shared by two names counted once."""
    seen: set[tuple[int, int]] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            key = (t.data_ptr(), t.numel())
            if key in seen:
                continue
            seen.add(key)
            n += t.numel() * t.element_size()
        return n

    return total(module.parameters()), total(module.buffers())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def shape_spec(shape: str) -> dict:
    s = SHAPES[shape]
    return {**COMMON_SHAPE, **{k: v for k, v in s.items() if k != "title"}}


def checkpoint_dir(cache: Path, shape: str) -> Path:
    return cache / shape


def checkpoint_ok(directory: Path, shape: str) -> bool:
    stamp = directory / CHECKPOINT_STAMP
    try:
        return json.loads(stamp.read_text()) == shape_spec(shape) and (directory / "model.safetensors").exists()
    except (OSError, json.JSONDecodeError):
        return False


def make_checkpoint(shape: str, directory: str) -> None:
    """(Subprocess) Creates a random GPT-Neo checkpoint of `shape` with transformers, plus tokenizer files."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    from neoj.tokenizer import EOS_TEXT, Tokenizer

    spec = shape_spec(shape)
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = GPTNeoConfig(**spec)
    model = GPTNeoForCausalLM(cfg).eval()  # fp32, transformers' own random init (std 0.02)
    model.save_pretrained(tmp)
    del model
    gc.collect()
    # GPT-Neo uses the GPT-2 tokenizer; write it into the directory so both implementations load it from there.
    backend = Tokenizer.from_dir().backend
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT, bos_token=EOS_TEXT,
                                     unk_token=EOS_TEXT)
    hf_tok.save_pretrained(tmp)
    (tmp / CHECKPOINT_STAMP).write_text(json.dumps(spec))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def warm_page_cache(directory: Path) -> None:
    """Reads the checkpoint files once so both implementations load from the OS page cache."""
    for f in sorted(directory.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(1 << 24):
                    pass


# ---------------------------------------------------------------------------------------------
# Worker: one process per (impl, shape, dtype) measurement


def bounded_repeats(fn, repeats: int, budget_s: float) -> list[float]:
    """Calls fn() up to `repeats` times (at least once), stopping early when the next call would
    overrun `budget_s` seconds for this metric. Returns fn's values."""
    values: list[float] = []
    t0 = time.perf_counter()
    while len(values) < repeats:
        t = time.perf_counter()
        values.append(fn())
        spent, last = time.perf_counter() - t0, time.perf_counter() - t
        if spent + last > budget_s:
            break
    return values


class Runner:
    """Loads one implementation and times its generate path with per-token timestamps."""

    def __init__(self, impl: str, directory: str, dtype: str):
        self.impl, self.directory, self.dtype_name = impl, directory, dtype

    def load(self):
        import torch

        dtype = getattr(torch, self.dtype_name)
        if self.impl == "neoj":
            import neoj

            self.lm = neoj.load(self.directory, dtype=self.dtype_name, device="cpu")
            self.module = self.lm.model
        else:
            from transformers import AutoTokenizer, GPTNeoForCausalLM

            self.tok = AutoTokenizer.from_pretrained(self.directory)
            self.module = GPTNeoForCausalLM.from_pretrained(self.directory, dtype=dtype,
                                                            attn_implementation="eager").eval()
            assert self.module.dtype == dtype, (self.module.dtype, dtype)

    def generate_stamps(self, prompt_ids: list[list[int]], new_tokens: int) -> tuple[float, list[float], list[list[int]]]:
        """Greedy-generates exactly new_tokens per row; returns (start time, time of each new token, tokens)."""
        import torch

        if self.impl == "neoj":
            from neoj.generate import stream_batch
            from neoj.sampling import GenerationParams

            params = GenerationParams(temperature=0, max_new_tokens=new_tokens, stop_at_eos=False)
            stamps: list[float] = []
            t0 = time.perf_counter()
            gen = stream_batch(self.lm.model, self.lm.tokenizer, prompt_ids, params)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    completions = stop.value
                    break
                stamps.append(time.perf_counter())
            return t0, stamps, [c.token_ids for c in completions]

        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor(prompt_ids, dtype=torch.long)
        streamer = Stamps()
        eos = self.module.config.eos_token_id
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.module.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       pad_token_id=eos, streamer=streamer)
        # The first put() is the prompt itself (before prefill); the rest are one per new token.
        return t0, streamer.times[1:], out[:, ids.shape[1]:].tolist()

    def decode_rate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """Returns (decode tokens/s over all rows, tokens): first token to last token, prefill excluded."""
        _, stamps, tokens = self.generate_stamps(prompts, new_tokens)
        assert len(stamps) == new_tokens and all(len(t) == new_tokens for t in tokens), (len(stamps), new_tokens)
        return len(prompts) * (new_tokens - 1) / (stamps[-1] - stamps[0]), tokens

    def prefill_rate(self, prompt: list[int]) -> float:
        """Returns prompt tokens/s: call start to the first new token (prefill + first token selection)."""
        t0, stamps, _ = self.generate_stamps([prompt], 1)
        return len(prompt) / (stamps[0] - t0)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    # Imported now, for their side effect only: their import time and memory stay out of the load time and sit
    # in the pre-load RSS baseline.
    if spec["impl"] == "neoj":
        importlib.import_module("neoj.generate")
    else:
        transformers = importlib.import_module("transformers")
        for name in ("AutoTokenizer", "GPTNeoForCausalLM"):  # transformers imports these lazily: import them now
            getattr(transformers, name)
        importlib.import_module("transformers.generation.streamers")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    gc.collect()
    runner = Runner(spec["impl"], spec["dir"], spec["dtype"])
    res: dict = {"rss_before_kb": proc_status_kb("VmRSS")}
    t = time.perf_counter()
    runner.load()
    res["load_s"] = time.perf_counter() - t
    res["peak_rss_kb"] = proc_status_kb("VmHWM")  # high-water mark: everything so far is import + load
    res["rss_after_kb"] = proc_status_kb("VmRSS")
    res["param_bytes"], res["buffer_bytes"] = model_bytes(runner.module)
    if spec["mode"] == "load":
        return res

    gen = torch.Generator().manual_seed(0)
    vocab = 50256  # ids below <|endoftext|>
    batch = spec["batch"]
    decode_prompts = torch.randint(0, vocab, (batch, spec["decode_prompt_tokens"]), generator=gen).tolist()
    prefill_prompt = torch.randint(0, vocab, (spec["prefill_tokens"],), generator=gen).tolist()
    reps, budget, n = spec["repeats"], spec["metric_budget_s"], spec["new_tokens"]
    tag = f"{spec['impl']} {spec['shape']} {spec['dtype']}"

    # Warm-up (first-call allocations, kernel selection/compilation), not in the rates. The first call is
    # reported on its own: it is what a user waits for after load in a fresh process.
    t = time.perf_counter()
    runner.decode_rate(decode_prompts[:1], 4)
    res["first_call_s"] = time.perf_counter() - t
    log(f"  {tag}: first generate call (4 tokens) {res['first_call_s']:.2f} s")
    runner.decode_rate(decode_prompts, 4)
    runner.prefill_rate(prefill_prompt[:32])

    tokens_b1: list[list[int]] = []

    def b1():
        rate, toks = runner.decode_rate(decode_prompts[:1], n)
        tokens_b1[:] = toks
        log(f"  {tag}: decode b1 {rate:.2f} tok/s")
        return rate

    def b8():
        rate, _ = runner.decode_rate(decode_prompts, n)
        log(f"  {tag}: decode b{batch} {rate:.2f} tok/s")
        return rate

    def prefill():
        rate = runner.prefill_rate(prefill_prompt)
        log(f"  {tag}: prefill {len(prefill_prompt)} {rate:.1f} tok/s")
        return rate

    res["decode_b1"] = bounded_repeats(b1, reps, budget)
    res["decode_bn"] = bounded_repeats(b8, reps, budget)
    res["prefill"] = bounded_repeats(prefill, spec["prefill_repeats"], budget)
    res["tokens_b1"] = tokens_b1[0]
    res["peak_rss_end_kb"] = proc_status_kb("VmHWM")
    return res


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (exit {proc.returncode}) for {spec}:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# ---------------------------------------------------------------------------------------------
# Machine description


def machine_description() -> dict:
    """Returns the machine for the section: CPU model, its features of FLAGS, cache, CPUs, memory."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    info: dict = {"model": cpu_model() or platform.processor() or "unknown", "flags": cpu_flags(FLAGS)}
    m = re.search(r"^cache size\s*:\s*(.+)$", text, re.M)
    info["cache"] = m.group(1).strip() if m else "?"
    info["logical_cpus"] = text.count("processor\t:") or os.cpu_count()
    try:
        info["nproc"] = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        info["nproc"] = len(os.sched_getaffinity(0))
    try:
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["mem_total_gib"] = int(mem.group(1)) / 2**20
    except (OSError, AttributeError):
        info["mem_total_gib"] = float("nan")
    return info


def copy_bandwidth_gbs(threads: int) -> float:
    """Returns the best of 5 torch copies of 512 MiB, counting bytes read + written, in GB/s."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(128 << 20, dtype=torch.float32)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    nbytes = 2 * src.numel() * 4
    del src, dst
    return nbytes / best / 1e9


def versions() -> dict:
    """Returns {"python", "torch", "transformers", "neoj": version, "git": revision}."""
    return {"python": platform.python_version(),
            **{pkg: package_version(pkg) for pkg in ("torch", "transformers", "neoj")},
            "git": git_rev(" with uncommitted changes in src/")}


# ---------------------------------------------------------------------------------------------
# Report


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def gib(kb_or_bytes: float | None, unit: int) -> float | None:
    return None if kb_or_bytes is None else kb_or_bytes * unit / 2**30


def summarize(runs: list[dict]) -> dict:
    """Returns the medians of one (impl, shape, dtype)'s processes; runs[0] is the full one."""
    full = runs[0]
    s = {
        "decode_b1": median(full.get("decode_b1", [])), "decode_b1_n": len(full.get("decode_b1", [])),
        "decode_bn": median(full.get("decode_bn", [])), "decode_bn_n": len(full.get("decode_bn", [])),
        "prefill": median(full.get("prefill", [])), "prefill_n": len(full.get("prefill", [])),
        "load_s": median(r["load_s"] for r in runs), "load_n": len(runs),
        "peak_rss": gib(median(r["peak_rss_kb"] for r in runs), 1024),
        "rss_before": gib(median(r["rss_before_kb"] for r in runs), 1024),
        "load_growth": gib(median(r["peak_rss_kb"] - r["rss_before_kb"] for r in runs), 1024),
        "weights": gib(full["param_bytes"], 1),
        "buffers": gib(full["buffer_bytes"], 1),
        "first_call_s": full.get("first_call_s"),
        "peak_rss_end": gib(full.get("peak_rss_end_kb"), 1024),
    }
    s["peak_over_weights"] = s["peak_rss"] / s["weights"]
    s["growth_over_weights"] = s["load_growth"] / s["weights"]
    return s


def render(meta: dict, results: dict) -> str:
    a = meta["args"]
    cpu = meta["cpu"]
    v = meta["versions"]
    lines = [SECTION_BEGIN, "## Core benchmark: neoj vs transformers (CPU)", ""]
    if a["quick"]:
        lines += ["> **Quick smoke-test settings (`--quick`): tiny token counts, single repeats — not representative.**", ""]
    lines += [
        f"Generated by `bench/bench_core.py` on {meta['date']} (took {meta['elapsed_min']:.1f} min).",
        "",
        "Command (from the repository root):",
        "",
        f"    {meta['command']}",
        "",
        f"- Machine: {cpu['model']}, {cpu['logical_cpus']} logical CPUs (nproc {cpu['nproc']}), "
        f"{cpu['mem_total_gib']:.1f} GiB RAM, cache {cpu['cache']}, ISA: {', '.join(cpu['flags']) or '?'}; "
        f"measured copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s (read + write, torch copy_ of 512 MiB, best of 5).",
        f"- Load average (1/5/15 min) at start: {meta['loadavg_start']}; at end: {meta['loadavg_end']} "
        "(the machine should be otherwise idle).",
        f"- Software: Python {v['python']}, torch {v['torch']} ({a['threads']} threads, "
        f"`torch.set_num_threads({a['threads']})`), transformers {v['transformers']} (eager attention), "
        f"neoj {v['neoj']} (git {v['git']}).",
        f"- Settings: decode = {a['new_tokens']} new tokens after a {a['decode_prompt_tokens']}-token prompt, "
        f"batch 1 and batch {a['batch']}; prefill = {a['prefill_tokens']}-token prompt; medians of up to "
        f"{a['repeats']} repeats per metric (prefill: {a['prefill_repeats_desc']}), each metric capped at "
        f"~{a['metric_budget']:.0f} s of repeats; load = median of {a['load_repeats']} fresh processes.",
        "",
    ]
    for shape in a["shapes"]:
        spec = SHAPES[shape]
        lines += [
            f"### {spec['title']} shape (random weights: hidden {spec['hidden_size']}, {spec['num_layers']} layers, "
            f"{spec['num_heads']} heads, vocab 50257, fp32 safetensors checkpoint)",
            "",
            "| dtype | metric | neoj | transformers | neoj / transformers |",
            "|---|---|---:|---:|---:|",
        ]
        for dtype in a["dtypes"]:
            key = f"{shape}/{dtype}"
            if key not in results:
                continue
            r = results[key]
            n, h = r.get("neoj"), r.get("transformers")
            rows = [
                ("decode tok/s, batch 1 ↑", "decode_b1", 2),
                (f"decode tok/s, batch {a['batch']} (all rows) ↑", "decode_bn", 2),
                (f"prefill tok/s, {a['prefill_tokens']}-token prompt ↑", "prefill", 1),
                ("load time, s ↓", "load_s", 2),
                ("first generate call after load (4 tokens), s ↓", "first_call_s", 2),
                ("peak RSS during load, GiB ↓", "peak_rss", 2),
                ("RSS before load (imports), GiB", "rss_before", 2),
                ("peak RSS − RSS before load, GiB ↓", "load_growth", 2),
                ("loaded weights (parameters), GiB", "weights", 3),
                ("other model buffers, GiB", "buffers", 3),
                ("peak RSS / weights ↓ (neoj target ≤ 1.2)", "peak_over_weights", 2),
                ("(peak RSS − RSS before load) / weights ↓ (target ≤ 1.2)", "growth_over_weights", 2),
                ("peak RSS over the whole benchmark process, GiB ↓", "peak_rss_end", 2),
            ]
            for label, k, d in rows:
                nv = n.get(k) if n else None
                hv = h.get(k) if h else None
                cells = []
                for side, val in ((n, nv), (h, hv)):
                    cell = fmt(val, d)
                    if side and k in ("decode_b1", "decode_bn", "prefill"):
                        want = a["prefill_repeats_for"](shape, dtype) if k == "prefill" else a["repeats"]
                        if side[f"{k}_n"] < want:
                            cell += f" (n={side[f'{k}_n']})"
                    cells.append(cell)
                ratio = f"{nv / hv:.2f}x" if nv is not None and hv and k != "buffers" else "—"
                lines.append(f"| {dtype} | {label} | {cells[0]} | {cells[1]} | {ratio} |")
            if r.get("match"):
                lines.append(f"| {dtype} | greedy batch-1 tokens identical (sanity) | {r['match']} | | |")
        lines.append("")
    lines += [
        "Notes:",
        "",
        "- ↑ higher is better, ↓ lower is better; the ratio column is neoj divided by transformers, so > 1 means "
        "neoj is faster for tok/s rows and < 1 means neoj is faster / leaner for time and memory rows. "
        "(n=K) marks a metric that got only K repeats because of its time cap.",
        "- Each (implementation, shape, dtype) runs in its own fresh process (no other model in memory); loads "
        "are timed in further fresh processes. Imports (torch, neoj / transformers) happen before the load clock "
        "starts and before the pre-load RSS sample.",
        "- Decode: both implementations generate greedily with exactly N new tokens per row (neoj: "
        "`neoj.generate.stream_batch` — the loop behind `generate_batch` / `LanguageModel.complete` — with "
        "`GenerationParams(temperature=0, max_new_tokens=N, stop_at_eos=False)`; transformers: "
        "`model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with a timestamping streamer). "
        "Decode tok/s = batch × (N − 1) / (time of token N − time of token 1): only the N − 1 one-token decode "
        "steps are timed, the prefill and first token are excluded, identically for both. Prompts are random "
        "token ids of equal length (no padding). One untimed warm-up generation precedes the timed ones.",
        "- Prefill: time from calling generate to the first new token for one prompt of P random tokens "
        "(prefill forward + last-position logits + greedy pick; transformers uses `logits_to_keep=1`), "
        "tok/s = P / time.",
        "- First generate call: wall time of the first (untimed-in-the-rates) 4-token batch-1 generation in the "
        "fresh process right after load; it includes one-time costs such as lazy imports and any kernel "
        "compilation (neoj compiles its CPU decode kernels with TorchInductor on first use; the compiled code is "
        "cached on disk across processes, so the very first run on a machine is slower still).",
        "- Load: `neoj.load(dir, dtype=..., device='cpu')` vs `AutoTokenizer.from_pretrained(dir)` + "
        "`GPTNeoForCausalLM.from_pretrained(dir, dtype=..., attn_implementation='eager')`, both reading the same "
        "fp32 `model.safetensors` (bfloat16 is converted while loading) and tokenizer.json. The checkpoint is "
        "read once beforehand, so loads come from the OS page cache.",
        "- Peak RSS is the process's VmHWM (/proc/self/status) right after the load, so it covers the imports "
        "and the load; 'RSS before load' is VmRSS after the imports. Weights = bytes of the loaded model's "
        "parameters (tied embedding counted once); transformers' GPT-Neo also keeps a 2048×2048 bool causal mask "
        "per layer as buffers (shown separately, not in the ratios). 'Peak RSS over the whole benchmark process' "
        "is VmHWM after all timed runs (weights actually touched, KV caches, compiled kernels). transformers "
        "memory-maps the safetensors file, so float32 weights it uses as-is stay file-backed and untouched "
        "until the first forward: its RSS right after a float32 load undercounts, the whole-process row does "
        "not. neoj's target is peak RSS during load ≤ 1.2× "
        "the loaded model size (the last two rows show it with and without the import baseline).",
        "- Greedy sanity row: batch-1 decode tokens of neoj and transformers compared position by position "
        "(float32 should match exactly; bfloat16 may diverge after a near-tie).",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Orchestration


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="comma list of 125m,1.3b (default: both; --quick: 125m)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32,bfloat16")
    p.add_argument("--impls", default="neoj,transformers", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per metric (default 3; --quick 1)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per row (default 32; --quick 8)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prefill prompt length (default 512; --quick 64)")
    p.add_argument("--decode-prompt-tokens", type=int, default=None, help="decode prompt length (default 16)")
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch (default 8)")
    p.add_argument("--prefill-repeats-1.3b", dest="prefill_repeats_big", type=int, default=2,
                   help="prefill repeats on 1.3B (default 2; each 512-token prefill is many seconds)")
    p.add_argument("--load-repeats", type=int, default=None, help="fresh load processes per cell (default: --repeats)")
    p.add_argument("--metric-budget", type=float, default=None,
                   help="stop repeating a metric once it has used this many seconds (default 40; --quick 20)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--cache-dir", default=os.environ.get("NEOJ_BENCH_CACHE", "~/.cache/neoj-bench"),
                   help="where the random checkpoints live (default ~/.cache/neoj-bench, or $NEOJ_BENCH_CACHE)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (prints the section "
                   "unless --out is given)")
    p.add_argument("--out", default=None, help="markdown file whose bench_core section is written/replaced "
                   "(default BENCHMARKS.md; --quick: '-' = stdout)")
    p.add_argument("--json", default=None, help="also write the raw per-process results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-checkpoint", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.shapes = [s.strip().lower() for s in (args.shapes or ("125m" if q else "125m,1.3b")).split(",") if s.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    for i in args.impls:
        if i not in IMPLS:
            p.error(f"unknown implementation {i!r}")
    args.repeats = args.repeats or (1 if q else 3)
    args.new_tokens = args.new_tokens or (8 if q else 32)
    args.prefill_tokens = args.prefill_tokens or (64 if q else 512)
    args.decode_prompt_tokens = args.decode_prompt_tokens or (8 if q else 16)
    args.load_repeats = args.load_repeats or args.repeats
    args.metric_budget = args.metric_budget or (20.0 if q else 40.0)
    args.out = args.out or ("-" if q else str(REPO / "BENCHMARKS.md"))
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode is timed from the first to the last new token)")
    return args


def prefill_repeats(args, shape: str) -> int:
    return min(args.repeats, args.prefill_repeats_big) if shape == "1.3b" else args.repeats


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        res = worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return
    if args.make_checkpoint:
        make_checkpoint(*args.make_checkpoint)
        return

    started = time.time()
    la_start = loadavg()
    cache = Path(args.cache_dir).expanduser()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else
                                               "bench/bench_core.py"] + (argv if argv is not None else sys.argv[1:])),
            "cpu": machine_description(), "versions": versions(), "loadavg_start": la_start}
    log(f"machine: {meta['cpu']['model']}, nproc {meta['cpu']['nproc']}, load average {la_start}")
    if la_start != "?" and float(la_start.split()[0]) > 0.5:
        log("warning: the machine is busy (load average > 0.5); timings will be noisy")
    meta["bandwidth_gbs"] = copy_bandwidth_gbs(args.threads)
    log(f"copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s")

    raw: dict = {}
    results: dict = {}
    timeout = 3600
    for shape in args.shapes:
        directory = checkpoint_dir(cache, shape)
        if not checkpoint_ok(directory, shape):
            log(f"creating the random {SHAPES[shape]['title']} checkpoint in {directory} (once)")
            directory.parent.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-checkpoint", shape, str(directory)],
                           check=True, env=env)
        warm_page_cache(directory)
        for dtype in args.dtypes:
            key = f"{shape}/{dtype}"
            results[key] = {}
            for impl in args.impls:
                base = {"impl": impl, "shape": shape, "dtype": dtype, "dir": str(directory), "threads": args.threads}
                spec = {**base, "mode": "full", "repeats": args.repeats, "prefill_repeats": prefill_repeats(args, shape),
                        "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
                        "decode_prompt_tokens": args.decode_prompt_tokens, "batch": args.batch,
                        "metric_budget_s": args.metric_budget}
                log(f"{impl} {shape} {dtype}: load + decode + prefill (elapsed {(time.time() - started) / 60:.1f} min)")
                runs = [run_worker(spec, timeout)]
                log(f"  {impl} {shape} {dtype}: load {runs[0]['load_s']:.2f} s, peak RSS "
                    f"{runs[0]['peak_rss_kb'] / 2**20:.2f} GiB, weights "
                    f"{(runs[0]['param_bytes'] + runs[0]['buffer_bytes']) / 2**30:.3f} GiB")
                for i in range(args.load_repeats - 1):
                    runs.append(run_worker({**base, "mode": "load"}, timeout))
                    log(f"  {impl} {shape} {dtype}: load {runs[-1]['load_s']:.2f} s, peak RSS "
                        f"{runs[-1]['peak_rss_kb'] / 2**20:.2f} GiB (load repeat {i + 2})")
                raw[f"{key}/{impl}"] = runs
                results[key][impl] = summarize(runs)
            toks = [raw.get(f"{key}/{impl}", [{}])[0].get("tokens_b1") for impl in ("neoj", "transformers")]
            if all(toks):
                same = sum(x == y for x, y in zip(*toks))
                results[key]["match"] = f"{same}/{len(toks[0])}"

    meta["loadavg_end"] = loadavg()
    meta["elapsed_min"] = (time.time() - started) / 60
    meta["args"] = {**vars(args), "prefill_repeats_for": lambda s, d: prefill_repeats(args, s),
                    "prefill_repeats_desc": (f"{prefill_repeats(args, '1.3b')} on 1.3B"
                                             if "1.3b" in args.shapes and prefill_repeats(args, "1.3b") < args.repeats
                                             else "same")}
    write_section(args.out, render(meta, results), SECTION_BEGIN, SECTION_END, log)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": {k: v for k, v in meta.items() if k != "args"},
                                               "args": {k: v for k, v in vars(args).items()},
                                               "results": results, "raw": raw}, indent=1, default=str))
        log(f"wrote raw results to {args.json}")
    log(f"done in {meta['elapsed_min']:.1f} min")


if __name__ == "__main__":
    main()
