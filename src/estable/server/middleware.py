"""Four plain ASGI middlewares around the app, outermost first.

:class:`Observe`: caps the request body (Content-Length over the cap, or a streamed body that grows past it → 413;
a body still arriving ``BODY_TIMEOUT`` seconds after the request began → 408), hashes the body as it streams in,
and after the response writes one JSON log line (route template, client, status, outcome, duration, the body's
hash; never a header, so never a key) and the Prometheus request metrics.

:class:`Guard`: refuses a request that changes something (POST, PUT, PATCH, DELETE) from a web page of another
origin (its ``Origin`` header neither the server's own nor a ``--cors-origin``: 403), and on a server without a
key a ``Host`` header that names no loopback address (403: a page of another site whose name was re-pointed at
127.0.0.1, "DNS rebinding", would otherwise reach the server as its own origin). Adds the security headers to every
response (nosniff, no framing, no referrer; a Content-Security-Policy on HTML pages).

:class:`Auth`: every route except ``/health/*``, ``/`` and ``/web/*`` needs ``Authorization: Bearer KEY`` (or HTTP
basic auth when ``--api-auth`` is set), compared in constant time (:func:`hmac.compare_digest`). A client address
with ``settings.auth_failure_limit`` refused attempts in ``FAILURE_WINDOW`` seconds gets 429 until the window
passes.

:class:`HeadAsGet`: HEAD answered as the GET of the same path without its body (a general-purpose HTTP server supports
HEAD wherever it supports GET, RFC 9110; the API's routes are declared for GET only, so HEAD got 405).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Match

from .settings import ServerSettings

__all__ = ["Auth", "Guard", "HeadAsGet", "Observe", "access_log"]

access_log = logging.getLogger("estable.server.access")
BODY_TIMEOUT = 60.0  # seconds from a request's start for its whole body to arrive (slower → 408)
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}  # any other is "other" in the metrics
FAILURE_WINDOW = 60.0  # seconds over which a client address's refused authentications are counted

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
    return {401: "unauthorized", 408: "too_slow", 413: "too_large", 503: "unavailable"}.get(status,
                                                                            "rejected" if status < 500 else "error")


def _flat(routes: list[Any]) -> Any:
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


class Observe:
    def __init__(self, app: ASGI, *, max_body: int, routes: Callable[[], list[Any]], metrics: Any = None,
                 body_timeout: float | None = None):
        self.app = app
        self.max_body = max_body
        self.body_timeout = BODY_TIMEOUT if body_timeout is None else body_timeout
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
        deadline = time.monotonic() + self.body_timeout
        hasher = hashlib.sha256()
        received = 0
        cut: int | None = None  # 413: the body grew past the cap; 408: it did not arrive in time
        body_done = False
        status = 500
        started = False

        async def watched_receive() -> dict:
            nonlocal received, cut, body_done
            if body_done:  # later calls only listen for a disconnect (a long job, a stream): no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                cut = 408
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > self.max_body:
                    cut = 413
                    return {"type": "http.disconnect"}
                hasher.update(body)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def watched_send(message: dict) -> None:
            nonlocal status, started
            if cut is not None:
                return  # the app's reaction to the cut body is replaced by a 413 / 408 below
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                cut = 413
            else:
                await self.app(scope, watched_receive, watched_send)
        except Exception:
            if cut is None:
                raise
        finally:
            if cut is not None and not started:
                status = cut
                detail = (f"the request body is larger than the server's limit of {self.max_body} bytes"
                          if cut == 413 else
                          f"the request body did not arrive within {self.body_timeout:g} seconds")
                await _send_json(send, cut, {"detail": detail})
            self._record(scope, status, time.perf_counter() - t0, hasher.hexdigest()[:16] if received else None)

    def _record(self, scope: Scope, status: int, seconds: float, body_hash: str | None) -> None:
        route = self.route_of(scope)
        client = scope.get("client")
        method = scope.get("method", "")
        method = method if method in METHODS else "other"  # a client may send any token as its method
        access_log.info(json.dumps({
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": method, "route": route, "client": client[0] if client else None,
            "status": status, "outcome": _outcome(status), "duration_ms": round(seconds * 1000, 2),
            "params_hash": body_hash,
        }))
        if self.metrics is not None:
            self.metrics.observe(route, method, status, seconds)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host: str) -> str:
    """The name in a Host header value: ``[::1]:7860`` → ``::1``, ``localhost:7860`` → ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
DOCS_POLICY = PAGE_POLICY + "; style-src 'unsafe-inline'"  # /docs is one self-contained page with a <style>


