"""Next-token choice for a running batch whose rows each keep their own sampling parameters and generator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..sampling import check_logits, penalize, sampling_probs

if TYPE_CHECKING:
    from .scheduler import Sequence


class RowSampler:
    """Picks each row's next token from fp32 logits, every row under its own parameters and generator.

    The same functions as sampling.TokenSelector (sampling.penalize: transformers' repetition penalty, OpenAI's
    presence and frequency penalties; sampling.sampling_probs: temperature, then top-k, then top-p), so the
    engine and generate() agree on every parameter value; a row's result never depends on its batch mates.
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
            probs = sampling_probs(scores[sampled], [seqs[i].params for i in sampled])
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
            s = seqs[i]
            scores[i] = penalize(scores[i], s.seen, s.counts, s.params)
        return scores
