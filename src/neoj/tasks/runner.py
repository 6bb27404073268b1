"""Where a task's model work runs: in-process (LocalRunner) or on a server's engine (EngineRunner).

Tasks are written once against Runner: generate prompts, stream one prompt, or run a function of the
model (scoring, embedding). A script gets a LocalRunner around its LanguageModel; the server gets an
EngineRunner, which sends generation through the continuous-batching engine and runs model functions on
the engine's thread between decode steps -- the one thread that may touch the model while it serves.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Iterator, TypeVar

import torch

from ..api import LanguageModel
from ..config import ModelConfig
from ..errors import ContextLengthError, NeojError
from ..generate import Completion, generate_batch, stream_batch
from ..model import Transformer
from ..model_utils import embed_rows, fit_prompt, right_pad
from ..sampling import GenerationParams
from ..tokenizer import Tokenizer
from ..engine.events import Countdown, drain
from ..engine.prefill import continuation_sums, score_rows_with_prefix
from ..engine.prefix_cache import PrefixCache

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_SECONDS = 0.1  # how often a waiting task checks whether it was cancelled
# Tokens (rows x width) in one scoring forward: bounds memory, and on a server the time the engine's
# decode steps wait for one scoring call.
SCORE_BATCH_TOKENS = 4096


class TaskError(NeojError, ValueError):
    """Input a task cannot work with: empty text, bad labels, options out of range."""


class Cancelled(NeojError):
    """The task was cancelled (its client went away) before it finished."""


class Runner:
    """Runs a task's model work; subclasses decide where."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.cancelled = threading.Event()

    @property
    def tokenizer(self) -> Tokenizer:
        """Returns the model's tokenizer."""
        return self.lm.tokenizer

    @property
    def config(self) -> ModelConfig:
        """Returns the model's configuration."""
        return self.lm.config

    @property
    def n_positions(self) -> int:
        """Returns the context length in tokens."""
        return self.lm.config.n_positions

    def check(self) -> None:
        """Raises Cancelled once cancel() was called; tasks call it between pieces of work."""
        if self.cancelled.is_set():
            raise Cancelled("the task was cancelled")

    def cancel(self) -> None:
        """Asks the task to stop at its next check."""
        self.cancelled.set()

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Completion]:
        """Returns one Completion per prompt (x num_return_sequences), in order."""
        raise NotImplementedError

    def generate_each(self, jobs: list[tuple[list[int], GenerationParams]]) -> list[list[Completion]]:
        """Returns the Completions of each (prompt, params) job; here, jobs with equal params share a batch."""
        groups: dict[str, list[int]] = {}
        for i, (_, params) in enumerate(jobs):
            groups.setdefault(repr(params), []).append(i)
        out: list[list[Completion]] = [[] for _ in jobs]
        for idx in groups.values():
            params = jobs[idx[0]][1]
            n = params.num_return_sequences
            comps = self.generate([jobs[i][0] for i in idx], params)
            for j, i in enumerate(idx):
                out[i] = comps[j * n : (j + 1) * n]
        return out

    def stream(self, prompt: list[int], params: GenerationParams) -> Iterator[str]:
        """Yields the text of one prompt's continuation as it is generated; closing it stops generation."""
        raise NotImplementedError

    def call(self, fn: Callable[[Transformer], T]) -> T:
        """Returns fn(model), run where the model may be used, in inference mode."""
        raise NotImplementedError


class LocalRunner(Runner):
    """Runs everything in the calling thread, on the LanguageModel itself, with its prefix cache and
    speculation (lm.prefix_cache, lm.speculative): a chat's history and a task's few-shot examples are
    prefilled once, then reused."""

    def generate(self, prompts, params):
        self.check()
        return generate_batch(self.lm.model, self.lm.tokenizer, prompts, params, prefix_cache=self.lm.prefix_cache,
                              speculative=self.lm.speculative)

    def stream(self, prompt, params):
        self.check()
        for events in stream_batch(self.lm.model, self.lm.tokenizer, [prompt], params,
                                   prefix_cache=self.lm.prefix_cache, speculative=self.lm.speculative):
            for event in events:
                if event.text:
                    yield event.text

    def call(self, fn):
        self.check()
        with torch.inference_mode():
            return fn(self.lm.model)


class EngineRunner(Runner):
    """Runs generation through a server's Engine and model functions on its thread; for a worker thread.

    Every wait polls the cancel flag, so a task whose client disconnected frees its rows promptly.
    """

    def __init__(self, lm: LanguageModel, engine):
        super().__init__(lm)
        self.engine = engine

    def _events(self, prompts: list[list[int]], params: GenerationParams):
        events: queue.Queue = queue.Queue()
        self.check()
        req = self.engine.start().submit(prompts, params, events.put)
        count = Countdown(len(req.seqs))
        try:
            for ev in drain(events, count, self.check, POLL_SECONDS):
                yield req, ev
        finally:
            if count.left:
                self.engine.cancel(req)

    def generate(self, prompts, params):
        req = None
        for req, _ in self._events(prompts, params):
            pass
        return [s.completion() for s in req.seqs] if req is not None else []

    def generate_each(self, jobs):
        """Submits every job as its own request (its own seed and options), all decoded in one running batch."""
        events: queue.Queue = queue.Queue()
        self.check()
        reqs = []
        try:
            for ids, params in jobs:
                reqs.append(self.engine.start().submit([ids], params, events.put))
            for _ in drain(events, Countdown(sum(len(r.seqs) for r in reqs)), self.check, POLL_SECONDS):
                pass
        finally:
            for r in reqs:
                if not r.done:
                    self.engine.cancel(r)
        return [[s.completion() for s in r.seqs] for r in reqs]

    def stream(self, prompt, params):
        for _, ev in self._events([prompt], params):
            if ev.text:
                yield ev.text

    def call(self, fn):
        self.check()
        model = self.lm.model
        fut = self.engine.start().call(lambda: fn(model))  # the engine's thread is already in inference mode
        while True:
            try:
                return fut.result(timeout=POLL_SECONDS)
            except FutureTimeout:
                if self.cancelled.is_set():
                    fut.cancel()
                    self.check()


