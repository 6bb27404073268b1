"""The running batch: the sequences being decoded, their cache and decode steps.

Sequences join after their prefill (first token chosen), every decode step advances them all by one token,
and those that finished leave between steps. On CUDA the next step is queued before the host reads the
tokens of this one (run-ahead), so the GPU computes while the host detokenizes and reports.
"""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch

from ..adapters import routed
from ..cuda_graph import DecodeSteps
from ..model import Transformer
from .batch_cache import BatchCache
from .request import EngineStats, Prefill
from .speculation import Proposal, Speculative, Speculator
from .sampler import Sampler
from .sequence import Event, Sequence


class RunningBatch:
    """The rows being decoded. `finish(seq, event)` is called for each row that ends (it reports the event)."""

    def __init__(self, model: Transformer, max_rows: int, sampler: Sampler, make_step, stats: EngineStats,
                 finish: Callable[[Sequence, Event], None], speculative: Speculative | None = None):
        self.model, self.max_rows, self.sampler, self.make_step = model, max_rows, sampler, make_step
        self.speculator = Speculator(speculative, model, sampler.usable_vocab, max_rows) if speculative else None
        # Held weakly: the engine owns this batch, and a cycle would keep the batch's cache alive (its memory
        # unreturned) until Python's cycle collector happened to run, after a private engine is dropped.
        self.stats, self._finish = stats, weakref.WeakMethod(finish)
        self.device = model.wte.weight.device
        self.run_ahead = self.device.type == "cuda"  # kernels run asynchronously there: overlap host and GPU
        self.reset()

    def finish(self, seq: Sequence, event: Event) -> None:
        """Ends a row: the engine records and reports it."""
        self._finish()(seq, event)

    def reset(self) -> None:
        """Empties the batch (after a failed step): a new cache and decode steps."""
        self.rows: list[Sequence] = []
        self.cache = BatchCache(self.model, self.max_rows)
        self.decode_step = DecodeSteps(self.model, self.cache, self.make_step)
        self.ahead: torch.Tensor | None = None  # logits of a step queued before the host finished the last
        if self.speculator is not None:
            self.speculator.proposer.forget()

    def start(self, seqs: list[Sequence], prefills: list[Prefill]) -> None:
        """Chooses the first token of prefilled sequences and puts those it does not end into the batch: spliced
        in from their prefill's cache, or, prefilled in place (into this batch's cache), kept where they are."""
        for seq in seqs:
            seq.pos = len(seq.prompt_ids)
        logits = torch.cat([prefill.logits for prefill in prefills])
        finished = self.advance(seqs, *self.sampler.select(seqs, logits).to_host())
        if prefills[0].cache is self.cache:
            self.rows = [seq for _, seq in sorted(zip((p.row for p in prefills), seqs))]
            for row in sorted((p.row for p, done in zip(prefills, finished) if done), reverse=True):
                self.remove(row)
        else:
            for seq, prefill, done in zip(seqs, prefills, finished):
                if not done:
                    self.cache.add(prefill.cache, seq.pos, prefill.row, prefill.end)
                    self.rows.append(seq)
        self.stats.running = len(self.rows)

    def step(self, may_run_ahead: bool) -> None:
        """Feeds every row its last token, chooses the next, and retires the rows that finished.

        With may_run_ahead (nothing waits to join), a CUDA batch queues its next step before this one's host
        work (reading tokens, detokenizing, stop strings, the sinks); rows that end here drop out of it.
        """
        seqs = self.rows
        began = time.perf_counter()
        proposal = self.speculator.propose(seqs) if self.speculator is not None and self.ahead is None else None
        if proposal is not None:
            self._speculative_step(seqs, proposal, began)
            return
        logits = self.ahead if self.ahead is not None else self._forward(seqs, None)
        self.ahead = None
        selection = self.sampler.select(seqs, logits)
        if self.speculator is not None and self.speculator.next_step_may_guess:
            may_run_ahead = False  # the next step may verify guesses: it cannot be queued now as a plain one
        if self.run_ahead and may_run_ahead and not any(s.last_token_due or s.request.cancelled for s in seqs):
            self.ahead = self._forward(seqs, selection.tokens)
        finished = self.advance(seqs, *selection.to_host())
        if self.speculator is not None:
            self.speculator.record(False, time.perf_counter() - began, len(seqs))
        self._retire(finished)

    def _retire(self, finished: list[bool]) -> None:
        """Removes the rows that ended and drops cache columns no row uses any more."""
        for i in sorted((i for i, done in enumerate(finished) if done), reverse=True):
            self.remove(i)
        self.cache.compact(min_gap=max(64, self.cache.length // 2))

    def _speculative_step(self, seqs: list[Sequence], proposal: Proposal, began: float) -> None:
        """Feeds every row its last token and its guesses in one forward, keeps what the sampler accepts (and the
        next token), and rolls the cache back past each row's first rejected guess. Rows without guesses (or
        that may not speculate) take one token, chosen by the ordinary selection."""
        T = 1 + max(len(d) for d in proposal.drafts)
        logits = self._forward_many(seqs, proposal.drafts, T)
        guessing = [i for i, d in enumerate(proposal.drafts) if d]
        plain = [i for i, d in enumerate(proposal.drafts) if not d]
        emitted: list[list[tuple]] = [[] for _ in seqs]
        if plain:
            picked = self.sampler.select([seqs[i] for i in plain], logits[plain, 0]).to_host()
            for j, i in enumerate(plain):
                emitted[i] = [(picked[0][j], picked[1][j], picked[2][j])]
        verified = self.sampler.verify([seqs[i] for i in guessing], logits[guessing],
                                       [proposal.drafts[i] for i in guessing], [proposal.probs[i] for i in guessing])
        for i, row in zip(guessing, verified):
            emitted[i] = row
        accepted = [len(e) - 1 for e in emitted]
        self.cache.keep_written(T, [len(e) for e in emitted])
        for s, e in zip(seqs, emitted):
            s.pos += len(e)
        self.speculator.proposer.accepted(seqs, proposal, accepted)
        self._count_guesses(seqs, proposal.drafts, accepted)
        finished = self._advance_many(seqs, emitted)
        self.speculator.record(True, time.perf_counter() - began, sum(len(e) for e in emitted))
        self._retire(finished)

    def _forward_many(self, seqs: list[Sequence], drafts: list[list[int]], T: int) -> torch.Tensor:
        """Runs one eager step of T tokens per row (its last token, its guesses, then filler that is rolled back);
        returns the logits (B, T, vocab)."""
        limit = self.model.config.n_positions - 1
        rows = [[s.next_input] + d + [s.next_input] * (T - 1 - len(d)) for s, d in zip(seqs, drafts)]
        tokens = torch.tensor(rows, device=self.device)
        positions = torch.tensor([[min(s.pos + j, limit) for j in range(T)] for s in seqs], device=self.device)
        self.cache.ensure_room(T)
        self.cache.slot = None  # eager: a graphed one-token step sets its slot again when it runs
        with routed(self.model, [s.params.adapter for s in seqs]):
            logits = self.model.logits(self.model(tokens, positions, self.cache))
        self.stats.steps += 1
        return logits

    def _count_guesses(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int]) -> None:
        """Adds a step's guesses and accepted guesses to the rows and the engine's counters."""
        self.stats.spec_steps += 1
        for s, d, a in zip(seqs, drafts, accepted):
            s.drafted_tokens += len(d)
            s.accepted_tokens += a
            self.stats.spec_drafted_tokens += len(d)
            self.stats.spec_accepted_tokens += a

    def _forward(self, seqs: list[Sequence], tokens: torch.Tensor | None) -> torch.Tensor:
        """Runs one decode step on `tokens` (default: each row's next input); returns the logits (B, vocab)."""
        self.cache.ensure_room(1)
        if tokens is None:
            tokens = torch.tensor([s.next_input for s in seqs], device=self.device)
        positions = torch.tensor([s.pos for s in seqs], device=self.device)
        with routed(self.model, [s.params.adapter for s in seqs]):  # each row's LoRA adapter, if any
            logits = self.decode_step(tokens, positions)
        for s in seqs:
            s.pos += 1
        self.stats.steps += 1
        return logits

    def advance(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float | None],
                tops: list[dict[int, float] | None]) -> list[bool]:
        """Records each row's chosen token and reports it; returns which rows ended."""
        return self._advance_many(seqs, [[row] for row in zip(tokens, logprobs, tops)])

    def _advance_many(self, seqs: list[Sequence], emitted: list[list[tuple]]) -> list[bool]:
        """Records each row's (token, logprob, top logprobs) in order, reporting each, until the row ends; returns
        which rows ended. Each row's sink sees one event per token."""
        now = time.monotonic()
        finished = []
        for s, row in zip(seqs, emitted):
            req = s.request
            if req.first_token_at is None:
                req.first_token_at = now
            ended = False
            for tok, lp, top in row:
                self.stats.generated_tokens += 1
                event = s.accept(tok, lp, top, now)
                ended = event.finish_reason is not None
                if ended:
                    self.finish(s, event)
                    break
                req.sink(event)
            finished.append(ended)
        return finished

    def remove(self, i: int) -> None:
        """Drops row i: the last row moves into its place, in the cache and in a queued step's logits."""
        self.cache.remove(i)
        last = self.rows.pop()
        if i < len(self.rows):
            self.rows[i] = last
        if self.ahead is not None:
            if i < len(self.rows):
                self.ahead[i] = self.ahead[len(self.rows)]
            self.ahead = self.ahead[: len(self.rows)]
        self.stats.running = len(self.rows)

    def drop_cancelled(self) -> None:
        """Ends the rows whose request was cancelled."""
        for i in range(len(self.rows) - 1, -1, -1):
            s = self.rows[i]
            if s.request.cancelled:
                self.finish(s, Event(s, "", finish_reason=s.request.cancel_reason))
                self.remove(i)
