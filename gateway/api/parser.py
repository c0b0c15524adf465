"""The request parser: webargs' FlaskParser with stricter JSON.

Python's json module takes ``NaN``, ``Infinity`` and unpaired surrogates (``"\\ud800"``), none of
which is valid JSON; a number that is not finite would slip past range checks, and a lone
surrogate cannot be written to a script, a log or the database. Both are a 400 here, with the
reason in the one error shape.

It also takes duplicate keys (the last one silently wins, so two readers of the same body can
disagree about it), raises ``ValueError`` on an integer of more than 4300 digits and
``RecursionError`` on deep nesting, and turns ``1e400`` into ``inf``. Those are refused here
too, naming where in the body they are: a duplicate key or too deep a nesting is a 400, a number
beyond a double's range a 422 naming the field (no schema takes one; flags are bounded far below).

A body that is not ``application/json`` on an endpoint taking JSON is a 415: read as "no body",
a form post would otherwise come back as a puzzling list of missing fields.
"""
from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import flask
from flask_smorest import abort
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

# Arrays and objects inside one another: a job request needs three levels (body, flags, value);
# deeper bodies are refused before anything walks them recursively.
MAX_JSON_DEPTH = 32
# A JSON number must fit a double: beyond it Python's json gives inf (1e400) or a huge int that no
# schema takes and that costs quadratic time to parse past 4300 digits (Python refuses those).
_MAX_INT_DIGITS = len(str(int(sys.float_info.max)))


class JSONRuleError(ValueError):
    """Valid JSON syntax breaking one of the gateway's rules; ``field`` is the path in the body."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.status = status
        self.field = field
        self.message = message


class _OutOfRange(str):
    """A number literal beyond a double's range, kept as text until the walk names its field."""


class _Duplicated(dict):  # type: ignore[type-arg]
    """An object in which ``key`` appears more than once, reported by the walk with its path."""

    key: str = ""


def _refuse_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a valid JSON number", name, 0)


def _parse_int(literal: str) -> Any:
    # Counted before int(): int() of 5000 digits raises ValueError, and is slow well before that.
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS or abs(value := int(literal)) > sys.float_info.max:
        return _OutOfRange(literal)
    return value


def _parse_float(literal: str) -> Any:
    value = float(literal)
    return _OutOfRange(literal) if value in (float("inf"), float("-inf")) else value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    duplicate = None
    for key, value in pairs:
        if key in seen and duplicate is None:
            duplicate = key
        seen[key] = value
    if duplicate is None:
        return seen
    marked = _Duplicated(seen)
    marked.key = duplicate
    return marked


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-4:]} ({len(literal)} characters)"


def _check(value: Any, path: str = "", depth: int = 0) -> None:
    """Walk a parsed body once: depth, duplicate keys, out-of-range numbers, lone surrogates."""
    if isinstance(value, (dict, list)) and depth >= MAX_JSON_DEPTH:
        raise JSONRuleError(400, path, f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, _OutOfRange):
        raise JSONRuleError(
            422, path, f"the number {_shown(value)} is beyond the range of any number the gateway takes (±{sys.float_info.max:.1e})"
        )
    if isinstance(value, str):
        if any("\ud800" <= c <= "\udfff" for c in value):
            raise json.JSONDecodeError("a string holds an unpaired surrogate (\\ud800-\\udfff)", "surrogate", 0)
    elif isinstance(value, dict):
        if isinstance(value, _Duplicated):
            raise JSONRuleError(400, _join(path, value.key), f"the key {value.key!r} appears more than once in the same object")
        for key, item in value.items():
            _check(key)
            _check(item, _join(path, key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, _join(path, index), depth + 1)


def load_strict_json(data: bytes) -> Any:
    """Parse a body as strict JSON.

    Raise json.JSONDecodeError for what is not JSON, JSONRuleError for JSON the gateway refuses.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"the body is not UTF-8 ({exc.reason})", "?", 0) from exc
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_parse_int, parse_float=_parse_float, object_pairs_hook=_pairs)
    except RecursionError:
        # Nested past the interpreter's own limit (~1000 levels): the walk below never sees it.
        raise JSONRuleError(400, "", f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep") from None
    _check(value)
    return value


class StrictJSONParser(FlaskParser):
    """FlaskParser refusing NaN/Infinity, lone surrogates, duplicate keys, deep nesting and
    numbers beyond a double, with the reason in the 400 (or 422), and other media types (415)."""

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            # An empty body stays "missing" (the schema names the required fields); a body in
            # another media type is the client's mistake, said as such.
            if req.content_length or (req.content_length is None and req.get_data(cache=True)):
                given = req.mimetype or "none"
                message = f"the body must be application/json (Content-Type: {given})"
                abort(415, message=message, messages={"json": [message]})
            return core.missing
        data = req.get_data(cache=True)
        if not data:
            raise json.JSONDecodeError("empty body", "", 0)
        try:
            return load_strict_json(data)
        except JSONRuleError as exc:
            messages: Any = {exc.field: [exc.message]} if exc.field else [exc.message]
            abort(exc.status, message=str(exc), messages={"json": messages})

    def load_querystring(self, req: flask.Request, schema: Any) -> Any:
        # A parameter the operation does not take is a 400 naming it: ignored, a misspelt filter
        # (?status=running for ?state=running) would silently return every job.
        known = {field.data_key or name for name, field in schema.fields.items()}
        unknown = sorted(set(req.args) - known)
        if unknown:
            rule = f"unknown parameter; this operation takes {', '.join(sorted(known))}"
            abort(400, message=f"{unknown[0]}: {rule}", messages={"query": {name: [rule] for name in unknown}})
        return super().load_querystring(req, schema)

    def _handle_invalid_json_error(self, error: Any, req: flask.Request, *args: Any, **kwargs: Any) -> NoReturn:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        abort(400, message=f"Invalid JSON body: {reason}", messages={"json": [f"Invalid JSON body: {reason}"]})
