"""Running the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C.

The first SIGTERM (or SIGINT) does not stop the server at once: new jobs are refused with 503 and /health/ready
turns 503, admitted jobs run on for up to ``grace`` seconds (then they are interrupted, their finished images
kept), waiting A1111 calls get their answers, and the process exits with status 0. A second signal hurries it.
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

from ..errors import EstableError
from .app import create_app
from .settings import ServerSettings

__all__ = ["run_server", "setup_logging"]

log = logging.getLogger("estable.server")
MAX_CONNECTIONS = 256  # open connections and tasks at once; more are answered 503 by uvicorn


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
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=int(settings.grace) + 10,
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5)
    server = DrainingServer(config, app, settings.grace)
    worker = app.state.estable.worker

    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"estable: serving on http://{_url_host(settings.host)}:{settings.port}/ (model {settings.model}, "
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
