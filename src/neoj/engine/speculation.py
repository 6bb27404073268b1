"""Speculative decoding: cheap guesses of the next tokens, verified by the model in one forward pass.

A proposer guesses up to `num_tokens` tokens per row: prompt lookup finds the last n-gram of the text earlier
in the prompt or output and proposes what followed it (no second model); a draft model (a smaller GPT-Neo, or a
quantized copy of the model) generates them. The running batch feeds each row its last token and its guesses
in one step and keeps the guesses the model would have chosen itself (greedy), or accepts them by rejection
sampling (sampled rows), so the output keeps the model's distribution (Leviathan et al. 2023; Chen et al. 2023).
The key/value slots of rejected guesses are rolled back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import NeojError
from ..kv_cache import KVCache
from ..model import positions_from_valid
from ..model_utils import left_pad
from ..sampling import sampling_probs
from .batch_cache import BatchCache
from .sequence import Sequence

METHODS = ("prompt_lookup", "draft")


@dataclass
class Speculative:
    """How the engine speculates. method "prompt_lookup" (n-gram candidates from the prompt and the text so far)
    or "draft" (`draft`, a Transformer or LanguageModel sharing the tokenizer, proposes). num_tokens: guesses
    per step (0: the method's default). adaptive: turn speculation off while it does not pay (measured
    seconds per token with and without), trying it again now and then."""

    method: str = "prompt_lookup"
    num_tokens: int = 0
    draft: Any = None
    max_ngram: int = 3
    min_ngram: int = 1
    adaptive: bool = True
    times: "StepTimes" = field(default=None, repr=False, compare=False)  # what adaptive has learned so far

    DEFAULT_TOKENS = {"prompt_lookup": 5, "draft": 4}
    MAX_TOKENS = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise NeojError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "draft" and self.draft is None:
            raise NeojError("speculative method 'draft' needs a draft model")
        if not 0 <= self.num_tokens <= self.MAX_TOKENS:
            raise NeojError(f"num_tokens={self.num_tokens} must be between 1 and {self.MAX_TOKENS} (0: default)")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise NeojError(f"n-gram sizes must satisfy 1 <= min_ngram ({self.min_ngram}) <= max_ngram "
                            f"({self.max_ngram})")
        if not self.num_tokens:
            self.num_tokens = self.DEFAULT_TOKENS[self.method]
        if self.times is None:
            self.times = StepTimes()

    @classmethod
    def of(cls, value: "Speculative | str | None") -> "Speculative | None":
        """Returns the Speculative a library caller asked for: None, a Speculative, "prompt_lookup", or a draft
        Transformer / LanguageModel."""
        if value is None or isinstance(value, Speculative):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if hasattr(value, "model") or hasattr(value, "config"):
            return cls(method="draft", draft=value)
        raise NeojError(f"speculative={value!r} must be 'prompt_lookup', a draft model or a neoj.Speculative")


@dataclass
class Proposal:
    """Guesses for the rows of a step: drafts[i] (possibly empty) and, for a draft model's, the distributions
    they were drawn from (probs[i] (len(drafts[i]), V) or None for certain guesses)."""

    drafts: list[list[int]]
    probs: list[torch.Tensor | None]

    @property
    def empty(self) -> bool:
        """Returns True when no row has a guess."""
        return not any(self.drafts)


def speculates(seq: Sequence) -> bool:
    """Returns True when a row may take guessed tokens: it did not opt out, and nothing but its logits decides
    its distribution (no constraint, no penalty state that each guess would change)."""
    return seq.params.speculative and seq.matcher is None and seq.seen is None and seq.counts is None


def guess_budget(seq: Sequence, num_tokens: int, n_positions: int) -> int:
    """Returns how many guesses a row can use: one fewer than the tokens it may still produce, and within the
    context (a step feeds the last token and the guesses at the next positions)."""
    left = seq.params.max_new_tokens - len(seq.token_ids) - 1
    return max(0, min(num_tokens, left, n_positions - 1 - seq.pos))


def lookup_ngram(context: np.ndarray, num_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Returns up to num_tokens tokens that followed the latest earlier occurrence of the context's last n
    tokens (the longest n from max_ngram down to min_ngram that occurs); [] when none does."""
    length = len(context)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)  # starts 0 .. length-1-n
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return context[start : start + num_tokens].tolist()
    return []


class PromptLookup:
    """Guesses by n-gram lookup in the row's own prompt and output: no second model."""

    def __init__(self, spec: Speculative):
        self.spec = spec

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> Proposal:
        drafts = []
        for seq, k in zip(seqs, budgets):
            context = np.asarray(seq.prompt_ids + seq.token_ids, dtype=np.int64)
            drafts.append(lookup_ngram(context, k, self.spec.max_ngram, self.spec.min_ngram) if k else [])
        return Proposal(drafts, [None] * len(seqs))

    def accepted(self, seqs: list[Sequence], proposal: Proposal, accepted: list[int]) -> None:
        """Nothing to roll back: lookup keeps no state."""

    def forget(self) -> None:
        """Nothing to free."""