class Guard:
    WRITES = {"POST", "PUT", "PATCH", "DELETE"}

    def __init__(self, app: ASGI, settings: ServerSettings):
        from .settings import is_loopback

        self.app = app
        self.origins = {o.rstrip("/").lower() for o in settings.cors_origins}
        self.any_origin = "*" in self.origins
        self.check_host = not settings.auth_required  # then the server listens on loopback only (settings.check)
        self._is_loopback = is_loopback
        self.bind_host = settings.host.lower()

    def refusal(self, scope: Scope) -> str | None:
        host = _header(scope, b"host") or ""
        if self.check_host and host:  # no Host at all (HTTP/1.0 tools) is not a browser, which always sends one
            name = host_name(host)
            if not (self._is_loopback(name) or name == self.bind_host):
                return (f"this server has no API key and answers only to loopback names (127.0.0.1, localhost), "
                        f"not Host {name[:100]!r}")
        origin = _header(scope, b"origin")
        if scope.get("method") in self.WRITES and origin is not None and not self.any_origin:
            origin = origin.rstrip("/").lower()
            own = {f"http://{host.lower()}", f"https://{host.lower()}"}
            if origin not in own and origin not in self.origins:
                return (f"a request from the web page of another origin ({origin[:100]}) may not change anything "
                        "here; serve that page from this server or list its origin with --cors-origin")
        return None

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def secured_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                content_type = dict(headers).get(b"content-type", b"")
                if content_type.startswith(b"text/html") and b"content-security-policy" not in names:
                    policy = DOCS_POLICY if path == "/docs" else PAGE_POLICY
                    headers.append((b"content-security-policy", policy.encode()))
                message = {**message, "headers": headers}
            await send(message)

        reason = self.refusal(scope)
        if reason is not None:
            await _send_json(secured_send, 403, {"detail": reason})
            return
        await self.app(scope, receive, secured_send)


class Auth:
    PUBLIC_PREFIXES = ("/health/", "/web/")
    PUBLIC_PATHS = ("/", "/web", "/favicon.ico")

    def __init__(self, app: ASGI, settings: ServerSettings):
        self.app = app
        self.key = settings.api_key.encode() if settings.api_key else None
        self.basic = ((settings.api_auth[0].encode(), settings.api_auth[1].encode())
                      if settings.api_auth is not None else None)
        self.failure_limit = settings.auth_failure_limit
        self.failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _throttled(self, client: str | None, failed: bool) -> bool:
        """Whether ``client`` has used up its refused attempts (and count this one if it ``failed``)."""
        if client is None:
            return False
        now = time.monotonic()
        times = self.failures.get(client)
        if times is not None:
            while times and times[0] < now - FAILURE_WINDOW:
                times.popleft()
            if not times:
                del self.failures[client]
                times = None
        if times is not None and len(times) >= self.failure_limit:
            return True
        if failed:
            if times is None:
                times = self.failures[client] = collections.deque()
                while len(self.failures) > 10_000:  # forget the oldest addresses, never grow without bound
                    self.failures.popitem(last=False)
            times.append(now)
        return False

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
        client = scope.get("client")
        address = client[0] if client else None
        if self._throttled(address, failed=False):
            await _send_json(send, 429, {"detail": "too many refused attempts from this address; try again later"},
                             [(b"retry-after", str(int(FAILURE_WINDOW)).encode())])
            return
        if self.allowed(dict(scope.get("headers") or []).get(b"authorization")):
            await self.app(scope, receive, send)
            return
        self._throttled(address, failed=True)
        challenge = [b'Bearer realm="estable"']
        if self.basic is not None:
            challenge.append(b'Basic realm="estable"')
        await _send_json(send, 401, {"detail": "Not authenticated: send Authorization: Bearer <API key>"},
                         [(b"www-authenticate", c) for c in challenge])


class HeadAsGet:
    """Runs a HEAD request as GET and sends the response's start (status and headers, Content-Length included) with an
    empty body. Once that is sent the app hears that the client left, so a stream (a job's events) ends."""

    def __init__(self, app: ASGI):
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def head_send(message: dict) -> None:
            nonlocal done
            if done:
                return
            if message["type"] == "http.response.body":
                done = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        async def head_receive() -> dict:
            return {"type": "http.disconnect"} if done else await receive()

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, head_receive, head_send)
        finally:
            if "route" in inner:  # set by the router: the access log and the metrics name the route, not "unmatched"
                scope["route"] = inner["route"]
