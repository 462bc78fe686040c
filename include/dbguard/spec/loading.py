"""YAML in, MigrationSpec out: size and alias-bomb limits, and pydantic's errors turned into
(field path, how to fix it) pairs."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from .fields import _At
from .migration import MigrationSpec


def _field_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Turn a pydantic location into 'tables[orders].columns[amount].type'.

    List items are named by their `name` (or, for stores, their `column`), else by index."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            label = str(item)
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                for key in ("name", "column"):
                    if isinstance(node[item].get(key), (str, int)) and node[item][key] != "":
                        label = str(node[item][key])
                        break
            parts[-1:] = [f"{parts[-1] if parts else ''}[{label}]"]
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec model class found at a location (to suggest field names)."""
    model: Any = MigrationSpec
    for item in loc:
        if isinstance(item, int):
            continue
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        field = fields.get(item)
        if field is None:
            return None
        stack, model = [field.annotation], None
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            stack.extend(getattr(t, "__args__", ()))
        if model is None:
            return None
    return model


def _unknown_field(loc: tuple[Any, ...]) -> str:
    msg = f"unknown field {loc[-1]!r}"
    model = _model_at(tuple(x for x in loc[:-1]))
    if model is not None:
        known = [f.alias or n for n, f in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            return f"{msg}; did you mean {close[0]!r}? (fields here: {', '.join(known)})"
        return f"{msg}; fields here: {', '.join(known)} (see docs/spec.md)"
    return f"{msg}; check the spelling against docs/spec.md"


def _friendly(err: dict, msg: str) -> str:
    """Pydantic's built-in messages, reworded to say what to write instead."""
    ctx, kind, got = err.get("ctx") or {}, err["type"], err.get("input")
    if kind == "missing":
        return "required field is missing; add it (see docs/spec.md)"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length', 0)}; add more"
    bounds = {"less_than_equal": ("<=", "le"), "less_than": ("<", "lt"),
              "greater_than_equal": (">=", "ge"), "greater_than": (">", "gt")}
    if kind in bounds:
        op, key = bounds[kind]
        return f"{got!r} is out of range; use a value {op} {ctx.get(key)}"
    if kind != "value_error" and got is not None and not isinstance(got, (dict, list)):
        return f"got {got!r}; {msg[:1].lower()}{msg[1:]}"
    return msg


def parse_spec(raw: Any, path: str = "<spec>") -> MigrationSpec:
    if not isinstance(raw, dict):
        raise SpecError(path, [("(top level)", "the spec must be a YAML mapping with name, source, target, tables")])
    try:
        return MigrationSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _At):
                loc += cause.loc
            if err["type"] == "extra_forbidden":
                msg = _unknown_field(loc)
            else:
                msg = _friendly(err, msg)
            problems.append((_field_path(loc, raw), msg))
        raise SpecError(path, problems) from None


MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # YAML values after expanding aliases; a real spec has a few thousand


def _expanded_nodes(text: str) -> int:
    """How many values the YAML holds once aliases are expanded, counted without expanding them
    (a "billion laughs" file is a few lines that expand to 10^9 values)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once
        kids = node.value if isinstance(node, yaml.SequenceNode) else \
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else []
        n = 1 + sum(size(k) for k in kids)
        sizes[id(node)] = n
        return n

    return size(root) if root is not None else 0


def load_spec(path: str | Path) -> MigrationSpec:
    p = Path(path)
    if p.is_dir():
        raise SpecError(str(p), [("(file)", "is a directory; pass the path of one migration YAML file, "
                                            "e.g. include/migrations/demo_shop.yaml")])
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(str(p), [("(file)", "no such file; pass the path of a migration YAML")]) from None
    except OSError as e:
        raise SpecError(str(p), [("(file)", f"cannot read it ({e.strerror}); check the path and permissions")]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(p), [("(file)", f"{len(data)} bytes is not a migration spec (limit {MAX_SPEC_BYTES}); "
                                            "pass the YAML spec, not a data file")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(str(p), [(f"line {line}", f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                                  "save the spec as UTF-8")]) from None
    try:
        if (n := _expanded_nodes(text)) > MAX_SPEC_NODES:
            raise SpecError(str(p), [("(file)", f"expands to {n:,} values through YAML aliases (*name), more than "
                                                f"{MAX_SPEC_NODES:,}: an alias bomb, not a spec; write values out")])
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return parse_spec(raw, str(p))
