"""Two plain ASGI middlewares around the app.

:class:`Observe` (outermost): caps the request body (Content-Length over the cap, or a streamed body that grows
past it → 413), hashes the body as it streams in, and after the response writes one JSON log line (route
template, client, status, outcome, duration, the body's hash; never a header, so never a key) and the Prometheus
request metrics.

:class:`Auth`: every route except ``/health/*``, ``/`` and ``/web/*`` needs ``Authorization: Bearer KEY`` (or HTTP
basic auth when ``--api-auth`` is set), compared in constant time (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Match

from .settings import ServerSettings

__all__ = ["Auth", "Observe", "access_log"]

access_log = logging.getLogger("estable.server.access")

Scope = dict[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return {401: "unauthorized", 413: "too_large", 503: "unavailable"}.get(status,
                                                                            "rejected" if status < 500 else "error")


def _flat(routes: list[Any]) -> Any:
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


class Observe:
    def __init__(self, app: ASGI, *, max_body: int, routes: Callable[[], list[Any]], metrics: Any = None):
        self.app = app
        self.max_body = max_body
        self._routes = routes
        self.metrics = metrics

    def route_of(self, scope: Scope) -> str:
        """The route template ("/v1/jobs/{job_id}"), so that metrics do not grow a label per job."""
        routed = scope.get("route")  # set by the router when the request reached it
        if routed is not None and getattr(routed, "path", None):
            return routed.path
        for route in _flat(self._routes()):  # a request stopped before routing (401, 413)
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", None) or "other"
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        hasher = hashlib.sha256()
        received = 0
        too_large = False
        status = 500
        started = False

        async def watched_receive() -> dict:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > self.max_body:
                    too_large = True
                    return {"type": "http.disconnect"}
                hasher.update(body)
            return message

        async def watched_send(message: dict) -> None:
            nonlocal status, started
            if too_large:
                return  # the app's reaction to the cut body is replaced by a 413 below
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                too_large = True
            else:
                await self.app(scope, watched_receive, watched_send)
        except Exception:
            if not too_large:
                raise
        finally:
            if too_large and not started:
                status = 413
                await _send_json(send, 413, {"detail": f"the request body is larger than the server's limit of "
                                                       f"{self.max_body} bytes"})
            self._record(scope, status, time.perf_counter() - t0, hasher.hexdigest()[:16] if received else None)

    def _record(self, scope: Scope, status: int, seconds: float, body_hash: str | None) -> None:
        route = self.route_of(scope)
        client = scope.get("client")
        access_log.info(json.dumps({
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": scope.get("method"), "route": route, "client": client[0] if client else None,
            "status": status, "outcome": _outcome(status), "duration_ms": round(seconds * 1000, 2),
            "params_hash": body_hash,
        }))
        if self.metrics is not None:
            self.metrics.observe(route, scope.get("method", ""), status, seconds)


class Auth:
    PUBLIC_PREFIXES = ("/health/", "/web/")
    PUBLIC_PATHS = ("/", "/web", "/favicon.ico")

    def __init__(self, app: ASGI, settings: ServerSettings):
        self.app = app
        self.key = settings.api_key.encode() if settings.api_key else None
        self.basic = ((settings.api_auth[0].encode(), settings.api_auth[1].encode())
                      if settings.api_auth is not None else None)

    def _public(self, path: str) -> bool:
        return path in self.PUBLIC_PATHS or path.startswith(self.PUBLIC_PREFIXES)

    def allowed(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, value = header.partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"bearer" and self.key is not None:
            return hmac.compare_digest(value, self.key)
        if scheme == b"basic" and self.basic is not None:
            try:
                user, sep, password = base64.b64decode(value, validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            ok_user = hmac.compare_digest(user, self.basic[0])
            ok_pass = hmac.compare_digest(password, self.basic[1])
            return bool(sep) and ok_user and ok_pass
        return False

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or self._public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if self.allowed(dict(scope.get("headers") or []).get(b"authorization")):
            await self.app(scope, receive, send)
            return
        challenge = [b'Bearer realm="estable"']
        if self.basic is not None:
            challenge.append(b'Basic realm="estable"')
        await _send_json(send, 401, {"detail": "Not authenticated: send Authorization: Bearer <API key>"},
                         [(b"www-authenticate", c) for c in challenge])
