"""`neoj serve`: an HTTP server speaking the OpenAI API, the HF Inference API and TGI, over continuous batching.

    serve(lm)                          # blocks; http://127.0.0.1:8000
    app = create_app(lm)               # the FastAPI app, for your own ASGI server or tests
    with run_in_thread(lm) as server:  # a real server on an ephemeral loopback port
        print(server.url)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

from ..api import LanguageModel
from ..errors import NeojError
from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .chat import TEMPLATES, ChatTemplate

log = logging.getLogger(__name__)

__all__ = ["serve", "create_app", "run_in_thread", "BackgroundServer", "ChatTemplate", "TEMPLATES"]


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
          log_level: str = "info") -> None:
    """Serves `model` over HTTP until interrupted (Ctrl+C); returns after a graceful shutdown.

    Binds 127.0.0.1 unless told otherwise; on any other address without an api_key, logs a warning.
    See create_app for the other arguments.
    """
    import uvicorn

    if not _is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                    "(pass api_key / --api-key or NEOJ_API_KEY)", host)
    app = create_app(model, model_id=model_id, aliases=aliases, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, max_body_bytes=max_body_bytes, chat_template=chat_template)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


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
