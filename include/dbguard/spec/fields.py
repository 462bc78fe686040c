"""Spec field types: validated names, SQL types, time zones, locales, and the strict base model."""
from __future__ import annotations

import re
import zoneinfo
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict


_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A column type as written in DDL: words, digits, one (p[,s]) modifier, array brackets.
_TYPE = re.compile(r"^([a-z_][a-z0-9_$]*\.)?[a-z_][a-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?( [a-z ]+)?(\[\])*$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _ident(v: str) -> str:
    if not isinstance(v, str) or not _IDENT.match(v):
        raise ValueError(
            f"{v!r} is not a plain SQL identifier; use lower-case letters, digits and _ "
            "(at most 63 characters, not starting with a digit)"
        )
    return v


# A user-defined type as format_type() prints it when its name needs quotes: "OrderStatus", "s"."T"[].
_QUOTED_PART = r'(?:"(?:[^"\x00]|"")+"|[a-z_][a-z0-9_$]*)'
_QUOTED_TYPE = re.compile(rf"^{_QUOTED_PART}(?:\.{_QUOTED_PART})?(\[\])*$")


def _sql_type(v: str) -> str:
    if isinstance(v, str) and '"' in v:
        if not _QUOTED_TYPE.match(v):
            raise ValueError(f"{v!r} is not a type name dbguard accepts; quote a user-defined type's name as "
                             'format_type() prints it, e.g. \'"OrderStatus"\' or \'shop."Mood"[]\'')
        return v
    norm = " ".join(str(v).lower().split())
    if not _TYPE.match(norm):
        raise ValueError(
            f"{v!r} is not a column type dbguard accepts; write it as in DDL, "
            "for example 'bigint', 'numeric(12,2)', 'timestamp with time zone', 'text[]', 'vector(384)'"
        )
    return norm


def _timezone(v: str) -> str:
    try:
        zoneinfo.ZoneInfo(v)
    except Exception:
        raise ValueError(f"unknown time zone {v!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
    return v


Ident = Annotated[str, AfterValidator(_ident)]


def _name(v: str) -> str:
    """Table, column, schema and index names: any PostgreSQL identifier ORMs use ("OrderItems", "createdAt",
    "_prisma_migrations", spaces, quotes, unicode). Safe because every use quotes it (sql.Identifier) and
    the catalog matches it exactly; the migration name and conn ids stay plain (DAG ids, env var names)."""
    if not isinstance(v, str) or v == "":
        raise ValueError(f"{v!r} is not a name; give the table/column name exactly as the database spells it")
    if "\x00" in v:
        raise ValueError(f"{v!r} contains a NUL byte, which no PostgreSQL identifier can hold")
    if len(v.encode("utf-8")) > 63:
        raise ValueError(f"{v!r} is {len(v.encode('utf-8'))} bytes; PostgreSQL identifiers are at most 63 bytes")
    return v


Name = Annotated[str, AfterValidator(_name)]


def _locale(v: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.@-]{1,63}$", v):
        raise ValueError(f"{v!r} is not a valid collation/locale name, e.g. 'C', 'POSIX', 'en_US.UTF-8', 'und-x-icu'")
    return v


LocaleName = Annotated[str, AfterValidator(_locale)]
SqlType = Annotated[str, AfterValidator(_sql_type)]


class _At(ValueError):
    """A model-level check that knows which field is wrong: `loc` is appended to the
    model's location, so the error names e.g. tables[orders].key, not tables[orders]."""

    def __init__(self, loc: tuple[Any, ...] | str, msg: str):
        super().__init__(msg)
        self.loc = (loc,) if isinstance(loc, str) else tuple(loc)


class _Model(BaseModel):
    # strict: YAML `concurrency: true` or `batch_rows: "5"` is refused, not coerced to 1 or 5
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)
