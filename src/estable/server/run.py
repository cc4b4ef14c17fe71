"""Running the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C, and guarded connections.

The first SIGTERM (or SIGINT) does not stop the server at once: new jobs are refused with 503 and /health/ready
turns 503, admitted jobs run on for up to ``grace`` seconds (then they are interrupted, their finished images
kept), waiting A1111 calls get their answers, and the process exits with status 0. A second signal hurries it.

uvicorn counts every open connection against its cap (``limit_concurrency``, over → 503 for everyone), including
connections that never send a request, so a client holding a few hundred idle sockets would lock every other
client out. :class:`GuardedProtocol` closes a connection that has not sent a whole request head within
``HEAD_TIMEOUT`` seconds of opening (or of its previous response), and refuses a client's connections past
``settings.max_client_connections`` at once.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import EstableError
from .app import create_app
from .settings import ServerSettings

__all__ = ["GuardedProtocol", "run_server", "setup_logging", "uvicorn_config"]

log = logging.getLogger("estable.server")
MAX_CONNECTIONS = 256  # open connections and tasks at once; more are answered 503 by uvicorn
HEAD_TIMEOUT = 10.0  # seconds a connection may stay open without a whole request head (nor a request running)


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two guards against clients that hold connections without using them: a
    deadline for each request head, and a cap on one client address's open connections (0: no cap; a reverse
    proxy in front makes every connection come from one address)."""

    head_timeout = HEAD_TIMEOUT
    per_client = 32

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: Any = None
        address = self.client[0] if self.client else None
        if self.per_client and address is not None:
            same = sum(1 for c in self.connections if getattr(c, "client", None) and c.client[0] == address)
            if same > self.per_client:
                transport.close()
                return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        waiting_after = self.cycle  # the request that was last answered (None: none yet)
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired, waiting_after)

    def _head_expired(self, waiting_after: Any) -> None:
        idle = self.cycle is waiting_after and (self.cycle is None or self.cycle.response_complete)
        if idle and not self.transport.is_closing():  # no new request began: drop the connection
            self.transport.close()

    def on_response_complete(self) -> None:
        self._arm_head_timer()  # before the base class starts a pipelined request, which then counts as begun
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def uvicorn_config(app: Any, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration ``estable serve`` runs ``app`` with (``overrides``: uvicorn.Config's arguments)."""
    protocol = type("GuardedProtocol", (GuardedProtocol,), {"per_client": settings.max_client_connections})
    options: dict[str, Any] = dict(host=settings.host, port=settings.port, log_level="warning", access_log=False,
                                   lifespan="on", timeout_graceful_shutdown=int(settings.grace) + 10,
                                   limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, http=protocol,
                                   # uvicorn's own default trusts X-Forwarded-For from 127.0.0.1: off unless named
                                   proxy_headers=settings.forwarded_allow_ips is not None,
                                   forwarded_allow_ips=settings.forwarded_allow_ips)
    options.update(overrides)
    return uvicorn.Config(app, **options)


class _JSONLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{") and not record.exc_info:
            return msg
        try:
            body = json.loads(msg)
        except ValueError:
            body = {"message": msg}
        if not isinstance(body, dict):
            body = {"message": msg}
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
               "level": record.levelname.lower(), **body}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging() -> None:
    """One JSON object per line on stderr for the server's loggers (access lines and events)."""
    logger = logging.getLogger("estable.server")
    if not any(getattr(h, "_estable", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JSONLines())
        handler._estable = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any, grace: float):
        super().__init__(config)
        self.estable = app.state.estable
        self.grace = grace
        self._drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_thread is None:
            log.info(json.dumps({"event": "draining", "signal": signal.Signals(sig).name, "grace_s": self.grace}))
            self._drain_thread = threading.Thread(target=self._drain, name="estable-drain", daemon=True)
            self._drain_thread.start()
        else:  # a second signal: interrupt what runs now and leave
            self.estable.worker.interrupt()
            self.should_exit = True

    def _drain(self) -> None:
        self.estable.worker.drain(self.grace)
        time.sleep(0.2)  # let waiting A1111 calls send their answers
        self.should_exit = True


def run_server(settings: ServerSettings) -> int:
    """Serve until SIGTERM / Ctrl-C (status 0), or fail on a model that cannot be loaded (EstableError)."""
    setup_logging()
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.grace)
    worker = app.state.estable.worker

    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else settings.port  # --port 0
            print(f"estable: serving on http://{_url_host(settings.host)}:{port}/ (model {settings.model} loading, "
                  f"jobs in {settings.data_dir}){'' if settings.auth_required else '; no API key'}",
                  file=sys.stderr, flush=True)
        while not worker.ready.is_set() and worker.load_error is None and not server.should_exit:
            time.sleep(0.1)
        if worker.load_error is not None:
            server.should_exit = True

    threading.Thread(target=watch, name="estable-watch", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise EstableError(f"could not listen on {settings.host}:{settings.port} (in use, or not an address of "
                           "this machine?)") from None
    if worker.load_error is not None:
        raise EstableError(worker.load_error)
    if not server.started:
        raise EstableError(f"could not listen on {settings.host}:{settings.port} (in use, or not an address here?)")
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
