#!/usr/bin/env python
"""Prefix caching: time to first token of a growing chat, and few-shot classification, with and without the cache.

Chat (the GPT-Neo-125M-shaped checkpoint of bench_core, ~/.cache/neoj-bench/125m, float32): a ChatSession of
`--turns` turns (neoj.tasks.chat, greedy, replies of `--reply-tokens` tokens), each user message a pydocs passage
of ~`--message-tokens` tokens, so the last turn's prompt is the whole conversation (~1000+ tokens). The same
conversation runs with lm.prefix_cache (a fresh 512 MiB PrefixCache per repeat, so nothing carries over from the
previous repeat) and with lm.prefix_cache = None, interleaved, `--repeats` times; per turn the median time to
first token (from the call to the first streamed piece) is reported, and the end-to-end tokens/s of the whole
conversation (reply tokens / wall time of all turns). Peer: transformers (GPTNeoForCausalLM on the same
checkpoint) has no cross-request prefix cache, so each turn's `generate` prefills the whole conversation again;
its time to first token is `generate(max_new_tokens=1)` on the same prompt ids.

Classification: neoj.tasks.classify (what `neoj classify --file --examples` runs) over `--texts` pydocs
snippets with `--shots` few-shot examples (~60 tokens each) on the same checkpoint, with and without the prefix
cache, interleaved: wall time and texts/s (median of the repeats), and how many prompt tokens the cache served.

    python bench/bench_prefix.py                  # writes the bench_prefix section of BENCHMARKS.md
    python bench/bench_prefix.py --quick --out -  # smoke test, prints the section
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # report.py, also under `python -m bench.bench_prefix`
from report import (busy_note, cpu_description, date_line, loadavg, logger, package_version,  # noqa: E402
                    section_markers, write_section)

import neoj  # noqa: E402  (before torch: neoj sets its OpenMP wait policy first)

import torch  # noqa: E402

from neoj.tasks import classify  # noqa: E402
from neoj.tasks.chat import ChatSession  # noqa: E402
from neoj.tasks.runner import LocalRunner  # noqa: E402

SECTION_BEGIN, SECTION_END = section_markers("bench_prefix")
DATA = Path("/work/shared/data/pydocs-train.jsonl")
CHECKPOINT = Path(os.environ.get("NEOJ_BENCH_CACHE", Path.home() / ".cache" / "neoj-bench")) / "125m"
LABELS = ("tutorial", "reference", "howto")
log = logger("bench_prefix")


def passages(tokenizer, n: int, tokens: int, skip: int = 0) -> list[str]:
    """Returns n pieces of pydocs prose of about `tokens` tokens each (whole lines of distinct documents)."""
    out = []
    with open(DATA) as f:
        docs = [json.loads(line)["text"] for line in f]
    for doc in docs[skip:]:
        lines = [ln.strip() for ln in doc.splitlines() if len(ln.strip()) > 30 and not ln.strip().startswith(("..", "="))]
        text = " ".join(lines)
        ids = tokenizer.encode(text)
        if len(ids) < tokens:
            continue
        out.append(tokenizer.decode(ids[:tokens]).strip())
        if len(out) == n:
            break
    return out


class TimedRunner(LocalRunner):
    """A LocalRunner that notes when each stream call starts and yields its first piece."""

    def stream(self, prompt, params):
        self.started, self.first, self.prompt_tokens = time.perf_counter(), None, len(prompt)
        for piece in super().stream(prompt, params):
            if self.first is None:
                self.first = time.perf_counter()
            yield piece


def run_chat(lm, messages: list[str], reply_tokens: int) -> dict:
    """Runs the conversation once; returns per-turn TTFT, prompt sizes, cached tokens and the totals."""
    runner = TimedRunner(lm)
    session = ChatSession(runner, system="You are a helpful assistant who knows the Python documentation.",
                          max_new_tokens=reply_tokens, temperature=0)
    ttft, prompts, cached, replies, new_tokens = [], [], [], [], 0
    start = time.perf_counter()
    for message in messages:
        hits_before = lm.prefix_cache.hit_tokens if lm.prefix_cache is not None else 0
        reply = session.send(message)
        ttft.append(runner.first - runner.started)
        prompts.append(runner.prompt_tokens)
        cached.append((lm.prefix_cache.hit_tokens - hits_before) if lm.prefix_cache is not None else 0)
        replies.append(reply)
        new_tokens += len(lm.tokenizer.encode(reply))
    seconds = time.perf_counter() - start
    return {"ttft": ttft, "prompts": prompts, "cached": cached, "replies": replies, "seconds": seconds,
            "tokens_per_s": new_tokens / seconds, "new_tokens": new_tokens}


def chat_prompt_ids(lm, messages: list[str], replies: list[str]) -> list[list[int]]:
    """Returns the prompt ids of each turn of a finished conversation, as ChatSession built them."""
    session = ChatSession(lm, system="You are a helpful assistant who knows the Python documentation.",
                          max_new_tokens=32, temperature=0)
    out = []
    for message, reply in zip(messages, replies):
        out.append(session.prompt_ids([("user", message)])[0])
        session.messages += [("user", message), ("assistant", reply)]
    return out


def transformers_ttft(checkpoint: Path, turn_ids: list[list[int]], repeats: int) -> list[float]:
    """Returns the median time to first token per turn of transformers' generate on the same prompts."""
    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        model.generate(torch.tensor([turn_ids[0]]), max_new_tokens=1, do_sample=False, pad_token_id=50256)  # warm-up
        for ids in turn_ids:
            x = torch.tensor([ids])
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False,
                               pad_token_id=50256)
                times.append(time.perf_counter() - t)
            out.append(statistics.median(times))
    del model
    return out


