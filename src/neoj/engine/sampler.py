"""Next-token choice for a running batch whose rows each keep their own sampling parameters and generator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..sampling import GenerationParams, check_logits

if TYPE_CHECKING:
    from .scheduler import Sequence


class RowSampler:
    """Picks each row's next token from fp32 logits, every row under its own parameters and generator.

    Same semantics as sampling.TokenSelector (transformers' repetition penalty, OpenAI's presence and
    frequency penalties, temperature, then top-k, then top-p); a row's result never depends on its batch mates.
    """

    def __init__(self, usable_vocab: int):
        self.usable_vocab = usable_vocab

    def select(self, seqs: list[Sequence], logits: torch.Tensor):
        """Returns (tokens, logprobs, top logprobs) per row; logprobs are the model's, before any warping."""
        if logits.shape[-1] > self.usable_vocab:
            logits[:, self.usable_vocab :] = float("-inf")
        n, device = len(seqs), logits.device
        scores = self._penalize(seqs, logits)
        # One pass over the batch gives every greedy row its token (argmax's first-maximum rule) and, when all
        # maxima are finite, shows no row holds NaN (max propagates it) or +inf and each has a finite logit
        # (penalties keep finite scores finite and the others not); only otherwise does the full check run.
        best, picked = scores.max(dim=-1)
        if not bool(torch.isfinite(best).all()):
            check_logits(logits)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        tokens = picked.tolist()
        if sampled:
            probs = self._warp([seqs[i].params for i in sampled], scores[sampled])
            for j, i in enumerate(sampled):
                tokens[i] = int(torch.multinomial(probs[j : j + 1], 1, generator=seqs[i].generator))
        for s, t in zip(seqs, tokens):
            if s.seen is not None:
                s.seen[t] = True
            if s.counts is not None:
                s.counts[t] += 1
        logprobs: list[float | None] = [None] * n
        tops: list[dict[int, float] | None] = [None] * n
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            logp = torch.log_softmax(logits[want], dim=-1)
            chosen = torch.tensor([tokens[i] for i in want], device=device)
            for i, lp in zip(want, logp.gather(1, chosen[:, None]).squeeze(1).tolist()):
                logprobs[i] = lp
            k = max(seqs[i].params.logprobs for i in want)
            if k:
                top = torch.topk(logp, k, dim=-1)
                for j, (ids, vals) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                    kk = seqs[want[j]].params.logprobs
                    tops[want[j]] = dict(zip(ids[:kk], vals[:kk])) if kk else None
        return tokens, logprobs, tops

    @staticmethod
    def _penalize(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.seen is not None or s.counts is not None]
        if not rows:
            return logits
        scores = logits.clone()
        for i in rows:  # few rows use penalties; per-row ops keep each row independent of the others
            s, p, row = seqs[i], seqs[i].params, scores[i]
            if s.seen is not None:
                penalized = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
                row = torch.where(s.seen, penalized, row)
            if s.counts is not None:
                row = row - p.frequency_penalty * s.counts - p.presence_penalty * (s.counts > 0).float()
            scores[i] = row
        return scores

    @staticmethod
    def _warp(params: list[GenerationParams], scores: torch.Tensor) -> torch.Tensor:
        """Returns sampling probabilities after temperature, top-k and top-p, row by row."""
        device = scores.device
        scores = scores / torch.tensor([p.temperature for p in params], device=device)[:, None]
        ks = [p.top_k for p in params]
        if any(ks):
            kmax = min(max(ks), scores.shape[-1])
            top = torch.topk(scores, kmax, dim=-1).values
            kth = top.gather(1, torch.tensor([[min(k, kmax) - 1 if k else 0] for k in ks], device=device))
            kth[torch.tensor([k == 0 for k in ks], device=device)] = float("-inf")
            scores = scores.masked_fill(scores < kth, float("-inf"))
        tps = [p.top_p for p in params]
        if any(tp < 1.0 for tp in tps):
            sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - torch.tensor(tps, device=device))[:, None]
            remove[torch.tensor([tp >= 1.0 for tp in tps], device=device)] = False
            remove[:, -1] = False  # always keep the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        return scores.softmax(dim=-1)
