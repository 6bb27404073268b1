"""The Engine: the queue, admission and the decode step, driven by its own thread or by the caller.

Every generation in neoj runs here. The server and `neoj batch` start the engine's thread and submit
requests from other threads; `generate_batch` and `stream_batch` (LanguageModel.generate/stream/complete,
the tasks) drive a private engine on the calling thread with `admit` and `decode`. One round is: the
next piece of each pending job, admission of waiting sequences (prefill, first token), one decode step.
engine.admission makes requests and admits sequences, engine.lockstep runs the rounds of a tensor-parallel
model's ranks; both drive the Engine through its public side (end, fail, admit_taken, plan_round, decode).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterable

import torch

from ..cuda_graph import DecodeStep
from ..errors import NeojError
from ..model import Transformer
from ..sampling import GenerationParams
from ..tokenizer import Tokenizer
from .admission import admit_sequences, new_request
from .prefix_cache import PrefixCache
from .speculation import Speculative
from .events import Countdown, drain
from .lockstep import Lockstep, NotReplicated, Round
from .request import EngineStats, Job, QueueFull, Request, WaitingQueue
from .running import RunningBatch
from .sampler import Sampler
from .sequence import Event, Sequence

log = logging.getLogger(__name__)


class Engine:
    """The continuous-batching scheduler: it owns the model's running batch and its cache.

    `start()` runs rounds on a background thread (the server); without it, the caller drives rounds with
    `step()`, or `admit()` and `decode()`, and failures raise instead of ending the rows with an error.
    `make_step(model, cache)` builds the decode step (default: a CUDA graph on GPUs, eager elsewhere).
    `prefix_cache` (shared between engines of one model) lets prompts reuse the keys and values of earlier
    prompts' common prefixes; `speculative` makes decode steps verify guessed tokens (per request opt-out:
    GenerationParams.speculative=False).

    On a tensor-parallel model (neoj.tensor_parallel) the ranks' engines run in lockstep (engine.lockstep): rank
    0's engine is started and leads, the others `follow()`; adaptive speculation is off there (its timing could
    differ between ranks) and work outside the rounds (call, call_pieces) is refused.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 32, max_queue: int = 64,
                 prefill_tokens: int = 2048, make_step=DecodeStep.for_cache, prefix_cache: PrefixCache | None = None,
                 speculative: Speculative | None = None):
        if max_batch < 1 or max_queue < 0:
            raise NeojError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model, self.tokenizer = model, tokenizer
        processes = getattr(model, "tensor_parallel", None)
        self.lockstep = Lockstep(processes) if processes is not None and processes.world > 1 else None
        if self.lockstep is not None and speculative is not None and speculative.adaptive:
            speculative = dataclasses.replace(speculative, adaptive=False, times=None)
        self.prefix_cache = prefix_cache  # reused prompt prefixes (None: off)
        self.speculative = speculative  # how decode steps guess ahead (None: they do not)
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.device = model.wte.weight.device
        self.vocab = model.config.vocab_size
        self.sampler = Sampler(min(tokenizer.vocab_size, self.vocab))
        self.stats = EngineStats()
        self.batch = RunningBatch(model, max_batch, self.sampler, make_step, self.stats, self._finish, speculative)
        self.raise_errors = True  # until start(): the caller drives the rounds and sees the exceptions
        self._waiting = WaitingQueue()  # in (priority, arrival) order
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._seq_seconds = 1.0  # moving average of a sequence's time in the batch, for Retry-After
        self._admitting = 0  # sequences taken from the queue and being prefilled
        self._flushes: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._leading = False  # started as the leader of engines in lockstep
        self.fatal: Exception | None = None  # what stopped a leader's or follower's rounds (a rank lost)
        self.on_fatal: Callable[[Exception], None] | None = None  # called on the model thread when that happens

    @property
    def running(self) -> list[Sequence]:
        """Returns the sequences in the running batch."""
        return self.batch.rows

    @property
    def cache(self):
        """Returns the running batch's BatchCache."""
        return self.batch.cache

    # ---- the public, thread-safe side ----

    def start(self) -> "Engine":
        """Starts the model thread; returns self. Engines in lockstep: only rank 0's starts (and leads)."""
        with self._cv:
            if self._thread is None:
                if self.lockstep is not None:
                    if not self.lockstep.leads:
                        raise NeojError(f"rank {self.lockstep.processes.rank} of a tensor-parallel model follows "
                                        "rank 0's engine: call follow(), not start()")
                    self._leading = True
                self._stopping = False
                self.raise_errors = self.lockstep is not None  # in lockstep, any failure stops every rank
                self._thread = threading.Thread(target=self._loop, name="neoj-engine", daemon=True)
                self._thread.start()
        return self

    @property
    def alive(self) -> bool | None:
        """Returns whether the model thread runs (None before start)."""
        return None if self._thread is None else self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the model thread; unfinished requests end with finish_reason "cancelled"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompts: list[list[int]], params: GenerationParams, sink: Callable[[Event], None],
               max_time: float | None = None, prompt_logprobs: int | None = None, priority: int = 0) -> Request:
        """Queues prompts x num_return_sequences sequences; returns the Request. Lower priorities are admitted
        first, equal ones in arrival order (vLLM's priority policy, without preempting running rows); a full
        queue refuses any new request, whatever its priority.

        Raises ContextLengthError or GenerationError for bad input and QueueFull when max_queue requests
        are already waiting beyond the free rows of the batch. `sink` receives every Event on the model thread
        and must not block (see on_events to pass events on in bursts).
        With prompt_logprobs=N, each sequence's prompt_logprobs holds (logprob, top N) per prompt token.
        """
        req = new_request(self, prompts, params, sink, max_time, prompt_logprobs, priority)
        if self._leading:  # the leader ends requests at their deadline, between rounds (see Lockstep.plan)
            self.lockstep.adopt(req)
        with self._cv:
            if self._stopping:
                raise NeojError("the engine is shutting down")
            # Requests that the next admission round takes into free rows are not "waiting beyond the batch".
            free_rows = max(0, self.max_batch - len(self.running) - self._admitting)
            if len(self._waiting) >= self.max_queue + free_rows:
                self.stats.rejected += 1
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                "(max_queue); retry later", self._retry_after())
            self._waiting.append(req)
            self.stats.requests += 1
            self.stats.waiting = len(self._waiting)
            self._cv.notify_all()
        return req

    def on_events(self, flush: Callable[[], None]) -> None:
        """Calls flush() on the model thread after each burst of events (an admission round, a decode step,
        the shutdown), so that sinks may collect events and pass them on together."""
        with self._cv:
            self._flushes.append(flush)

    def cancel(self, req: Request) -> None:
        """Ends a request: dropped from the queue now, its running rows at the next step."""
        with self._cv:
            if self._leading:  # every rank ends it at the start of the same round
                self.lockstep.end(req, "cancelled")
            else:
                req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self.stats.waiting = len(self._waiting)
            self._cv.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Runs fn() on the model thread between steps; returns a Future of its result."""
        return self._submit_job([fn], single=True)

    def call_pieces(self, pieces: Iterable[Callable[[], object]]) -> Future:
        """Runs each piece on the model thread, one per round between decode steps; returns a Future of the
        list of their results. Long model work (embedding many inputs) split into pieces delays the running
        streams by one piece per step instead of stalling them until it is all done; the queue admits it once,
        as one job. Cancelling the Future skips the pieces not yet run."""
        return self._submit_job(pieces, single=False)

    def _submit_job(self, pieces: Iterable[Callable[[], object]], single: bool) -> Future:
        if self.lockstep is not None and self._leading:
            raise NotReplicated("this runs outside the engine's generation rounds, which a model split over "
                                "processes (--tp) cannot do in step on every rank; it is not served with --tp")
        fut: Future = Future()
        with self._cv:
            if self._stopping:
                raise NeojError("the engine is shutting down")
            if len(self._waiting) + len(self._jobs) >= self.max_queue + 1:
                self.stats.rejected += 1
                raise QueueFull("the server is busy; retry later", self._retry_after())
            self._jobs.append(Job(fut, pieces, single))
            self._cv.notify_all()
        return fut

    def generate(self, prompts: list[list[int]], params: GenerationParams, **options):
        """Returns the Completions of prompts, blocking while the engine's thread runs them."""
        events: queue.Queue = queue.Queue()
        req = self.submit(prompts, params, events.put, **options)
        for _ in drain(events, Countdown(len(req.seqs)), idle=lambda: None, poll=1.0):
            pass
        return [s.completion() for s in req.seqs]

    def _retry_after(self) -> int:
        waves = (len(self._waiting) + len(self.running)) / self.max_batch
        return int(min(60, max(1, math.ceil(waves * self._seq_seconds))))

    # ---- rounds: the engine's thread, or the caller's ----

    @property
    def has_work(self) -> bool:
        """Returns True while requests wait or run, or jobs are pending."""
        return bool(self._waiting or self.running or self._jobs)

    def step(self) -> bool:
        """Runs one round on the calling thread (jobs, admission, a decode step); returns has_work."""
        with torch.inference_mode():
            self._run_jobs()
            self.admit()
            self.decode()
        return self.has_work

    def run_until_done(self) -> None:
        """Runs rounds on the calling thread until every request has finished and every job has run."""
        while self.step():
            pass

    def admit(self) -> int:
        """Prefills the waiting sequences that fit and starts them (first token); returns how many it took."""
        seqs = []
        if self.batch.ahead is None:  # else the queued step covers only the rows running now: admit after it
            with self._cv:
                seqs = self._take_waiting()
        return self.admit_taken(seqs)

    def admit_taken(self, seqs: list[Sequence]) -> int:
        """Prefills and starts sequences taken from the queue (on a follower: those the leader's round names);
        returns how many."""
        taken_at, before = time.monotonic(), len(self.running)
        with torch.inference_mode():
            admit_sequences(self, seqs)
            self._admitting = 0
            self.stats.latency.admitted(seqs, self.running[before:], taken_at, time.monotonic())
            self.batch.drop_cancelled()
        self._flush()  # first tokens go out now, not after the next step
        return len(seqs)

    def decode(self, may_run_ahead: bool | None = None) -> None:
        """Advances every running sequence by one token (nothing when none runs). A step may run ahead (queue
        the next one) when nothing waits, unless may_run_ahead says otherwise."""
        if not self.running:
            return
        seqs = list(self.running)  # the step removes the rows that end
        try:
            with torch.inference_mode():
                self.batch.step(may_run_ahead=not self._waiting if may_run_ahead is None else may_run_ahead)
            self.stats.latency.stepped(seqs, time.monotonic())
        except Exception as exc:
            failed = self.running
            self.batch.reset()
            self.fail(failed, exc, "decode step failed; ending the running batch")
        self._flush()

    def _loop(self) -> None:
        if self._leading:
            self._lead()
            return
        while True:
            with self._cv:
                while not (self._stopping or self.has_work):
                    self._cv.wait()
                if self._stopping:
                    break
            with torch.inference_mode():
                self._run_jobs()
            self.admit()
            self.decode()
        self._cancel_everything()

    # ---- lockstep (engine.lockstep runs the rounds; the engine plans the leader's and runs each) ----

    def _lead(self) -> None:
        """The leader's model thread (Lockstep.lead); a failure (a rank lost) ends everything (_die)."""
        try:
            self.lockstep.lead(self)
        except Exception as exc:
            self._die(exc)
            return
        self._cancel_everything()

    def follow(self) -> None:
        """Runs the rounds rank 0's engine broadcasts, on this rank of a tensor-parallel model, until the leader
        stops; raises ProcessesError when the leader is lost (it died, or a collective timed out)."""
        if self.lockstep is None or self.lockstep.leads:
            raise NeojError("follow() is for ranks other than 0 of a model split over processes (--tp)")
        self.raise_errors = True
        self.lockstep.follow(self)
        self._cancel_everything()

    def plan_round(self, wait: float) -> tuple[Round, list[Sequence]]:
        """Returns the leader's next Round and the sequences it admits (Lockstep.plan), once there is work or
        `wait` seconds have passed; a stop Round once the engine is shutting down."""
        with self._cv:
            if not (self._stopping or self.has_work or self.lockstep.ending):
                self._cv.wait(wait)
            if self._stopping:
                return Round(stop=True), []
            seqs = self._take_waiting() if self.batch.ahead is None else []
            return self.lockstep.plan(seqs, may_run_ahead=not self._waiting), seqs

    def _die(self, exc: Exception) -> None:
        """Ends every request with the error that stopped the rounds, marks the engine stopped, calls on_fatal."""
        log.error("the engine stops: %s", exc)
        self.fatal = exc
        with self._cv:
            self._stopping = True
        self._end_all("error", f"the model stopped: {exc}")
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _run_jobs(self) -> None:
        """Runs the next piece of every pending job; those with pieces left run again next round."""
        with self._cv:
            jobs, self._jobs = self._jobs, []
        unfinished = [job for job in jobs if not job.run_one()]
        if unfinished:
            with self._cv:
                self._jobs[:0] = unfinished

    def _cancel_everything(self) -> None:
        for job in self._jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NeojError("the engine is shutting down"))
        self._end_all("cancelled")

    def _end_all(self, reason: str, error: str | None = None) -> None:
        """Ends every running and waiting sequence (finish_reason `reason`) and flushes their events."""
        for seq in list(self.running):
            self.end(seq, reason, error)
        for req in self._waiting:
            for seq in req.seqs[req.next_admit :]:
                self.end(seq, reason, error)
        self._flush()

    def _flush(self) -> None:
        for flush in self._flushes:
            try:
                flush()
            except Exception:  # like a failing sink, it must not take the model thread down
                log.exception("event flush failed")

    def _take_waiting(self) -> list[Sequence]:
        """Pops the sequences to admit this round: free rows, and a prompt-token budget (at least one)."""
        out = self._waiting.take(self.max_batch - len(self.running), self.prefill_tokens)
        self.stats.waiting = len(self._waiting)
        self._admitting = len(out)
        return out

    # ---- finishing ----

    def fail(self, seqs: list[Sequence], exc: Exception, what: str) -> None:
        """Ends seqs with the error, or raises it when the caller drives the rounds (no engine thread); model thread."""
        if self.raise_errors:
            raise exc
        log.exception(what)
        for seq in seqs:
            self.end(seq, "error", str(exc))

    def end(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Ends a sequence without a new token (finish_reason `reason`, with `error` for "error"); model thread."""
        self._finish(seq, Event(seq, "", finish_reason=reason, error=error))

    def _finish(self, seq: Sequence, event: Event) -> None:
        seq.finish_reason = event.finish_reason
        req = seq.request
        req.finished += 1
        self.stats.finished[event.finish_reason] += 1
        if req.done:
            now = time.monotonic()
            self.stats.latency.finished(req, now)
            self._seq_seconds = 0.9 * self._seq_seconds + 0.1 * (now - (req.first_token_at or req.submitted))
        try:
            req.sink(event)
        except Exception:  # a sink that fails must not take the model thread down
            log.exception("event sink failed")