class DraftModel:
    """Guesses with a smaller model (or a quantized copy) that shares the tokenizer, run on its own batch cache.

    The draft keeps a cache row per speculating sequence. Each proposal feeds the row's tokens it has not seen
    (the last accepted ones), then draws num_tokens guesses one step at a time under the row's own sampling
    parameters and generator; after verification the slots of rejected guesses are rolled back.
    """

    def __init__(self, spec: Speculative, model, usable_vocab: int, max_rows: int):
        draft = spec.draft.model if hasattr(spec.draft, "model") else spec.draft
        if draft.wte.weight.device != model.wte.weight.device:
            raise NeojError(f"the draft model is on {draft.wte.weight.device} but the model on "
                            f"{model.wte.weight.device}; load both on one device")
        if draft.config.vocab_size < usable_vocab:
            raise NeojError(f"the draft model has {draft.config.vocab_size} token embeddings but the model's "
                            f"tokenizer has {usable_vocab}: a draft must share the model's tokenizer")
        self.spec, self.model, self.usable = spec, draft, usable_vocab
        self.cache = BatchCache(draft, max_rows)
        self.rows: list[Sequence] = []
        self.fed: list[int] = []  # per row: how many of its tokens (prompt + output) the draft cache holds
        self.written = 0  # guesses fed back into the draft's cache by the last proposal

    def propose(self, seqs: list[Sequence], budgets: list[int]) -> Proposal:
        want = [s for s, k in zip(seqs, budgets) if k and len(s.prompt_ids) + len(s.token_ids) + self.spec.num_tokens
                < self.model.config.n_positions]
        self._sync(want)
        if not self.rows:
            return Proposal([[] for _ in seqs], [None] * len(seqs))
        guesses, probs = self._draw_all()
        by_seq = {id(s): i for i, s in enumerate(self.rows)}
        drafts, dists = [], []
        for s, k in zip(seqs, budgets):
            i = by_seq.get(id(s))
            drafts.append(guesses[i][:k] if i is not None and k else [])
            dists.append(probs[i][:k] if i is not None and k and probs[i] is not None else None)
        return Proposal(drafts, dists)

    def accepted(self, seqs: list[Sequence], proposal: Proposal, accepted: list[int]) -> None:
        """Rolls the draft's cache back to the guesses the model accepted."""
        counts = {id(s): a for s, a in zip(seqs, accepted)}
        keep = [min(counts.get(id(s), 0), self.written) for s in self.rows]
        self.cache.keep_written(self.written, keep)
        self.fed = [f + k for f, k in zip(self.fed, keep)]
        self.written = 0

    def forget(self) -> None:
        """Drops every row (after a failed step)."""
        self.cache = BatchCache(self.model, self.cache.max_rows)
        self.rows, self.fed, self.written = [], [], 0

    def _sync(self, want: list[Sequence]) -> None:
        """Makes the draft's rows exactly `want`: rows no longer speculating leave, new ones are prefilled."""
        keep = {id(s) for s in want}
        for i in range(len(self.rows) - 1, -1, -1):
            if id(self.rows[i]) not in keep:
                self.cache.remove(i)
                last, last_fed = self.rows.pop(), self.fed.pop()
                if i < len(self.rows):
                    self.rows[i], self.fed[i] = last, last_fed
        have = {id(s) for s in self.rows}
        new = [s for s in want if id(s) not in have]
        if new:
            self._prefill(new)

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Runs new rows' tokens but the last through the draft and splices them into its cache."""
        rows = [(s.prompt_ids + s.token_ids)[:-1] or [s.eos_token_id] for s in seqs]
        device = self.model.wte.weight.device
        ids, valid = left_pad(rows, seqs[0].eos_token_id, device)
        width = ids.shape[1]
        src = KVCache.for_model(self.model, len(rows), width)
        self.model(ids, positions_from_valid(valid), src, valid)
        for j, (s, r) in enumerate(zip(seqs, rows)):
            self.cache.add(src, len(r), j, width)
            self.rows.append(s)
            self.fed.append(len(r) if len(s.prompt_ids) + len(s.token_ids) > 1 else 0)

    def _draw_all(self) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Feeds each row's unseen tokens, then draws num_tokens guesses per row; returns them and, for sampled
        rows, the distributions they were drawn from."""
        k, device = self.spec.num_tokens, self.model.wte.weight.device
        pending = [(s.prompt_ids + s.token_ids)[f:] for s, f in zip(self.rows, self.fed)]
        width = max(len(p) for p in pending)
        tokens = torch.tensor([[p[0]] * (width - len(p)) + p for p in pending], device=device)
        valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in pending], device=device)
        positions = torch.tensor([[max(0, f + j - (width - len(p))) for j in range(width)]
                                  for p, f in zip(pending, self.fed)], device=device)
        self.fed = [f + len(p) for f, p in zip(self.fed, pending)]
        guesses: list[list[int]] = [[] for _ in self.rows]
        dists: list[list[torch.Tensor]] = [[] for _ in self.rows]
        for step in range(k):
            self.cache.ensure_room(tokens.shape[1])
            self.cache.slot = None
            hidden = self.model(tokens, positions, self.cache, valid if step == 0 else None)
            chosen = self._choose(self.model.logits(hidden[:, -1]), dists)
            for g, t in zip(guesses, chosen.tolist()):
                g.append(t)
            tokens, positions = chosen[:, None], positions[:, -1:] + 1
        self.written = k - 1  # the last guess was drawn but never fed
        probs = [torch.stack(d) if d else None for d in dists]
        return guesses, probs

    def _choose(self, logits: torch.Tensor, dists: list[list[torch.Tensor]]) -> torch.Tensor:
        """Returns each row's next guess: the draft's argmax for greedy rows, a draw under the row's parameters
        (recording the distribution) for sampled ones."""
        logits = logits[:, : self.usable]
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(self.rows) if not s.params.greedy]
        if sampled:
            probs = sampling_probs(logits[sampled], [self.rows[i].params for i in sampled])
            for j, i in enumerate(sampled):
                chosen[i] = torch.multinomial(probs[j], 1, generator=self.rows[i].generator)[0]
                dists[i].append(probs[j])
        return chosen


class StepTimes:
    """Whether speculating pays, learned from the time of steps with and without guesses.

    It keeps moving averages of the seconds per emitted token of both kinds of step. Steps run plain until one
    is timed (an engine's first step is not: cold caches); while speculating pays, every PROBE_EVERY-th step runs plain to keep that measured; while it
    does not, one speculative probe runs after PROBE_EVERY steps, then after twice as many each time it still does
    not pay (up to 2**MAX_BACKOFF times). A draft that is rarely right then costs one step early on and a share of
    steps that halves with every probe. A Speculative holds one StepTimes, so the engines that the library builds
    per call (all sharing lm.speculative) keep what earlier calls learned.
    """

    PROBE_EVERY = 16
    MAX_BACKOFF = 6
    SMOOTHING = 0.5

    def __init__(self):
        self.seconds_per_token: dict[bool, float | None] = {True: None, False: None}
        self.steps = 0
        self.failed_probes = 0
        self.next_probe = 0
        self.lock = threading.Lock()

    @property
    def paying(self) -> bool:
        """Returns False once speculating measured slower per token than not."""
        spec, plain = self.seconds_per_token[True], self.seconds_per_token[False]
        return spec is None or plain is None or spec <= plain

    def choose(self, advance: bool = True) -> bool:
        """Returns whether the next step should speculate (advance=False: only tells, without counting a step)."""
        with self.lock:
            step = self.steps + 1
            if advance:
                self.steps = step
            if self.seconds_per_token[False] is None:  # plain steps first, until one is timed
                return False
            if self.paying:
                if advance:  # once it stops paying, the first probe comes PROBE_EVERY steps later
                    self.failed_probes, self.next_probe = 0, step + self.PROBE_EVERY
                return step % self.PROBE_EVERY != 0
            if step < self.next_probe:
                return False
            if advance:
                self.failed_probes = min(self.failed_probes + 1, self.MAX_BACKOFF)
                self.next_probe = step + self.PROBE_EVERY * 2 ** self.failed_probes
            return True

    def record(self, speculated: bool, seconds: float, tokens: int) -> None:
        """Adds a step's time and emitted tokens to its kind's moving average."""
        if tokens <= 0:
            return
        with self.lock:
            value, old = seconds / tokens, self.seconds_per_token[speculated]
            self.seconds_per_token[speculated] = value if old is None else old + self.SMOOTHING * (value - old)


class Speculator:
    """Proposes the running batch's guesses, on the steps where its Speculative's StepTimes says speculating pays
    (every step with adaptive=False)."""

    def __init__(self, spec: Speculative, model, usable_vocab: int, max_rows: int):
        self.spec = spec
        self.n_positions = model.config.n_positions
        self.proposer = PromptLookup(spec) if spec.method == "prompt_lookup" else \
            DraftModel(spec, model, usable_vocab, max_rows)
        self.times = spec.times
        self.warm = False  # an engine's first step (cold caches, first allocations) is not timed

    def propose(self, seqs: list[Sequence]) -> Proposal | None:
        """Returns this step's guesses, or None for a plain step (nothing to guess, or speculation does not pay)."""
        if not self._worth_trying():
            return None
        budgets = [guess_budget(s, self.spec.num_tokens, self.n_positions) if speculates(s) else 0 for s in seqs]
        if not any(budgets):
            return None
        proposal = self.proposer.propose(seqs, budgets)
        if proposal.empty:
            self.proposer.accepted(seqs, proposal, [0] * len(seqs))
            return None
        return proposal

    def record(self, speculated: bool, seconds: float, tokens: int) -> None:
        """Adds a step's time and emitted tokens to the Speculative's StepTimes (from the engine's second step)."""
        if self.warm:
            self.times.record(speculated, seconds, tokens)
        self.warm = True

    @property
    def next_step_may_guess(self) -> bool:
        """Returns whether the next step may speculate: then a CUDA batch must not queue it ahead as a plain one."""
        return not self.spec.adaptive or self.times.choose(advance=False)

    def _worth_trying(self) -> bool:
        return not self.spec.adaptive or self.times.choose()
