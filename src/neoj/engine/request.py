"""What the engine queues: requests (sequences sharing parameters and a sink) in priority order, model-thread
jobs, counters and latency histograms."""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import GenerationError, NeojError
from ..kv_cache import KVCache
from ..sampling import GenerationParams
from .sequence import Event, Sequence


class QueueFull(NeojError):
    """The engine already has max_queue requests waiting; retry_after estimates when to retry (seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Prefill:
    """A prompt's prefilled keys and values, shared by the copies (num_return_sequences) that start from it."""

    cache: KVCache
    row: int  # the prompt's row in cache
    end: int  # its tokens end at this slot
    logits: torch.Tensor  # (1, vocab): the next-token logits after the prompt
    prompt_logprobs: list | None
    copies_left: int
    cached_tokens: int = 0  # of the prompt's first tokens, how many were reused from the prefix cache


class Request:
    """A submitted group of sequences (each prompt x num_return_sequences) sharing parameters and a sink."""

    def __init__(self, params: GenerationParams, sink: Callable[[Event], None], max_time: float | None,
                 prompt_logprobs: int | None, priority: int = 0):
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise GenerationError(f"priority={priority!r} must be an integer (lower values run first)")
        self.params, self.sink, self.prompt_logprobs = params, sink, prompt_logprobs
        self.priority = priority  # lower runs first (vLLM's priority scheduling)
        self.submitted = time.monotonic()
        self.deadline = self.submitted + max_time if max_time is not None else None
        self.seqs: list[Sequence] = []
        self.next_admit = 0  # seqs before this have left the waiting queue
        self.finished = 0
        self.cancelled = False
        self.cancel_reason = "cancelled"  # the finish reason of rows a cancel ends ("time" for a lockstep deadline)
        self.key: int | None = None  # engines in lockstep: the request's key on every rank
        self.end_at: float | None = None  # engines in lockstep: the deadline, checked between rounds
        self.first_token_at: float | None = None
        self.prefills: dict[int, Prefill] = {}  # by prompt index, until its last copy has started

    @property
    def done(self) -> bool:
        """Returns True once every sequence has finished."""
        return self.finished == len(self.seqs)

    def take_prefill(self, seq: Sequence) -> Prefill:
        """Returns seq's prompt prefill; the last copy to start takes it out of the request."""
        prefill = self.prefills[seq.prompt_index]
        prefill.copies_left -= 1
        if prefill.copies_left == 0:
            del self.prefills[seq.prompt_index]
        return prefill


