"""Names that are valid but may not be what they seem: Cyrillic or Greek letters that look Latin, fullwidth
forms, zero-width and other invisible characters. PostgreSQL accepts them all (the spec does too, since
ORMs use any identifier), so `validate` only warns, naming each suspicious code point."""
from __future__ import annotations

import typing
import unicodedata
from typing import Any, Iterator

from pydantic import AfterValidator, BaseModel

from .fields import _name

# Letters of other scripts drawn like a Latin one (Unicode's confusables, the common part).
_LOOKS_LATIN = dict(zip(
    "аеорсухіјѕԁһԛԝӏАВЕКМНОРСТХІЈЅԜ" "οινρΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxijsdhqwlABEKMHOPCTXIJSW" "oivpABEZHIKMNOPTYX"))


def _latin_twin(ch: str) -> str | None:
    """The ASCII letter `ch` passes for, or None."""
    if ch.isascii():
        return None
    folded = unicodedata.normalize("NFKC", ch)  # fullwidth and mathematical letters fold to ASCII
    return _LOOKS_LATIN.get(ch) or (folded if folded.isascii() and folded.isalnum() else None)


def _invisible(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cf", "Cc", "Co", "Cn") or (cat.startswith("Z") and ch != " ")


def _cp(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


def suspicious(name: str) -> str | None:
    """Why `name` may not be what it seems, or None: invisible characters always; look-alike letters when the
    name also has Latin letters, or has only look-alikes (an all-Cyrillic 'асе' reads as 'ace')."""
    hidden = sorted({ch for ch in name if _invisible(ch)})
    twins = {ch: t for ch in name if (t := _latin_twin(ch))}
    letters = [ch for ch in name if ch.isalpha()]
    has_latin = any(ch.isascii() for ch in letters)
    if twins and not has_latin and not all(ch in twins for ch in letters):
        twins = {}
    parts = [f"invisible {_cp(ch)}" for ch in hidden]
    parts += [f"{_cp(ch)}, which looks like Latin {t!r}" for ch, t in sorted(twins.items())]
    if not parts:
        return None
    return (f"{name!r} holds " + "; ".join(parts) + ". Valid, but a person reading the spec sees another name: "
            "check it is the name the database spells, or retype it")


def _is_name(field) -> bool:
    """The field holds Name values (alone, in a list or optional)."""
    stack: list[Any] = [field.annotation, *field.metadata]
    while stack:
        t = stack.pop()
        if isinstance(t, AfterValidator) and t.func is _name:
            return True
        stack.extend(typing.get_args(t))
        stack.extend(getattr(t, "__metadata__", ()))
    return False


def _label(item: Any, index: int) -> str:
    for key in ("name", "column"):
        if isinstance(getattr(item, key, None), str):
            return getattr(item, key)
    return str(index)


def _walk(model: BaseModel, path: str) -> Iterator[tuple[str, str]]:
    for attr, field in type(model).model_fields.items():
        value, where = getattr(model, attr), f"{path}.{field.alias or attr}" if path else (field.alias or attr)
        if _is_name(field):
            for name in value if isinstance(value, list) else [value]:
                if isinstance(name, str) and (why := suspicious(name)):
                    yield where, why
        elif isinstance(value, BaseModel):
            yield from _walk(value, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk(item, f"{where}[{_label(item, i)}]")


def suspicious_names(spec: BaseModel) -> list[tuple[str, str]]:
    """(field path, why) for each Name in the spec that holds invisible or look-alike characters."""
    return list(_walk(spec, ""))
