"""The KoboldAI API (/api/v1 and koboldcpp's /api/extra), so SillyTavern, KoboldAI Lite and TavernAI connect.

Shapes follow KoboldAI United's API 1.2.5 (aiserver.py) and koboldcpp's extensions (koboldcpp.py), as the
clients use them: SillyTavern's KoboldAI backend posts to /api/v1/generate or /api/extra/generate/stream and
aborts with a bare POST /api/extra/abort; KoboldAI Lite sends a genkey and polls /api/extra/generate/check.

/api/extra/version answers {"result": "KoboldCpp", "version": "1.49"}: the clients turn on streaming, token
counting, abort, grammar, min_p and `memory` only for a KoboldCpp of such a version (SillyTavern reads
"result", Lite "version"), and 1.49 is the newest koboldcpp whose request fields neoj acts on (1.70's DRY and
1.74's XTC it does not have, so the clients are not told to send them). "server" says what really answers.

Generation semantics (koboldcpp's where KoboldAI and koboldcpp differ):
- the prompt keeps its last tokens so that memory + prompt + max_length fit max_context_length (capped at the
  model's context); max_length shrinks to leave the prompt at least min(16, context - 4) tokens;
- temperature 0 is greedy, top_k 0 and top_p 1, typical 0 or 1, min_p 0, rep_pen 1 are off; top_p 0 keeps
  only the best token (as llama.cpp's samplers do); sampler_seed -1 or absent is a random seed;
- singleline ends at the first newline, which is not returned; stop_sequence ends at any of its strings,
  which is returned unless trim_stop is true (KoboldAI's documented behaviour);
- use_default_badwordsids (or ban_eos_token) bans <|endoftext|>; bypass_eos generates past it;
- grammar: a GBNF grammar the text must match; logit_bias: token id -> bias, clamped to [-100, 100];
- an empty prompt (and no memory) starts from <|endoftext|>, GPT-2's start of text.
Fields read but not acted on are listed in kobold_schemas.IGNORED; unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import __version__
from ..engine import OPENAI_FINISH_REASONS, Event
from ..engine.events import failure
from .bodies import parse, read_json
from .common import APIError, ClientGone, EventStream, Generation, ServerState, unless_disconnected
from .kobold_schemas import (KoboldGenerateRequest, KoboldGenkeyRequest, KoboldTokenCountRequest, Plan,
                             default_max_length, plan)
from .openapi import describe

router = APIRouter()
API_VERSION = "1.2.5"  # KoboldAI United's API version that koboldcpp reports too (stop_sequence needs 1.2.2)
KOBOLDCPP_VERSION = "1.49"  # see the module docstring
KEEP_FINISHED = 64  # finished generations kept for /api/extra/generate/check
PREFIXES = ("/api/v1", "/api/latest")  # KoboldAI serves its API under both
GET_PATHS = ("/model", "/info/version", "/config/max_context_length", "/config/max_length")
PATHS: tuple[str, ...] = (
    *(p + s for p in PREFIXES for s in (*GET_PATHS, "/generate")), "/api/extra/version",
    "/api/extra/true_max_context_length", "/api/extra/generate/stream", "/api/extra/abort",
    "/api/extra/generate/check", "/api/extra/tokencount")
POST_ERRORS = (400, 401, 413, 422, 503)
BODY_ERRORS = (400, 401, 413, 422)  # POSTs that never wait for the model thread


def _state(request: Request) -> ServerState:
    return request.app.state.neoj


# ---- running generations, by genkey ----

@dataclass
class Job:
    """One Kobold generation: its engine request, the text so far per sequence, and who may abort it."""

    gen: Generation
    plan: Plan
    genkey: str | None
    caller: str
    texts: list[str]
    reasons: list[str | None]
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)  # (row, text, finish reason); None: the end
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    error: str | None = None
    finished: bool = False
    pump: asyncio.Task | None = None

    async def run(self) -> None:
        """Reads the engine's events into the texts and the updates queue until every sequence ends."""
        try:
            async for ev in self.gen.events():
                self._see(ev)
        finally:
            self.end()

    def _see(self, ev: Event) -> None:
        if failure(ev) is not None:
            self.error = failure(ev)
        self.texts[ev.row] += ev.text
        self.reasons[ev.row] = ev.finish_reason or self.reasons[ev.row]
        self.updates.put_nowait((ev.row, ev.text, ev.finish_reason))

    def end(self) -> None:
        """Marks the job finished (once): waiters wake, the stream ends."""
        if not self.finished:
            self.finished = True
            self.updates.put_nowait(None)
            if not self.done.done():
                self.done.set_result(None)

    def abort(self) -> None:
        """Stops the generation now: the engine frees its rows at the next step; the text so far stays."""
        if self.pump is not None:
            self.pump.cancel()
        self.gen.close()
        self.end()

    def text(self, row: int) -> str:
        """Returns a sequence's text, with the stop string that ended it unless trim_stop (KoboldAI's rule)."""
        text = self.texts[row]
        if self.reasons[row] != "stop" or self.plan.trim_stop or not self.plan.user_stops:
            return text
        seq = self.gen.seqs[row]
        rest = self.gen.state.lm.tokenizer.decode(seq.token_ids, skip_special_tokens=True)[len(seq.text):]
        hit = [s for s in self.plan.user_stops if rest.startswith(s)]
        return text + (min(hit, key=len) if hit else "")


