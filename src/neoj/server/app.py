"""The FastAPI app: routes of every API family over one engine, an API-key and body-size gate, JSON errors."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..adapters import load_adapters
from ..api import LanguageModel
from ..engine import Engine
from .chat import ChatTemplate, get_template
from .common import APIError, ServerState, default_aliases
from .metrics import CONTENT_TYPE, Metrics
from .openapi import describe, install as install_openapi
from . import hf_api, kobold_api, openai_api, tasks, tokenize_api

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
OPEN_PATHS = ("/health",)  # reachable without the API key
ROUTE_LABELS = {"/", "/health", "/metrics", "/info", "/generate", "/generate_stream", "/embed", "/v1/models",
                "/v1/completions", "/v1/chat/completions", "/v1/embeddings", *tasks.PATHS, *kobold_api.PATHS,
                *tokenize_api.PATHS}


class MetricsResponse(Response):
    """The Prometheus text exposition format (its content type also documents GET /metrics)."""

    media_type = CONTENT_TYPE


def _route_label(path: str) -> str:
    if path in ROUTE_LABELS:
        return path
    if path.startswith("/models/"):
        return "/models/{model_id}/pipeline/feature-extraction" if path.endswith("/pipeline/feature-extraction") \
            else "/models/{model_id}"
    if path.startswith("/pipeline/feature-extraction/"):
        return "/pipeline/feature-extraction/{model_id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model_id}"
    return "other"


def error_body(path: str, err: APIError) -> dict:
    """Returns the error in the API family's shape: OpenAI's {"error": {...}} under /v1, KoboldAI's
    {"detail": {"msg", "type"}} under /api (types as KoboldAI and koboldcpp name them), else HF/TGI's."""
    if path == "/api" or path.startswith("/api/"):
        kind = {400: "bad_input", 413: "bad_input", 422: "bad_input", 401: "unauthorized",
                503: "service_unavailable"}.get(err.status, f"generic.error_{err.status}")
        return {"detail": {"msg": err.message, "type": kind}}
    if path.startswith("/v1"):
        code = {401: "invalid_api_key", 404: "model_not_found" if err.param == "model" else "not_found",
                503: "overloaded", 413: "request_too_large"}.get(err.status)
        return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": code}}
    kind = {400: "validation", 413: "validation", 422: "validation", 401: "authentication", 404: "not_found",
            405: "validation", 503: "overloaded"}.get(err.status, "generation")
    return {"error": err.message, "error_type": kind}


