#!/usr/bin/env python
"""Constrained decoding benchmark: what structured output costs, on CPU.

1. Mask cost: the time to compute the allowed-token mask over GPT-2's 50257 tokens and commit the chosen token,
   per generated token, along a valid output, for llguidance (what neoj uses) and outlines-core (when
   installed), with each library's one-off costs (tokenizer/vocabulary and grammar/index compilation).
2. Decode: greedy decode tokens/s on the GPT-Neo-125M shape (random weights, float32) at batch 1 and 8,
   unconstrained against constrained to a JSON schema, with the next mask computed while the model runs
   (prefetch) and only when the sampler asks for it (neoj's default); runs alternate, medians reported; the time
   runs from each run's first token to its last.
   The schema's output cannot end within the tokens asked for (an array of at least 50 objects) and EOS is
   ignored, so every run generates the same number of tokens.

It writes (or replaces) the `bench_constrained` section of BENCHMARKS.md. Progress goes to stderr.

    python bench/bench_constrained.py            # full run (~3 min on 2 cores)
    python bench/bench_constrained.py --quick    # smoke test, prints the section
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_constrained`
from report import REPO, cpu_description, loadavg, logger, section_markers, software_line, write_section  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_constrained")
CHECKPOINT = Path(os.environ.get("NEOJ_BENCH_CACHE", Path.home() / ".cache" / "neoj-bench")) / "125m"

# The decode schema: its output cannot be complete within the tokens generated.
DECODE_SCHEMA = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 50, "items": {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["id", "name", "tags"]}}}, "required": ["items"]}

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "role": {"enum": ["admin", "user", "guest"]}, "active": {"type": "boolean"},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                 "zip": {"type": "string"}}, "required": ["street", "city", "zip"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "email", "role", "active", "address", "tags"]}
PERSON_TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "admin",
                          "active": True, "address": {"street": "12 St James's Square", "city": "London",
                                                      "zip": "SW1Y 4JH"}, "tags": ["math", "engines", "poetry"]},
                         separators=(",", ":"))
# (name, kind, value, a valid text) for the mask-cost table.
MASK_CASES = [
    ("JSON schema (person, 7 fields)", "json_schema", PERSON, PERSON_TEXT),
    ("JSON schema (decode bench)", "json_schema", DECODE_SCHEMA,
     json.dumps({"items": [{"id": i, "name": f"item number {i}", "tags": ["a", "b"]} for i in range(3)]},
                separators=(",", ":"))[:-2]),
    ("regex IPv4 `\\d{1,3}(\\.\\d{1,3}){3}`", "regex", r"\d{1,3}(\.\d{1,3}){3}", "192.168.100.254"),
    ("regex date + phone", "regex", r"\d{4}-\d{2}-\d{2} \(\d{3}\) \d{3}-\d{4}", "2024-02-29 (555) 123-4567"),
    ("choice of 4 strings", "choice", ["positive", "negative", "neutral", "mixed feelings"], "mixed feelings"),
]


log = logger("bench_constrained")


def median_us(fn, repeats: int) -> float:
    """Returns the median over repeats of fn()'s seconds per token, in microseconds (fn returns its token count)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        times.append((time.perf_counter() - start) / n)
    return statistics.median(times) * 1e6