class Jobs:
    """The server's Kobold generations: running ones, and the last finished ones for generate/check."""

    def __init__(self):
        self.items: list[Job] = []

    def add(self, job: Job) -> None:
        """Registers a job, forgetting the oldest finished ones beyond KEEP_FINISHED."""
        self.items.append(job)
        finished = [j for j in self.items if j.finished]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self.items.remove(old)

    def find(self, genkey: str | None, caller: str) -> list[Job]:
        """Returns the jobs of a genkey, or without one the caller's latest (a genkey is the client's secret:
        without it, one client never sees or stops another's generation)."""
        if genkey:
            return [j for j in self.items if j.genkey == genkey]
        own = [j for j in self.items if j.caller == caller]
        return own[-1:]


def _jobs(request: Request) -> Jobs:
    jobs = getattr(request.app.state, "kobold_jobs", None)
    if jobs is None:
        jobs = request.app.state.kobold_jobs = Jobs()
    return jobs


def _caller(request: Request) -> str:
    return request.client.host if request.client else ""


def _start(request: Request, body: KoboldGenerateRequest, stream: bool, route: str) -> Job:
    """Submits the request to the engine and registers it under its genkey."""
    st = _state(request)
    request_plan = plan(st, body, stream)
    gen = Generation(st, [request_plan.prompt], request_plan.params, route=route)
    n = request_plan.params.num_return_sequences
    job = Job(gen, request_plan, body.genkey or None, _caller(request), [""] * n, [None] * n)
    job.pump = asyncio.ensure_future(job.run())
    _jobs(request).add(job)
    return job


def _finish_reason(reason: str | None) -> str:
    return OPENAI_FINISH_REASONS.get(reason, "stop") if reason else "stop"


# ---- routes ----

def _versioned_routes(prefix: str) -> None:
    """Registers the routes of /api/v1 under `prefix` (KoboldAI serves /api/latest as the same API)."""
    @router.get(prefix + "/model", **describe(prefix + "/model", summary="The served model: {\"result\": id}"))
    async def model(request: Request):
        """The served model id (KoboldAI answers the Hugging Face id it loaded)."""
        return {"result": _state(request).model_id}

    @router.get(prefix + "/info/version", **describe(prefix + "/info/version", summary="KoboldAI API version"))
    async def version():
        """The KoboldAI API version (clients send stop_sequence from 1.2.2, use_default_badwordsids from 1.2.4)."""
        return {"result": API_VERSION}

    @router.get(prefix + "/config/max_context_length", **describe(prefix + "/config/max_context_length"))
    async def max_context_length(request: Request):
        """The model's context length in tokens."""
        return {"value": _state(request).n_positions}

    @router.get(prefix + "/config/max_length", **describe(prefix + "/config/max_length"))
    async def max_length(request: Request):
        """The default number of new tokens (max_length when a request leaves it out)."""
        return {"value": default_max_length(_state(request))}

    @router.post(prefix + "/generate", **describe(prefix + "/generate", body=KoboldGenerateRequest,
                                               errors=POST_ERRORS))
    async def generate(request: Request):
        """{"prompt", ...KoboldAI's sampler fields} -> {"results": [{"text", "finish_reason"}]} (n results)."""
        return await _generate(request, route=prefix + "/generate")


for _prefix in PREFIXES:
    _versioned_routes(_prefix)


async def _generate(request: Request, route: str):
    """Runs a generate request to its end (or its abort); 499 when the client leaves first."""
    body = parse(KoboldGenerateRequest, await read_json(request))
    job = _start(request, body, stream=False, route=route)
    try:
        await unless_disconnected(request, asyncio.shield(job.done))
    except ClientGone:
        job.abort()
        return Response(status_code=499)
    if job.error is not None:
        raise APIError(500, job.error, kind="generation")
    return {"results": [{"text": job.text(i), "finish_reason": _finish_reason(job.reasons[i])}
                        for i in range(len(job.texts))]}


