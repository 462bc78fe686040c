"""The demo corpus: standard-library docstrings, embedded offline with TF-IDF + TruncatedSVD.

Real text that needs no download. The order is fixed (module list, then sorted
names), the SVD has a fixed random_state, so the same Python version gives the
same documents, ids and vectors. Vectors are raw (not unit length), like many
embedding models' outputs: the demo migration normalises them.
"""
from __future__ import annotations

import importlib
import inspect
import io
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql

from .db import connect

MODULES = (
    "abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections "
    "collections.abc colorsys concurrent.futures configparser contextlib copy csv dataclasses datetime "
    "decimal difflib dis doctest email email.message email.utils enum filecmp fnmatch fractions "
    "functools getopt gettext glob graphlib gzip hashlib heapq hmac html html.parser http.client "
    "http.cookies http.server imaplib importlib inspect io ipaddress itertools json json.decoder "
    "keyword linecache locale logging logging.handlers lzma mailbox math mimetypes mmap "
    "multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pkgutil platform "
    "plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors "
    "shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string "
    "struct subprocess sysconfig tarfile tempfile textwrap threading time timeit token tokenize "
    "trace traceback tracemalloc types typing unicodedata unittest unittest.mock urllib.parse "
    "urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile "
    "zipimport zlib zoneinfo"
).split()

EMBED_MODEL_VER = "tfidf-svd-stdlib-v1"
_SENTENCE = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class Doc:
    id: int
    title: str
    body: str


def _objects(mod) -> list[tuple[str, Any]]:
    out = [(mod.__name__, mod)]
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) not in (mod.__name__, "_" + mod.__name__.split(".")[-1]):
            continue
        out.append((f"{mod.__name__}.{name}", obj))
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                m = vars(obj)[mname]
                if not mname.startswith("_") and (inspect.isfunction(m) or inspect.ismethoddescriptor(m)):
                    out.append((f"{mod.__name__}.{name}.{mname}", m))
    return out


def documents(max_docs: int = 3000, min_chars: int = 60) -> list[Doc]:
    """Docstrings of the modules in MODULES, in a fixed order, de-duplicated, ids 1..n."""
    docs: list[Doc] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in MODULES:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # pragma: no cover - a module missing from this build of Python
                continue
            for title, obj in _objects(mod):
                body = inspect.getdoc(obj) or ""
                body = " ".join(body.split())
                if len(body) < min_chars or body in seen:
                    continue
                seen.add(body)
                docs.append(Doc(len(docs) + 1, title, body))
                if len(docs) >= max_docs:
                    return docs
    return docs


class Embedder:
    """LSA (TF-IDF + TruncatedSVD) fitted on the corpus; `embed(texts)` gives raw float32 vectors.

    Like a mean-pooling sentence model without a final normalisation, the raw output's
    length is close to 1 but depends on the text's length (within about ±2 %): L2 search on
    raw vectors and cosine search on normalised ones then mean nearly the same, which is
    what the demo migration (L2 raw -> cosine normalised) must show.
    """

    def __init__(self, docs: list[Doc], dim: int = 128, random_state: int = 0):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.dim = dim
        self.tfidf = TfidfVectorizer(stop_words="english", min_df=2, max_df=0.5, sublinear_tf=True)
        x = self.tfidf.fit_transform([_text(d) for d in docs])
        self.svd = TruncatedSVD(n_components=dim, random_state=random_state, n_iter=7)
        self.svd.fit(x)
        lengths = np.log1p([len(_text(d).split()) for d in docs])
        self._len_mean, self._len_std = float(lengths.mean()), float(lengths.std() or 1.0)
        self.doc_vectors = self._raw(self.svd.transform(x), [_text(d) for d in docs])

    def _raw(self, z: np.ndarray, texts: list[str]) -> np.ndarray:
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        unit = np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)
        scale = 1 + 0.02 * np.tanh((np.log1p([len(t.split()) for t in texts]) - self._len_mean) / self._len_std)
        return (unit * scale[:, None]).astype(np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._raw(self.svd.transform(self.tfidf.transform(texts)), texts)


@lru_cache(maxsize=4)
def corpus(dim: int = 128, max_docs: int = 3000) -> tuple[list[Doc], Embedder]:
    """The documents and the fitted embedder (cached: fitting takes about a second)."""
    docs = documents(max_docs)
    return docs, Embedder(docs, dim)


def _text(d: Doc) -> str:
    return f"{d.title.replace('.', ' ').replace('_', ' ')} {d.body}"


def _vec_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in v.tolist()) + "]"


