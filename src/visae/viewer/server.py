"""A local web server for the feature browser: the app's static files, the JSON documents of
`payload`, and each analysis's thumbnails and plots, read-only; with a `LiveModel`, also the
edit panel's one endpoint, `POST /api/a<i>/intervene` (`visae.viewer.live`). Bound to
127.0.0.1."""

from __future__ import annotations

import json
import mimetypes
import os
import threading
import traceback
import webbrowser
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from visae.analysis.artifact import PLOTS_DIR, THUMBS_DIR, Analysis
from visae.errors import VisaeError, first_line
from visae.viewer.payload import payload

if TYPE_CHECKING:
    from visae.viewer.live import LiveModel

STATIC_FILES = ("index.html", "app.js", "style.css")
# analysis sub-folders the browser may read files from
SERVED_DIRS = (THUMBS_DIR, PLOTS_DIR)
# the largest intervention request body read (a request lists at most a grid's patches)
MAX_BODY = 1 << 20


def static_dir() -> Path:
    """Folder of the app's HTML, JS and CSS (shipped as package data)."""
    return Path(str(resources.files("visae.viewer") / "static"))


def load_analyses(paths: Sequence[str | os.PathLike[str] | Analysis]) -> list[Analysis]:
    if not paths:
        raise VisaeError("the browser needs at least one analysis directory")
    return [p if isinstance(p, Analysis) else Analysis.load(p) for p in paths]


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of paths resolved against a fixed set of roots; POST of the intervention
    endpoint only with a live model (else 501, as any server without POST)."""

    server_version = "visae-viewer"

    def __init__(self, *args: Any, app: _App, **kwargs: Any) -> None:
        self.app = app
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.verbose:
            super().log_message(format, *args)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_POST(self) -> None:
        if self.app.live is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        try:
            doc = self.app.intervene(unquote(urlsplit(self.path).path), self._json_body())
        except VisaeError as e:
            status = getattr(e, "status", HTTPStatus.BAD_REQUEST)
            self._send_json(int(status), {"error": first_line(e)})
            return
        except Exception as e:  # a bug, not a bad request: answer, and keep the traceback
            traceback.print_exc()
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": first_line(e)})
            return
        self._send_json(HTTPStatus.OK, doc)

    def _json_body(self) -> Any:
        """The request body as JSON; refuses other content types (so a cross-site form, which
        cannot send JSON without a CORS preflight, never reaches the model) and large bodies."""
        from visae.viewer.live import RequestError

        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(f"content type must be application/json, not {ctype!r}", 415)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("the request has no Content-Length", 411)
        if int(length) > MAX_BODY:
            raise RequestError(f"request body of {length} bytes; at most {MAX_BODY}", 413)
        try:
            return json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not JSON: {e}") from None

    def _send_json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _respond(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            body, ctype = self.app.resolve(path)
        except FileNotFoundError:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        except VisaeError as e:
            self.send_error(HTTPStatus.NOT_FOUND, str(e))
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _App:
    def __init__(self, analyses: list[Analysis], verbose: bool, live: LiveModel | None) -> None:
        self.analyses = analyses
        self.verbose = verbose
        self.live = live
        if live is not None:
            live.bind(analyses)
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def intervene(self, path: str, body: Any) -> dict[str, Any]:
        """`/api/a<i>/intervene`: the live model's answer for analysis i."""
        from visae.viewer.live import RequestError

        assert self.live is not None
        parts = [p for p in path.split("/") if p]
        if (
            len(parts) != 3
            or parts[0] != "api"
            or parts[2] != "intervene"
            or not parts[1].startswith("a")
            or not parts[1][1:].isdigit()
        ):
            raise RequestError(f"no endpoint {path} (POST /api/a<i>/intervene)", 404)
        return self.live.run(int(parts[1][1:]), body)

    def resolve(self, path: str) -> tuple[bytes, str]:
        if path in ("/", "/index.html"):
            return (static_dir() / "index.html").read_bytes(), "text/html; charset=utf-8"
        parts = [p for p in path.split("/") if p]
        if len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC_FILES:
            f = static_dir() / parts[1]
            return f.read_bytes(), mimetypes.guess_type(f.name)[0] or "application/octet-stream"
        if parts and parts[0] == "data" and path.endswith(".json"):
            return self._data(path[len("/data/") : -len(".json")]), "application/json"
        if len(parts) == 3 and parts[0].startswith("a") and parts[0][1:].isdigit():
            idx = int(parts[0][1:])
            if idx < len(self.analyses) and parts[1] in SERVED_DIRS and _plain(parts[2]):
                f = self.analyses[idx].path / parts[1] / parts[2]
                if f.is_file():
                    ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                    return f.read_bytes(), ctype
        raise FileNotFoundError(path)

    def _data(self, key: str) -> bytes:
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            doc = payload(self.analyses, key)
        except KeyError:
            raise FileNotFoundError(key) from None
        if key == "index" and self.live is not None:
            doc["live"] = self.live.info()
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = body
        return body


def _plain(name: str) -> bool:
    """A file name without any path component (no traversal out of the served folders)."""
    return name not in (".", "..") and "/" not in name and "\\" not in name


def make_server(
    analyses: Sequence[str | os.PathLike[str] | Analysis],
    host: str = "127.0.0.1",
    port: int = 8000,
    verbose: bool = False,
    live: LiveModel | None = None,
) -> ThreadingHTTPServer:
    """A server ready for `serve_forever()` (port 0 picks a free port: see `server_port`);
    `live` adds the edit panel for the analyses made with its model."""
    app = _App(load_analyses(analyses), verbose, live)
    try:
        server = ThreadingHTTPServer((host, port), partial(_Handler, app=app))
    except OSError as e:
        raise VisaeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server


def serve(
    analyses: Sequence[str | os.PathLike[str] | Analysis],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    open_browser: bool = False,
    verbose: bool = False,
    live: LiveModel | None = None,
) -> None:
    """Serve the browser until interrupted (Ctrl-C); `live` adds the edit panel."""
    loaded = load_analyses(analyses)
    server = make_server(loaded, host, port, verbose, live)
    url = f"http://{host}:{server.server_port}/"
    print(f"visae browser on {url}  (Ctrl-C to stop)", flush=True)
    if live is not None:
        names = ", ".join(loaded[i].name for i in live.analyses)
        print(f"edit panel: {live.backbone.name}, head {live.head.name}, on {names}", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
