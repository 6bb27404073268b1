#!/usr/bin/env python
"""Quantization benchmark: neoj int8 / int4 (and fp32 / bf16) against transformers, side by side in one run.

For each shape (GPT-Neo-125M, GPT-Neo-1.3B, GPT-J-6B; random weights of the published shapes) every
configuration runs in its own fresh process and reports: load time, peak RSS after loading and at the
end (VmHWM), greedy decode tokens/s at batch 1 (first to last new token, median of repeats), prefill
tokens/s, the bytes of weights one decode step reads, and memory-bandwidth utilisation = bytes read per
token x tokens/s / the read bandwidth measured here at the start of the run (a 1 GiB sum).

transformers runs eager attention, in fp32 on the GPT-Neo shapes and in bf16 on GPT-J (its fp32 weights,
24 GB, do not fit this machine). neoj int8/int4 load the same checkpoints and quantize while reading;
on GPT-J they load both the bf16 checkpoint and the fp32 one (the official main branch is fp32).

Quality: on the built-in model and the documents its training held out (pydocs-train.jsonl, 5% by
document, seed 0), perplexity of fp32, int8 and int4 over a slice of that text, and greedy agreement with
fp32 over 128 new tokens.

    python bench/bench_quant.py                      # everything (~40 min on 2 cores; GPT-J needs 24 GB RAM
                                                     # and ~40 GB of disk for its checkpoints, made once)
    python bench/bench_quant.py --shapes 125m,1.3b   # skip GPT-J
    python bench/bench_quant.py --quick              # smoke test: 125M, few tokens, prints the section
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, bench_core.py, also under python -m
import bench_core  # noqa: E402  (checkpoints of the GPT-Neo shapes, machine description, versions)
from report import REPO, loadavg, logger, section_markers, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_quant")
RESULT_TAG = "BENCH_RESULT "
GPTJ_DIRS = {"bfloat16": "gpt-j-6b-bf16", "float32": "gpt-j-6b-fp32"}
PROMPTS = ["The list type", "To open a file for reading,", "def fibonacci(n):", "The following example shows"]


log = logger("bench_quant")


def vm_kb(field: str) -> int:
    return bench_core.proc_status_kb(field)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def gptj_checkpoints(cache: Path) -> dict[str, Path]:
    """Returns {dtype: directory} of random GPT-J-6B checkpoints in bf16 and fp32, making them once.

    Written tensor by tensor in 2 GiB shards (as the Hub's sharded checkpoints are), so making them
    needs a few GB of RAM, not the 24 GB of the fp32 model.
    """
    import torch

    from neoj.config import preset
    from neoj.quantize import ShardWriter
    from neoj.weights import build_meta, expected_tensors, neoj_to_hf_name

    dirs = {d: cache / name for d, name in GPTJ_DIRS.items()}
    if all((p / "DONE").exists() for p in dirs.values()):
        return dirs
    cfg = preset("gpt-j-6b")
    log("making random GPT-J-6B checkpoints (bf16 12 GB + fp32 24 GB; once)")
    writers = {}
    for d, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            f.unlink()
        writers[d] = ShardWriter(path, 2 << 30)
    gen = torch.Generator().manual_seed(0)
    for name, p in expected_tensors(build_meta(cfg)).items():
        if name.endswith("bias"):
            t = torch.zeros(p.shape)
        elif ".ln_" in name or name.startswith("ln_f"):
            t = torch.ones(p.shape)
        else:
            t = torch.empty(p.shape).normal_(0.0, 0.02, generator=gen)
        key = neoj_to_hf_name(name, cfg.model_type)
        writers["bfloat16"].add(key, t.to(torch.bfloat16))
        writers["float32"].add(key, t)
    for d, path in dirs.items():
        writers[d].close({"format": "pt"})
        cfg.save(path)
        (path / "DONE").write_text("ok\n")
    return dirs


def neo_checkpoint(cache: Path, shape: str) -> Path:
    directory = bench_core.checkpoint_dir(cache, shape)
    if not bench_core.checkpoint_ok(directory, shape):
        log(f"making the {shape} checkpoint (once)")
        subprocess.run([sys.executable, str(REPO / "bench" / "bench_core.py"), "--make-checkpoint", shape,
                        str(directory)], check=True)
    return directory


# ---------------------------------------------------------------------------------------------
# Worker


def hf_read_bytes(model) -> int:
    """Bytes a transformers decode step reads: every distinct weight but the embedding tables (a tied head counts)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    seen, total = set(), 0
    for name, t in named.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for emb in ("transformer.wte.weight", "transformer.wpe.weight"):
        t = named.get(emb)
        if t is not None and not (emb.endswith("wte.weight") and named["lm_head.weight"].data_ptr() == t.data_ptr()):
            total -= t.numel() * t.element_size()
    return total


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["impl"] == "neoj":
        import neoj
        from neoj.generate import stream_batch
        from neoj.quantize import decode_read_bytes
        from neoj.sampling import GenerationParams
    else:
        from transformers import AutoModelForCausalLM
        from transformers.generation.streamers import BaseStreamer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    gc.collect()
    res: dict = {"rss_before_kb": vm_kb("VmRSS")}
    t = time.perf_counter()
    if spec["impl"] == "neoj":
        lm = neoj.load(spec["dir"], dtype=spec["dtype"], device="cpu", quantize=spec["quantize"])
        res["read_bytes"] = decode_read_bytes(lm.model)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=getattr(torch, spec["dtype"]),
                                                     attn_implementation="eager").eval()
        res["read_bytes"] = hf_read_bytes(model)
    res["load_s"] = time.perf_counter() - t
    res["peak_rss_load_kb"] = vm_kb("VmHWM")

    def stamps(prompt: list[int], n: int) -> tuple[float, list[float], list[int]]:
        times: list[float] = []
        if spec["impl"] == "neoj":
            params = GenerationParams(temperature=0, max_new_tokens=n, stop_at_eos=False)
            t0 = time.perf_counter()
            gen = stream_batch(lm.model, lm.tokenizer, [prompt], params)
            while True:
                try:
                    next(gen)
                except StopIteration as stop:
                    return t0, times, stop.value[0].token_ids
                times.append(time.perf_counter())

        class Stamps(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=50256, streamer=Stamps())
        return t0, times[1:], out[0, ids.shape[1]:].tolist()  # the first put() is the prompt

    gen = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(0, 50256, (spec["decode_prompt_tokens"],), generator=gen).tolist()
    prefill_prompt = torch.randint(0, 50256, (spec["prefill_tokens"],), generator=gen).tolist()
    t = time.perf_counter()
    stamps(decode_prompt, 2)  # warm-up: first-call allocations and kernel selection
    res["first_call_s"] = time.perf_counter() - t
    tag = f"{spec['label']} {spec['shape']}"
    rates = []
    for _ in range(spec["repeats"]):
        _, times, tokens = stamps(decode_prompt, spec["new_tokens"])
        rates.append((len(times) - 1) / (times[-1] - times[0]))
        log(f"  {tag}: decode b1 {rates[-1]:.2f} tok/s")
    res["decode_b1"] = rates
    res["tokens"] = tokens
    t0, times, _ = stamps(prefill_prompt, 1)
    res["prefill"] = len(prefill_prompt) / (times[0] - t0)
    log(f"  {tag}: prefill {len(prefill_prompt)} tokens {res['prefill']:.2f} tok/s")
    res["peak_rss_end_kb"] = vm_kb("VmHWM")
    return res


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", NEOJ_MEMORY_LIMIT=os.environ.get("NEOJ_MEMORY_LIMIT", ""))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed (exit {proc.returncode}) for {spec}:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_TAG):])