def as_runner(lm: "LanguageModel | Runner") -> Runner:
    """Returns a Runner for a LanguageModel (in-process) or the Runner given."""
    if isinstance(lm, Runner):
        return lm
    if isinstance(lm, LanguageModel):
        return LocalRunner(lm)
    raise TypeError(f"expected a neoj LanguageModel (from neoj.load) or a Runner, got {type(lm).__name__}")


def task_params(max_new_tokens: int, stop: tuple[str, ...] | list[str] = (), **options) -> GenerationParams:
    """Returns GenerationParams for a task: greedy unless options say otherwise, extra stops appended."""
    options = {"temperature": 0.0, **options}
    extra = options.pop("stop", None) or []
    extra = [extra] if isinstance(extra, str) else list(extra)
    return GenerationParams.from_kwargs(max_new_tokens=max_new_tokens, stop=list(stop) + extra, **options)


def check_fits(prompt_tokens: int, max_new_tokens: int, n_positions: int, what: str) -> None:
    """Raises ContextLengthError when a prompt plus max_new_tokens does not fit the context (as
    neoj.model_utils.fit_prompt decides), worded for a task: tasks never truncate their prompts."""
    try:
        fit_prompt(range(prompt_tokens), max_new_tokens, n_positions, truncate=False)
    except ContextLengthError as exc:
        raise ContextLengthError(
            f"{what} has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, but the model's "
            f"context is {exc.limit} tokens; shorten it or lower max_new_tokens", exc.prompt_tokens, exc.limit) from None


# ---- scoring ----

def continuation_logprobs(runner: Runner, pairs: list[tuple[list[int], list[int]]],
                          batch_tokens: int = SCORE_BATCH_TOKENS) -> list[float]:
    """Returns, per (context ids, continuation ids), the sum of log P(continuation token | all before it).

    A context too long for the window keeps its last tokens. Rows are right-padded into batches of about
    batch_tokens tokens: under causal attention, padding after a row's end never reaches its real tokens.
    With the runner's model holding a prefix cache (lm.prefix_cache), rows reuse the cached keys and values of
    the contexts' common start (a few-shot prompt) and store theirs for the batches that follow.
    """
    n_pos, eos = runner.n_positions, runner.tokenizer.eos_token_id
    prefix_cache = runner.lm.prefix_cache
    rows = []
    for ctx, cont in pairs:
        if not cont:
            raise TaskError("a scored continuation must have at least one token")
        try:  # the context keeps its last tokens, as a truncated prompt does before len(cont) new ones
            ctx = fit_prompt(list(ctx) or [eos], len(cont), n_pos, truncate=True)
        except ContextLengthError:
            raise ContextLengthError(f"a scored continuation has {len(cont)} tokens; the context is {n_pos}",
                                     len(cont), n_pos) from None
        rows.append((ctx + list(cont), len(cont)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths pad little
    out = [0.0] * len(rows)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(rows[order[end]][0]) <= batch_tokens:
            end += 1
        group = order[start:end]
        scores = runner.call(lambda model, g=group: _score_rows(model, [rows[i] for i in g], eos, prefix_cache))
        for i, lp in zip(group, scores):
            out[i] = lp
        start = end
    return out


def _score_rows(model: Transformer, rows: list[tuple[list[int], int]], pad_id: int,
                prefix_cache: PrefixCache | None) -> list[float]:
    """Returns, per (ids, n) row, the summed log-probability of its last n tokens: through `prefix_cache` when
    there is one (a few-shot prompt runs once, then its keys and values are reused), else from one
    right-padded forward over whole rows."""
    if prefix_cache is not None:
        return score_rows_with_prefix(model, prefix_cache, rows, pad_id)
    x = right_pad([ids for ids, _ in rows], pad_id, model.wte.weight.device)
    return continuation_sums(model, model(x), x, rows)


def embeddings(runner: Runner, texts: list[list[int]], batch_tokens: int = SCORE_BATCH_TOKENS) -> torch.Tensor:
    """Returns the mean-pooled final hidden state (N, C) of each token-id sequence, as LanguageModel.embed."""
    eos, n_pos = runner.tokenizer.eos_token_id, runner.n_positions
    rows = [(list(ids) or [eos])[-n_pos:] for ids in texts]
    out: list[torch.Tensor] = []
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and (j - i + 1) * max(len(r) for r in rows[i : j + 1]) <= batch_tokens:
            j += 1
        out += runner.call(lambda model, g=rows[i:j]: embed_rows(model, g, eos))
        i = j
    return torch.stack(out) if out else torch.zeros(0, runner.config.hidden_size)
