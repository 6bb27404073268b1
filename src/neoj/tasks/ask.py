"""Answers to questions: from the model alone, or from the passages of a document most relevant to the question.

A document that fits the window goes in whole. A longer one is cut into passages, each ranked by how
likely the model finds the question after it ("likelihood": log P(question | passage), the model's own
judgement of relevance) or by cosine similarity of mean-pooled hidden states ("embedding": cheaper, and
weaker with base models). The best passages that fit go into the prompt, in document order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .chunking import Chunk, split_text, template_overhead
from .prompts import Prompts, resolve_prompts
from .runner import Runner, TaskError, as_runner, check_fits, continuation_logprobs, embeddings, task_params

RANKINGS = ("likelihood", "embedding")
_MARK = "\x00\x01question\x01\x00"  # stands in for the question to find where it begins in the template


@dataclass
class Passage:
    """A piece of the document placed in the prompt: its text, token span and relevance score."""

    text: str
    start: int
    end: int
    score: float | None = None


@dataclass
class Answer:
    """The answer, and the passages of the document it was given (empty without a document)."""

    text: str
    passages: list[Passage] = field(default_factory=list)
    passages_total: int = 0  # passages the document was cut into (1 when it fitted whole)
    finish_reason: str | None = None

    def __str__(self) -> str:
        return self.text


def ask(lm, question: str, context: str | None = None, *, max_new_tokens: int = 64, rank: str = "likelihood",
        passage_tokens: int | None = None, overlap: int | None = None, prompts: Prompts | dict | None = None,
        progress: bool = False, **options) -> Answer:
    """Returns the Answer to `question`, from the model alone or from `context` (a document of any length).

    rank: "likelihood" or "embedding" (how passages of a long document are chosen). passage_tokens:
    passage size (default a quarter of the room for context, at most 256); overlap: tokens passages share
    (default an eighth of a passage). Options go to generation (greedy by default).
    """
    runner = as_runner(lm)
    p = resolve_prompts(prompts)
    question = question.strip() if isinstance(question, str) else ""
    if not question:
        raise TaskError("the question is empty")
    if rank not in RANKINGS:
        raise TaskError(f"unknown ranking {rank!r}; use {' or '.join(RANKINGS)}")
    tok, n_pos = runner.tokenizer, runner.n_positions
    params = task_params(max_new_tokens, p.ask_stop, **options)
    if context is None:
        ids = tok.encode(p.render("ask", question=question))
        check_fits(len(ids), max_new_tokens, n_pos, "the question")
        c = runner.generate([ids], params)[0]
        return Answer(c.text.strip(), [], 0, c.finish_reason)
    if not context.strip():
        raise TaskError("the context document is empty")
    room = n_pos - max_new_tokens - template_overhead(tok, p.ask_context, context="", question=question)
    if room < 16:
        raise TaskError(f"the question and max_new_tokens={max_new_tokens} leave {max(room, 0)} tokens of this "
                        f"model's {n_pos}-token context for the document; shorten the question or lower max_new_tokens")
    whole = split_text(context, tok, room)
    if len(whole) == 1:
        passages = [Passage(whole[0].text, whole[0].start, whole[0].end)]
        total = 1
    else:
        size = passage_tokens or max(16, min(256, room // 4))
        size = min(size, room)
        chunks = split_text(context, tok, size, overlap if overlap is not None else size // 8)
        scores = rank_passages(runner, question, chunks, rank, p, progress)
        passages = _select(runner, chunks, scores, room, p.context_separator)
        total = len(chunks)
    prompt = p.render("ask_context", context=p.context_separator.join(x.text.strip() for x in passages),
                      question=question)
    ids = tok.encode(prompt)
    check_fits(len(ids), max_new_tokens, n_pos, "the question with its passages")
    c = runner.generate([ids], params)[0]
    return Answer(c.text.strip(), passages, total, c.finish_reason)


def rank_passages(lm, question: str, chunks: list[Chunk], rank: str = "likelihood", prompts: Prompts | None = None,
                  progress: bool = False) -> list[float]:
    """Returns a relevance score per chunk (higher is more relevant): log P(question | chunk) or cosine similarity."""
    runner: Runner = as_runner(lm)
    p = resolve_prompts(prompts)
    tok = runner.tokenizer
    if rank == "embedding":
        vecs = embeddings(runner, [tok.encode(question)] + [tok.encode(c.text) for c in chunks])
        return torch.nn.functional.cosine_similarity(vecs[1:], vecs[:1], dim=-1).tolist()
    pairs = []
    for c in chunks:
        # Score what the template puts from the question on, given everything before it.
        full = p.render("ask_rank", context=c.text.strip(), question=question)
        head = p.render("ask_rank", context=c.text.strip(), question=_MARK).split(_MARK, 1)[0]
        if head.endswith(" "):  # GPT-2 attaches a space to the word after it
            head = head[:-1]
        pairs.append((tok.encode(head), tok.encode(full[len(head) :])))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs), unit="passage", desc="rank", dynamic_ncols=True)
    scores: list[float] = []
    try:
        step = 16
        for i in range(0, len(pairs), step):
            scores += continuation_logprobs(runner, pairs[i : i + step])
            if bar is not None:
                bar.update(len(pairs[i : i + step]))
    finally:
        if bar is not None:
            bar.close()
    return scores


def _select(runner: Runner, chunks: list[Chunk], scores: list[float], room: int, separator: str) -> list[Passage]:
    """Returns the best-scoring chunks that fit in `room` tokens together, in document order."""
    tok = runner.tokenizer
    sep = len(tok.encode(separator)) + 1
    chosen, used = [], 0
    for i in sorted(range(len(chunks)), key=lambda i: -scores[i]):
        need = len(tok.encode(chunks[i].text.strip())) + (sep if chosen else 0)
        if used + need <= room:
            chosen.append(i)
            used += need
    return [Passage(chunks[i].text.strip(), chunks[i].start, chunks[i].end, scores[i]) for i in sorted(chosen)]
