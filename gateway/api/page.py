"""The job page (issue 15): one static HTML page with its script and style, from gateway/api/ui/.

The page is public (a browser loads it before it has a token); every call it makes for data sends
the token it keeps in the tab's sessionStorage. Its CSP allows only its own script and style, the
gateway's API and the blob: URLs it makes for images fetched with the token.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Flask, redirect, send_from_directory
from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Response

from gateway.auth import public

UI_DIR = Path(__file__).resolve().parent / "ui"
ASSETS = frozenset({"app.js", "app.css"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def register_page(app: Flask, base: str) -> None:
    page = Blueprint("job_page", __name__)

    @page.get("/ui")
    @public
    def ui_root() -> Response:
        return redirect(f"{base}/ui/", 308)

    @page.get("/ui/")
    @public
    def ui_index() -> Response:
        """The job page: a token form, the caller's jobs, and one job's previews, logs and output."""
        response = send_from_directory(UI_DIR, "index.html", mimetype="text/html", max_age=0)
        response.headers["Cache-Control"] = "no-cache"
        return _headers(response)

    @page.get("/ui/<name>")
    @public
    def ui_asset(name: str) -> Response:
        if name not in ASSETS:
            raise NotFound(f"no page asset {name!r}")
        response = send_from_directory(UI_DIR, name, max_age=0)
        response.headers["Cache-Control"] = "no-cache"
        return _headers(response)

    app.register_blueprint(page, url_prefix=base)
