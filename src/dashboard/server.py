"""The dashboard's web server: a read-only Starlette app over one runs root, served by uvicorn.

Endpoints (all ``GET``; every other method is answered 405):

=========================  ==========================================================================================
``/``                      the page (``static/index.html``; chart code vendored under ``static/vendor/``)
``/api/runs``              every run under the root with family, status, step, last loss (``runs_index.py``)
``/api/series``            ``run`` and selectors ``m`` (exact metric) / ``p`` (prefix), downsampled to ``max_points``
``/api/stream``            server-sent events: the selectors' events appended after ``offset`` (or ``Last-Event-ID``)
``/api/plasticity``        the Layer × Time heatmap and bucket bars of a run's plasticity tables
``/api/files``             the viewable files of a run (images, reports, config)
``/files/<path>``          one such file, below the root only (``paths.py``), by an extension allow-list
=========================  ==========================================================================================

Safety: the server binds 127.0.0.1 unless told otherwise, answers only Host headers naming the address it serves
(DNS rebinding), sends a Content-Security-Policy allowing only its own origin, never writes, and has no endpoint that
runs anything. Memory per client is bounded: a stream reads at most :data:`STREAM_READ_BYTES` per poll and waits for
the client to take each message before reading on (uvicorn's flow control); a response holds at most ``max_points``
points per series and :data:`~src.dashboard.series.MAX_SERIES` series per selector.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from src.dashboard.paths import Refused, safe_path
from src.dashboard.plasticity_view import METRICS as PLASTICITY_METRICS
from src.dashboard.plasticity_view import PlasticityView
from src.dashboard.runs_index import TELEMETRY, RunsIndex
from src.dashboard.series import MAX_SELECTORS, Selector, TelemetryStore, matching_events, read_appended, series_payload

STATIC = Path(__file__).with_name("static")
DEFAULT_POINTS, MAX_POINTS = 1000, 5000
POLL_SECONDS = 0.02  # how often a stream looks for appended lines: the floor of append-to-page latency
HEARTBEAT_SECONDS = 10.0
STREAM_READ_BYTES = 1 << 20
STREAM_BEHIND_BYTES = 16 << 20  # a client further behind than this reloads the series instead of streaming them
MAX_STREAMS = 32
FILE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".md": "text/markdown; charset=utf-8",
    ".json": "application/json",
    ".yaml": "text/plain; charset=utf-8",
    ".yml": "text/plain; charset=utf-8",
    ".csv": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
}
MAX_LISTED_FILES = 200
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; object-src 'none'; "
        b"base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _not_found() -> JSONResponse:
    # Refused and missing paths get the same answer: the reply says nothing about what exists outside the root.
    return JSONResponse({"error": "not found"}, status_code=404)


def _bad(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


class Dashboard:
    """The state behind the endpoints: one runs root, its run index and the caches."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.runs = RunsIndex(self.root)
        self.store = TelemetryStore()
        self.plasticity = PlasticityView()
        self.streams = 0

    def run_dir(self, request: Request) -> Path:
        run = request.query_params.get("run", "")
        return safe_path(self.root, run)

    @staticmethod
    def selectors(request: Request) -> list[Selector]:
        exact = [Selector(m) for m in request.query_params.getlist("m") if m]
        prefixes = [Selector(p, prefix=True) for p in request.query_params.getlist("p") if p]
        found = list(dict.fromkeys(exact + prefixes))
        if not found or len(found) > MAX_SELECTORS:
            raise ValueError(f"give 1 to {MAX_SELECTORS} selectors (m=metric, p=prefix)")
        return found

    # --- endpoints ------------------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    def list_runs(self, request: Request) -> Response:
        runs = [s.to_json() for s in self.runs.summaries()]
        return JSONResponse({"root": str(self.root), "now": time.time(), "runs": runs})

    def series(self, request: Request) -> Response:
        try:
            run_dir = self.run_dir(request)
            selectors = self.selectors(request)
            max_points = min(MAX_POINTS, max(3, int(request.query_params.get("max_points", DEFAULT_POINTS))))
        except Refused:
            return _not_found()
        except ValueError as err:
            return _bad(str(err))
        if not run_dir.is_dir():
            return _not_found()
        offset, sets = self.store.query(run_dir / TELEMETRY, selectors)
        return JSONResponse(
            {
                "offset": offset,
                "series": series_payload(sets, selectors, max_points),
                "truncated": any(s.truncated for s in sets),
            }
        )

    async def stream(self, request: Request) -> Response:
        try:
            run_dir = self.run_dir(request)
            selectors = self.selectors(request)
            offset = int(request.headers.get("last-event-id") or request.query_params.get("offset", "0"))
            if offset < 0:
                raise ValueError("offset must be >= 0")
        except Refused:
            return _not_found()
        except ValueError as err:
            return _bad(str(err))
        if self.streams >= MAX_STREAMS:
            return JSONResponse({"error": f"at most {MAX_STREAMS} live streams"}, status_code=503)
        path = run_dir / TELEMETRY  # the run (or its file) may appear later: the stream waits for it
        return StreamingResponse(
            self._events(request, path, selectors, offset),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _events(self, request: Request, path: Path, selectors: list[Selector], offset: int) -> AsyncIterator[str]:
        self.streams += 1
        try:
            yield f"retry: 1000\nid: {offset}\n\n"
            beat = time.monotonic()
            while not await request.is_disconnected():
                size = _size(path)
                if size < offset or size - offset > STREAM_BEHIND_BYTES:
                    yield "event: reset\ndata: {}\n\n"  # replaced, truncated, or too far behind: reload the series
                    return
                if size > offset:
                    data, offset, _ = read_appended(path, offset, STREAM_READ_BYTES)
                    events = (
                        await anyio.to_thread.run_sync(matching_events, data, selectors)
                        if len(data) > 65536
                        else matching_events(data, selectors)
                    )
                    if events:
                        payload = json.dumps({"offset": offset, "events": events}, separators=(",", ":"))
                        yield f"id: {offset}\ndata: {payload}\n\n"
                        beat = time.monotonic()
                        continue
                if time.monotonic() - beat > HEARTBEAT_SECONDS:
                    yield f"id: {offset}\n: heartbeat\n\n"  # keeps proxies open and notices a gone client
                    beat = time.monotonic()
                await asyncio.sleep(POLL_SECONDS)
        finally:
            self.streams -= 1

    def plasticity_panel(self, request: Request) -> Response:
        try:
            run_dir = self.run_dir(request)
            step = request.query_params.get("step")
            step_value = int(step) if step not in (None, "") else None
        except Refused:
            return _not_found()
        except ValueError:
            return _bad("step must be an integer")
        metric = request.query_params.get("metric", "update_norm")
        if metric not in PLASTICITY_METRICS:
            return _bad(f"metric must be one of {', '.join(PLASTICITY_METRICS)}")
        if not run_dir.is_dir():
            return _not_found()
        try:
            panel = self.plasticity.panel(run_dir, request.query_params.get("stage"), step_value, metric)
        except (OSError, KeyError, ValueError) as err:  # a table being written, or not a plasticity table
            return JSONResponse({"error": f"plasticity tables unreadable: {err}"}, status_code=409)
        return JSONResponse(panel)

    def list_files(self, request: Request) -> Response:
        try:
            run_dir = self.run_dir(request)
        except Refused:
            return _not_found()
        if not run_dir.is_dir():
            return _not_found()
        found = []
        for folder, dirs, files in os.walk(run_dir):  # does not follow links to folders
            rel = Path(folder).relative_to(run_dir)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints" and len(rel.parts) < 3)
            for name in sorted(files):
                path = Path(folder) / name
                if Path(name).suffix in FILE_TYPES and not name.startswith(".") and not path.is_symlink():
                    found.append((rel / name).as_posix())
            if len(found) >= MAX_LISTED_FILES:
                break
        return JSONResponse({"files": found[:MAX_LISTED_FILES]})

    def file(self, request: Request) -> Response:
        name = request.path_params["path"]
        try:
            path = safe_path(self.root, name)
        except Refused:
            return _not_found()
        kind = FILE_TYPES.get(path.suffix)
        if kind is None or not path.is_file():
            return _not_found()
        return FileResponse(path, media_type=kind, headers={"cache-control": "no-cache"})


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _allowed_hosts(host: str) -> list[str]:
    if host in ("0.0.0.0", "::", ""):
        return ["*"]  # every address of the machine: the warning printed at start says so
    names = {"127.0.0.1", "localhost", "::1", "[::1]", host}
    return sorted(names)


def create_app(root: str | Path, host: str = "127.0.0.1") -> Starlette:
    """The dashboard app over ``root`` (which must exist), answering requests addressed to ``host``."""
    dash = Dashboard(Path(root))

    routes = [
        Route("/", dash.index),
        Route("/api/runs", dash.list_runs),
        Route("/api/series", dash.series),
        Route("/api/stream", dash.stream),
        Route("/api/plasticity", dash.plasticity_panel),
        Route("/api/files", dash.list_files),
        Route("/files/{path:path}", dash.file),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=_allowed_hosts(host))]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.dashboard = dash
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or :class:`OSError` (e.g. the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on the already bound ``sock`` until Ctrl-C."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
