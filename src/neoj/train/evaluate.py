"""Perplexity of a model over long texts with a sliding window, as reported for The Pile.

The token stream (documents joined by <|endoftext|>) is scored in windows of max_length tokens that
move `stride` tokens at a time, as in transformers' perplexity guide. Each window scores only the
tokens no earlier window did, with the max_length - stride tokens before them as context, so every
token but the first is scored exactly once. A larger stride is faster and gives each token less
context; stride is capped at max_length - 1 so that no token goes unscored.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..errors import NeojError
from ..model_utils import token_logprobs
from .data import read_documents, tokenize
from .loss import linear_cross_entropy


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Returns (begin, end, first scored position) per window over n tokens.

    The first window scores tokens 1 .. max_length - 1; each next one ends `stride` tokens later
    (at most max_length - 1, so that its first new token still has a token of context in the window)
    and scores only those new tokens, with the max_length - stride tokens before them as context.
    """
    stride = max(1, min(stride, max_length - 1))
    end = min(max_length, n)
    out = [(0, end, 1)]
    while end < n:
        new_end = min(end + stride, n)
        out.append((max(0, new_end - max_length), new_end, end))
        end = new_end
    return out


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, weights: torch.Tensor | None = None, max_length: int | None = None,
               stride: int | None = None, progress: bool = False) -> dict:
    """Returns {"tokens", "nll", "perplexity", ...} of a token stream ids (N,) under `model`.

    weights (N,) may exclude tokens from scoring (0), e.g. the prompts of prompt/completion pairs.
    """
    cfg = model.config
    max_length = min(max_length or cfg.n_positions, cfg.n_positions)
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise NeojError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    n = ids.numel()
    if n < 2:
        raise NeojError("perplexity needs at least 2 tokens of text")
    if weights is None:
        weights = torch.ones(n)
    device = model.wte.weight.device
    spans = windows(n, max_length, stride)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), unit="window", desc="perplexity", dynamic_ncols=True)
    nll, count, t0 = 0.0, 0.0, time.perf_counter()
    for begin, end, first in spans:
        x = ids[begin:end].to(device)[None]
        w = torch.zeros(end - begin)
        w[first - begin :] = weights[first:end].float()
        h = model(x)[0, :-1]  # (T-1, C): position t predicts token t+1
        if isinstance(model.lm_head, torch.nn.Linear):
            nll += float(linear_cross_entropy(h, model.lm_head, x[0, 1:], w[1:].to(device)))
        else:  # a quantized head has no weight matrix to fuse with: fp32 log-probabilities, chunked
            lps, _ = token_logprobs(model, h, x[0, 1:])
            nll -= float((torch.tensor(lps, dtype=torch.float64) * w[1:].double()).sum())
        count += float(w[1:].sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(nll / max(count, 1)):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    return {"tokens": int(count), "nll": nll / max(count, 1), "perplexity": math.exp(nll / max(count, 1)),
            "max_length": max_length, "stride": stride, "windows": len(spans),
            "seconds": round(time.perf_counter() - t0, 3)}


def file_tokens(paths: list[str | Path], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the (ids, weights) stream of data files: documents joined by <|endoftext|>."""
    docs = [d for p in paths for d in read_documents(p)]
    pieces = tokenize(docs, tokenizer)
    ids = torch.tensor([t for ex, _ in pieces for t in ex], dtype=torch.long)
    weights = torch.tensor([w for ex, ws in pieces for w in (ws if ws is not None else [1] * len(ex))],
                           dtype=torch.float32)
    return ids, weights
