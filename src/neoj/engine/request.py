"""What the engine queues: requests (sequences sharing parameters and a sink), model-thread jobs, counters."""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import NeojError
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


class Request:
    """A submitted group of sequences (each prompt x num_return_sequences) sharing parameters and a sink."""

    def __init__(self, params: GenerationParams, sink: Callable[[Event], None], max_time: float | None,
                 prompt_logprobs: int | None):
        self.params, self.sink, self.prompt_logprobs = params, sink, prompt_logprobs
        self.submitted = time.monotonic()
        self.deadline = self.submitted + max_time if max_time is not None else None
        self.seqs: list[Sequence] = []
        self.next_admit = 0  # seqs before this have left the waiting queue
        self.finished = 0
        self.cancelled = False
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


@dataclass
class EngineStats:
    """Counters since start (monotonic) and the current queue depth and batch size."""

    waiting: int = 0
    running: int = 0
    requests: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)
