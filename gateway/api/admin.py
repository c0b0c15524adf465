"""Admin-only views: closed to everyone but admin principals (``admin_required``)."""
from __future__ import annotations

from typing import Any

from flask import current_app
from flask.views import MethodView
from flask_smorest.error_handler import ErrorSchema

from gateway.api.docs import DocumentedBlueprint
from gateway.api.parser import StrictJSONParser
from gateway.api.schemas import TokenSchema
from gateway.auth import admin_required, list_tokens

blp = DocumentedBlueprint("admin", __name__, description="Administration (admin tokens only)")
blp.ARGUMENTS_PARSER = StrictJSONParser()


@blp.route("/admin/tokens")
class Tokens(MethodView):
    @blp.response(200, TokenSchema(many=True))
    @blp.alt_response(401, schema=ErrorSchema, description="No valid bearer token")
    @blp.alt_response(403, schema=ErrorSchema, description="The token is not an admin's")
    @blp.doc(operationId="listTokens")
    @admin_required
    def get(self) -> list[dict[str, Any]]:
        """Every bearer token (ids, users, dates; never a secret or hash). Create and revoke them with `relion-gateway token`."""
        return list_tokens(current_app)
