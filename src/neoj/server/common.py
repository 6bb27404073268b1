"""What every API family shares: errors, the server's state, prompts and their fit to the context, and engine
requests seen from asyncio. (Reading and validating request bodies: neoj.server.bodies.)"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..api import LanguageModel
from ..engine import Engine, Event, QueueFull, Sequence
from ..errors import ContextLengthError, GenerationError
from ..model_utils import fit_prompt
from ..sampling import GenerationParams
from ..engine.events import Countdown, failure
from .chat import ChatTemplate
from .metrics import Metrics


class APIError(Exception):
    """An error answered as JSON in the calling API's shape, with an HTTP status and optional headers."""

    def __init__(self, status: int, message: str, kind: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             405: "invalid_request_error", 413: "invalid_request_error",
                             422: "invalid_request_error",
                             503: "overloaded_error"}.get(status, "server_error")


@dataclass
class ServerState:
    """Everything a route needs: the model, its engine, the served ids and the server's limits."""

    lm: LanguageModel
    engine: Engine
    model_id: str
    aliases: tuple[str, ...]
    api_key: str | None
    max_body_bytes: int
    chat_template: ChatTemplate
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    relays: dict = field(default_factory=dict, repr=False)  # event loop -> EventRelay

    def relay(self) -> "EventRelay":
        """Returns the relay of engine events to the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        if loop not in self.relays:
            self.relays[loop] = EventRelay(loop, self.engine)
        return self.relays[loop]

    @property
    def n_positions(self) -> int:
        """Returns the model's context length in tokens."""
        return self.lm.config.n_positions

    @property
    def adapter_names(self) -> list[str]:
        """Returns the names of the LoRA adapters served over the base model (each is a model id)."""
        return self.lm.adapter_names

    def check_model(self, name: str | None) -> str | None:
        """Returns the adapter `name` picks: None for the base model (None, the served id or one of its aliases,
        case-insensitive), or a served adapter's name; else raises 404.

        The name is only ever compared: the server never loads a model or opens a path a request names.
        """
        if name is None or name.lower() in {a.lower() for a in (self.model_id, *self.aliases)}:
            return None
        if name in self.adapter_names:
            return name
        adapters = f"; adapters: {', '.join(repr(a) for a in self.adapter_names)}" if self.adapter_names else ""
        raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}"
                       + (f" (also reachable as {', '.join(repr(a) for a in self.aliases)})" if self.aliases else "")
                       + adapters, param="model")


    def check_base_model(self, name: str | None, what: str) -> None:
        """Raises 404 unless `name` names the base model, and 422 when it names an adapter: `what` (embeddings,
        the tasks) runs on the base model only."""
        if self.check_model(name) is not None:
            raise APIError(422, f"{what} run on the base model only; model {name!r} is a LoRA adapter "
                           f"(use {self.model_id!r})", param="model")


def default_aliases(lm: LanguageModel, model_id: str) -> tuple[str, ...]:
    """Returns other names a client may use for the served model: the id's last component, the Hub id
    recorded in config.json (_name_or_path), and the model's load name."""
    names = [model_id.rstrip("/").rsplit("/", 1)[-1]]
    hub = lm.config.source.get("_name_or_path")
    if isinstance(hub, str) and hub.count("/") == 1 and not os.path.isabs(hub) and not hub.startswith("."):
        names += [hub, hub.rsplit("/", 1)[-1]]
    if lm.name and not lm.name.startswith((os.sep, ".", "~")) and not os.path.exists(lm.name):
        names.append(lm.name)  # a Hub id or random:PRESET, never a filesystem path
    out: list[str] = []
    for n in names:
        if n and n.lower() != model_id.lower() and n.lower() not in (o.lower() for o in out):
            out.append(n)
    return tuple(out)


def best_first(seqs: list[Sequence], per_prompt: int) -> list[list[Sequence]]:
    """Returns each prompt's `per_prompt` sequences (seqs holds them prompt by prompt), best first: by the mean
    log-probability of their tokens, how OpenAI and TGI pick the best of best_of samples."""
    def mean_logprob(seq: Sequence) -> float:
        return sum(seq.logprobs) / max(len(seq.logprobs), 1)

    return [sorted(seqs[first : first + per_prompt], key=mean_logprob, reverse=True)
            for first in range(0, len(seqs), per_prompt)]


