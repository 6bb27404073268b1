"""Summaries of documents of any length: summarize the chunks, then the summaries, until one prompt holds them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .chunking import split_text, template_overhead
from .prompts import Prompts, resolve_prompts
from .runner import Runner, TaskError, as_runner, check_fits, task_params

log = logging.getLogger(__name__)

# Tokens per summary for each --length, capped at a quarter of the model's context.
LENGTHS = {"short": 64, "medium": 128, "long": 256}
MAX_ROUNDS = 8


@dataclass
class Summary:
    """The final summary, and the intermediate summaries of each map-reduce round (first: one per chunk)."""

    text: str
    rounds: list[list[str]] = field(default_factory=list)
    chunks: int = 1  # chunks of the original document

    def __str__(self) -> str:
        return self.text


def summary_tokens(n_positions: int, length: str = "medium", max_new_tokens: int | None = None) -> int:
    """Returns the tokens each summary may have: max_new_tokens, or the length's, capped at a quarter of the context."""
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise TaskError(f"max_new_tokens={max_new_tokens} must be at least 1")
        return max_new_tokens
    if length not in LENGTHS:
        raise TaskError(f"unknown summary length {length!r}; use {', '.join(LENGTHS)}")
    return max(1, min(LENGTHS[length], n_positions // 4))


def summarize(lm, text: str, *, length: str = "medium", max_new_tokens: int | None = None,
              overlap: int | None = None, prompts: Prompts | dict | None = None, batch_size: int = 4,
              progress: bool = False, **options) -> Summary:
    """Returns the Summary of `text`, however long: chunk summaries are summarized until one prompt holds them.

    `lm` is a LanguageModel (or a Runner). length: short, medium or long (64/128/256 tokens per summary,
    at most a quarter of the context), or max_new_tokens exactly. overlap: tokens consecutive chunks
    share (default min(64, an eighth of a chunk)). Options go to generation (greedy by default).
    """
    runner = as_runner(lm)
    p = resolve_prompts(prompts)
    if not isinstance(text, str) or not text.strip():
        raise TaskError("there is no text to summarize: the input is empty")
    max_new = summary_tokens(runner.n_positions, length, max_new_tokens)
    summary = Summary("", [], 0)
    template = "summarize"
    for _ in range(MAX_ROUNDS):
        chunks = _chunks(runner, p, template, text, max_new, overlap)
        summary.chunks = summary.chunks or len(chunks)
        summaries = _summarize_chunks(runner, p, template, [c.text for c in chunks], max_new, batch_size,
                                      progress and len(chunks) > 1, options)
        if len(chunks) == 1:
            summary.text = summaries[0]
            return summary
        summary.rounds.append(summaries)
        combined = "\n".join(s for s in summaries if s)
        if not combined:
            log.warning("every chunk summary came back empty; the model gave no summary")
            return summary
        log.info("round %d: %d chunks summarized in %d tokens", len(summary.rounds), len(chunks),
                 len(runner.tokenizer.encode(combined)))
        text, template = combined, "summarize_combine"
    raise TaskError(f"the summaries did not fit one prompt after {MAX_ROUNDS} rounds; lower max_new_tokens")


def _chunks(runner: Runner, p: Prompts, template: str, text: str, max_new: int, overlap: int | None):
    """Returns the chunks of `text` whose prompts fit the context with room for max_new tokens."""
    tok = runner.tokenizer
    budget = runner.n_positions - max_new - template_overhead(tok, getattr(p, template), text="")
    default_overlap = min(64, budget // 8)
    overlap = default_overlap if overlap is None else overlap
    # Each chunk must shrink to its summary, or the rounds would never end.
    if budget - overlap < 2 * max_new:
        raise TaskError(f"max_new_tokens={max_new} leaves chunks of only {max(0, budget)} tokens (overlap {overlap}) "
                        f"in this model's {runner.n_positions}-token context; a chunk must be at least twice its "
                        "summary: lower max_new_tokens or the overlap")
    return split_text(text, tok, budget, overlap)


def _summarize_chunks(runner: Runner, p: Prompts, template: str, texts: list[str], max_new: int,
                      batch_size: int, progress: bool, options: dict) -> list[str]:
    """Returns the summary of each text, generated batch_size prompts at a time."""
    tok = runner.tokenizer
    params = task_params(max_new, p.summarize_stop, **options)
    prompts = [tok.encode(p.render(template, text=t)) for t in texts]
    for ids in prompts:
        check_fits(len(ids), max_new, runner.n_positions, "a summary prompt")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), unit="chunk", desc="summarize", dynamic_ncols=True)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), max(1, batch_size)):
            out += [c.text.strip() for c in runner.generate(prompts[i : i + batch_size], params)]
            if bar is not None:
                bar.update(len(prompts[i : i + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return out
