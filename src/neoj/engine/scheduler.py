"""The scheduler: requests, their sequences and events, and the model thread that batches them."""

from __future__ import annotations

import collections
import logging
import math
import queue
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import GenerationError, NeojError
from ..generate import Completion, _drain, _StopScanner
from ..kv_cache import KVCache
from ..model import Transformer, positions_from_valid
from ..model_utils import fit_prompt, left_pad
from ..sampling import GenerationParams
from ..tokenizer import StreamDecoder, Tokenizer
from .batch_cache import BatchCache
from .sampler import RowSampler

log = logging.getLogger(__name__)

# Why a sequence ended: "eos" (<|endoftext|>), "stop" (a stop string), "length" (max_new_tokens),
# "time" (max_time), "cancelled" (client gone or server stopping), "error" (the model failed).
FINISH_REASONS = ("eos", "stop", "length", "time", "cancelled", "error")


class QueueFull(NeojError):
    """The engine already has max_queue requests waiting; retry_after estimates when to retry (seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Event:
    """What one sequence produced in one step; finish_reason is set on its last event."""

    seq: "Sequence"
    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """One generated row: prompt, parameters, sampling state and the output so far."""

    def __init__(self, request: "Request", index: int, prompt_index: int, prompt_ids: list[int], seed: int,
                 tokenizer: Tokenizer, vocab: int, device: torch.device):
        p = request.params
        self.request, self.index, self.prompt_index, self.prompt_ids = request, index, prompt_index, prompt_ids
        self.params, self.seed = p, seed
        self.generator = None if p.greedy else torch.Generator(device=device).manual_seed(seed)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device) if p.repetition_penalty != 1 else None
        if self.seen is not None:
            self.seen[torch.tensor(prompt_ids, device=device)] = True
        needs_counts = p.presence_penalty != 0 or p.frequency_penalty != 0
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device) if needs_counts else None
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.scanner = _StopScanner(p.stop)
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if p.logprobs is not None else None
        self.top_logprobs: list[dict[int, float]] | None = [] if p.logprobs else None
        self.prompt_logprobs: list[tuple[float | None, dict[int, float] | None]] | None = None
        self.text = ""
        self.finish_reason: str | None = None
        self.pos = 0  # tokens of this row in the cache = the position of the next token fed
        self.pending = 0  # the last token chosen, fed at the next step

    def completion(self) -> Completion:
        """Returns the finished sequence as a Completion (finish_reason "stop" or "length", as generate's)."""
        reason = "stop" if self.finish_reason in ("eos", "stop") else "length"
        return Completion(self.text, list(self.token_ids), self.logprobs, self.top_logprobs, reason,
                          len(self.prompt_ids), self.prompt_index)


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
        # prompt index -> (cache, row, end, last logits, prompt logprobs, copies still to start)
        self.prefills: dict[int, tuple[KVCache, int, int, torch.Tensor, list | None, int]] = {}

    @property
    def done(self) -> bool:
        """Returns True once every sequence has finished."""
        return self.finished == len(self.seqs)


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


class Engine:
    """The continuous-batching scheduler: one background thread owns the model and the batch cache."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 32, max_queue: int = 64,
                 prefill_tokens: int = 2048):
        if max_batch < 1 or max_queue < 0:
            raise NeojError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        cfg = model.config
        self.device = model.wte.weight.device
        self.vocab = cfg.vocab_size
        self.sampler = RowSampler(min(tokenizer.vocab_size, cfg.vocab_size))
        self.cache = BatchCache(model, max_batch)
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._waiting: collections.deque[Request] = collections.deque()
        self._jobs: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._seq_seconds = 1.0  # moving average of a sequence's time in the batch, for Retry-After
        self._admitting = 0  # sequences taken from the queue and being prefilled
        self._flushes: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    # ---- the public, thread-safe side ----

    def start(self) -> "Engine":
        """Starts the model thread; returns self."""
        with self._cv:
            if self._thread is None:
                self._stopping = False
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
               max_time: float | None = None, prompt_logprobs: int | None = None) -> Request:
        """Queues prompts x num_return_sequences sequences; returns the Request.

        Raises ContextLengthError or GenerationError for bad input and QueueFull when max_queue requests
        are already waiting beyond the free rows of the batch. `sink` receives every Event on the model thread
        and must not block (see on_events to pass events on in bursts).
        With prompt_logprobs=N, each sequence's prompt_logprobs holds (logprob, top N) per prompt token.
        """
        params.validated()
        if max_time is not None and not max_time > 0:
            raise GenerationError(f"max_time={max_time!r} must be > 0 seconds")
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= 20:
            raise GenerationError(f"prompt logprobs={prompt_logprobs!r} must be between 0 and 20")
        n_pos = self.model.config.n_positions
        fitted = [fit_prompt(ids or [self.tokenizer.eos_token_id], params.max_new_tokens, n_pos, params.truncate)
                  for ids in prompts]
        for ids in fitted:
            bad = [t for t in ids if not 0 <= t < self.sampler.usable_vocab]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {self.sampler.usable_vocab})")
        req = Request(params, sink, max_time, prompt_logprobs)
        n = params.num_return_sequences
        for i, ids in enumerate(fitted):
            for j in range(n):
                seed = params.seed + j if params.seed is not None else random.getrandbits(63)
                req.seqs.append(Sequence(req, i * n + j, i, ids, seed, self.tokenizer, self.vocab, self.device))
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

    def generate(self, prompts: list[list[int]], params: GenerationParams, **options) -> list[Completion]:
        """Returns the Completions of prompts, blocking; the synchronous form of submit()."""
        events: queue.Queue = queue.Queue()
        req = self.submit(prompts, params, events.put, **options)
        pending = len(req.seqs)
        while pending:
            ev = events.get()
            if ev.finish_reason is not None:
                pending -= 1
                if ev.finish_reason == "error":
                    raise GenerationError(ev.error)
        return [s.completion() for s in req.seqs]

    def _retry_after(self) -> int:
        waves = (len(self._waiting) + len(self.running)) / self.max_batch
        return int(min(60, max(1, math.ceil(waves * self._seq_seconds))))

    # ---- the model thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._waiting or self._jobs or self.running):
                        self._cv.wait()
                    if self._stopping:
                        break
                    jobs, self._jobs = self._jobs, []
                    admitted = self._take_waiting()
                unfinished = [job for job in jobs if not job.run_one()]
                if unfinished:  # their next pieces run next round, after this round's step
                    with self._cv:
                        self._jobs[:0] = unfinished
                self._admit(admitted)
                self._drop_finished_or_cancelled()
                self._flush()  # first tokens go out now, not after the next step
                if self.running:
                    try:
                        self._step()
                    except Exception as exc:
                        log.exception("decode step failed; ending the running batch")
                        for seq in self.running:
                            self._finish(seq, "error", error=str(exc))
                        self.running = []
                        self.cache = BatchCache(self.model, self.max_batch)
                    self._flush()
            for job in self._jobs:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(NeojError("the engine is shutting down"))
            for seq in self.running:
                self._finish(seq, "cancelled")
            for req in self._waiting:
                for seq in req.seqs[req.next_admit :]:
                    self._finish(seq, "cancelled")
            self._flush()

    def _flush(self) -> None:
        for flush in self._flushes:
            try:
                flush()
            except Exception:  # like a failing sink, it must not take the model thread down
                log.exception("event flush failed")

    def _take_waiting(self) -> list[Sequence]:
        """Pops the sequences to admit this round: free rows, and a prompt-token budget (at least one)."""
        out, budget = [], self.prefill_tokens
        free = self.max_batch - len(self.running)
        while self._waiting and len(out) < free:
            req = self._waiting[0]
            seq = req.seqs[req.next_admit]
            new_prompt = seq.prompt_index not in req.prefills
            if out and new_prompt and budget < len(seq.prompt_ids):
                break
            if new_prompt:
                budget -= len(seq.prompt_ids)
            out.append(seq)
            req.next_admit += 1
            if req.next_admit == len(req.seqs):
                self._waiting.popleft()
        self.stats.waiting = len(self._waiting)
        self._admitting = len(out)
        return out

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefills the prompts of seqs in one left-padded forward; leaves each in its request's prefills."""
        rows = [seq.prompt_ids for seq in seqs]
        ids, valid = left_pad(rows, self.tokenizer.eos_token_id, self.device)
        width = ids.shape[1]
        cache = KVCache.for_model(self.model, len(rows), width)
        padded = any(len(r) != width for r in rows)
        positions = positions_from_valid(valid) if padded else None
        hidden = self.model(ids, positions, cache, valid if padded else None)
        last = self.model.logits(hidden[:, -1])
        for i, seq in enumerate(seqs):
            req, p = seq.request, len(seq.prompt_ids)
            plp = self._prompt_logprobs(hidden[i, width - p : -1], seq.prompt_ids, req.prompt_logprobs) \
                if req.prompt_logprobs is not None else None
            req.prefills[seq.prompt_index] = (cache, i, width, last[i : i + 1], plp, seq.params.num_return_sequences)
            self.stats.prompt_tokens += p

    def _prefill_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Returns seqs in groups to prefill together: by length, each at most prefill_tokens once padded."""
        groups: list[list[Sequence]] = []
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
            if groups and (len(groups[-1]) + 1) * len(seq.prompt_ids) <= self.prefill_tokens:
                groups[-1].append(seq)
            else:
                groups.append([seq])
        return groups

    def _take_prefill(self, seq: Sequence):
        """Returns (cache, row, end, last logits, prompt logprobs) of seq's prompt, shared by its copies."""
        req = seq.request
        cache, row, end, last, plp, uses = req.prefills[seq.prompt_index]
        if uses > 1:
            req.prefills[seq.prompt_index] = (cache, row, end, last, plp, uses - 1)
        else:
            del req.prefills[seq.prompt_index]
        return cache, row, end, last.clone(), plp

    def _prompt_logprobs(self, hidden: torch.Tensor, ids: list[int], top_n: int, chunk: int = 256) -> list:
        """Returns [(logprob, top) per prompt token]; the first token has none (nothing precedes it).

        Over the full output vocabulary, as LanguageModel.score and transformers compute them, so scores
        served to lm-eval match local ones (GPT-J's padding rows are not masked here).
        """
        out: list = [(None, None)]
        targets = torch.tensor(ids[1:], device=self.device)
        for s in range(0, len(ids) - 1, chunk):
            logits = self.model.logits(hidden[s : s + chunk])
            logp = torch.log_softmax(logits, dim=-1)
            lps = logp.gather(1, targets[s : s + chunk, None]).squeeze(1).tolist()
            if top_n:
                top = torch.topk(logp, top_n, dim=-1)
                tops = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                tops = [None] * len(lps)
            out += list(zip(lps, tops))
        return out

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefills this round's sequences (new prompts together, in padded groups) and adds them to the batch."""
        todo, fresh = [], {}
        for seq in seqs:
            req = seq.request
            if req.cancelled:
                self._finish(seq, "cancelled")
            elif seq.params.max_new_tokens == 0 and req.prompt_logprobs is None:
                self._finish(seq, "length")
            else:
                todo.append(seq)
                if seq.prompt_index not in req.prefills:
                    fresh.setdefault((id(req), seq.prompt_index), seq)
                continue
            self._admitting -= 1
        failed: dict[tuple[int, int], str] = {}
        for group in self._prefill_groups(list(fresh.values())):
            try:
                self._prefill(group)
            except Exception as exc:
                log.exception("prefill failed")
                failed.update(((id(seq.request), seq.prompt_index), str(exc)) for seq in group)
        for seq in todo:
            try:
                error = failed.get((id(seq.request), seq.prompt_index))
                if error is not None:
                    self._finish(seq, "error", error=error)
                else:
                    self._start(seq)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, "error", error=str(exc))
            self._admitting -= 1

    def _start(self, seq: Sequence) -> None:
        """Chooses a prefilled sequence's first token and, unless that ends it, splices it into the batch."""
        cache, row, end, logits, seq.prompt_logprobs = self._take_prefill(seq)
        if seq.params.max_new_tokens == 0:
            self._finish(seq, "length")
            return
        seq.pos = len(seq.prompt_ids)
        if not self._advance([seq], logits)[0]:
            self.cache.add(cache, seq.pos, row, end)
            self.running.append(seq)

    def _step(self) -> None:
        """Feeds every running row its last token and advances each by one."""
        seqs = self.running
        self.cache.ensure_room(1)
        ids = torch.tensor([[s.pending] for s in seqs], device=self.device)
        positions = torch.tensor([[s.pos] for s in seqs], device=self.device)
        hidden = self.model(ids, positions, self.cache, None)
        logits = self.model.logits(hidden[:, -1])
        for s in seqs:
            s.pos += 1
        self.stats.steps += 1
        finished = self._advance(seqs, logits)
        for i in sorted((i for i, f in enumerate(finished) if f), reverse=True):
            self._remove_row(i)
        self.cache.compact(min_gap=max(64, self.cache.length // 2))

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> list[bool]:
        """Chooses each row's next token, records it and reports it; returns which rows finished."""
        tokens, logprobs, tops = self.sampler.select(seqs, logits)
        now = time.monotonic()
        eos = self.tokenizer.eos_token_id
        finished = []
        for s, tok, lp, top in zip(seqs, tokens, logprobs, tops):
            req, p = s.request, s.params
            if req.first_token_at is None:
                req.first_token_at = now
            s.token_ids.append(tok)
            s.pending = tok
            self.stats.generated_tokens += 1
            if s.logprobs is not None:
                s.logprobs.append(lp)
            if s.top_logprobs is not None:
                s.top_logprobs.append(top)
            reason = None
            if p.stop_at_eos and tok == eos:
                text, reason = _drain(s.decoder, s.scanner), "eos"
            else:
                text, hit = s.scanner.feed(s.decoder.push(tok))
                if hit:
                    reason = "stop"
                elif len(s.token_ids) >= p.max_new_tokens or (req.deadline is not None and now >= req.deadline):
                    text += _drain(s.decoder, s.scanner)
                    reason = "length" if len(s.token_ids) >= p.max_new_tokens else "time"
            s.text += text
            if reason is None:
                s.request.sink(Event(s, text, tok, lp, top))
            else:
                self._finish(s, reason, text=text, token_id=tok, logprob=lp, top=top)
            finished.append(reason is not None)
        return finished

    def _finish(self, seq: Sequence, reason: str, text: str = "", token_id: int | None = None,
                logprob: float | None = None, top: dict | None = None, error: str | None = None) -> None:
        seq.finish_reason = reason
        req = seq.request
        req.finished += 1
        self.stats.finished[reason] += 1
        if req.done:
            age = time.monotonic() - (req.first_token_at or req.submitted)
            self._seq_seconds = 0.9 * self._seq_seconds + 0.1 * age
        try:
            req.sink(Event(seq, text, token_id, logprob, top, reason, error))
        except Exception:  # a sink that fails must not take the model thread down
            log.exception("event sink failed")

    def _remove_row(self, i: int) -> None:
        self.cache.remove(i)
        last = self.running.pop()
        if i < len(self.running):
            self.running[i] = last
        self.stats.running = len(self.running)

    def _drop_finished_or_cancelled(self) -> None:
        for i in range(len(self.running) - 1, -1, -1):
            s = self.running[i]
            if s.request.cancelled:
                self._finish(s, "cancelled")
                self._remove_row(i)
        self.stats.running = len(self.running)
