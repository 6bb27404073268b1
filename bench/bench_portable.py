#!/usr/bin/env python
"""Portable decode benchmark: neoj's CPU kernels per ISA against CTranslate2 and transformers, one run.

Greedy decode tokens/s (prefill excluded: first new token to last) of a GPT-J-architecture model
(hidden 2048 x 16 layers, 16 heads, rotary 64, vocab 50400: random weights, one fp32 safetensors
checkpoint that every engine loads or converts) at batch 1 and batch 8, and of the GPT-Neo-125M and
GPT-Neo-1.3B shapes at batch 1 (neoj int8 against transformers fp32), for:

  neoj fp32 / int8 / int4     dtype "auto", as `neoj.load` picks it: bf16 where PyTorch may use the CPU's
                              bf16 instructions (never in avx2 rows), fp32 elsewhere (the compute column)
  CTranslate2 int8 / fp32     the transformers checkpoint converted by ctranslate2's
                              TransformersConverter; int8 is compute_type="int8" (quantized at load)
  transformers fp32           AutoModelForCausalLM, eager attention

each twice where the CPU has more than AVX2: once held to AVX2 in every library the process uses (AVX2_CAPS:
the code an AVX2-only CPU runs, neoj's and its peers' alike) and once with the CPU's own best.

Each configuration runs in its own process (load, warm-up, then batch 1 and batch 8 repeats); rounds
interleave the configurations, and the table reports medians over rounds. The machine may be shared:
compare ratios within the run, not with other runs. Writes a marked section of BENCHMARKS.md.

    python bench/bench_portable.py                 # ~30 min on 2 cores (checkpoints are made once)
    python bench/bench_portable.py --quick --out - # smoke test: tiny settings, prints the section
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_portable`
from report import REPO, cpu_description, git_rev, loadavg, logger, section_markers, software_line  # noqa: E402
from report import write_section  # noqa: E402

RESULT_TAG = "BENCH_RESULT "
# The OpenMP wait policy the user started the benchmark with: this parent imports neoj (for the CPU's kernel
# variants), which may set OMP_WAIT_POLICY in os.environ, and the workers must not inherit that: each engine runs
# with its own default (neoj's is decided in its worker, which imports neoj first, as `neoj generate` does).
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
GPTJ = {"model_type": "gptj", "vocab_size": 50400, "n_positions": 2048, "n_embd": 2048, "n_layer": 16,
        "n_head": 16, "rotary_dim": 64}
NEO125 = {"model_type": "gpt_neo", "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 768,
          "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]], "window_size": 256}
NEO13B = {**NEO125, "hidden_size": 2048, "num_layers": 24, "num_heads": 16, "attention_types": [[["global", "local"], 12]]}
# The GPT-Neo shapes: (label in the tables, checkpoint directory name, transformers config).
NEO_SHAPES = (("125M", "gpt-neo-125m", NEO125), ("1.3B", "gpt-neo-1.3b", NEO13B))


log = logger("bench_portable")


# ---------------------------------------------------------------------------------------------
# Checkpoints (made once, each in a subprocess so the parent stays small)


def make_hf_checkpoint(shape: dict, directory: Path) -> None:
    """Writes a random transformers checkpoint of `shape` (fp32 safetensors) and GPT-2 tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from neoj.tokenizer import EOS_TEXT, Tokenizer

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**shape)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(tmp)  # transformers' init (std 0.02)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_dir().backend, eos_token=EOS_TEXT,
                                  bos_token=EOS_TEXT, unk_token=EOS_TEXT)
    # GPT-J pads its vocabulary to 50400 with added tokens, as EleutherAI's tokenizer does (CTranslate2's
    # converter checks that the vocabulary matches the embedding).
    tok.add_tokens([f"<|extratoken_{i}|>" for i in range(1, cfg.vocab_size - len(tok) + 1)])
    tok.save_pretrained(tmp)
    tmp.rename(directory)


def make_neoj_quantized(source: Path, scheme: str, directory: Path) -> None:
    """Writes neoj's quantized checkpoint of `source` (what `neoj quantize` writes)."""
    from neoj.quantize import QuantSpec, quantize_checkpoint

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    quantize_checkpoint(source, tmp, QuantSpec(scheme))
    tmp.rename(directory)


def make_ct2(source: Path, directory: Path) -> None:
    """Converts `source` with CTranslate2's TransformersConverter (fp32 weights; int8 is quantized at load)."""
    from ctranslate2.converters import TransformersConverter

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    TransformersConverter(str(source)).convert(str(tmp), force=True)
    tmp.rename(directory)