class WaitingQueue:
    """The requests waiting for rows, in (priority, arrival) order: lower priorities first, FIFO among equals.

    It offers what the scheduler used of a deque (append, [0], popleft, remove, in, len, iteration). Arrival is a
    counter, not a clock, so equal priorities keep their submission order exactly. A queue holds at most
    max_queue + max_batch requests, so a sorted list's O(n) insertion costs less than a heap's bookkeeping.
    """

    def __init__(self):
        self._items: list[tuple[int, int, Request]] = []
        self._arrivals = itertools.count()

    def append(self, req: Request) -> None:
        """Queues req behind every waiting request of its priority or lower (better)."""
        bisect.insort(self._items, (req.priority, next(self._arrivals), req), key=lambda item: item[:2])

    def __getitem__(self, index: int) -> Request:
        return self._items[index][2]

    def popleft(self) -> Request:
        """Removes and returns the request to admit first."""
        return self._items.pop(0)[2]

    def remove(self, req: Request) -> None:
        """Removes req (a cancelled request)."""
        self._items = [item for item in self._items if item[2] is not req]

    def __contains__(self, req: object) -> bool:
        return any(item[2] is req for item in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return (item[2] for item in list(self._items))

    def take(self, free: int, budget: int) -> list[Sequence]:
        """Pops the sequences to admit this round, in queue order: at most `free`, and prompts of at most `budget`
        tokens (the first one whatever its length). A request leaves the queue once its last sequence is taken."""
        out: list[Sequence] = []
        while self._items and len(out) < free:
            req = self[0]
            seq = req.seqs[req.next_admit]
            new_prompt = seq.prompt_index not in req.prefills
            if out and new_prompt and budget < len(seq.prompt_ids):
                break
            if new_prompt:
                budget -= len(seq.prompt_ids)
            out.append(seq)
            req.next_admit += 1
            if req.next_admit == len(req.seqs):
                self.popleft()
        return out


class Job:
    """Model-thread work submitted with call() or call_pieces(): pieces run one per round, between decode steps.

    The future stays pending until the last piece has run, so cancelling it skips the pieces left.
    """

    def __init__(self, future: Future, pieces: Iterable[Callable[[], object]], single: bool):
        self.future, self.pieces, self.single = future, iter(pieces), single
        self.results: list = []

    def run_one(self) -> bool:
        """Runs the next piece on the model thread; returns True when the job has ended (done, failed, cancelled)."""
        fut = self.future
        if fut.cancelled():
            return True
        try:
            piece = next(self.pieces, None)
            if piece is not None:
                self.results.append(piece())
                return False
        except BaseException as exc:  # handed to the caller, who reports it
            if fut.set_running_or_notify_cancel():
                fut.set_exception(exc)
            return True
        if fut.set_running_or_notify_cancel():
            fut.set_result(self.results[0] if self.single else self.results)
        return True


# vLLM's bucket bounds (vllm/v1/metrics/buckets.py), so that dashboards made for it read neoj's histograms alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class Timings:
    """Durations (seconds) counted into fixed buckets: what a Prometheus histogram exports, kept in O(buckets)
    memory however long the engine runs. Written by the model thread; read with snapshot() from any thread."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """Records n observations of `seconds` (one bisect however many)."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += n
        self.total += seconds * n

    def snapshot(self) -> tuple[list[int], float]:
        """Returns (count per bucket, not cumulative, the last above every bound; sum of the observations)."""
        return list(self.counts), self.total


class Latencies:
    """The engine's latency histograms, filled at admission, after each decode step and as requests end.

    Inter-token latency costs one bisect per decode step for the rows that were in the previous step (their
    tokens all came then), and a subtraction and a dict entry per row that joined the batch since (its first
    token came at its admission): no per-token work beyond that.
    """

    def __init__(self):
        self.ttft = Timings(TTFT_BUCKETS)  # submit -> first token, per request (queueing and prefill included)
        self.itl = Timings(ITL_BUCKETS)  # between a sequence's consecutive tokens
        self.e2e = Timings(REQUEST_BUCKETS)  # submit -> last token, per request that produced one
        self.queue = Timings(REQUEST_BUCKETS)  # submit -> taken from the queue, per request
        self._joined: dict[Sequence, float] = {}  # rows started since the last step -> their first token's time
        self._last_step: float | None = None

    def admitted(self, taken: list[Sequence], joined: list[Sequence], taken_at: float, now: float) -> None:
        """Records the queue time and first token of the requests whose first sequence was taken this round
        (at taken_at), and when the rows that joined the running batch (at `now`) got their first token."""
        for seq in taken:
            req = seq.request
            if seq.index == 0:  # sequences leave the queue in order: the request's first admission round
                self.queue.observe(taken_at - req.submitted)
                if req.first_token_at is not None:
                    self.ttft.observe(req.first_token_at - req.submitted)
        for seq in joined:
            self._joined[seq] = now

    def stepped(self, seqs: list[Sequence], now: float) -> None:
        """Records the inter-token latency of each row of a decode step that chose their tokens by `now`."""
        rest = len(seqs)
        if self._joined:
            for seq in seqs:
                at = self._joined.pop(seq, None)
                if at is not None:
                    self.itl.observe(now - at)
                    rest -= 1
            self._joined.clear()  # rows that ended or were cancelled before stepping
        if rest and self._last_step is not None:
            self.itl.observe(now - self._last_step, rest)
        self._last_step = now

    def finished(self, req: Request, now: float) -> None:
        """Records the end-to-end latency of a request whose last sequence ended at `now`."""
        if req.first_token_at is not None:
            self.e2e.observe(now - req.submitted)


@dataclass
class EngineStats:
    """Counters since start (monotonic), the current queue depth and batch size, and latency histograms."""

    waiting: int = 0
    running: int = 0
    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int = 0  # of those, found (their keys and values reused, not prefilled)
    spec_steps: int = 0  # decode steps that verified guesses
    spec_drafted_tokens: int = 0  # guesses proposed and verified
    spec_accepted_tokens: int = 0  # guesses accepted
    finished: collections.Counter = field(default_factory=collections.Counter)
    latency: Latencies = field(default_factory=Latencies)
