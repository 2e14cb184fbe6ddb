"""The web dashboard the daemon serves at ``/``: live sandboxes, per-tier
latency from the metrics, the latest bench report, and a page per sandbox
with its command history and a read-only view of each command's output.

Pages are rendered on the server with Jinja2 (no build step, nothing fetched
from the network); a few lines of script refresh the table and follow a
running command's output. On TCP a person logs in with an API key once: the
browser gets a session cookie that only ever reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from tierbox.errors import AuthenticationError, TierboxError
from tierbox.server.db import Caller

TEMPLATES = Environment(
    loader=PackageLoader("tierbox.server", "templates"),
    autoescape=select_autoescape(["html"]),
)
SESSION_COOKIE = "tierbox_session"
CHART_SUFFIXES = (".png", ".svg")


def latest_bench(bench_dir: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``results.json`` in ``bench_dir`` or a directory just below it."""
    if bench_dir is None or not bench_dir.is_dir():
        return None
    found = [bench_dir / "results.json"] if (bench_dir / "results.json").is_file() else []
    found += [p for p in bench_dir.glob("*/results.json") if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    try:
        results = json.loads(newest.read_text())
    except (OSError, ValueError):
        return None
    return newest.parent, results


def bench_view(found: tuple[Path, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The bench report as the page shows it: the summary table and charts."""
    if found is None:
        return None
    report_dir, results = found
    from tierbox.bench.report import COLUMNS, summary_rows

    try:
        rows = summary_rows(results)
    except (KeyError, TypeError, ValueError):
        rows = []
    charts = results.get("charts") or {}
    return {
        "dir": str(report_dir),
        "when": time.strftime(
            "%Y-%m-%d %H:%M", time.localtime((report_dir / "results.json").stat().st_mtime)
        ),
        "columns": list(COLUMNS),
        "rows": [[_plain(c) for c in row] for row in rows],
        "charts": [
            {"title": title, "name": name}
            for title, name in charts.items()
            if isinstance(name, str) and name.endswith(CHART_SUFFIXES)
        ],
    }


def _plain(cell: str) -> str:
    """A rich-markup cell as plain text."""
    from rich.text import Text

    return Text.from_markup(str(cell)).plain


def fmt_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f} MiB"


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.1f} s"


def mount_dashboard(
    app: FastAPI,
    service: Any,
    sessions: Any,
    authenticate: Callable[..., Caller],
) -> None:
    """Add the dashboard's pages to the API's app."""

    def who(request: Request) -> Caller | None:
        try:
            return authenticate(request, read_only=True)
        except AuthenticationError:
            return None

    def page(name: str, **context: Any) -> HTMLResponse:
        html = TEMPLATES.get_template(name).render(
            fmt_age=fmt_age, fmt_mib=fmt_mib, fmt_ms=fmt_ms, now=time.time(), **context
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def login_first() -> Response:
        return RedirectResponse("/login", status_code=303)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        caller = who(request)
        if caller is None:
            return login_first()
        found = await service.blocking(latest_bench, service.bench_dir)
        return page(
            "index.html",
            caller=caller,
            sandboxes=service.list(caller),
            latency=service.metrics.latency_table(),
            bench=bench_view(found),
        )

    @app.get("/ui/sandboxes.json", include_in_schema=False)
    async def sandboxes_json(request: Request) -> Response:
        caller = who(request)
        if caller is None:
            return Response(status_code=401)
        now = time.time()
        rows = [
            {
                "id": v["id"],
                "name": v["name"],
                "tier": v["tier"],
                "image": v["image"] or "-",
                "age": fmt_age(now - v["created_unix"]),
                "memory": fmt_mib(v["memory_bytes"]),
                "peak": fmt_mib(v["memory_peak_bytes"]),
                "owner": v["tenant"],
                "running": v["running_execs"],
            }
            for v in service.list(caller)
        ]
        return Response(json.dumps(rows), media_type="application/json")

    @app.get("/sandboxes/{sandbox_id}", include_in_schema=False)
    async def sandbox_page(request: Request, sandbox_id: str) -> Response:
        caller = who(request)
        if caller is None:
            return login_first()
        try:
            view = service.row(caller, sandbox_id)
            history = service.exec_history(caller, sandbox_id)
        except TierboxError:
            return page("missing.html", caller=caller, what=f"sandbox {sandbox_id}")
        return page("sandbox.html", caller=caller, sb=view, execs=history)

    @app.get("/sandboxes/{sandbox_id}/execs/{exec_id}", include_in_schema=False)
    async def exec_page(request: Request, sandbox_id: str, exec_id: str) -> Response:
        caller = who(request)
        if caller is None:
            return login_first()
        try:
            view = service.exec_view(caller, sandbox_id, exec_id)
        except TierboxError:
            return page("missing.html", caller=caller, what=f"command {exec_id}")
        row = service.db.exec_row(exec_id)
        stdout = (row.stdout_head if row else b"").decode(errors="replace")
        stderr = (row.stderr_head if row else b"").decode(errors="replace")
        return page(
            "exec.html",
            caller=caller,
            sandbox_id=sandbox_id,
            ex=view,
            stdout=stdout,
            stderr=stderr,
            live=view["status"] == "running",
        )

    @app.get("/ui/bench/{name}", include_in_schema=False)
    async def bench_chart(request: Request, name: str) -> Response:
        if who(request) is None:
            return Response(status_code=401)
        found = await service.blocking(latest_bench, service.bench_dir)
        if found is None or "/" in name or not name.endswith(CHART_SUFFIXES):
            return Response(status_code=404)
        path = found[0] / name
        if not path.is_file():
            return Response(status_code=404)
        return FileResponse(path)

    @app.get("/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return page("login.html", caller=None, error=None)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body())[:4096].decode(errors="replace"))
        key = (form.get("key") or [""])[0]
        try:
            caller = service.db.authenticate(key.strip())
        except AuthenticationError as exc:
            return page("login.html", caller=None, error=str(exc))
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            sessions.new(caller),
            httponly=True,
            samesite="strict",
            max_age=12 * 3600,
        )
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response