def ensure(directory: Path, what: str, *args) -> Path:
    """Runs make_<what>(*args, directory) in a fresh Python unless `directory` exists; returns it.

    Path arguments travel as strings and come back as Paths; dicts (shapes) as JSON."""
    if not directory.exists():
        log(f"making {directory}")
        payload = json.dumps([[str(a), "path"] if isinstance(a, Path) else [a, "value"] for a in [*args, directory]])
        code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); from pathlib import Path; "
                "import bench_portable as b; "
                f"args = [Path(v) if k == 'path' else v for v, k in json.loads({payload!r})]; b.make_{what}(*args)")
        subprocess.run([sys.executable, "-c", code], check=True, env=worker_env({}))
    return directory


# ---------------------------------------------------------------------------------------------
# Worker: one process per configuration


class Runner:
    """Loads one engine and returns per-token timestamps of a greedy generation."""

    def __init__(self, spec: dict):
        self.spec = spec
        engine = spec["engine"]
        if engine == "neoj":
            import neoj

            self.lm = neoj.load(spec["dir"], device="cpu")
        elif engine == "transformers":
            import torch
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.float32,
                                                              attn_implementation="eager").eval()
        else:
            import ctranslate2
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(spec["hf_dir"])
            self.gen = ctranslate2.Generator(spec["dir"], device="cpu", compute_type=spec["compute_type"],
                                             intra_threads=spec["threads"], inter_threads=1)

    def stamps(self, prompts: list[list[int]], n: int) -> list[float]:
        """Generates exactly n tokens per prompt; returns the time each step's tokens were ready."""
        return getattr(self, f"stamps_{self.spec['engine']}")(prompts, n)

    def stamps_neoj(self, prompts, n):
        from neoj.generate import stream_batch
        from neoj.sampling import GenerationParams

        params = GenerationParams(temperature=0, max_new_tokens=n, stop_at_eos=False)
        out = []
        for _ in stream_batch(self.lm.model, self.lm.tokenizer, prompts, params):
            out.append(time.perf_counter())
        return out

    def stamps_transformers(self, prompts, n):
        import torch
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor(prompts)
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=0, streamer=Stamps())
        return times[1:]  # the first put() is the prompt

    def stamps_ct2(self, prompts, n):
        times: list[float] = []

        def step(result) -> bool:
            if result.batch_id == 0:
                times.append(time.perf_counter())
            return False

        tokens = [self.tok.convert_ids_to_tokens(p) for p in prompts]
        self.gen.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1, include_prompt_in_result=False,
                                callback=step)
        return times

    def first_token_seconds(self, prompt: list[int]) -> float:
        """Returns the seconds from the call to the first new token of one prompt: prefill, mostly."""
        start = time.perf_counter()
        return self.stamps([prompt], 2)[0] - start

    def decode_rate(self, prompts: list[list[int]], n: int) -> float:
        """Returns decode tokens/s over all rows: first new token to last, prefill excluded."""
        t = self.stamps(prompts, n)
        if len(t) != n:
            raise RuntimeError(f"{self.spec['name']}: {len(t)} steps for {n} tokens")
        return len(prompts) * (n - 1) / (t[-1] - t[0])


def worker(spec: dict) -> dict:
    if spec["engine"] == "neoj":  # before torch: neoj's threading default, as its command line gets it
        importlib.import_module("neoj")
    import torch

    torch.set_num_threads(spec["threads"])
    t = time.perf_counter()
    runner = Runner(spec)
    res = {"load_s": time.perf_counter() - t, "torch_isa": torch.backends.cpu.get_cpu_capability()}
    if spec["engine"] == "neoj":
        from neoj import rowmatmul

        res["isa"] = rowmatmul.variant_name()
        res["dtype"] = str(runner.lm.dtype).replace("torch.", "")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 50256, (max(spec["batches"]), spec["prompt"]), generator=gen).tolist()
    runner.decode_rate(prompts[:1], 4)  # warm-up: first-call allocations, kernel choices
    if spec.get("long_prompt"):
        long = torch.randint(0, 50256, (1, spec["long_prompt"]), generator=gen)[0].tolist()
        res["first_token_s"] = [runner.first_token_seconds(long) for _ in range(2)]
    for b in spec["batches"]:
        if b > 1:
            runner.decode_rate(prompts[:b], 4)
        res[f"b{b}"] = [runner.decode_rate(prompts[:b], spec["tokens"]) for _ in range(spec["repeats"])]
        log(f"  {spec['name']} batch {b}: " + ", ".join(f"{r:.2f}" for r in res[f"b{b}"]) + " tok/s")
    return res


