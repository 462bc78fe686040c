"""YAML in, MigrationSpec out: a regular file under a size cap, no alias bomb, no duplicate key, no
absurd nesting; pydantic's errors turned into (field path, how to fix it) pairs."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from ..files import FileRefused, read_capped
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
    if not set(raw) & set(MigrationSpec.model_fields):
        # e.g. a credentials file given by mistake: say so without echoing its lines back as field names
        raise SpecError(path, [("(top level)", f"not a dbguard migration spec: none of its {len(raw)} top-level "
                                               "keys is a spec field (name, source, target, tables, ...); "
                                               "see docs/spec.md")])
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
MAX_SPEC_DEPTH = 64  # nested mappings/lists; a real spec nests about 6 deep


class _TooDeep(Exception):
    pass


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Node, again: yaml.Node):
        super().__init__(f"key {key!r} given twice (first on line {first.start_mark.line + 1}); YAML would keep "
                         "only the last one silently: remove one")
        self.problem_mark = again.start_mark


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one silently, so a
    second `name:` would rename the migration). Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first is not key_node:
                    raise _DuplicateKey(key, first, key_node)
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(text: str) -> int:
    """How many values the YAML holds once aliases are expanded, counted without expanding them
    (a "billion laughs" file is a few lines that expand to 10^9 values); _TooDeep past MAX_SPEC_DEPTH."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node, depth: int) -> int:
        if depth > MAX_SPEC_DEPTH:
            raise _TooDeep
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once
        kids = node.value if isinstance(node, yaml.SequenceNode) else \
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else []
        n = 1 + sum(size(k, depth + 1) for k in kids)
        sizes[id(node)] = n
        return n

    return size(root, 0) if root is not None else 0


def load_spec(path: str | Path) -> MigrationSpec:
    p = Path(path)

    def refuse(where: str, msg: str) -> SpecError:
        return SpecError(str(p), [(where, msg)])

    if p.is_dir():
        raise refuse("(file)", "is a directory; pass the path of one migration YAML file, "
                               "e.g. include/migrations/demo_shop.yaml")
    try:  # a regular file of at most the cap: never read a device or a FIFO (it would never end)
        data = read_capped(p, MAX_SPEC_BYTES)
    except FileNotFoundError:
        raise refuse("(file)", "no such file; pass the path of a migration YAML") from None
    except FileRefused as e:
        raise refuse("(file)", f"{e}; pass the path of one migration YAML file (at most {MAX_SPEC_BYTES:,} bytes)") \
            from None
    except OSError as e:
        raise refuse("(file)", f"cannot read it ({e.strerror}); check the path and permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise refuse(f"line {line}", f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                     "save the spec as UTF-8") from None
    try:
        if (n := _expanded_nodes(text)) > MAX_SPEC_NODES:
            raise refuse("(file)", f"expands to {n:,} values through YAML aliases (*name), more than "
                                   f"{MAX_SPEC_NODES:,}: an alias bomb, not a spec; write values out")
        raw = yaml.load(text, Loader=_StrictLoader)
    except (_TooDeep, RecursionError):
        raise refuse("(file)", f"values nested more than {MAX_SPEC_DEPTH} deep (lists or mappings inside each "
                               "other): not a spec; a spec nests about 6 deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = str(e) if isinstance(e, _DuplicateKey) else f"not valid YAML: {getattr(e, 'problem', e)}"
        raise refuse(where, problem) from None
    return parse_spec(raw, str(p))