def load_docs(conn_id_or_dsn: str, *, dim: int = 128, max_docs: int = 3000, schema: str = "docs",
              table: str = "documents", config: str = "english", norm_spread: float | None = None) -> dict[str, Any]:
    """Create `docs.documents` on the source with an L2 HNSW index and an FTS GIN index; fill it.
    norm_spread: rescale each vector to length 1 ± norm_spread by its document's length (as embedders
    that leave long documents long do), instead of the corpus's ±2 %; a cosine search is unchanged."""
    docs, emb = corpus(dim, max_docs)
    vectors = emb.doc_vectors
    if norm_spread is not None:
        z = (np.log1p([len(_text(d).split()) for d in docs]) - emb._len_mean) / emb._len_std
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = (unit * (1 + norm_spread * np.tanh(z))[:, None]).astype(np.float32)
    t = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(table))
    with connect(conn_id_or_dsn) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(t))
        conn.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL, "
                             "embedding vector({}), tsv tsvector)").format(t, sql.Literal(dim)))
        with conn.cursor().copy(sql.SQL("COPY {} (id, title, body, embedding) FROM STDIN").format(t)) as cp:
            for d, v in zip(docs, vectors):
                cp.write_row((d.id, d.title, d.body, _vec_text(v)))
        conn.execute(sql.SQL("UPDATE {} SET tsv = to_tsvector({}::regconfig, title || ' ' || body)").format(
            t, sql.Literal(config)))
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding vector_l2_ops)").format(
            sql.Identifier(f"{table}_embedding_l2_idx"), t))
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING gin (tsv)").format(
            sql.Identifier(f"{table}_tsv_idx"), t))
        conn.commit()
        conn.execute(sql.SQL("ANALYZE {}").format(t))
        conn.commit()
    return {"rows": len(docs), "dim": dim, "embed_model": EMBED_MODEL_VER}


def _first_sentence(body: str) -> str:
    s = _SENTENCE.split(body, maxsplit=1)[0]
    return " ".join(s.split()[:16])


def _paraphrases(title: str, sentence: str) -> list[str]:
    """Two cheap rewordings: the sentence's words reversed in halves, and a shortened form with the name."""
    words = sentence.rstrip(".").split()
    half = len(words) // 2
    reordered = " ".join(words[half:] + words[:half])
    short = " ".join([title.split(".")[-1].replace("_", " ")] + words[: max(4, len(words) // 2)])
    return [reordered, short]


def build_gold(path: str | Path, *, dim: int = 128, max_docs: int = 3000, n_queries: int = 200,
               decimals: int = 5) -> int:
    """Write the gold set: every (n_docs // n_queries)-th document becomes a query (deterministic)."""
    docs, emb = corpus(dim, max_docs)
    step = max(1, len(docs) // n_queries)
    picked = [d for d in docs[::step] if len(_first_sentence(d.body).split()) >= 4][:n_queries]
    texts, paras = [], []
    for d in picked:
        texts.append(_first_sentence(d.body))
        paras.append(_paraphrases(d.title, texts[-1]))
    qv = emb.embed(texts)
    pv = emb.embed([p for ps in paras for p in ps]).reshape(len(picked), 2, dim)
    buf = io.StringIO()
    r = lambda v: [round(float(x), decimals) for x in v]  # noqa: E731
    for i, d in enumerate(picked):
        line = {"id": f"q{i + 1:03d}", "text": texts[i], "vector": r(qv[i]), "anchor": r(emb.doc_vectors[d.id - 1]),
                "expected_ids": [d.id],
                "paraphrases": [{"text": p, "vector": r(pv[i, j])} for j, p in enumerate(paras[i])]}
        buf.write(json.dumps(line, separators=(",", ":")) + "\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(buf.getvalue(), encoding="utf-8")
    return len(picked)


def main() -> None:  # python -m dbguard.corpus: regenerate include/gold/demo_docs.jsonl
    root = Path(__file__).resolve().parents[2]
    n = build_gold(root / "include" / "gold" / "demo_docs.jsonl")
    print(f"wrote {n} gold queries")


if __name__ == "__main__":
    main()