def worker_env(extra: dict) -> dict:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", **extra)
    env.pop("NEOJ_ISA", None)
    env.pop("OMP_WAIT_POLICY", None)
    if USER_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_WAIT_POLICY
    env.update(extra)
    return env


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=worker_env(spec["env"]))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec['name']} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_TAG):])


# ---------------------------------------------------------------------------------------------
# Orchestration


# An AVX2-only CPU, emulated on a bigger one: every library in the process is held to AVX2 (PyTorch's own
# kernels, oneDNN, MKL, CTranslate2's), not only neoj's, so each engine runs the code such a CPU would.
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "CT2_FORCE_CPU_ISA": "AVX2"}


def isa_env(isa: str) -> dict:
    """Returns the environment of a worker held to `isa` ("avx2"), or {} for the CPU's own best."""
    return dict(AVX2_CAPS) if isa == "avx2" else {}


def configurations(work: Path, native: str, args) -> list[dict]:
    """Returns the worker specs: (shape, engine, weights, ISA) with the checkpoint each loads. Each ISA group
    (avx2, and the CPU's own best where it has more) has its own CTranslate2 and transformers rows."""
    j = work / "gptj-2048x16"
    base = {"threads": args.threads, "tokens": args.tokens, "prompt": args.prompt, "repeats": args.repeats}
    gptj = {"long_prompt": args.long_prompt}  # GPT-J rows also time a long prompt's first token
    isas = ["avx2"] + ([native] if native not in ("avx2", "none") else [])
    specs = []
    for isa in isas:
        for scheme, path in (("fp32", j), ("int8", work / "gptj-2048x16-int8"), ("int4", work / "gptj-2048x16-int4")):
            specs.append({**gptj, "name": f"neoj {scheme} {isa}", "shape": "gptj", "engine": "neoj", "scheme": scheme,
                          "isa": isa, "dir": str(path), "env": {**isa_env(isa), "NEOJ_ISA": isa}, "batches": [1, 8]})
        for ctype in ("int8", "float32"):
            specs.append({**gptj, "name": f"ct2 {ctype} {isa}", "shape": "gptj", "engine": "ct2", "scheme": ctype,
                          "isa": isa, "dir": str(work / "gptj-2048x16-ct2"), "hf_dir": str(j), "compute_type": ctype,
                          "env": isa_env(isa), "batches": [1, 8]})
        specs.append({**gptj, "name": f"transformers fp32 {isa}", "shape": "gptj", "engine": "transformers",
                      "scheme": "fp32",
                      "isa": isa, "dir": str(j), "env": isa_env(isa), "batches": [1, 8]})
    neo = {"tokens": NEO_TOKENS_FACTOR * args.tokens, "repeats": NEO_TOKENS_FACTOR * args.repeats}
    for label, name, _ in NEO_SHAPES:
        for isa in isas:
            specs.append({**neo, "name": f"neoj int8 {isa} ({label})", "shape": f"GPT-Neo-{label} shape", "engine": "neoj",
                          "scheme": "int8", "isa": isa, "dir": str(work / f"{name}-int8"),
                          "env": {**isa_env(isa), "NEOJ_ISA": isa}, "batches": [1]})
            specs.append({**neo, "name": f"transformers fp32 {isa} ({label})", "shape": f"GPT-Neo-{label} shape",
                          "engine": "transformers", "scheme": "fp32", "isa": isa, "dir": str(work / name),
                          "env": isa_env(isa), "batches": [1]})
    return [{**base, **s} for s in specs]


# The GPT-Neo rows decode this many times the tokens and repeats: a GPT-Neo-125M step takes a few ms, so 16
# tokens would be timed over a tenth of a second, too short on a shared machine.
NEO_TOKENS_FACTOR = 4


