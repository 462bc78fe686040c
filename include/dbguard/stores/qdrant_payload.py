"""Payload values of a Qdrant point: the typed PostgreSQL value <-> its JSON form, exact both ways.

Qdrant payloads are JSON, so every type gets one documented encoding that decodes to the value it
came from (the README lists them): integers and booleans as JSON, floats as JSON numbers (NaN and
±Infinity as the strings PostgreSQL prints), numeric as PostgreSQL's own text (scale kept: "12.50"),
timestamps as RFC 3339 with six fraction digits (timestamptz in UTC with "Z", timestamp without an
offset), dates as ISO dates, uuid as text, bytea as base64, json/jsonb as the JSON value, arrays of
these as JSON lists, NULL as null. The canonical text of a payload (for the checksum) is its JSON
with sorted keys and no spaces, computed the same way for what the source sends and what the
store returns.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import uuid
from decimal import Decimal
from typing import Any, Callable

_INT = {"smallint", "integer", "bigint", "int", "int2", "int4", "int8"}
_FLOAT = {"real", "double precision", "float4", "float8"}
_NUMERIC = {"numeric", "decimal"}
_TEXT = {"text", "character varying", "varchar", "character", "char", "citext", "name"}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def base_type(sql_type: str) -> tuple[str, bool]:
    """('timestamp with time zone', False) for 'timestamp(3) with time zone'; arrays flagged."""
    t = sql_type.strip().lower()
    is_array = t.endswith("[]")
    t = re.sub(r"\(\s*\d+\s*(,\s*\d+\s*)?\)", "", t.rstrip("[]")).strip()
    t = " ".join(t.split())
    return {"timestamptz": "timestamp with time zone", "timestamp": "timestamp without time zone",
            "bool": "boolean"}.get(t, t), is_array


def _float_out(x: float) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)


def _float_in(v: Any) -> float:
    return _SPECIAL_FLOATS[v] if isinstance(v, str) else float(v)


def _ts_out(v: dt.datetime) -> str:
    if v.tzinfo is not None:
        return v.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return v.strftime("%Y-%m-%dT%H:%M:%S.%f")


def _ts_in(v: str) -> dt.datetime:
    if v.endswith("Z"):
        return dt.datetime.strptime(v[:-1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
    return dt.datetime.strptime(v, "%Y-%m-%dT%H:%M:%S.%f")


# base type -> (encode, decode); identity for what JSON holds as it is.
_same = (lambda v: v, lambda v: v)
CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    **{t: (int, int) for t in _INT},
    **{t: (_float_out, _float_in) for t in _FLOAT},
    **{t: (str, Decimal) for t in _NUMERIC},
    **{t: _same for t in _TEXT},
    "boolean": _same,
    "uuid": (str, uuid.UUID),
    "date": (lambda v: v.isoformat(), dt.date.fromisoformat),
    "timestamp with time zone": (_ts_out, _ts_in),
    "timestamp without time zone": (_ts_out, _ts_in),
    "json": _same,
    "jsonb": _same,
    "bytea": (lambda v: base64.b64encode(bytes(v)).decode("ascii"), base64.b64decode),
}


def supported(sql_type: str) -> bool:
    base, is_array = base_type(sql_type)
    return base in CODECS and not (is_array and base in ("json", "jsonb"))


def unsupported_message(column: str, sql_type: str) -> str:
    return (f"payload column {column!r} has type {sql_type!r}, which has no exact payload encoding; supported: "
            f"{', '.join(sorted(CODECS))} and arrays of them (not json[]); cast it in a view or leave it out of "
            "qdrant.payload")


def encoder(sql_type: str) -> Callable[[Any], Any]:
    base, is_array = base_type(sql_type)
    enc = CODECS[base][0]
    one = lambda v: None if v is None else enc(v)  # noqa: E731
    return (lambda v: None if v is None else [one(x) for x in v]) if is_array else one


def decoder(sql_type: str) -> Callable[[Any], Any]:
    base, is_array = base_type(sql_type)
    dec = CODECS[base][1]
    one = lambda v: None if v is None else dec(v)  # noqa: E731
    return (lambda v: None if v is None else [one(x) for x in v]) if is_array else one


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(payload: dict[str, Any]) -> str:
    """The payload's checksum text: JSON, keys sorted, no spaces, non-ASCII kept, floats as repr
    (one encoder for every call: json.dumps with options builds a new one each time)."""
    return _CANONICAL.encode(payload)