def run_classify(lm, texts: list[str], examples: list[tuple[str, str]], batch_size: int) -> dict:
    hits_before = lm.prefix_cache.hit_tokens if lm.prefix_cache is not None else 0
    queried_before = lm.prefix_cache.queried_tokens if lm.prefix_cache is not None else 0
    start = time.perf_counter()
    results = classify(lm, texts, LABELS, examples=examples, batch_size=batch_size)
    seconds = time.perf_counter() - start
    cache = lm.prefix_cache
    return {"seconds": seconds, "texts_per_s": len(texts) / seconds, "labels": [r.label for r in results],
            "hit": (cache.hit_tokens - hits_before) if cache is not None else 0,
            "queried": (cache.queried_tokens - queried_before) if cache is not None else 0}


def run(args) -> dict:
    lm = neoj.load(str(args.checkpoint), dtype="float32", device="cpu")
    messages = passages(lm.tokenizer, args.turns, args.message_tokens, skip=10)
    results: dict = {"chat": {"cache": [], "none": []}, "classify": {"cache": [], "none": []}}
    log(f"{lm}; {args.turns} turns of ~{args.message_tokens}-token messages")
    run_chat(lm, messages[:2], 4)  # warm-up
    for r in range(args.repeats):
        for mode in ("none", "cache"):
            lm.prefix_cache = neoj.PrefixCache.megabytes(512) if mode == "cache" else None
            res = run_chat(lm, messages, args.reply_tokens)
            results["chat"][mode].append(res)
            log(f"chat round {r + 1} {mode}: ttft " + " ".join(f"{t * 1000:.0f}" for t in res["ttft"])
                + f" ms; prompts {res['prompts']}; cached {res['cached']}; {res['tokens_per_s']:.1f} tok/s")
    same = all(a["replies"] == b["replies"] for a in results["chat"]["cache"] for b in results["chat"]["none"])
    results["chat_same"] = same
    results["turn_ids"] = chat_prompt_ids(lm, messages, results["chat"]["cache"][0]["replies"])
    assert [len(x) for x in results["turn_ids"]] == results["chat"]["cache"][0]["prompts"], "peer prompts differ"
    if "transformers" not in args.skip:
        log("transformers: time to first token per turn")
        results["hf_ttft"] = transformers_ttft(args.checkpoint, results["turn_ids"], args.repeats)
        log("transformers ttft " + " ".join(f"{t * 1000:.0f}" for t in results["hf_ttft"]) + " ms")

    # few-shot classification
    shots = passages(lm.tokenizer, args.shots, 60, skip=100)
    examples = [(t, LABELS[i % len(LABELS)]) for i, t in enumerate(shots)]
    texts = passages(lm.tokenizer, args.texts, 40, skip=200)
    results["classify_setup"] = {"prefix_tokens": len(lm.tokenizer.encode(
        "Classify each text as one of: " + ", ".join(LABELS) + ".\n\n"
        + "".join(f"Text: {t}\nAnswer: {label}\n\n" for t, label in examples))),
        "texts": len(texts), "shots": len(examples)}
    lm.prefix_cache = None
    classify(lm, texts[:2], LABELS, examples=examples)  # warm-up
    for r in range(args.classify_repeats):
        for mode in ("none", "cache"):
            lm.prefix_cache = neoj.PrefixCache.megabytes(512) if mode == "cache" else None
            res = run_classify(lm, texts, examples, args.batch_size)
            results["classify"][mode].append(res)
            log(f"classify round {r + 1} {mode}: {res['seconds']:.2f} s, {res['texts_per_s']:.2f} texts/s, "
                f"cache hit {res['hit']}/{res['queried']} tokens")
    results["classify_same"] = all(a["labels"] == b["labels"] for a in results["classify"]["cache"]
                                   for b in results["classify"]["none"])
    return results


