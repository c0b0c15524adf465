"""The request parser: webargs' FlaskParser with stricter JSON.

Python's json module takes ``NaN``, ``Infinity`` and unpaired surrogates (``"\\ud800"``), none of
which is valid JSON; a number that is not finite would slip past range checks, and a lone
surrogate cannot be written to a script, a log or the database. Both are a 400 here, with the
reason in the one error shape.
"""
from __future__ import annotations

import json
from typing import Any, NoReturn

import flask
from flask_smorest import abort
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a valid JSON number", name, 0)


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if any("\ud800" <= c <= "\udfff" for c in value):
            raise json.JSONDecodeError("a string holds an unpaired surrogate (\\ud800-\\udfff)", "surrogate", 0)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def load_strict_json(data: bytes) -> Any:
    """Parse a body as strict JSON; raise json.JSONDecodeError saying what is wrong."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason})", "?", 0) from exc
    value = json.loads(text, parse_constant=_refuse_constant)
    _check_strings(value)
    return value


class StrictJSONParser(FlaskParser):
    """FlaskParser refusing NaN/Infinity and lone surrogates, with the reason in the 400."""

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            return core.missing
        data = req.get_data(cache=True)
        if not data:
            raise json.JSONDecodeError("empty body", "", 0)
        return load_strict_json(data)

    def _handle_invalid_json_error(self, error: Any, req: flask.Request, *args: Any, **kwargs: Any) -> NoReturn:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        abort(400, message=f"Invalid JSON body: {reason}", messages={"json": [f"Invalid JSON body: {reason}"]})
