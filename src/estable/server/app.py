"""The FastAPI application: :func:`create_app` wires settings, model catalog, job store, worker and metrics, the two
APIs (:mod:`.a1111`, :mod:`.api`), health and metrics routes, offline docs and the web page's static files.

Middleware, outermost first: :class:`~.middleware.Observe` (body cap, log line, metrics),
:class:`~.middleware.Guard` (Host and Origin checks, security headers), CORS (only with ``--cors-origin``),
:class:`~.middleware.Auth` (only with an API key or ``--api-auth``), :class:`~.middleware.HeadAsGet` (HEAD as GET
without the body).
"""

from __future__ import annotations

import html
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..errors import EstableError
from . import a1111, api, extras
from .catalog import ModelCatalog, ModelNameError
from .metrics import Metrics
from .middleware import Auth, Guard, HeadAsGet, Observe
from .settings import ServerSettings
from .state import ServerState
from .store import JobStore
from .worker import Draining, Worker

__all__ = ["WEB_DIR", "create_app"]

WEB_DIR = Path(__file__).resolve().parent / "web"


def create_app(settings: ServerSettings, *, worker_class: type[Worker] = Worker, loader: Any = None) -> FastAPI:
    """The app for ``settings`` (checked here). The worker thread starts with the app (its lifespan) and loads the
    model there, so the server answers /health/live at once and /health/ready once the model is warm.
    ``worker_class`` and ``loader`` are seams for tests."""
    settings.check()
    catalog = ModelCatalog(settings.models_dir, settings.model)
    store = JobStore(settings.data_dir)
    holder: dict[str, Metrics] = {}
    worker = worker_class(settings, catalog, store, loader=loader,
                          on_images=lambda n: holder["m"].images.inc(n) if "m" in holder else None)
    metrics = Metrics(lambda: worker.queue_depth, store.count_by_state)
    holder["m"] = metrics
    worker.provenance = provenance_policy(settings)
    worker.networks = extras.Networks(settings)
    state = ServerState(settings, catalog, store, worker, metrics, provenance=worker.provenance,
                        networks=worker.networks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            store.close()

    app = FastAPI(title="Estable", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Stable Diffusion over HTTP: A1111's API under /sdapi/v1, Estable's jobs under /v1.")
    app.state.estable = state
    _handlers(app)
    _routes(app, state)
    app.include_router(extras.router)
    app.include_router(a1111.router)
    app.include_router(api.router)
    app.add_middleware(HeadAsGet)  # each add_middleware wraps the ones before: the first added is the innermost
    if settings.auth_required:
        app.add_middleware(Auth, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(Observe, max_body=settings.limits.max_body_bytes, routes=lambda: app.router.routes,
                       metrics=metrics)
    return app


def provenance_policy(settings: ServerSettings) -> Any:
    """The generation policy of ``estable generate``'s provenance flags, from the server's settings."""
    from ..provenance.policy import ProvenancePolicy

    return ProvenancePolicy.configure(
        watermark=settings.watermark, watermark_key=settings.watermark_key, tree_ring=settings.tree_ring,
        sign_key=settings.sign_key, blocklists=settings.blocklists, output_check=settings.output_check,
        output_clip=settings.output_clip, output_threshold=settings.output_threshold)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        if err.get("type") == "json_invalid":  # loc ("body", offset) would read as a field: "15: JSON decode error"
            at = err.get("loc", ())[-1]
            return JSONResponse({"detail": f"body: not valid JSON: {err.get('ctx', {}).get('error', 'invalid')} "
                                           f"(at character {at + 1 if isinstance(at, int) else at})"}, status_code=422)
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        return JSONResponse({"detail": f"{field}: {err.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(EstableError)
    async def estable_error(request: Request, exc: EstableError) -> JSONResponse:
        status = getattr(exc, "status", 400)
        if isinstance(exc, ModelNameError):
            status = 400
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(Draining)
    async def draining(request: Request, exc: Draining) -> JSONResponse:
        return JSONResponse({"detail": "the server is shutting down"}, status_code=503, headers={"Retry-After": "30"})


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health/live", tags=["Operations"], summary="The process answers")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", tags=["Operations"], summary="200 once the model is loaded and warmed up")
    async def ready() -> JSONResponse:
        w = state.worker
        if w.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if w.load_error:
            return JSONResponse({"status": "failed", "detail": w.load_error}, status_code=503)
        if not w.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "model": w.entry.name if w.entry else None})

    @app.get("/metrics", tags=["Operations"], summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(render_docs(app.openapi()))

    web = WEB_DIR
    if not web.is_dir():
        return

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        page = web / "index.html"
        if not page.is_file():
            raise HTTPException(404, "no web page installed")
        return FileResponse(page, media_type="text/html")

    app.mount("/web", StaticFiles(directory=web, html=True), name="web")


def render_docs(schema: dict[str, Any]) -> str:
    """A self-contained HTML page listing every route of the OpenAPI schema (no script, no CDN: works offline)."""
    esc = html.escape
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(esc(p["name"]) for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            ref = body.get("$ref", "").rsplit("/", 1)[-1]
            fields = ""
            if ref:
                props = schema.get("components", {}).get("schemas", {}).get(ref, {}).get("properties", {})
                fields = ", ".join(esc(k) for k in props)
            rows.append(f"<tr><td><code>{esc(method.upper())}</code></td><td><code>{esc(path)}</code></td>"
                        f"<td>{esc(op.get('summary', ''))}</td><td>{params}</td><td>{fields}</td></tr>")
    info = schema.get("info", {})
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Estable API</title><style>"
        "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}</style></head><body>"
        f"<h1>{esc(info.get('title', 'API'))} {esc(info.get('version', ''))}</h1>"
        f"<p>{esc(info.get('description', ''))}</p><p>The machine-readable schema: "
        "<a href=/openapi.json>/openapi.json</a>. Send <code>Authorization: Bearer KEY</code> when the server has "
        "an API key.</p><table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th><th>body fields</th>"
        f"</tr>{''.join(rows)}</table></body></html>")