def llguidance_costs(tokenizer, repeats: int) -> tuple[float, list[dict]]:
    """Returns (tokenizer build seconds, per case: compile ms and per-token mask + commit µs) for llguidance."""
    import torch
    from llguidance import LLMatcher, LLTokenizer

    from neoj.constraint import Constraint

    start = time.perf_counter()
    lt = LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id)
    setup = time.perf_counter() - start
    rows = []
    words = torch.empty((lt.vocab_size + 31) // 32, dtype=torch.int32)
    for name, kind, value, text in MASK_CASES:
        grammar = Constraint(kind, value).grammar
        tokens = tokenizer.encode(text)
        start = time.perf_counter()
        LLMatcher(lt, grammar, log_level=0)
        compile_ms = (time.perf_counter() - start) * 1e3

        fresh = [LLMatcher(lt, grammar, log_level=0) for _ in range(repeats + 1)]

        def walk() -> int:
            m = fresh.pop()
            for tok in tokens:
                m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
                assert m.consume_token(tok), (name, tok)
            return len(tokens)

        walk()  # warm-up
        per_token = median_us(walk, repeats)
        rows.append({"name": name, "compile_ms": compile_ms, "us": per_token, "tokens": len(tokens)})
    return setup, rows


def outlines_vocabulary(tokenizer):
    """Returns outlines-core's Vocabulary of the GPT-2 tokenizer: each token's bytes (byte-level BPE undone)."""
    import outlines_core

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_of[chr(256 + extra)] = b
            extra += 1
    tokens: dict[bytes, list[int]] = {}
    for text, i in tokenizer.backend.get_vocab().items():
        if i != tokenizer.eos_token_id:
            tokens.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    return outlines_core.Vocabulary(tokenizer.eos_token_id, tokens)


def outlines_regex(kind: str, value) -> str:
    """Returns the regular expression outlines-core compiles for a constraint (JSON schemas through its own
    converter, compact whitespace as neoj's llguidance grammars)."""
    import re

    from outlines_core.json_schema import build_regex_from_schema

    if kind == "json_schema":
        return build_regex_from_schema(json.dumps(value), whitespace_pattern="")
    if kind == "choice":
        return "|".join(re.escape(c) for c in value)
    return value


def outlines_costs(tokenizer, repeats: int) -> tuple[float, list[dict]] | None:
    """Returns (vocabulary build seconds, per case: index ms and per-token mask + advance µs) for outlines-core,
    or None when it is not installed."""
    try:
        import outlines_core
    except ImportError:
        return None
    import torch

    start = time.perf_counter()
    vocab = outlines_vocabulary(tokenizer)
    setup = time.perf_counter() - start
    rows = []
    words = torch.empty((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    for name, kind, value, text in MASK_CASES:
        regex = outlines_regex(kind, value)
        tokens = tokenizer.encode(text)
        start = time.perf_counter()
        try:
            index = outlines_core.Index(regex, vocab)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            rows.append({"name": name, "error": str(exc).splitlines()[0][:60]})
            continue
        compile_ms = (time.perf_counter() - start) * 1e3

        def walk() -> int:
            guide = outlines_core.Guide(index)
            for tok in tokens:
                guide.write_mask_into(words.data_ptr(), words.numel(), 4)
                guide.advance(tok, return_tokens=False)
            return len(tokens)

        walk()
        rows.append({"name": name, "compile_ms": compile_ms, "us": median_us(walk, repeats), "tokens": len(tokens)})
    return setup, rows


def load_model():
    """Returns the GPT-Neo-125M-shape model in float32: bench_core's random checkpoint when it is there, else
    neoj's own random weights of that shape."""
    import neoj

    source = str(CHECKPOINT) if (CHECKPOINT / "model.safetensors").exists() else "random:gpt-neo-125m"
    log(f"loading {source}")
    return neoj.load(source, dtype="float32"), source


def decode_rate(lm, batch: int, new_tokens: int, constrained: bool) -> float:
    """Returns greedy decode tokens/s for one run of `batch` prompts: the tokens after the first (prefill and the
    first token excluded) over the time from the first token to the last."""
    import torch

    from neoj.constraint import Constraint
    from neoj.generate import stream_batch
    from neoj.sampling import GenerationParams

    constraint = Constraint("json_schema", DECODE_SCHEMA) if constrained else None
    params = GenerationParams(max_new_tokens=new_tokens, temperature=0, stop_at_eos=False, constraint=constraint)
    prompts = [lm.tokenizer.encode(f"Record {i}:") for i in range(batch)]
    steps = stream_batch(lm.model, lm.tokenizer, prompts, params)
    with torch.inference_mode():
        first = next(steps)
        start = time.perf_counter()
        tokens = sum(len(events) for events in steps)
    elapsed = time.perf_counter() - start
    if len(first) + tokens != batch * new_tokens:
        raise RuntimeError(f"batch {batch} generated {len(first) + tokens} tokens, not {batch * new_tokens}")
    return tokens / elapsed


def decode_table(lm, batches: list[int], new_tokens: int, rounds: int) -> list[dict]:
    """Returns per batch the median tokens/s of each mode, the modes alternating within every round."""
    from neoj import constraint_matcher

    modes = {"unconstrained": (False, True), "constrained, prefetch": (True, True),
             "constrained, no prefetch": (True, False)}
    rows = []
    for batch in batches:
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for constrained, prefetch in modes.values():  # warm-up
            constraint_matcher.PREFETCH = prefetch
            decode_rate(lm, batch, 8, constrained)
        for r in range(rounds):
            for mode, (constrained, prefetch) in modes.items():
                constraint_matcher.PREFETCH = prefetch
                rates[mode].append(decode_rate(lm, batch, new_tokens, constrained))
            log(f"batch {batch} round {r + 1}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in rates.items()))
        constraint_matcher.PREFETCH = False  # neoj's default
        rows.append({"batch": batch, **{m: statistics.median(v) for m, v in rates.items()},
                     "ranges": {m: (min(v), max(v)) for m, v in rates.items()}})
    return rows


def mask_lines(llg: tuple[float, list[dict]], oc: tuple[float, list[dict]] | None) -> list[str]:
    """Returns the markdown of the mask-cost table."""
    lines = ["| constraint | tokens | llguidance compile | llguidance mask + commit / token | outlines-core index "
             "| outlines-core mask + advance / token |", "|---|---:|---:|---:|---:|---:|"]
    others = {r["name"]: r for r in oc[1]} if oc else {}
    for r in llg[1]:
        o = others.get(r["name"])
        if o is None:
            theirs = "not installed | -"
        elif "error" in o:
            theirs = f"failed: {o['error']} | -"
        else:
            theirs = f"{o['compile_ms']:,.1f} ms | {o['us']:.1f} µs"
        lines.append(f"| {r['name']} | {r['tokens']} | {r['compile_ms']:.1f} ms | {r['us']:.1f} µs | {theirs} |")
    setup = f"; outlines-core's vocabulary {oc[0]:.2f} s" if oc else ""
    lines += ["", f"One-off: llguidance's tokenizer from neoj's {llg[0]:.2f} s (cached per tokenizer){setup}."]
    return lines


def section(args, llg, oc, decode: list[dict], source: str, load: str) -> str:
    """Returns the BENCHMARKS.md section."""
    model, isa = cpu_description()
    lines = [SECTION_BEGIN, "## Constrained decoding: structured output cost (CPU)", "",
             "Mask cost: the allowed-token mask over GPT-2's 50257 tokens plus committing the token, per token of a "
             "valid output, from a freshly compiled matcher (median of "
             f"{args.repeats} walks; the first masks of a fresh matcher cost the most, so short outputs show a "
             "higher figure). Compile: the grammar (llguidance) or the regular expression's index over the "
             "vocabulary (outlines-core), once per constraint.", ""]
    lines += mask_lines(llg, oc)
    lines += ["", f"Decode: greedy tokens/s, `{source}` (GPT-Neo-125M shape, random weights), float32, "
              f"{args.threads} thread{'s' if args.threads != 1 else ''}, {args.new_tokens} new tokens per row, EOS ignored; constrained rows follow "
              "a JSON schema whose output cannot end within them (an array of at least 50 objects). Median of "
              f"{args.rounds} runs per mode, the modes alternating; from the first token to the last (prefill "
              "excluded).", "",
              "| batch | unconstrained | constrained, prefetch | constrained, no prefetch | prefetch vs unconstrained "
              "| no prefetch vs unconstrained |", "|---:|---:|---:|---:|---:|---:|"]
    for d in decode:
        base = d["unconstrained"]
        lines.append(f"| {d['batch']} | {base:.1f} | {d['constrained, prefetch']:.1f} | "
                     f"{d['constrained, no prefetch']:.1f} | {d['constrained, prefetch'] / base:.2f}x | "
                     f"{d['constrained, no prefetch'] / base:.2f}x |")
    lines += ["", "Target: constrained within 10% of unconstrained (0.90x or more). Prefetch: each row's next mask "
              "is computed on a pool thread as soon as its token is committed, while the model runs the next step; "
              "no prefetch (neoj's default, `neoj.constraint_matcher.PREFETCH = False`): the sampler computes it "
              "when it needs it.", "",
              f"Machine: {model} ({isa}), {os.cpu_count()} CPUs, {platform.platform()}; load average at start "
              f"{load}. Date: {_dt.date.today().isoformat()}; {versions()}.",
              f"Command: `{' '.join(['python', 'bench/bench_constrained.py', *map(shlex.quote, sys.argv[1:])])}`",
              SECTION_END, ""]
    return "\n".join(lines)


def versions() -> str:
    """Returns the versions of torch, llguidance, outlines-core and neoj's git revision."""
    return software_line(("torch", "llguidance", "outlines-core"), missing="not installed")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 64; --quick 8)")
    p.add_argument("--rounds", type=int, default=None, help="runs per mode and batch (default 5; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="walks per mask-cost case (default 7; --quick 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (default: all CPUs)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny counts, prints the section")
    p.add_argument("--out", default=None, help="file to write the section to (default BENCHMARKS.md; --quick: -)")
    args = p.parse_args(argv)
    q = args.quick
    args.new_tokens = args.new_tokens or (8 if q else 64)
    args.rounds = args.rounds or (1 if q else 5)
    args.repeats = args.repeats or (2 if q else 7)
    args.out = args.out or ("-" if q else str(REPO / "BENCHMARKS.md"))
    load = loadavg("n/a")
    import torch

    torch.set_num_threads(args.threads)
    lm, source = load_model()
    log("mask cost: llguidance")
    llg = llguidance_costs(lm.tokenizer, args.repeats)
    log("mask cost: outlines-core")
    oc = outlines_costs(lm.tokenizer, args.repeats)
    decode = decode_table(lm, [int(b) for b in args.batches.split(",")], args.new_tokens, args.rounds)
    write_section(args.out, section(args, llg, oc, decode, source, load), SECTION_BEGIN, SECTION_END, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