# ---------------------------------------------------------------------------------------------
# Quality on the built-in model


def quality(data: Path, eval_tokens: int, threads: int) -> dict:
    import torch

    import neoj
    from neoj.train.data import load_dataset
    from neoj.train.evaluate import perplexity

    torch.set_num_threads(threads)
    base = neoj.load(dtype="float32", device="cpu")
    held = load_dataset([data], base.tokenizer, 512, val_fraction=0.05, seed=0).val
    ids = held.ids.reshape(-1)[:eval_tokens]
    out = {"tokens": int(ids.numel())}
    ref_tokens = {p: base.complete(p, max_new_tokens=128, temperature=0, stop_at_eos=False)[0].token_ids
                  for p in PROMPTS}
    for label, kw in (("float32", {"dtype": "float32"}), ("bfloat16", {"dtype": "bfloat16"}),
                      ("int8", {"quantize": "int8"}), ("int4", {"quantize": "int4"})):
        lm = neoj.load(device="cpu", **kw)
        ppl = perplexity(lm.model, ids, max_length=512, stride=512)["perplexity"]
        same, first = 0, []
        for p, want in ref_tokens.items():
            got = lm.complete(p, max_new_tokens=128, temperature=0, stop_at_eos=False)[0].token_ids
            same += sum(a == b for a, b in zip(got, want))
            first.append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 128))
        out[label] = {"perplexity": ppl, "agreement": same / (128 * len(PROMPTS)), "first_divergence": first}
        log(f"  quality {label}: perplexity {ppl:.3f}, greedy agreement {out[label]['agreement']:.3f}, "
            f"first divergence {first}")
    return out