def median(values) -> float:
    return statistics.median(values)


def section(results: dict, args, load: str) -> str:
    model, isa = cpu_description()
    argv = " ".join(sys.argv[1:])
    chat = results["chat"]
    turns = len(chat["cache"][0]["ttft"])
    shown = sorted({0, min(4, turns - 1), turns - 1})
    ttft = {mode: [median([run["ttft"][t] for run in chat[mode]]) for t in range(turns)] for mode in chat}
    prompts = chat["cache"][0]["prompts"]
    cached = chat["cache"][0]["cached"]
    hf = results.get("hf_ttft")
    lines = [SECTION_BEGIN, "## Prefix caching: time to first token and tokens/s (CPU)", "",
             f"- Machine: {platform.machine()}, {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
             f"ISA: {isa}; load average at start {load}",
             date_line() + f"; transformers {package_version('transformers')}",
             f"- Command: `python bench/bench_prefix.py{(' ' + argv) if argv else ''}`",
             *busy_note(load),
             f"- Model: the GPT-Neo-125M-shaped checkpoint ({args.checkpoint.name}: random-ish weights, float32). "
             f"Chat: neoj.tasks.ChatSession, {turns} turns, each user message a pydocs passage of "
             f"{args.message_tokens} tokens, greedy replies of {args.reply_tokens} tokens; with the prefix cache (a "
             "fresh 512 MiB lm.prefix_cache per repeat) and without (lm.prefix_cache = None), interleaved, "
             f"{args.repeats} repeats, medians. Time to first token: from the call to the first streamed piece. "
             "transformers: `generate(max_new_tokens=1)` on the same prompt ids (no cross-request cache: every "
             "turn prefills the whole conversation).", "",
             "| turn | prompt tokens | served by the cache | TTFT without cache (ms) | TTFT with cache (ms) | "
             "without / with | transformers TTFT (ms) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in shown:
        hf_cell = f"{hf[t] * 1000:.0f}" if hf else "—"
        lines.append(f"| {t + 1} | {prompts[t]} | {cached[t]} | {ttft['none'][t] * 1000:.0f} | "
                     f"{ttft['cache'][t] * 1000:.0f} | {ttft['none'][t] / ttft['cache'][t]:.2f}x | {hf_cell} |")
    tps = {mode: median([run["tokens_per_s"] for run in chat[mode]]) for mode in chat}
    wall = {mode: median([run["seconds"] for run in chat[mode]]) for mode in chat}
    ratio10 = ttft["none"][-1] / ttft["cache"][-1]
    lines += ["", f"- Whole conversation ({turns} turns, {chat['cache'][0]['new_tokens']} reply tokens, prefill "
              f"included): {tps['none']:.1f} tok/s without the cache ({wall['none']:.1f} s), {tps['cache']:.1f} tok/s "
              f"with it ({wall['cache']:.1f} s): {tps['cache'] / tps['none']:.2f}x. Replies identical with and "
              f"without the cache: {'yes' if results['chat_same'] else 'NO'}.",
              f"- Target: time to first token at turn {turns} at least 3x lower with the cache: "
              f"{ratio10:.2f}x, {'met' if ratio10 >= 3 else 'missed'}."]
    if turns > 1 and all(cached[t] <= prompts[t - 1] for t in range(1, turns)):
        lines.append("- Served by the cache: at most the previous turn's prompt (in whole 16-token blocks); the "
                     "previous reply, whose keys and values were computed while decoding it, is prefilled again "
                     "with the new message (the cache stores prompts, not generated tokens).")
    if hf:
        lines.append(f"- At turn {turns} neoj with the cache reaches its first token {hf[-1] / ttft['cache'][-1]:.1f}x "
                     f"sooner than transformers, which prefills all {prompts[-1]} tokens again.")
    cls, setup = results["classify"], results["classify_setup"]
    sec = {mode: median([run["seconds"] for run in cls[mode]]) for mode in cls}
    hit = cls["cache"][-1]
    lines += ["", f"Few-shot classification: `neoj.tasks.classify` (what `neoj classify --file FILE --examples FILE` "
              f"runs) of {setup['texts']} pydocs snippets (~40 tokens) into {len(LABELS)} labels with "
              f"{setup['shots']} examples (a shared prefix of ~{setup['prefix_tokens']} tokens), batch size "
              f"{args.batch_size}, same checkpoint, {args.classify_repeats} interleaved repeats, medians (a fresh cache "
              "per repeat: only the examples shared within one run are reused).", "",
              "| prefix cache | wall time (s) | texts/s | prompt tokens served by the cache |", "|---|---:|---:|---:|",
              f"| off (lm.prefix_cache = None) | {sec['none']:.2f} | {setup['texts'] / sec['none']:.2f} | — |",
              f"| on (512 MiB) | {sec['cache']:.2f} | {setup['texts'] / sec['cache']:.2f} | "
              f"{hit['hit']} of {hit['queried']} looked up |", "",
              f"- With / without: {sec['none'] / sec['cache']:.2f}x texts/s; same labels: "
              f"{'yes' if results['classify_same'] else 'NO'}."]
    if hit["queried"] == 0:
        lines.append("- The classify scoring path (neoj.tasks.runner.continuation_logprobs) did not consult the "
                     "prefix cache at this revision: nothing was looked up, so both rows run the same code.")
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="GPT-Neo checkpoint (the 125M shape)")
    parser.add_argument("--turns", type=int, default=10, help="chat turns (10)")
    parser.add_argument("--message-tokens", type=int, default=80, help="tokens per user message (80)")
    parser.add_argument("--reply-tokens", type=int, default=32, help="tokens per reply (32)")
    parser.add_argument("--texts", type=int, default=16, help="texts to classify (16)")
    parser.add_argument("--shots", type=int, default=8, help="few-shot examples (8)")
    parser.add_argument("--batch-size", type=int, default=16, help="classify batch size (16)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (3)")
    parser.add_argument("--classify-repeats", type=int, default=2, help="classify: interleaved repeats (2)")
    parser.add_argument("--skip", default="", help="comma-separated: transformers")
    parser.add_argument("--quick", action="store_true", help="4 turns, 8 texts, 1 repeat")
    parser.add_argument("--out", default="BENCHMARKS.md", help="file to write the section to (- prints it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.texts, args.repeats, args.classify_repeats = 4, 8, 1, 1
    load = loadavg()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    write_section(args.out, section(run(args), args, load), SECTION_BEGIN, SECTION_END, log)


if __name__ == "__main__":
    main()
