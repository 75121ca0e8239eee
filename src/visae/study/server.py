"""`visae study serve`: the study as a web application (Starlette, served by uvicorn).

Participants: `/` (the invitation link, with the recruiting platform's PROLIFIC_PID, STUDY_ID
and SESSION_ID parameters) -> `/s/<token>` (their own page; every API call carries the token).
Admin: `/admin#<admin token>`; the admin API wants `Authorization: Bearer <admin token>`.
Endpoints are plain functions run in a thread pool (images known to the server skip it); the
database layer (`visae.study.db`) queues the writes.
"""

from __future__ import annotations

import csv
import hmac
import html
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from visae.errors import VisaeError
from visae.study.session import Study, StudyError

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16_384
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never pass it on
    "X-Content-Type-Options": "nosniff",
}


def build_app(study: Study, admin_token: str) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    from visae.study.report import scores_plot
    from visae.study.responses import exclusions, score_responses

    title = html.escape(study.plan.spec.name)
    pages = {
        name: (STATIC / name).read_text(encoding="utf-8").replace("{{study}}", title)
        for name in ("welcome.html", "participant.html", "admin.html")
    }

    def page(name: str) -> HTMLResponse:
        return HTMLResponse(pages[name], headers=HEADERS)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=HEADERS)

    def api(handler: Any) -> Any:
        """A JSON endpoint: refused requests answer {"error": ...} with their status."""

        async def endpoint(request: Request) -> Response:
            body = None
            if request.method == "POST":
                raw = await request.body()
                if len(raw) > MAX_BODY:
                    return error(413, "request body too large")
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    return error(400, "the request body is not JSON")
                if not isinstance(body, dict):
                    return error(400, "the request body must be a JSON object")
            try:
                from starlette.concurrency import run_in_threadpool

                out = await run_in_threadpool(handler, request, body)
            except StudyError as e:
                return error(e.status, str(e))
            except VisaeError as e:
                return error(400, str(e))
            if isinstance(out, Response):
                return out
            return JSONResponse(out, headers=HEADERS)

        return endpoint

    def admin(handler: Any) -> Any:
        def guarded(request: Request, body: Any) -> Any:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
                raise StudyError(401, "admin endpoints need Authorization: Bearer <admin token>")
            return handler(request, body)

        return api(guarded)

    def token(request: Request) -> str:
        return request.path_params["token"]

    async def welcome(request: Request) -> Response:
        return page("welcome.html")

    def enter(request: Request, body: Any) -> Response:
        tok = study.enter(dict(request.query_params))
        return RedirectResponse(f"/s/{tok}", status_code=303, headers=HEADERS)

    async def participant_page(request: Request) -> Response:
        return page("participant.html")

    def state(request: Request, body: Any) -> Any:
        return study.state(token(request))

    def consent(request: Request, body: Any) -> Any:
        if body.get("agree") is not True:
            raise StudyError(400, "consent: agree must be true to take part")
        return study.advance(token(request), "instructions")

    def start(request: Request, body: Any) -> Any:
        return study.advance(token(request), "trials")

    def answer(request: Request, body: Any) -> Any:
        return study.submit(token(request), request.path_params["position"], body)

    def finish(request: Request, body: Any) -> Any:
        return study.finish(token(request), body.get("comments"))

    def image(request: Request, body: Any) -> Response:
        data = study.image(
            token(request), request.path_params["position"], request.path_params["slot"]
        )
        return Response(data, media_type="image/png", headers=HEADERS)

    image_from_db = api(image)

    async def image_endpoint(request: Request) -> Response:
        """Most images come from memory, without a thread or the database."""
        try:
            data = study.cached_image(
                token(request), request.path_params["position"], request.path_params["slot"]
            )
        except StudyError as e:
            return error(e.status, str(e))
        if data is None:
            return await image_from_db(request)
        return Response(data, media_type="image/png", headers=HEADERS)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = STATIC / name
        kinds = {".js": "text/javascript", ".css": "text/css"}
        if "/" in name or path.suffix not in kinds or not path.is_file():
            return error(404, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=kinds[path.suffix], headers=HEADERS)

    async def admin_page(request: Request) -> Response:
        return page("admin.html")

    cache: dict[str, Any] = {}

    def rows() -> list[dict[str, str]]:
        return study.db.rows()

    def scores(request: Request, body: Any) -> Any:
        current = rows()
        key = len(current)
        if cache.get("key") != key:
            main = [r for r in current if r["kind"] == "main"]
            result: dict[str, Any] = {"responses": key}
            if main:
                try:
                    result |= score_responses(
                        study.plan.spec, current, boot=500, analyses=study.plan.analyses
                    )
                except VisaeError as e:  # e.g. every participant excluded so far
                    result["note"] = str(e)
            else:
                result["note"] = "no main trial answered yet"
            ex = exclusions(current, study.plan.spec)
            result["exclusions"] = {
                "participants": list(ex.participants),
                "fast_trials": ex.fast_trials,
            }
            cache.update(key=key, result=result)
        return cache["result"]

    def scores_png(request: Request, body: Any) -> Response:
        result = scores(request, body)
        return Response(
            scores_plot(result.get("scores", [])), media_type="image/png", headers=HEADERS
        )

    def progress(request: Request, body: Any) -> Any:
        return study.progress()

    def export_csv(request: Request, body: Any) -> Response:
        current = rows()
        buf = io.StringIO()
        from visae.study.responses import EXPORT_COLUMNS

        w = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS)
        w.writeheader()
        w.writerows(current)
        return Response(
            buf.getvalue(),
            media_type="text/csv",
            headers=HEADERS
            | {"Content-Disposition": f'attachment; filename="{study.plan.spec.name}.csv"'},
        )

    def export_json(request: Request, body: Any) -> Any:
        return {
            "study": study.plan.spec.name,
            "fingerprint": study.plan.fingerprint,
            "spec": study.plan.spec.to_dict(),
            "responses": rows(),
        }

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "study": study.plan.spec.name})

    routes = [
        Route("/", welcome),
        Route("/enter", api(enter), methods=["POST"]),
        Route("/healthz", health),
        Route("/static/{name}", static),
        Route("/s/{token}", participant_page),
        Route("/s/{token}/img/{position:int}/{slot}", image_endpoint),
        Route("/api/s/{token}/state", api(state)),
        Route("/api/s/{token}/consent", api(consent), methods=["POST"]),
        Route("/api/s/{token}/start", api(start), methods=["POST"]),
        Route("/api/s/{token}/trial/{position:int}", api(answer), methods=["POST"]),
        Route("/api/s/{token}/finish", api(finish), methods=["POST"]),
        Route("/admin", admin_page),
        Route("/api/admin/progress", admin(progress)),
        Route("/api/admin/scores", admin(scores)),
        Route("/api/admin/scores.png", admin(scores_png)),
        Route("/api/admin/export.csv", admin(export_csv)),
        Route("/api/admin/export.json", admin(export_json)),
    ]
    return Starlette(routes=routes)


@contextmanager
def running(
    study: Study, admin_token: str, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """The study served from a background thread while the block runs; yields its base URL
    (port 0: any free port). For simulations, tests and the demo."""
    import uvicorn

    config = uvicorn.Config(
        build_app(study, admin_token), host=host, port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise VisaeError(f"the study server could not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join()


def serve(study: Study, admin_token: str, host: str, port: int) -> None:
    import uvicorn

    app = build_app(study, admin_token)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    base = f"http://{host}:{port}"
    print(f"serving study {study.plan.spec.name!r} on {base}/ (database {study.db.display})")
    print(f"admin page: {base}/admin#{admin_token}", flush=True)
    server.run()