# ---------------------------------------------------------------------------------------------
# Orchestration and report


def read_bandwidth_gbs(threads: int) -> float:
    """Returns the median of 11 sums over 1 GiB of fp32 with `threads` threads: bytes read per second, GB/s.

    The median, not the best: single runs on this shared VM range from 25 to 45 GB/s.
    """
    import torch

    torch.set_num_threads(threads)
    x = torch.rand(256 << 20, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(11):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / median(times) / 1e9


def configs(shape: str) -> list[dict]:
    if shape == "6b":
        return [dict(label="transformers bf16", impl="hf", dtype="bfloat16", quantize=None, ckpt="bfloat16"),
                dict(label="neoj int8", impl="neoj", dtype="auto", quantize="int8", ckpt="bfloat16"),
                dict(label="neoj int4", impl="neoj", dtype="auto", quantize="int4", ckpt="bfloat16"),
                dict(label="neoj int8 (fp32 ckpt)", impl="neoj", dtype="auto", quantize="int8", ckpt="float32"),
                dict(label="neoj int4 (fp32 ckpt)", impl="neoj", dtype="auto", quantize="int4", ckpt="float32")]
    return [dict(label="transformers fp32", impl="hf", dtype="float32", quantize=None),
            dict(label="neoj fp32", impl="neoj", dtype="float32", quantize=None),
            dict(label="neoj bf16", impl="neoj", dtype="bfloat16", quantize=None),
            dict(label="neoj int8", impl="neoj", dtype="auto", quantize="int8"),
            dict(label="neoj int4", impl="neoj", dtype="auto", quantize="int4")]


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def render(meta: dict, results: dict, qual: dict | None) -> str:
    bw = meta["read_bandwidth_gbs"]
    lines = [SECTION_BEGIN, "## Quantization: int8 / int4 weight-only, memory, bandwidth (CPU)", "",
             f"- Machine: {meta['cpu']}, {meta['threads']} threads, {meta['ram_gib']:.0f} GiB RAM; "
             f"read bandwidth at the start **{bw:.1f} GB/s** (median of 11 sums over 1 GiB, {meta['threads']} threads; "
             "measured again before every row, in the table)",
             f"- Date: {meta['date']}; load average at start {meta['loadavg']}",
             f"- Command: `{meta['command']}`",
             f"- Versions: {meta['versions']}",
             "- Random weights of the published shapes. Each row is a fresh process. Decode: greedy, batch 1, "
             "first to last new token (median of the repeats). Prefill: prompt tokens / time to the first token. "
             "Peak RSS: VmHWM after loading, and at the end. Bandwidth use: weight bytes read per token x "
             "tokens/s / the read bandwidth measured just before that row. Ratios are against the transformers row of the same shape.",
             ""]
    titles = {"125m": "GPT-Neo-125M", "1.3b": "GPT-Neo-1.3B", "6b": "GPT-J-6B"}
    for shape, rows in results.items():
        spec = rows[0]["spec"]
        lines += [f"### {titles[shape]} shape ({spec['new_tokens']} new tokens x {spec['repeats']} repeats after a "
                  f"{spec['decode_prompt_tokens']}-token prompt; prefill {spec['prefill_tokens']} tokens)", "",
                  "| configuration | load s | peak RSS load / end GiB | weights read / token | decode tok/s "
                  "| vs transformers | bandwidth use (GB/s measured) | prefill tok/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        ref = median(rows[0]["decode_b1"])
        for r in rows:
            rate = median(r["decode_b1"])
            use = r["read_bytes"] * rate / (r["bandwidth_gbs"] * 1e9)
            lines.append(f"| {r['spec']['label']} | {r['load_s']:.1f} | {r['peak_rss_load_kb'] / 2**20:.2f} / "
                         f"{r['peak_rss_end_kb'] / 2**20:.2f} | {r['read_bytes'] / 2**20:,.0f} MiB | {rate:.2f} | "
                         f"{rate / ref:.2f}x | {use:.0%} ({r['bandwidth_gbs']:.0f}) | {r['prefill']:.1f} |")
        lines.append("")
    if qual:
        lines += [f"### Quality on the built-in model ({qual['tokens']:,} held-out tokens, windows of 512)", "",
                  "| weights | perplexity | vs fp32 | greedy agreement with fp32 (128 tokens x 4 prompts) "
                  "| first divergence per prompt |", "|---|---:|---:|---:|---|"]
        ref = qual["float32"]["perplexity"]
        for label in ("float32", "bfloat16", "int8", "int4"):
            q = qual[label]
            lines.append(f"| {label} | {q['perplexity']:.3f} | {q['perplexity'] / ref - 1:+.2%} | "
                         f"{q['agreement']:.1%} | {q['first_divergence']} |")
        lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="125m,1.3b,6b", help="comma-separated: 125m, 1.3b, 6b")
    p.add_argument("--only", default=None, help="run only configurations whose label contains this text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="125M only, few tokens, prints the section")
    p.add_argument("--no-quality", action="store_true", help="skip the built-in model's quality table")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pydocs-train.jsonl"))
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for perplexity (16384)")
    p.add_argument("--cache-dir", default=os.environ.get("NEOJ_BENCH_CACHE", str(Path.home() / ".cache" / "neoj-bench")))
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bandwidth:
        print(read_bandwidth_gbs(args.bandwidth))
        return
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    shapes = ["125m"] if args.quick else args.shapes.split(",")
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    cpu = bench_core.machine_description()
    meta = {"cpu": f"{cpu.get('model', platform.processor())} ({', '.join(cpu.get('flags', []))})",
            "threads": args.threads,
            "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "loadavg": loadavg(),
            "command": "python bench/bench_quant.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": ", ".join(f"{k} {v}" for k, v in bench_core.versions().items()),
            "read_bandwidth_gbs": read_bandwidth_gbs(args.threads)}
    log(f"read bandwidth {meta['read_bandwidth_gbs']:.1f} GB/s")
    results: dict = {}
    for shape in shapes:
        if shape == "6b":
            dirs = gptj_checkpoints(cache)
            run = dict(new_tokens=16, repeats=2, decode_prompt_tokens=16, prefill_tokens=32)
        else:
            ckpt = neo_checkpoint(cache, shape)
            bench_core.warm_page_cache(ckpt)
            quick = dict(new_tokens=8, repeats=1, decode_prompt_tokens=8, prefill_tokens=32)
            run = quick if args.quick else dict(new_tokens=32, repeats=3, decode_prompt_tokens=16,
                                                prefill_tokens=128)
        rows = []
        for c in configs(shape):
            if args.only and args.only not in c["label"] and c["impl"] != "hf":
                continue
            directory = dirs[c.pop("ckpt")] if shape == "6b" else ckpt
            spec = {**c, **run, "shape": shape, "dir": str(directory), "threads": args.threads}
            log(f"{spec['label']} on {shape}")
            # Bandwidth right before each row, in its own process (it would add 1 GiB to the row's RSS):
            # this VM's bandwidth drifts between 25 and 45 GB/s over minutes.
            bw = float(subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bandwidth",
                                       str(args.threads)], capture_output=True, text=True, check=True).stdout)
            res = run_worker(spec, timeout=3600)
            res["bandwidth_gbs"] = bw
            res["spec"] = spec
            rows.append(res)
            if args.json:  # after every row: a crash later loses nothing measured
                Path(args.json).write_text(json.dumps({"meta": meta, "results": {**results, shape: rows}}, indent=2))
            log(f"  load {res['load_s']:.1f} s, peak RSS {res['peak_rss_load_kb'] / 2**20:.2f} GiB, decode "
                f"{median(res['decode_b1']):.2f} tok/s, end peak {res['peak_rss_end_kb'] / 2**20:.2f} GiB")
        results[shape] = rows
    qual = None if args.no_quality or args.quick else quality(Path(args.data), args.eval_tokens, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "quality": qual}, indent=2))
    write_section("-" if args.quick else args.out, render(meta, results, qual), SECTION_BEGIN, SECTION_END, log)


if __name__ == "__main__":
    main()
