"""The Engine: the queue, admission and the decode step, driven by its own thread or by the caller.

Every generation in neoj runs here. The server and `neoj batch` start the engine's thread and submit
requests from other threads; `generate_batch` and `stream_batch` (LanguageModel.generate/stream/complete,
the tasks) drive a private engine on the calling thread with `admit` and `decode`. One round is: the
next piece of each pending job, admission of waiting sequences (prefill, first token), one decode step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterable

import torch

from ..adapters import check_adapter_request
from ..cuda_graph import DecodeStep
from ..errors import GenerationError, NeojError
from ..model import Transformer
from ..model_utils import fit_prompt
from ..sampling import GenerationParams
from ..tokenizer import Tokenizer
from .prefill import look_up_prefixes, prefill, prefill_groups, remember_prefixes
from .prefix_cache import PrefixCache, PrefixHit
from .speculation import Speculative
from .events import Countdown, drain
from .lockstep import HEARTBEAT_S, Lockstep, NotReplicated, Round, request_spec
from .request import EngineStats, Job, Prefill, QueueFull, Request, WaitingQueue
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
        self._keys = itertools.count()  # a leader's request keys, as its followers know them
        self._ends: dict[Request, str] = {}  # a leader's requests to end at the next round: "cancelled"
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
        req = self._request(prompts, params, sink, max_time, prompt_logprobs, priority)
        if self._leading:  # the leader ends requests at their deadline, between rounds (see _plan_round)
            req.key, req.end_at, req.deadline = next(self._keys), req.deadline, None
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

    def _request(self, prompts: list[list[int]], params: GenerationParams, sink: Callable[[Event], None],
                 max_time: float | None, prompt_logprobs: int | None, priority: int = 0) -> Request:
        """Returns a Request of checked, context-fitted prompts, each repeated num_return_sequences times."""
        params.validated()
        check_adapter_request(self.model, params.adapter)  # a LoRA adapter the model does not serve
        if max_time is not None and not max_time > 0:
            raise GenerationError(f"max_time={max_time!r} must be > 0 seconds")
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= 20:
            raise GenerationError(f"prompt logprobs={prompt_logprobs!r} must be between 0 and 20")
        n_pos, usable = self.model.config.n_positions, self.sampler.usable_vocab
        fitted = [fit_prompt(ids or [self.tokenizer.eos_token_id], params.max_new_tokens, n_pos, params.truncate)
                  for ids in prompts]
        for ids in fitted:
            bad = [t for t in ids if not 0 <= t < usable]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {usable})")
        if any(t >= usable for t in params.logit_bias or ()):
            raise GenerationError(f"logit_bias names a token id outside the vocabulary [0, {usable})")
        req = Request(params, sink, max_time, prompt_logprobs, priority)
        n = params.num_return_sequences
        for i, ids in enumerate(fitted):
            for j in range(n):  # unseeded: a seed from torch's generator, so torch.manual_seed repeats a run
                seed = params.seed + j if params.seed is not None else \
                    0 if params.greedy else int(torch.randint(0, 2**62, (1,)))
                req.seqs.append(Sequence(req, i * n + j, i, ids, seed, self.tokenizer, self.vocab, self.device))
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
                self._ends.setdefault(req, "cancelled")
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
        return self._admit_taken(seqs)

    def _admit_taken(self, seqs: list[Sequence]) -> int:
        """Prefills and starts the sequences taken from the queue; returns how many."""
        taken_at, before = time.monotonic(), len(self.running)
        with torch.inference_mode():
            self._admit(seqs)
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
            self._fail(failed, exc, "decode step failed; ending the running batch")
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

    # ---- lockstep: the leader's rounds and the followers' ----

    def _lead(self) -> None:
        """The leader's model thread: each round is planned, broadcast, then run as every follower runs it; an idle
        leader sends a heartbeat round every HEARTBEAT_S. A failure (a rank lost) ends everything (_die)."""
        try:
            while True:
                with self._cv:
                    if not (self._stopping or self.has_work or self._ends):
                        self._cv.wait(HEARTBEAT_S)
                    round_, seqs = (Round(stop=True), []) if self._stopping else self._plan_round()
                self.lockstep.send(round_)
                if round_.stop:
                    break
                self._run_round(round_, seqs)
        except Exception as exc:
            self._die(exc)
            return
        self._cancel_everything()

    def _plan_round(self) -> tuple[Round, list[Sequence]]:
        """Returns the leader's next Round and the sequences it admits (called holding the lock): the requests to
        end (cancelled, or past their deadline), the waiting sequences that fit, and whether a step may run ahead."""
        known, now = self.lockstep.known, time.monotonic()
        ends = [(req.key, reason) for req, reason in self._ends.items() if req.key in known]
        self._ends.clear()
        ends += [(key, "time") for key, req in known.items()
                 if req.end_at is not None and now >= req.end_at and not req.cancelled]
        seqs = self._take_waiting() if self.batch.ahead is None else []
        round_ = Round(ends=ends, may_run_ahead=not self._waiting)
        for seq in seqs:
            req = seq.request
            if req.key not in known:
                known[req.key] = req
                round_.new_requests.append(request_spec(req.key, req))
            round_.admit.append((req.key, seq.index))
        return round_, seqs

    def follow(self) -> None:
        """Runs the rounds rank 0's engine broadcasts, on this rank of a tensor-parallel model, until the leader
        stops; raises ProcessesError when the leader is lost (it died, or a collective timed out)."""
        if self.lockstep is None or self.lockstep.leads:
            raise NeojError("follow() is for ranks other than 0 of a model split over processes (--tp)")
        self.raise_errors = True
        while True:
            round_ = self.lockstep.receive()
            if round_.stop:
                break
            self._run_round(round_, self._followed_sequences(round_))
        self._cancel_everything()

    def _followed_sequences(self, round_: Round) -> list[Sequence]:
        """Makes the requests the leader sent for the first time; returns the sequences the round admits."""
        known = self.lockstep.known
        for spec in round_.new_requests:
            req = Request(spec.params, lambda event: None, None, spec.prompt_logprobs, spec.priority)
            req.key, req.end_at = spec.key, None
            req.seqs = [Sequence(req, s.index, s.prompt_index, s.prompt_ids, s.seed, self.tokenizer, self.vocab,
                                 self.device) for s in spec.seqs]
            known[spec.key] = req
        return [known[key].seqs[index] for key, index in round_.admit]

    def _run_round(self, round_: Round, seqs: list[Sequence]) -> None:
        """Runs one round as every rank runs it: the ends, the admission of `seqs`, one decode step."""
        for key, reason in round_.ends:
            req = self.lockstep.known[key]
            req.cancelled, req.cancel_reason = True, reason
        self._admit_taken(seqs)
        self.decode(may_run_ahead=round_.may_run_ahead)
        self.lockstep.forget_finished()

    def _die(self, exc: Exception) -> None:
        """Ends every request with the error that stopped the rounds, marks the engine stopped, calls on_fatal."""
        log.error("the engine stops: %s", exc)
        self.fatal = exc
        with self._cv:
            self._stopping = True
        message = f"the model stopped: {exc}"
        for seq in list(self.running):
            self._finish(seq, Event(seq, "", finish_reason="error", error=message))
        for req in self._waiting:
            for seq in req.seqs[req.next_admit :]:
                self._finish(seq, Event(seq, "", finish_reason="error", error=message))
        self._flush()
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
        for seq in self.running:
            self._finish(seq, Event(seq, "", finish_reason="cancelled"))
        for req in self._waiting:
            for seq in req.seqs[req.next_admit :]:
                self._finish(seq, Event(seq, "", finish_reason="cancelled"))
        self._flush()

    def _flush(self) -> None:
        for flush in self._flushes:
            try:
                flush()
            except Exception:  # like a failing sink, it must not take the model thread down
                log.exception("event flush failed")

    # ---- admission ----

    def _take_waiting(self) -> list[Sequence]:
        """Pops the sequences to admit this round: free rows, and a prompt-token budget (at least one)."""
        out = self._waiting.take(self.max_batch - len(self.running), self.prefill_tokens)
        self.stats.waiting = len(self._waiting)
        self._admitting = len(out)
        return out

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefills this round's new prompts (in padded groups, reusing cached prefixes) and starts their sequences."""
        todo, fresh = [], {}
        for seq in seqs:
            req = seq.request
            if req.cancelled:
                self._finish(seq, Event(seq, "", finish_reason=req.cancel_reason))
            elif seq.params.max_new_tokens == 0 and req.prompt_logprobs is None:
                self._finish(seq, Event(seq, "", finish_reason="length"))
            else:
                todo.append(seq)
                if seq.prompt_index not in req.prefills:
                    fresh.setdefault((id(req), seq.prompt_index), seq)
        prompts = list(fresh.values())
        hits = look_up_prefixes(self.prefix_cache, prompts) if self.prefix_cache is not None else {}
        groups = prefill_groups(prompts, self.prefill_tokens, {seq: hit.tokens for seq, hit in hits.items()})
        # Into an empty batch, one group of prompts each starting one sequence is prefilled in place: its
        # keys and values are written straight into the batch's cache (no second cache, no copy).
        in_place = not self.running and len(groups) == 1 and len(groups[0]) == len(todo) and \
            all(seq.params.max_new_tokens > 0 for seq in todo)
        failed = self._prefill_all(groups, in_place, hits)
        ready = []
        for seq in todo:
            error = failed.get((id(seq.request), seq.prompt_index))
            if error is not None:
                self._finish(seq, Event(seq, "", finish_reason="error", error=error))
            else:
                ready.append(seq)
        self._start(ready)
        self._admitting = 0

    def _prefill_all(self, groups: list[list[Sequence]], in_place: bool,
                     hits: dict[Sequence, PrefixHit]) -> dict[tuple[int, int], str]:
        """Prefills each group's prompts into their requests (in_place: the one group straight into the batch's
        cache), reusing their `hits`, and stores their blocks in the prefix cache; returns the error of each
        prompt that failed."""
        failed: dict[tuple[int, int], str] = {}
        for group in groups:
            try:
                cache = self.cache.begin([len(seq.prompt_ids) for seq in group]) if in_place else None
                done = prefill(self.model, group, self.tokenizer.eos_token_id, cache, [hits.get(s) for s in group])
                for seq, result in zip(group, done):
                    seq.request.prefills[seq.prompt_index] = result
                    self.stats.prompt_tokens += len(seq.prompt_ids)
                self._remember_prefixes(group, done)
            except Exception as exc:
                if in_place:
                    self.batch.reset()
                if self.raise_errors:
                    raise
                log.exception("prefill failed")
                failed.update(((id(seq.request), seq.prompt_index), str(exc)) for seq in group)
        return failed

    def _remember_prefixes(self, group: list[Sequence], done: list[Prefill]) -> None:
        """Stores a prefilled group's prompts in the prefix cache and counts the tokens it served."""
        if self.prefix_cache is not None:
            queried, hit = remember_prefixes(self.prefix_cache, group, done)
            self.stats.prefix_queried_tokens += queried
            self.stats.prefix_hit_tokens += hit

    def _start(self, seqs: list[Sequence]) -> None:
        """Starts prefilled sequences: their first token, then the running batch (unless that token ends them)."""
        started, prefills = [], []
        for seq in seqs:
            prefill = seq.request.take_prefill(seq)
            seq.prompt_logprobs = prefill.prompt_logprobs
            seq.cached_tokens = prefill.cached_tokens
            if seq.params.max_new_tokens == 0:  # only the prompt's logprobs were asked for
                self._finish(seq, Event(seq, "", finish_reason="length"))
            else:
                started.append(seq)
                prefills.append(prefill)
        if not started:
            return
        try:
            self.batch.start(started, prefills)
        except Exception as exc:
            if not self.running:  # rows prefilled in place are in the cache: empty it
                self.batch.reset()
            self._fail(started, exc, "choosing the first token failed")

    # ---- finishing ----

    def _fail(self, seqs: list[Sequence], exc: Exception, what: str) -> None:
        """Ends seqs with the error, or raises it when the caller drives the rounds (no engine thread)."""
        if self.raise_errors:
            raise exc
        log.exception(what)
        for seq in seqs:
            self._finish(seq, Event(seq, "", finish_reason="error", error=str(exc)))

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
