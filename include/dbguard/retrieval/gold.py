"""Gold sets: JSONL queries (text and/or vector, anchor, expected ids, paraphrases), validated line by line."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DbguardError
from ..files import FileRefused, read_capped
from ..spec import MigrationSpec


MAX_GOLD_BYTES = 64 << 20  # the demo's 200 queries with 128-dim vectors are 0.9 MB


class GoldSetError(DbguardError):
    """A gold set line is malformed; the message names the file, line and field."""


@dataclass(frozen=True)
class Paraphrase:
    text: str | None = None
    vector: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GoldQuery:
    id: str
    line: int
    text: str | None = None
    vector: np.ndarray | None = field(default=None, compare=False)
    anchor: np.ndarray | None = field(default=None, compare=False)
    expected_ids: tuple[str, ...] = ()
    paraphrases: tuple[Paraphrase, ...] = ()


def _vec(path: str, line: int, name: str, value: Any, dim: int | None) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in value):
        raise GoldSetError(f"{path}:{line}: field {name!r} must be a non-empty list of numbers")
    a = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise GoldSetError(f"{path}:{line}: field {name!r} holds NaN or infinite values")
    if dim is not None and a.shape[0] != dim:
        raise GoldSetError(f"{path}:{line}: field {name!r} has {a.shape[0]} dimensions, the store has {dim}")
    if not np.any(a):
        raise GoldSetError(f"{path}:{line}: field {name!r} is a zero vector (ΔS and cosine are undefined for it)")
    return a


def load_gold(path: str | Path, dim: int | None = None) -> list[GoldQuery]:
    """Read and validate a JSONL gold set; any error names the line number and the field."""
    p = Path(path)
    try:  # a regular file under the cap: never a device or a FIFO (reading it would never end)
        data = read_capped(p, MAX_GOLD_BYTES)
    except FileNotFoundError:
        raise GoldSetError(f"{p}: no such gold set; set gold: in the spec to an existing .jsonl file") from None
    except (FileRefused, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise GoldSetError(f"{p}: {why}; set gold: in the spec to a JSONL file of at most "
                           f"{MAX_GOLD_BYTES:,} bytes") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise GoldSetError(f"{p}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the gold set as UTF-8") from None
    out: list[GoldQuery] = []
    seen: set[str] = set()
    allowed = {"id", "text", "vector", "anchor", "expected_ids", "paraphrases"}
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise GoldSetError(f"{p}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise GoldSetError(f"{p}:{no}: each line must be a JSON object")
        extra = sorted(set(obj) - allowed)
        if extra:
            raise GoldSetError(f"{p}:{no}: unknown field(s) {extra}; allowed: {sorted(allowed)}")
        qid = str(obj.get("id", f"line{no}"))
        if qid in seen:
            raise GoldSetError(f"{p}:{no}: field 'id' {qid!r} repeats an earlier query id")
        seen.add(qid)
        text = obj.get("text")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise GoldSetError(f"{p}:{no}: field 'text' must be a non-empty string")
        vector = _vec(str(p), no, "vector", obj["vector"], dim) if obj.get("vector") is not None else None
        if text is None and vector is None:
            raise GoldSetError(f"{p}:{no}: give field 'text' or field 'vector' (or both)")
        anchor = _vec(str(p), no, "anchor", obj["anchor"], dim) if obj.get("anchor") is not None else None
        exp = obj.get("expected_ids", [])
        if not isinstance(exp, list) or not all(isinstance(x, (int, str)) for x in exp):
            raise GoldSetError(f"{p}:{no}: field 'expected_ids' must be a list of ids")
        paras = []
        for j, para in enumerate(obj.get("paraphrases") or []):
            if isinstance(para, str):
                para = {"text": para}
            if not isinstance(para, dict) or not (para.get("text") or para.get("vector")):
                raise GoldSetError(f"{p}:{no}: field 'paraphrases[{j}]' must be a string or an object with "
                                   "'text' and/or 'vector'")
            pv = _vec(str(p), no, f"paraphrases[{j}].vector", para["vector"], dim) if para.get("vector") else None
            paras.append(Paraphrase(para.get("text"), tuple(pv.tolist()) if pv is not None else None))
        out.append(GoldQuery(qid, no, text, vector, anchor, tuple(str(x) for x in exp), tuple(paras)))
    if not out:
        raise GoldSetError(f"{p}: the gold set has no queries")
    return out


def gold_path(spec: MigrationSpec) -> Path:
    if spec.gold is None:
        raise GoldSetError(f"spec {spec.name}: field 'gold' is not set; point it at include/gold/<name>.jsonl")
    p = Path(spec.gold)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[3] / p