def _event(data: dict) -> str:
    """Returns one koboldcpp stream event: "event: message" and its JSON data line."""
    return f"event: message\ndata: {json.dumps(data)}\n\n"


@router.post("/api/extra/generate/stream", response_class=EventStream, status_code=200,
             **describe("/api/extra/generate/stream", body=KoboldGenerateRequest, errors=POST_ERRORS))
async def generate_stream(request: Request):
    """koboldcpp's stream: one `event: message` / `data: {"token", "finish_reason": null}` per text piece, then
    one with the finish reason ("stop" or "length"); the tokens joined are /api/v1/generate's text."""
    body = parse(KoboldGenerateRequest, await read_json(request))
    job = _start(request, body, stream=True, route="/api/extra/generate/stream")

    async def events():
        try:
            while (item := await job.updates.get()) is not None:
                _, piece, reason = item
                if reason is None:
                    if piece:
                        yield _event({"token": piece, "finish_reason": None})
                    continue
                extra = job.text(0)[len(job.texts[0]):]  # the stop string, unless trimmed
                if job.error is not None:
                    yield _event({"token": piece, "finish_reason": "error",
                                  "detail": {"msg": job.error, "type": "generation"}})
                else:
                    yield _event({"token": piece + extra, "finish_reason": _finish_reason(reason)})
                return
            yield _event({"token": "", "finish_reason": "stop"})  # aborted
        finally:
            job.abort()

    return EventStream(events(), job.gen)


async def _genkey_body(request: Request) -> KoboldGenkeyRequest:
    """Returns the body's genkey; no body (SillyTavern's abort, a GET) means none."""
    if request.method == "GET" or not (await request.body()).strip():
        return KoboldGenkeyRequest()
    return parse(KoboldGenkeyRequest, await read_json(request))


@router.post("/api/extra/abort", **describe("/api/extra/abort", body=KoboldGenkeyRequest, errors=BODY_ERRORS))
async def abort(request: Request):
    """Stops the running generations of {"genkey"}, or without one the caller's latest; what they generated so far
    is their answer. {"success": "true"} when one was stopped (koboldcpp's strings)."""
    body = await _genkey_body(request)
    running = [j for j in _jobs(request).find(body.genkey, _caller(request)) if not j.finished]
    for job in running:
        job.abort()
    flag = "true" if running else "false"
    return {"success": flag, "done": flag}


@router.post("/api/extra/generate/check", **describe("/api/extra/generate/check", body=KoboldGenkeyRequest,
                                                   errors=BODY_ERRORS))
async def generate_check(request: Request):
    """The text generated so far by {"genkey"}'s generation (the caller's latest without one): {"results": [{"text"}]};
    "" when there is none. Lite polls it while /api/v1/generate runs, and after a lost connection."""
    body = await _genkey_body(request)
    jobs = _jobs(request).find(body.genkey, _caller(request))
    text = (jobs[-1].text(0) if jobs[-1].finished else jobs[-1].texts[0]) if jobs else ""
    return {"results": [{"text": text}]}


@router.get("/api/extra/generate/check", **describe("/api/extra/generate/check"))
async def generate_check_get(request: Request):
    """GET /api/extra/generate/check: the caller's latest generation's text so far (koboldcpp serves GET too)."""
    return await generate_check(request)


@router.post("/api/extra/tokencount", **describe("/api/extra/tokencount", body=KoboldTokenCountRequest,
                                                errors=BODY_ERRORS))
async def tokencount(request: Request):
    """{"prompt"} -> {"value": token count, "ids": [...]} (GPT-2's tokenizer adds no special tokens)."""
    body = parse(KoboldTokenCountRequest, await read_json(request))
    ids = _state(request).lm.tokenizer.encode(body.prompt) if body.prompt else []
    return {"value": len(ids), "ids": ids}


@router.get("/api/extra/version", **describe("/api/extra/version", summary="The koboldcpp API level served"))
async def extra_version(request: Request):
    """{"result": "KoboldCpp", "version": "1.49", ...}: the koboldcpp features the clients may use (see the
    module docstring); "server" and "server_version" name neoj."""
    return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": _state(request).api_key is not None,
            "txt2img": False, "vision": False, "transcribe": False, "server": "neoj", "server_version": __version__}


@router.get("/api/extra/true_max_context_length", **describe("/api/extra/true_max_context_length"))
async def true_max_context_length(request: Request):
    """The model's context length in tokens (koboldcpp's context size)."""
    return {"value": _state(request).n_positions}
