"""`neoj serve`: an HTTP server speaking the OpenAI API, the HF Inference API and TGI, over continuous batching.

    serve(lm)                          # blocks; http://127.0.0.1:8000
    app = create_app(lm)               # the FastAPI app, for your own ASGI server or tests
    with run_in_thread(lm) as server:  # a real server on an ephemeral loopback port
        print(server.url)

Routes (one engine behind all of them; every request keeps its own sampling parameters, seed, stop strings):

    OpenAI         POST /v1/completions        prompt: str | [str] | [token ids] | [[token ids]]; max_tokens (16),
                                               temperature (1), top_p, n, stop, stream (SSE, ends "data: [DONE]"),
                                               stream_options.include_usage, logprobs (0-20), echo (max_tokens 0
                                               scores the prompt, as lm-eval's local-completions does), seed,
                                               presence/frequency_penalty; neoj extras: top_k, repetition_penalty,
                                               ignore_eos, truncate (keep the prompt's last tokens), max_time (s)
                   POST /v1/chat/completions   messages -> prompt by the chat template (see neoj.server.chat:
                                               "plain" transcript by default, "dolly"; per request: chat_template);
                                               max_tokens defaults to 512, shrunk to what the context leaves
                   GET  /v1/models, /v1/models/{id}
                   POST /v1/embeddings         mean-pooled final hidden states; encoding_format float | base64;
                                               at most 64 inputs, each within the context, embedded in pieces
                                               between decode steps (running streams keep flowing)
    HF Inference   POST /models/{id}           {"inputs": str | [str], "parameters": {...}, "options": {...}} ->
                                               [{"generated_text"}] (a list per input for a list); defaults:
                                               do_sample true, temperature 1, 50 new tokens, return_full_text true.
                                               Also max_length, remove_input, penalty (the Neuro API's names).
    TGI            POST /generate, /generate_stream (SSE), GET /info: TGI's shapes and defaults (greedy unless
                                               a sampling parameter is given, 100 new tokens, details, top_n_tokens,
                                               decoder_input_details, truncate N)
                   POST /                      TGI's compat_generate: /generate's answer in a list, or
                                               /generate_stream's events with "stream": true (what
                                               InferenceClient(base_url).text_generation posts); a body without
                                               "parameters" and "stream" is feature extraction (what
                                               InferenceClient(base_url).feature_extraction posts, as TEI's /)
    Features       POST /models/{id}/pipeline/feature-extraction, /pipeline/feature-extraction/{id}, /embed (TEI):
                                               {"inputs": str | [str], "normalize", "truncate",
                                               "truncation_direction"} -> [[float, ...]] per input, equal to
                                               LanguageModel.embed (mean-pooled; normalized only if asked)
    Other          GET /health (never needs the key), GET /metrics (Prometheus text), GET / (playground page)

Prefix caching and speculative decoding: the engine reuses prompt prefixes through lm.prefix_cache and
speculates as lm.speculative says (`neoj serve --prefix-cache-mb, --prompt-lookup, --draft-model`); a request
opts out of speculation with "speculative": false (completions, chat, TGI parameters; a neoj extension).
OpenAI usage carries prompt_tokens_details.cached_tokens and, when guesses were verified, "speculative":
{drafted_tokens, accepted_tokens, acceptance_rate}; TGI details carry cached_tokens and those three; /metrics
counts them under vLLM's names (vllm:prefix_cache_queries_total, vllm:spec_decode_num_accepted_tokens_total, ...).

Sampling parameters: every value a route accepts generates. Temperatures below 1e-5 are greedy (as vLLM's),
the samplers keep huge temperatures and extreme repetition penalties finite; NaN and infinity are 422s.
/openapi.json documents each route's request model, error responses and content types.

Model ids: the served id (model_id), its last path component, and the Hub id in config.json, compared
case-insensitively; anything else is 404. Nothing a request names is ever loaded or opened.
LoRA adapters (serve(..., adapters={name: dir}), `neoj serve --adapter NAME=DIR`) are loaded at start and
named like models: rows of every adapter and of the base decode in one batch (see neoj.adapters).

Errors are JSON in the family's shape ({"error": {"message", "type", "param", "code"}} under /v1, else
{"error": message, "error_type": kind}): 400 malformed JSON or a prompt too long for the context (naming
its token count and the limit), 401 missing or wrong API key (compared with hmac.compare_digest; Bearer,
or Basic with the key as password for browsers), 404 unknown model or route, 413 body over max_body_bytes,
422 wrong types, out-of-range or unsupported parameters, empty prompts and more than 64 inputs to embed,
503 with Retry-After when max_queue requests already wait beyond the batch. A client that disconnects frees
its slot at the next step.

Over tensor parallelism (`torchrun --nproc-per-node N -m neoj serve --tp N`): rank 0 serves HTTP and schedules,
every rank runs the same rounds (neoj.engine.lockstep; the others call follow_engine). The generation routes
work as on one process; embeddings and task routes that score or embed (classify), which run the model outside
those rounds, answer 501.
A rank that dies stops the server with an error (its collectives fail or time out) instead of hanging.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

from ..api import LanguageModel
from ..errors import NeojError
from .app import DEFAULT_MAX_BODY_BYTES, create_app, follow_engine
from .chat import TEMPLATES, ChatTemplate

log = logging.getLogger(__name__)

__all__ = ["serve", "create_app", "follow_engine", "run_in_thread", "BackgroundServer", "ChatTemplate", "TEMPLATES"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: LanguageModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_id: str | None = None, aliases: list[str] | None = None, max_batch: int = 32, max_queue: int = 64,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template: str | ChatTemplate = "plain",
          log_level: str = "info", sock: socket.socket | None = None, adapters: dict[str, str] | None = None,
          allow_origins: list[str] | tuple[str, ...] = ()) -> None:
    """Serves `model` over HTTP until interrupted (Ctrl+C); returns after a graceful shutdown.

    Binds 127.0.0.1 unless told otherwise; on any other address without an api_key, logs a warning. `sock`, a
    socket already listening (listen.bind_listening_socket: `neoj serve` binds before loading the model), is
    served instead of binding host:port. See create_app for the other arguments.
    """
    import uvicorn

    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(pass api_key / --api-key or NEOJ_API_KEY)", host)
    app = create_app(model, model_id=model_id, aliases=aliases, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, max_body_bytes=max_body_bytes, chat_template=chat_template,
                     adapters=adapters, allow_origins=allow_origins)
    engine = app.state.neoj.engine
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # A model thread that stops for good (a tensor-parallel rank lost) shuts the server down, as Ctrl+C would.
    engine.on_fatal = lambda exc: setattr(server, "should_exit", True)
    server.run(sockets=[sock] if sock is not None else None)
    if engine.fatal is not None:
        raise NeojError(f"the server stopped: {engine.fatal}")


class BackgroundServer:
    """A real uvicorn server running in a daemon thread, for notebooks, scripts and tests."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=2)
        self.app, self.host = app, host
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="neoj-server", daemon=True)
        self.port: int | None = None

    @property
    def url(self) -> str:
        """Returns the base URL, e.g. http://127.0.0.1:41234."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Starts serving and waits until the socket accepts connections; returns self."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise NeojError(f"the server did not start on {self.host}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shuts the server down (open streams are cut after a short grace period)."""
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start() if self.port is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_in_thread(model: LanguageModel, host: str = "127.0.0.1", port: int = 0, **options) -> BackgroundServer:
    """Returns a started BackgroundServer for `model` (port 0 picks a free port); options go to create_app."""
    return BackgroundServer(create_app(model, **options), host=host, port=port).start()
