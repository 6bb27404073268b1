"""What every API family shares: errors, the server's state, reading bodies, and engine requests seen from asyncio."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..api import LanguageModel
from ..engine import Engine, Event, QueueFull, Sequence
from ..errors import ContextLengthError, GenerationError
from ..sampling import GenerationParams
from .chat import ChatTemplate
from .metrics import Metrics

M = TypeVar("M", bound=BaseModel)


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

    def check_model(self, name: str | None) -> None:
        """Raises 404 unless `name` is None or the served id or one of its aliases (case-insensitive).

        The name is only ever compared: the server never loads a model or opens a path a request names.
        """
        if name is None or name.lower() in {a.lower() for a in (self.model_id, *self.aliases)}:
            return
        raise APIError(404, f"model {name!r} is not served here; this server serves {self.model_id!r}"
                       + (f" (also reachable as {', '.join(repr(a) for a in self.aliases)})" if self.aliases else ""),
                       param="model")


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


async def read_json(request: Request) -> object:
    """Returns the parsed JSON body whatever the Content-Type (curl -d sends form-encoded), or a 400."""
    body = await request.body()
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as exc:
        raise APIError(400, f"malformed JSON in the request body: {exc}") from None
    except RecursionError:
        raise APIError(400, "malformed JSON in the request body: nested too deeply") from None
    _check_unicode(data)
    return data


def _check_unicode(data: object) -> None:
    """Rejects strings holding a lone UTF-16 surrogate ("\\ud800" in JSON), which no tokenizer can encode."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, "the request holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which "
                               "is not text; send valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def parse(model: type[M], data: object) -> M:
    """Returns the validated request, or a 422 naming each bad field and why."""
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise APIError(422, validation_message(exc), param=_first_loc(exc)) from None


# Fields that accept several shapes: one line saying which, instead of one per alternative tried.
UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "input": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "inputs": "a string or a list of strings", "stop": "a string or a list of strings",
    "stop_sequences": "a string or a list of strings", "content": "a string or a list of text parts",
    "truncate": "a token count or true/false",
}


def validation_message(exc: ValidationError) -> str:
    """Returns pydantic's errors as one line per field: "temperature: Input should be ... (got 5)"."""
    seen, lines = set(), []
    errors = exc.errors(include_url=False)
    for err in errors:
        parts = [str(p) for p in err["loc"] if not _is_union_tag(p)]
        union = next((i for i, p in enumerate(parts) if p in UNION_FIELDS), None)
        if union is not None and err["type"] != "missing":
            key = ".".join(parts[: union + 1])
            if key not in seen:
                seen.add(key)
                same = [e for e in errors if ".".join(str(p) for p in e["loc"] if not _is_union_tag(p)).startswith(key)]
                specific = [e for e in same if not e["type"].endswith(("_type", "_parsing"))]
                lines.append(f"{key}: {specific[0]['msg']}" if specific else
                             f"{key}: must be {UNION_FIELDS[parts[union]]}")
            continue
        loc = ".".join(parts)
        msg = err["msg"]
        key = (loc, msg)
        if key in seen:
            continue
        seen.add(key)
        got = err.get("input")
        got = json.dumps(got)[:60] if _jsonable(got) else repr(got)[:60]
        shown = "" if err["type"] == "missing" else f" (got {got})"
        lines.append(f"{loc or 'body'}: {msg}{shown}")
    if len(lines) > 4:  # a union tries every alternative; the first few are enough
        lines = lines[:4] + [f"... and {len(lines) - 4} more"]
    return "; ".join(lines)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict",
                                                               "constrained-int", "constrained-float"))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _first_loc(exc: ValidationError) -> str | None:
    errs = exc.errors()
    return str(errs[0]["loc"][0]) if errs and errs[0]["loc"] else None


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
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise APIError(422, f"{what} is empty" + (f" (item {i})" if len(prompt) > 1 else "")
                               + ": give some text", param=what)
            ids.append(tok.encode(p))
            texts.append(p)
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(422, f"{what} holds token id {bad[0]}, outside the vocabulary [0, {vocab})", param=what)
            ids.append(list(p))
            texts.append(None)
    return ids, texts


def check_context(state: ServerState, prompts: list[list[int]], max_new: int, truncate: bool, param: str,
                  truncate_hint: str = '"truncate": true') -> None:
    """Raises a 400 naming the token counts and the limit when a prompt plus max_new cannot fit."""
    limit = state.n_positions
    if max_new >= limit:
        raise APIError(400, f"{param}={max_new} leaves no room for a prompt: this model's context is {limit} "
                       f"tokens", param=param)
    if truncate:
        return
    for ids in prompts:
        if len(ids) >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                           f"{len(ids)} tokens, leaving no room for new ones; shorten the prompt or set "
                           f"{truncate_hint} to keep the prompt's last tokens", param="prompt")
        if len(ids) + max_new > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but the prompt has "
                           f"{len(ids)} tokens and {max_new} new tokens were requested ({len(ids) + max_new} in "
                           f"total); shorten the prompt, lower {param}, or set {truncate_hint} to keep the "
                           "prompt's last tokens", param="prompt")


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
                 max_time: float | None = None, prompt_logprobs: int | None = None, route: str = ""):
        self.state, self.route = state, route
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.started = time.perf_counter()
        if len(prompts) * params.num_return_sequences > MAX_SEQUENCES:
            raise APIError(422, f"{len(prompts)} prompts x {params.num_return_sequences} sequences is more than "
                           f"the {MAX_SEQUENCES} sequences one request may ask for; split the request")

        try:
            self.req = state.engine.start().submit(prompts, params, state.relay().sink(self.queue),
                                                   max_time=max_time, prompt_logprobs=prompt_logprobs)
        except QueueFull as exc:
            state.metrics.rejected.inc()
            raise APIError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except ContextLengthError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        except GenerationError as exc:
            raise APIError(422, str(exc)) from None
        self.remaining = len(self.req.seqs)
        self.closed = False

    @property
    def seqs(self) -> list[Sequence]:
        """Returns the request's sequences, index = prompt index x n + copy."""
        return self.req.seqs

    async def events(self) -> AsyncIterator[Event]:
        """Yields events until every sequence has finished."""
        while self.remaining:
            event = await self.queue.get()
            if event.finish_reason is not None:
                self.remaining -= 1
            yield event
        self.close()

    async def wait(self, request: Request) -> list[Sequence]:
        """Returns the finished sequences; cancels the request if the client disconnects first."""
        async def drain():
            async for event in self.events():
                if event.finish_reason == "error":
                    raise APIError(500, f"generation failed: {event.error}", kind="generation")

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
        if self.remaining:
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