def speculation(seqs: list[Sequence]) -> dict:
    """Returns the speculative-decoding figures of sequences, summed: {"drafted_tokens", "accepted_tokens",
    "acceptance_rate"} (the rate None when nothing was drafted: speculation off, opted out, or paused)."""
    drafted = sum(s.drafted_tokens for s in seqs)
    accepted = sum(s.accepted_tokens for s in seqs)
    return {"drafted_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None}


def encode_prompts(state: ServerState, prompt, what: str = "prompt") -> tuple[list[list[int]], list[str | None]]:
    """Returns (token ids, original text or None) per prompt; empty prompts and unknown ids are 422s."""
    tok = state.lm.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(422, f"{what} is empty: give at least one non-empty {what}", param=what)
    ids, texts = [], []
    vocab = min(tok.vocab_size, state.lm.config.vocab_size)
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            if not item:
                raise APIError(422, f"{what} is empty" + (f" (item {i})" if len(prompt) > 1 else "")
                               + ": give some text", param=what)
            ids.append(tok.encode(item))
            texts.append(item)
        else:
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError(422, f"{what} holds token id {bad[0]}, outside the vocabulary [0, {vocab})", param=what)
            ids.append(list(item))
            texts.append(None)
    return ids, texts


def check_context(state: ServerState, prompts: list[list[int]], max_new: int, truncate: bool, param: str,
                  truncate_hint: str = '"truncate": true') -> None:
    """Raises a 400 naming the token counts and the limit when a prompt plus max_new cannot fit (as
    neoj.model_utils.fit_prompt decides; see context_error for the wording)."""
    for ids in prompts:
        try:
            fit_prompt(ids, max_new, state.n_positions, truncate)
        except ContextLengthError as exc:
            raise context_error(exc, max_new, param, truncate_hint) from None


def context_error(exc: ContextLengthError, max_new: int, param: str, truncate_hint: str) -> APIError:
    """Returns the 400 for a prompt that does not fit, in the route's own words: param is its new-token field
    (max_tokens, max_new_tokens, max_length), truncate_hint how its requests ask for truncation."""
    limit, n = exc.limit, exc.prompt_tokens
    if max_new >= limit:
        return APIError(400, f"{param}={max_new} leaves no room for a prompt: this model's context is {limit} "
                        "tokens", param=param)
    if n >= limit:
        return APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has {n} "
                        f"tokens, leaving no room for new ones; shorten the prompt or set {truncate_hint} to keep "
                        "the prompt's last tokens", param="prompt")
    return APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has {n} tokens "
                    f"and {max_new} new tokens were requested ({n + max_new} in total); shorten the prompt, lower "
                    f"{param}, or set {truncate_hint} to keep the prompt's last tokens", param="prompt")


def room_for(state: ServerState, prompts: list[list[int]], default: int) -> int:
    """Returns a default max_new_tokens shrunk to what the longest prompt leaves of the context (at least 1)."""
    longest = max(len(p) for p in prompts)
    return max(1, min(default, state.n_positions - longest))


MAX_SEQUENCES = 512  # prompts x n in one request


class EventRelay:
    """Carries engine events to one event loop: sinks collect them on the model thread, and the engine's flush
    after each step hands them all over with one wake-up of the loop. (A call_soon_threadsafe per event would
    wake the loop once per token and row, each time pulling the GIL away from the model thread mid-step.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: Engine):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Event]] = []
        engine.on_events(self.flush)

    def sink(self, queue: asyncio.Queue) -> Callable[[Event], None]:
        """Returns a sink (called on the model thread) whose events reach `queue` at the next flush."""
        def put(event: Event) -> None:
            with self._lock:
                self._pending.append((queue, event))

        return put

    def flush(self) -> None:
        """Schedules delivery of the collected events on the loop; called on the model thread."""
        with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
        try:
            self.loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop has closed: the server is gone
            pass


def _deliver(batch: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


class Generation:
    """An engine request seen from the event loop: the model thread's events arrive on an asyncio.Queue."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: GenerationParams,
                 max_time: float | None = None, prompt_logprobs: int | None = None, route: str = "",
                 priority: int = 0):
        self.state, self.route = state, route
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.started = time.perf_counter()
        if len(prompts) * params.num_return_sequences > MAX_SEQUENCES:
            raise APIError(422, f"{len(prompts)} prompts x {params.num_return_sequences} sequences is more than "
                           f"the {MAX_SEQUENCES} sequences one request may ask for; split the request")

        try:
            self.req = state.engine.start().submit(prompts, params, state.relay().sink(self.queue), max_time=max_time,
                                                   prompt_logprobs=prompt_logprobs, priority=priority)
        except QueueFull as exc:
            state.metrics.rejected.inc()
            raise APIError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        except GenerationError as exc:
            raise APIError(422, str(exc)) from None
        self.count = Countdown(len(self.req.seqs))
        self.closed = False

    @property
    def seqs(self) -> list[Sequence]:
        """Returns the request's sequences, index = prompt index x n + copy."""
        return self.req.seqs

    async def events(self) -> AsyncIterator[Event]:
        """Yields events until every sequence has finished."""
        while self.count.left:
            yield self.count.see(await self.queue.get())
        self.close()

    async def wait(self, request: Request) -> list[Sequence]:
        """Returns the finished sequences; cancels the request if the client disconnects first."""
        async def drain():
            async for event in self.events():
                message = failure(event)
                if message is not None:
                    raise APIError(500, message, kind="generation")

        task = asyncio.ensure_future(drain())
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
                self.close()
        if task not in done:
            raise ClientGone()
        task.result()
        return self.seqs

    def close(self) -> None:
        """Frees the request's rows and records its metrics (once)."""
        if self.closed:
            return
        self.closed = True
        if self.count.left:
            self.state.engine.cancel(self.req)
        m, req = self.state.metrics, self.req
        m.latency.observe(time.perf_counter() - self.started, self.route)
        if req.first_token_at is not None:
            m.ttft.observe(req.first_token_at - req.submitted, self.route)


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: asyncio.Future):
    """Returns work's result; cancels work and raises ClientGone if the client disconnects first."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work not in done:
        raise ClientGone()
    return work.result()


class EventStream(StreamingResponse):
    """A server-sent-events response that cancels its generation however the stream ends (done, error,
    or a client that went away), so a disconnected client frees its slot at the next step."""

    media_type = "text/event-stream"  # what /openapi.json says of routes whose response_class this is

    def __init__(self, body, generation: Generation):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()
            await self.body_iterator.aclose()


def sse(data) -> str:
    """Returns one server-sent event carrying `data` as JSON (or a literal string such as [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
