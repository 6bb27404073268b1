"""The one sampler: next tokens for a batch whose rows each keep their own parameters and generator.

Semantics are transformers' for every knob (sampling.penalize: OpenAI's logit bias, the CTRL repetition
penalty and OpenAI's presence and frequency penalties; sampling.sampling_probs: top-k, temperature, top-p,
min-p, typical-p). A constrained row's disallowed tokens go to -inf first (constraint_matcher). Rows that share
their parameters (a request's sequences) are penalized together, every sampled row's distribution comes
from one vectorized call, and each row draws from its own generator, so a seeded row's tokens never
depend on its batch mates. The tokens stay on the device until the caller asks for them (Selection.to_host),
so a GPU can already run the next step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constraint_matcher import apply_masks
from ..sampling import check_logits, penalize, sampling_probs, speculative_accept
from .sequence import Sequence


@dataclass
class Selection:
    """The tokens chosen for a batch, still on the device, and the log-probabilities the rows asked for."""

    tokens: torch.Tensor  # (B,) long
    logits: torch.Tensor  # (B, V) fp32, the model's: what logprobs and the NaN check read
    best: torch.Tensor | None  # (B,) each row's best score, when the finite check is still due
    wanted: list[int]  # rows that asked for logprobs
    logprobs: torch.Tensor | None  # (len(wanted),) the chosen tokens' log-probabilities
    top: tuple[torch.Tensor, torch.Tensor] | None  # (values, indices) of the top-k, k = the most any row asked
    top_counts: list[int]  # per wanted row, how many alternatives it asked for

    def to_host(self) -> tuple[list[int], list[float | None], list[dict[int, float] | None]]:
        """Returns (token, logprob, top logprobs) per row; raises NumericalError for NaN or +inf logits."""
        if self.best is not None and not bool(torch.isfinite(self.best).all()):
            check_logits(self.logits)
        tokens = self.tokens.tolist()
        n = len(tokens)
        logprobs: list[float | None] = [None] * n
        tops: list[dict[int, float] | None] = [None] * n
        if self.wanted:
            for i, value in zip(self.wanted, self.logprobs.tolist()):
                logprobs[i] = value
        if self.top is not None:
            values, indices = self.top[0].tolist(), self.top[1].tolist()
            for j, (i, k) in enumerate(zip(self.wanted, self.top_counts)):
                tops[i] = dict(zip(indices[j][:k], values[j][:k])) if k else None
        return tokens, logprobs, tops


class Sampler:
    """Picks each row's next token from fp32 logits (B, V), row i under seqs[i]'s parameters and generator."""

    def __init__(self, usable_vocab: int):
        self.usable_vocab = usable_vocab

    def mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns logits with the embedding's padding rows (e.g. GPT-J's 50257..50399) at -inf, in place."""
        if logits.shape[-1] > self.usable_vocab:
            logits[:, self.usable_vocab :] = float("-inf")
        return logits

    def select(self, seqs: list[Sequence], logits: torch.Tensor) -> Selection:
        """Chooses every row's next token and records it in the rows' penalty state; returns the Selection.

        A row with a constraint chooses among the tokens it allows (the others at -inf before penalties,
        greedy and sampling alike); the caller commits the chosen token to its matcher (Sequence.accept).
        """
        logits = self.mask_vocab(logits)
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            apply_masks(logits, constrained, [seqs[i].matcher for i in constrained])
        scores = self._penalize(seqs, logits)
        # One pass gives every greedy row its token (argmax's first-maximum rule) and, when all maxima are
        # finite, shows that no row holds NaN (max propagates it) or +inf and each has a finite logit.
        best, tokens = scores.max(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:  # sampling from NaN fails (on CUDA, a device-side assert): check first
            if not bool(torch.isfinite(best).all()):
                check_logits(logits)
            best = None
            tokens.index_copy_(0, torch.tensor(sampled, device=tokens.device), self._draw(seqs, sampled, scores))
        self._observe(seqs, tokens)
        return self._with_logprobs(seqs, logits, tokens, best)

    def verify(self, seqs: list[Sequence], logits: torch.Tensor, drafts: list[list[int]],
               draft_probs: list[torch.Tensor | None]) -> list[list[tuple[int, float | None, dict[int, float] | None]]]:
        """Returns each row's emitted (token, logprob, top logprobs): the guesses it accepts, then one more token.

        logits (B, T, V) are the model's after each row's last token and its guesses drafts[i] (T >= 1 + every
        len(drafts[i])). A greedy row accepts guesses while they equal the model's argmax, then takes the argmax:
        exactly the tokens greedy decoding gives. A sampled row accepts by rejection sampling against the
        distribution each guess was drawn from (draft_probs[i] (k, V'), V' <= V, or None: certain guesses), so its
        tokens keep the model's distribution. Rows that speculate have no constraint or penalties (only the static
        logit bias), so their distributions at every guess are known from the logits alone.
        """
        B, T, V = logits.shape
        logits = self.mask_vocab(logits.view(B * T, V)).view(B, T, V)
        scores = logits
        biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if biased:
            scores = logits.clone()
            for i in biased:
                scores[i] = penalize(scores[i], None, None, seqs[i].params)
        best = scores.max(dim=-1)
        if not bool(torch.isfinite(best.values).all()):
            check_logits(logits.view(B * T, V))
        greedy = best.indices.tolist()
        probs = self._guess_probs(seqs, scores, drafts)
        out = []
        for i, s in enumerate(seqs):
            d = drafts[i]
            k = len(d)
            if s.params.greedy:
                accepted = next((j for j in range(k) if d[j] != greedy[i][j]), k)
                tokens = d[:accepted] + [greedy[i][accepted]]
            else:
                q = draft_probs[i]
                if q is not None and q.shape[-1] < V:  # a draft with fewer embedding rows (GPT-Neo for GPT-J)
                    q = torch.nn.functional.pad(q, (0, V - q.shape[-1]))
                accepted, token = speculative_accept(probs[i], d, q, s.generator)
                tokens = d[:accepted] + [token]
            out.append(self._emitted(s, logits[i], tokens))
        return out

    @staticmethod
    def _guess_probs(seqs: list[Sequence], scores: torch.Tensor, drafts: list[list[int]]) -> dict[int, torch.Tensor]:
        """Returns, per sampled row i, its sampling distributions (len(drafts[i]) + 1, V) at its guesses'
        positions, from one vectorized call over every sampled row."""
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if not rows:
            return {}
        flat = torch.cat([scores[i, : len(drafts[i]) + 1] for i in rows])
        probs = sampling_probs(flat, [seqs[i].params for i in rows for _ in range(len(drafts[i]) + 1)])
        return dict(zip(rows, probs.split([len(drafts[i]) + 1 for i in rows])))

    @staticmethod
    def _emitted(seq: Sequence, logits: torch.Tensor, tokens: list[int]) -> list[tuple]:
        """Returns (token, logprob, top logprobs) for tokens emitted at a row's successive positions."""
        n = seq.params.logprobs
        if n is None:
            return [(t, None, None) for t in tokens]
        logp = torch.log_softmax(logits[: len(tokens)], dim=-1)
        values = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        tops = [None] * len(tokens)
        if n:
            top_v, top_i = torch.topk(logp, n, dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
        return list(zip(tokens, values, tops))

    @staticmethod
    def _draw(seqs: list[Sequence], rows: list[int], scores: torch.Tensor) -> torch.Tensor:
        """Returns one token per sampled row, each drawn with that row's own generator."""
        probs = sampling_probs(scores[rows], [seqs[i].params for i in rows])
        return torch.cat([torch.multinomial(probs[j : j + 1], 1, generator=seqs[i].generator)[0]
                          for j, i in enumerate(rows)])

    @staticmethod
    def _penalize(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Returns the scores after each row's penalties: rows sharing parameters in one call."""
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            if s.seen is not None or s.counts is not None or s.params.logit_bias:
                groups.setdefault(id(s.params), []).append(i)
        if not groups:
            return logits
        scores = logits.clone()
        for rows in groups.values():
            first = seqs[rows[0]]
            seen = torch.stack([seqs[i].seen for i in rows]) if first.seen is not None else None
            counts = torch.stack([seqs[i].counts for i in rows]) if first.counts is not None else None
            index = torch.tensor(rows, device=logits.device)
            scores[index] = penalize(scores[index], seen, counts, first.params)
        return scores

    @staticmethod
    def _observe(seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Records the chosen tokens in the penalty state of the rows that keep one (on the device)."""
        for i, s in enumerate(seqs):
            if s.seen is not None:
                s.seen.index_fill_(0, tokens[i : i + 1], True)
            if s.counts is not None:
                s.counts.index_add_(0, tokens[i : i + 1], torch.ones(1, device=tokens.device))

    @staticmethod
    def _with_logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor,
                       best: torch.Tensor | None) -> Selection:
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = top = None
        counts = [seqs[i].params.logprobs for i in wanted]
        if wanted:
            index = torch.tensor(wanted, device=logits.device)
            logp = torch.log_softmax(logits[index], dim=-1)
            logprobs = logp.gather(1, tokens[index, None]).squeeze(1)
            if max(counts):
                values, indices = torch.topk(logp, max(counts), dim=-1)
                top = (values, indices)
        return Selection(tokens, logits, best, wanted, logprobs, top, counts)