def _error_response(path: str, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


class Gate:
    """ASGI middleware in front of every route: the API key, the body-size limit, and request metrics."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.key = state.api_key.encode("utf-8") if state.api_key else None

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"basic":  # browsers (the playground): any user name, the key as password
            try:
                value = base64.b64decode(value, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value, self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = dict(scope["headers"])
        try:
            if self.key is not None and path not in OPEN_PATHS and not self._authorized(headers.get(b"authorization")):
                challenge = 'Basic realm="neoj", charset="UTF-8"' if path == "/" and scope["method"] == "GET" \
                    else 'Bearer realm="neoj"'
                why = "missing" if b"authorization" not in headers else "invalid"
                err = APIError(401, f"{why} API key: send the header 'Authorization: Bearer KEY'",
                               headers={"WWW-Authenticate": challenge})
                return await _error_response(path, err)(scope, receive, send_status)
            limit = self.state.max_body_bytes
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > limit
                except ValueError:
                    return await _error_response(path, APIError(400, "invalid Content-Length header"))(
                        scope, receive, send_status)
                if too_big:
                    err = APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}")
                    return await _error_response(path, err)(scope, receive, send_status)
            received = 0

            async def counted_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise APIError(413, f"the request body is over the limit of {limit} bytes")
                return message

            await self.app(scope, counted_receive, send_status)
        finally:
            self.state.metrics.requests.inc(_route_label(path), str(status[0]))


def create_app(lm: LanguageModel, *, model_id: str | None = None, aliases: list[str] | tuple[str, ...] | None = None,
               api_key: str | None = None, max_batch: int = 32, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template: str | ChatTemplate = "plain",
               prefill_tokens: int = 2048, adapters: dict[str, str] | None = None,
               allow_origins: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """Returns the FastAPI app serving `lm` (its engine thread starts with the app and stops with it).

    model_id: the id clients name (default: the model's load name); aliases: other accepted names
    (default: the id's last component and the Hub id in config.json). api_key: when set, every route but
    /health needs "Authorization: Bearer KEY". max_batch: sequences decoded together; max_queue: requests
    that may wait before new ones get 503. chat_template: "plain" or "dolly" (see neoj.server.chat).
    adapters: {name: PEFT LoRA directory} loaded onto lm (lm.load_adapter) before serving; each name is a
    model id of its own (lm.adapter_names), and its rows share every batch with the base model's.
    allow_origins: web origins (or "*") whose pages may call the server from a browser (CORS), as KoboldAI
    Lite's page does; none by default, so no other site's page can read what the server answers.
    The engine reuses prompt prefixes through lm.prefix_cache and speculates as lm.speculative says (set them
    before creating the app; a request opts out of speculation with "speculative": false).
    """
    model_id = model_id or lm.name or lm.config.model_type
    aliases = tuple(aliases) if aliases is not None else default_aliases(lm, model_id)
    if adapters:
        load_adapters(lm.model, adapters, base=model_id, reserved=(model_id, *aliases))
    engine = server_engine(lm, max_batch, max_queue, prefill_tokens)
    state = ServerState(lm=lm, engine=engine, model_id=model_id, aliases=aliases,
                        api_key=api_key or None, max_body_bytes=max_body_bytes,
                        chat_template=get_template(chat_template), metrics=Metrics(model_name=model_id))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="neoj", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.neoj = state
    app.include_router(openai_api.router)
    app.include_router(hf_api.router)
    app.include_router(tasks.router)
    app.include_router(kobold_api.router)
    app.include_router(tokenize_api.router)
    _add_pages(app, state)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    install_openapi(app)
    app.add_middleware(Gate, state=state)
    if allow_origins:  # added last, so outermost: a browser's preflight (OPTIONS) never meets the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def server_engine(lm: LanguageModel, max_batch: int = 32, max_queue: int = 64, prefill_tokens: int = 2048) -> Engine:
    """Returns the engine a server runs `lm` on (with its prefix cache and speculation). Every rank of a model split
    over processes (--tp) makes it with the same arguments: rank 0's leads, the others follow (follow_engine)."""
    return Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue, prefill_tokens=prefill_tokens,
                  prefix_cache=lm.prefix_cache, speculative=lm.speculative)


def follow_engine(lm: LanguageModel, max_batch: int = 32, max_queue: int = 64, prefill_tokens: int = 2048) -> None:
    """Runs, on a rank other than 0 of a model split over processes, the rounds of the engine rank 0 serves from;
    returns when rank 0 stops, raises ProcessesError when it is lost."""
    server_engine(lm, max_batch, max_queue, prefill_tokens).follow()


def _add_pages(app: FastAPI, state: ServerState) -> None:
    """Adds the routes of no API family: the playground page, /health and /metrics."""
    model_id, engine = state.model_id, state.engine
    playground = resources.files("neoj.server").joinpath("playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, **describe("/", summary="The playground page"))
    async def index():
        """The playground: a page to type a prompt and watch it stream (Basic auth with the key as password)."""
        return HTMLResponse(playground.replace("{{MODEL_ID}}", json.dumps(model_id).replace("<", "\\u003c")))

    @app.get("/health", **describe("/health", errors=(503,)))
    async def health():
        """{"status": "ok"} while the model thread runs, else 503; never needs the API key."""
        if engine.alive is False:
            return JSONResponse({"status": "error", "error": "the model thread has stopped"}, status_code=503)
        return {"status": "ok", "model": model_id}

    @app.get("/metrics", response_class=MetricsResponse, **describe("/metrics"))
    async def metrics():
        """Prometheus metrics, in the text exposition format 0.0.4."""
        return MetricsResponse(state.metrics.render(engine))


async def _api_error(request: Request, exc: APIError):
    return _error_response(request.url.path, exc)


async def _validation_error(request: Request, exc: RequestValidationError):
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error_response(request.url.path, APIError(422, msg))


async def _http_error(request: Request, exc: StarletteHTTPException):
    msg = {404: f"no route {request.method} {request.url.path}; see /docs",
           405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return _error_response(request.url.path, APIError(exc.status_code, msg, headers=exc.headers))


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(request.url.path, APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
