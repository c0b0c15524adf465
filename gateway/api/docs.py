"""The API docs page (Swagger UI) with its assets served locally: no CDN, works offline."""
from __future__ import annotations

from flask import Blueprint, Flask, send_from_directory
from werkzeug.wrappers import Response

ASSETS_PATH = "docs/assets"


def register_docs(app: Flask, base: str) -> None:
    """Point flask-smorest's Swagger UI page at assets from the swagger-ui-bundle package."""
    from swagger_ui_bundle import swagger_ui_path

    assets = Blueprint("docs_assets", __name__)

    @assets.get(f"/{ASSETS_PATH}/<path:filename>")
    def asset(filename: str) -> Response:
        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    app.register_blueprint(assets, url_prefix=base)
    app.config.update(
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=f"{base}/{ASSETS_PATH}/",
    )
