"""The report's plots: matplotlib (Agg), each returned as a base64 PNG data URI or None when the run
has nothing to draw. Inputs are pandas DataFrames built from the ledger (never table data)."""
from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

GOOD, BAD, PRE, POST = "#2e7d32", "#c62828", "#1f77b4", "#ff7f0e"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rows_per_second(ranges: pd.DataFrame) -> str | None:
    """Each verified range as a point: finish time (s since the first range) vs its copy rate."""
    df = ranges[(ranges["seconds"] > 0) & ranges["rows"].notna()].copy() if len(ranges) else ranges
    if not len(df):
        return None
    df["t"] = (df["updated_at"] - df["updated_at"].min()).dt.total_seconds()
    df["rate"] = df["rows"] / df["seconds"]
    df = df.sort_values("t")
    fig, ax = plt.subplots(figsize=(7, 3))
    for table, g in df.groupby("table_name"):
        ax.plot(g["t"], g["rate"], "o-", ms=4, label=table)
    ax.set(title="Backfill: rows/s per key range", xlabel="time since first range finished (s)",
           ylabel="rows/s")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    return _png(fig)


def table_verdicts(tables: pd.DataFrame) -> str | None:
    """Per table: source vs target row counts, bars coloured by the checksum verdict."""
    if not len(tables):
        return None
    fig, ax = plt.subplots(figsize=(7, max(2.2, 1 + 0.5 * len(tables))))
    y = range(len(tables))
    colors = [GOOD if ok else BAD for ok in tables["checksum equal"]]
    ax.barh([i + 0.2 for i in y], tables["source rows"], height=0.4, color="#bbb", label="source rows")
    ax.barh([i - 0.2 for i in y], tables["target rows"], height=0.4, color=colors, label="target rows")
    ax.set_yticks(list(y), [f"{t} ({'checksum equal' if ok else 'MISMATCH'})"
                            for t, ok in zip(tables["table"], tables["checksum equal"])])
    ax.set(title="Rows per table: source (grey) vs target\n(green: checksum equal, red: mismatch)", xlabel="rows")
    ax.set_xlim(right=max(tables["source rows"].max(), tables["target rows"].max()) * 1.3)
    return _png(fig)


def delta_s(shadow: pd.DataFrame) -> str | None:
    """ΔS (1 - similarity of the top-k lists) pre vs post per gold query, one point per query and seed."""
    df = shadow[shadow["seed"] > 0].dropna(subset=["delta_s_pre", "delta_s_post"]) if len(shadow) else shadow
    if not len(df):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for store, g in df.groupby("store"):
        ax.scatter(g["delta_s_pre"], g["delta_s_post"], s=10, alpha=.6, label=store)
    hi = max(df["delta_s_pre"].max(), df["delta_s_post"].max(), 0.05) * 1.05
    ax.plot([0, hi], [0, hi], color="#888", lw=1, ls="--", label="no change")
    ax.set(title="ΔS per gold query: before vs after migration", xlabel="ΔS pre (source)",
           ylabel="ΔS post (target)", xlim=(0, hi), ylim=(0, hi))
    ax.legend(fontsize=7)
    ax.grid(alpha=.3)
    return _png(fig)


LAMBDA_ORDER = ["→", "<>", "~", "←", "×"]
LAMBDA_COLORS = {"→": GOOD, "<>": "#9ccc65", "~": "#fbc02d", "←": "#ef6c00", "×": BAD}


def lambda_states(shadow: pd.DataFrame) -> str | None:
    """How many gold queries fall in each λ class, per store and seed (stacked bars)."""
    df = shadow[(shadow["seed"] > 0) & shadow["lambda"].notna()] if len(shadow) else shadow
    if not len(df):
        return None
    counts = df.groupby([df["store"] + " seed " + df["seed"].astype(str), "lambda"]).size().unstack(fill_value=0)
    counts = counts[[c for c in LAMBDA_ORDER if c in counts] + [c for c in counts if c not in LAMBDA_ORDER]]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 1.2 + 0.45 * len(counts))))
    counts.plot.barh(stacked=True, ax=ax, color=[LAMBDA_COLORS.get(c, "#999") for c in counts.columns], width=.7)
    ax.set(title="λ states per store and seed (→ convergent … × divergent)", xlabel="gold queries", ylabel="")
    ax.legend(title="λ", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _png(fig)


def latency(shadow: pd.DataFrame) -> str | None:
    """Query latency distributions on the source (pre) and the target (post), milliseconds."""
    df = shadow.dropna(subset=["latency_pre_ms", "latency_post_ms"]) if len(shadow) else shadow
    df = df[df["seed"] > 0] if len(df) else df
    if not len(df):
        return None
    fig, ax = plt.subplots(figsize=(7, 3))
    top = max(df["latency_pre_ms"].quantile(.99), df["latency_post_ms"].quantile(.99))
    bins = [top * i / 40 for i in range(41)]
    ax.hist(df["latency_pre_ms"].clip(upper=top), bins=bins, alpha=.6, color=PRE, label="pre (source)")
    ax.hist(df["latency_post_ms"].clip(upper=top), bins=bins, alpha=.6, color=POST, label="post (target)")
    for col, c in (("latency_pre_ms", PRE), ("latency_post_ms", POST)):
        ax.axvline(df[col].quantile(.95), color=c, ls="--", lw=1)
    ax.set(title="Query latency pre vs post (dashed: p95; clipped at p99)", xlabel="latency (ms)",
           ylabel="queries")
    ax.legend(fontsize=8)
    return _png(fig)


def change_lag(drains: pd.DataFrame, batches: pd.DataFrame) -> str | None:
    """Unapplied change-ledger ops at each drain pass, and cumulative applied ops per apply batch."""
    if not len(drains) and not len(batches):
        return None
    t0 = min(x["at"].min() for x in (drains, batches) if len(x))
    fig, ax = plt.subplots(figsize=(7, 3))
    if len(drains):
        ax.plot((drains["at"] - t0).dt.total_seconds(), drains["lag"], "o-", color=BAD, ms=4,
                label="lag at drain (ops not yet applied)")
    if len(batches):
        b = batches.sort_values("at")
        ax.step((b["at"] - t0).dt.total_seconds(), b["ops"].cumsum(), where="post", color=PRE,
                label="applied ops (cumulative)")
    quiet = (not len(drains) or drains["lag"].max() == 0) and (not len(batches) or batches["ops"].sum() == 0)
    ax.set(title="Change ledger: lag and applied changes over time" + ("\n(no writes were captured)" if quiet else ""),
           xlabel="time since first record (s)", ylabel="change ops")
    ax.set_ylim(0, None if not quiet else 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3)
    return _png(fig)


def cutover_timeline(steps: pd.DataFrame) -> str | None:
    """Cutover (and rollback) steps as a Gantt bar per step, milliseconds from the first step."""
    if not len(steps):
        return None
    df = steps.reset_index(drop=True)
    start = df["ms"].cumsum().shift(fill_value=0)
    fig, ax = plt.subplots(figsize=(7, max(2.2, 1 + 0.35 * len(df))))
    ax.barh(range(len(df)), df["ms"], left=start, color=[GOOD if ok else BAD for ok in df["ok"]])
    ax.set_yticks(range(len(df)), [f"{k}: {s}" for k, s in zip(df["kind"], df["step"])])
    ax.invert_yaxis()
    ax.set(title="Cutover timeline (red: step failed)", xlabel="ms since the first step")
    return _png(fig)