def prepare_checkpoints(work: Path, quick: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    j = ensure(work / "gptj-2048x16", "hf_checkpoint", GPTJ if not quick else {**GPTJ, "n_layer": 2})
    for scheme in ("int8", "int4"):
        ensure(work / f"gptj-2048x16-{scheme}", "neoj_quantized", j, scheme)
    ensure(work / "gptj-2048x16-ct2", "ct2", j)
    for _, name, shape in NEO_SHAPES:
        small = {**shape, "num_layers": 2, "attention_types": [[["global", "local"], 1]]}
        neo = ensure(work / name, "hf_checkpoint", shape if not quick else small)
        ensure(work / f"{name}-int8", "neoj_quantized", neo, "int8")


def versions() -> str:
    """Returns the Versions part of the Date line: Python, the engines, neoj's revision."""
    return software_line(("torch", "transformers", "ctranslate2"), python=True,
                         rev=git_rev(" with uncommitted changes in src/"))


def medians(results: dict) -> dict:
    """Returns {name: {batch: median over rounds of each round's median}}."""
    out = {}
    for name, rounds in results.items():
        out[name] = {}
        for key in ("b1", "b8", "first_token_s"):
            per_round = [statistics.median(r[key]) for r in rounds if key in r]
            if per_round:
                out[name][key] = statistics.median(per_round)
    return out


def target_lines(m: dict, isa: str) -> list[str]:
    """The issue's targets, from this run's medians, for neoj at `isa`."""
    def ratio(a, b, key):
        return m.get(a, {}).get(key, 0) / m[b][key] if m.get(b, {}).get(key) else float("nan")

    lines = []
    for key, label in (("b1", "batch 1"), ("b8", "batch 8")):
        r8 = ratio(f"neoj int8 {isa}", f"ct2 int8 {isa}", key)
        r32 = ratio(f"neoj fp32 {isa}", f"ct2 float32 {isa}", key)
        i8_f32 = ratio(f"neoj int8 {isa}", f"neoj fp32 {isa}", key)
        i4_i8 = ratio(f"neoj int4 {isa}", f"neoj int8 {isa}", key)
        lines.append(f"| GPT-J arch, {label}, {isa} | neoj int8 / CT2 int8 = {r8:.2f}x (target >= 1.2x: "
                     f"{'met' if r8 >= 1.2 else 'NOT met'}); neoj fp32 / CT2 fp32 = {r32:.2f}x (target >= 1.0x: "
                     f"{'met' if r32 >= 1.0 else 'NOT met'}); neoj int8 / neoj fp32 = {i8_f32:.2f}x (target >= 1: "
                     f"{'met' if i8_f32 >= 1.0 else 'NOT met'}); int4 / int8 = {i4_i8:.2f}x |")
    for label, _, _ in NEO_SHAPES:
        r = ratio(f"neoj int8 {isa} ({label})", f"transformers fp32 {isa} ({label})", "b1")
        lines.append(f"| GPT-Neo-{label} shape, batch 1, {isa} | neoj int8 / transformers fp32 = {r:.2f}x (target "
                     f">= 4x: {'met' if r >= 4 else 'NOT met'}) |")
    return lines


def render(specs: list[dict], m: dict, meta: dict, args) -> str:
    model, flags = meta["cpu"]
    isas = sorted({s["isa"] for s in specs if s["engine"] == "neoj"}, key=lambda i: i != "avx2")
    cmd = "python bench/bench_portable.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("rounds", "repeats", "tokens", "threads", "long_prompt")
        if getattr(args, k) != DEFAULTS[k])
    begin, end = markers(args)
    lines = [begin, f"## Portable decode: neoj per ISA vs CTranslate2 and transformers (CPU, {args.threads} "
             f"thread{'s' if args.threads > 1 else ''})", "",
             f"- Machine: {model}; ISA flags: {flags}; {os.cpu_count()} logical CPUs, {args.threads} threads per "
             f"engine; load average at start {meta['load_start']}, at end {meta['load_end']} (a shared machine: "
             "compare within this table only)",
             f"- Date: {meta['date']} (took {meta['minutes']:.0f} min); {meta['versions']}",
             f"- Command: `{cmd}`",
             "- ISA: `avx2` rows emulate an AVX2-only CPU: every engine's process is held to AVX2 (neoj: NEOJ_ISA=avx2, "
             "its AVX2+FMA kernel build with no AVX-512 instruction in it; PyTorch: ATEN_CPU_CAPABILITY=avx2; oneDNN: "
             "ONEDNN_MAX_CPU_ISA=AVX2; MKL: MKL_ENABLE_INSTRUCTIONS=AVX2; CTranslate2: CT2_FORCE_CPU_ISA=AVX2). "
             f"Other rows: this CPU's best ({', '.join(i for i in isas if i != 'avx2') or 'none'}), no caps. "
             "Targets compare engines within one ISA group.",
             f"- Greedy decode tokens/s over all rows (first new token to last, {args.tokens} new tokens after a "
             f"{args.prompt}-token prompt), median of {args.repeats} repeats per process and of {args.rounds} "
             "interleaved rounds, each configuration in its own process. neoj loads its own quantized checkpoints "
             "(`neoj quantize` of the same fp32 checkpoint) with dtype auto, which is bf16 where PyTorch may use the CPU's bf16 "
             "instructions (never in avx2 rows) and fp32 elsewhere; the compute column says what each neoj row ran in. "
             f"CTranslate2 loads its conversion of that checkpoint (int8: compute_type int8). The GPT-Neo rows decode "
             f"{NEO_TOKENS_FACTOR * args.tokens} tokens, {NEO_TOKENS_FACTOR * args.repeats} repeats (a GPT-Neo-125M "
             "step is a few ms).", "",
             f"- First token: seconds from the call to the first new token of one {args.long_prompt}-token prompt "
             "(prefill, mostly), GPT-J arch only, median of 2 per process and of the rounds.", "",
             "| model | engine | weights | compute | ISA | batch 1 tok/s | batch 8 tok/s (all rows) | "
             f"first token, {args.long_prompt}-token prompt (s) |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for s in specs:
        r = m.get(s["name"], {})
        shape = "GPT-J arch 2048x16" if s["shape"] == "gptj" else s["shape"]
        b1 = f"{r['b1']:.2f}" if "b1" in r else "—"
        b8 = f"{r['b8']:.2f}" if "b8" in r else "—"
        first = f"{r['first_token_s']:.2f}" if "first_token_s" in r else "—"
        compute = compute_dtype(s, meta.get("dtypes", {}).get(s["name"]))
        lines.append(f"| {shape} | {s['engine']} | {s['scheme']} | {compute} | {s['isa']} | {b1} | {b8} | {first} |")
    lines += ["", "| targets (issue 14) | this run |", "|---|---|"]
    for isa in isas:
        lines += target_lines(m, isa)
    lines.append(end)
    return "\n".join(lines) + "\n"


def compute_dtype(spec: dict, neoj_dtype: str | None) -> str:
    """Returns what a row's activations ran in: neoj's model dtype as its worker reported it, CTranslate2's
    compute type, transformers' fp32."""
    if spec["engine"] == "neoj":
        return {"float32": "fp32", "bfloat16": "bf16"}.get(neoj_dtype, neoj_dtype or "?")
    return {"float32": "fp32"}.get(spec["scheme"], spec["scheme"])


def markers(args) -> tuple[str, str]:
    """Returns the section markers: the plain ones at the default thread count, one pair per other count."""
    return section_markers("bench_portable", "" if args.threads == DEFAULTS["threads"] else f"[threads={args.threads}]")


DEFAULTS = {"rounds": 2, "repeats": 2, "tokens": 16, "prompt": 16, "threads": 2, "long_prompt": 128}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    p.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    p.add_argument("--prompt", type=int, default=DEFAULTS["prompt"])
    p.add_argument("--long-prompt", type=int, default=DEFAULTS["long_prompt"],
                   help="prompt tokens for the GPT-J rows' first-token time")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "neoj-bench" / "portable"))
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching configurations")
    p.add_argument("--quick", action="store_true", help="2-layer models, 1 round, 1 repeat, 6 tokens")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="file to write the section into, or -")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.tokens = 1, 1, 6
        args.workdir = args.workdir + "-quick"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    from neoj import rowmatmul

    start = time.time()
    meta = {"load_start": loadavg(), "cpu": cpu_description(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "versions": versions()}
    work = Path(args.workdir)
    prepare_checkpoints(work, args.quick)
    native = rowmatmul.supported_variants()[0].name if rowmatmul.supported_variants() else "none"
    specs = configurations(work, native, args)
    if args.only:
        specs = [s for s in specs if any(o in s["name"] for o in args.only.split(","))]
    results: dict[str, list] = {s["name"]: [] for s in specs}
    for rnd in range(args.rounds):
        order = specs if rnd % 2 == 0 else specs[::-1]  # alternate the order: drift hits every config alike
        for spec in order:
            log(f"round {rnd + 1}/{args.rounds}: {spec['name']}")
            results[spec["name"]].append(run_worker(spec, timeout=1800))
    meta["load_end"], meta["minutes"] = loadavg(), (time.time() - start) / 60
    meta["dtypes"] = {name: rounds[0].get("dtype") for name, rounds in results.items() if rounds}
    section = render(specs, medians(results), meta, args)
    write_section(args.out, section, *markers(args))
    if args.out != "-":
        log(f"wrote {args.out}")
        print(section, end="")


if __name__ == "__main__":
    main()
