"""The API docs: the Swagger UI page with its assets served locally (no CDN, works offline), and
what the OpenAPI spec says beyond the views' own decorators, so a generator turns it into a typed
client with no hand edits.

The spec is built per app (``Api(app)`` in gateway/app.py, after ``register_docs``): what depends on
the configuration (the partitions) or on no one view (the one error shape, the metadata.json
schema, the responses every operation can give) is said here, once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from apispec import BasePlugin
from flask import Blueprint, Flask, send_from_directory
from flask_smorest import Blueprint as SmorestBlueprint
from werkzeug.wrappers import Response

from gateway.api.errors import ERROR_REQUIRED, MAX_HEADER_BYTES, MAX_HEADER_FIELDS, MAX_URI_BYTES
from gateway.api.schemas import STATES
from gateway.relion.modes import MODES

log = logging.getLogger(__name__)

ASSETS_PATH = "docs/assets"
# The archive job's metadata.json, as a JSON Schema (2020-12): the one owner of its shape.
METADATA_SCHEMA = Path(__file__).resolve().parents[1] / "jobside" / "metadata.schema.json"
METADATA_COMPONENT = "JobMetadata"

# What any operation may answer before or beside its view, in the one error shape: the request
# limits (gateway/api/errors.py, RequestLimits) and an unexpected error. Names of response components.
COMMON_RESPONSES = {
    413: ("REQUEST_TOO_LARGE", "The request body is larger than the limit (1 MiB)"),
    414: ("URI_TOO_LONG", f"The request URI is longer than {MAX_URI_BYTES} bytes"),
    431: ("HEADERS_TOO_LARGE", f"More than {MAX_HEADER_FIELDS} header fields, or more than {MAX_HEADER_BYTES} bytes of them"),
    500: ("INTERNAL_ERROR", "An unexpected error (the gateway log has it)"),
}
def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _common_responses(doc: dict[str, Any], doc_info: dict[str, Any], **_: Any) -> dict[str, Any]:
    """Declare on each operation the status codes every operation can give (flask-smorest doc callback)."""
    responses = doc.setdefault("responses", {})
    for code, (name, _description) in COMMON_RESPONSES.items():
        # alt_response keys are ints, @doc's strings: one entry per code either way.
        if code not in responses and str(code) not in responses:
            responses[code] = name
    return doc


class DocumentedBlueprint(SmorestBlueprint):
    """A flask-smorest Blueprint whose operations also declare COMMON_RESPONSES."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prepare_doc_cbks.append(_common_responses)


def openapi30(node: Any, defs: dict[str, Any] | None = None) -> Any:
    """A JSON Schema (2020-12) as an OpenAPI 3.0 Schema Object.

    3.0 has no ``$defs`` (inlined), no type lists (``nullable``), no ``const`` (a one-value enum)
    and no ``$schema``/``$id``; the rest of what metadata.schema.json uses is the same in both.
    """
    if isinstance(node, list):
        return [openapi30(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    defs = node.get("$defs", defs) or {}
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return openapi30({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$schema", "$id", "$defs", "$comment"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            if len(types) == 1:
                out["type"] = types[0]
            else:
                out["anyOf"] = [{"type": t} for t in types]
            if "null" in value:
                out["nullable"] = True
        elif key == "enum" and None in value:
            out["enum"], out["nullable"] = value, True
        elif key in ("properties", "patternProperties"):
            out[key] = {name: openapi30(item, defs) for name, item in value.items()}
        else:
            out[key] = openapi30(value, defs)
    for key in ("oneOf", "anyOf"):
        # 3.0 has no null type: a {"type": "null"} branch is the parent's nullable, and one branch
        # left is the parent itself (a generator then gives X | None, not a union with a null model).
        branches = out.get(key)
        if isinstance(branches, list) and any(b.get("type") == "null" for b in branches):
            kept = [b for b in branches if b.get("type") != "null"]
            del out[key]
            out = {**kept[0], **out} if len(kept) == 1 else {**out, key: kept}
            out["nullable"] = True
    return out


def metadata_component() -> dict[str, Any]:
    schema: dict[str, Any] = openapi30(json.loads(METADATA_SCHEMA.read_text()))
    # Generators name the model after the title; the file's own title is kept in the description.
    schema["description"] = f"{schema.pop('title', '')}: {schema.get('description', '')}".lstrip(": ")
    schema["title"] = METADATA_COMPONENT
    return schema


def spec_options(config: dict[str, Any], base: str) -> dict[str, Any]:
    """What the spec says beyond the views: merged (apispec deep-merges options) over what they generate."""
    schemas: dict[str, Any] = {
        "Error": {"required": list(ERROR_REQUIRED)},
        METADATA_COMPONENT: metadata_component(),
        "JobState": {"type": "string", "enum": STATES, "description": "a job's gateway state (README, Job states)"},
        # x-enum-varnames: generators name the members (Mode.MODE_2D), not VALUE_0 for a value starting with a digit.
        "Mode": {"type": "string", "enum": list(MODES), "x-enum-varnames": [f"MODE_{m.upper()}" for m in MODES],
                 "description": "2D classification, 3D classification, 3D auto-refinement"},
    }
    partitions = sorted(config.get("SLURM_PARTITIONS") or {})
    if partitions:
        # A request may name only a configured partition when any is (gateway/jobs/resources.py).
        schemas["JobRequest"] = {"properties": {"partition": {"enum": partitions}}}
    return {
        # The base path is the server's (RelativePaths strips it from every path): generated
        # clients take it as their base URL (http://host:9012/v1/relion) and name operations by
        # operationId, never by the base path; Swagger UI resolves it against the spec's origin.
        "servers": [{"url": base or "/", "description": "this gateway's API (relative to its origin)"}],
        "components": {"schemas": schemas, "responses": {name: _error_response(text) for name, text in COMMON_RESPONSES.values()}},
    }


def _merge(into: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def register_docs(app: Flask, base: str) -> None:
    """Point flask-smorest's Swagger UI page at assets from the swagger-ui-bundle package, and add
    spec_options to the app's API_SPEC_OPTIONS (read by Api() at init)."""
    from swagger_ui_bundle import swagger_ui_path

    assets = Blueprint("docs_assets", __name__)

    @assets.get(f"/{ASSETS_PATH}/<path:filename>")
    def asset(filename: str) -> Response:
        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    app.register_blueprint(assets, url_prefix=base)
    app.config.update(
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL=f"{base}/{ASSETS_PATH}/",
        API_SPEC_OPTIONS=_merge(dict(app.config.get("API_SPEC_OPTIONS") or {}), spec_options(app.config, base)),
    )


class RelativePaths(BasePlugin):  # type: ignore[misc]
    """The spec's paths relative to its server (``/jobs``, not ``/v1/relion/jobs``): the base path
    is said once, in ``servers``."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def path_helper(self, path: str | None = None, **_: Any) -> str | None:
        if path and self.base and path.startswith(self.base + "/"):
            return path[len(self.base):]
        return path
