"""The side-by-side report of a ``contrastive compare`` run.

Input: one *run record* per (loss, seed) cell, a plain dict::

    {"loss": "infonce", "critic": "cosine(t=0.1)", "seed": 0, "status": "ok",
     "metrics": {"recall_at_1": 0.9, ..., "linear_probe": 0.95, "knn_top1": 0.94},
     "readout": {"infonce": 2.1, "nwj": 1.3},     # final I_NCE / I_NWJ readouts, nats
     "train_time_s": 12.3,
     "history": [{"step": 0, "loss": 4.1, "infonce": 0.3, "nwj": -0.2,
                  "recall_at_1": 0.5}, ...]}    # recall_at_1 on evaluation steps only

A failed cell has ``"status": "failed"`` and an ``"error"`` message; its metrics may be missing.

Output (:func:`write_report`): ``results.json`` (records, aggregate, metadata), ``results.csv``
(one row per (loss, critic) with ``*_mean`` / ``*_std`` columns), ``results.md`` (the table of
:func:`format_table`) and three PNG plots: ``map_probe.png`` (MAP@R and linear-probe accuracy per
loss), ``mi_vs_accuracy.png`` (final I_NCE / I_NWJ readout against linear-probe accuracy: the point
of Tschannen et al. 2020, "On Mutual Information Maximization for Representation Learning", that
the MI readout does not predict downstream accuracy) and ``curves.png`` (training curves).

Statistics: the mean and the *sample* standard deviation (``ddof=1``, numpy's
``np.std(x, ddof=1)``) over the successful seeds of a (loss, critic) row; with a single seed the
std is undefined (NaN, shown as the mean alone). Failed cells and missing / non-finite values are
left out of the statistics and reported: ``n_failed`` / ``failed`` per row and a list in the
Markdown file. All files are written atomically with :mod:`contrastive.checkpoint` (temporary
file in the same folder, fsync, ``os.replace``), so an interrupted run never leaves a
half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_bytes, atomic_write_text

__all__ = [
    "METRICS",
    "READOUTS",
    "FIELDS",
    "aggregate",
    "format_table",
    "write_report",
    "plot_map_probe",
    "plot_mi_vs_accuracy",
    "plot_curves",
]

# Retrieval / clustering / classification metrics, all fractions in [0, 1].
METRICS: tuple[str, ...] = (
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "precision_at_1",
    "r_precision",
    "map_at_r",
    "nmi",
    "ami",
    "linear_probe",
    "knn_top1",
)
# Final MI readouts (nats), stored in the aggregate as ``readout_<name>``.
READOUTS: tuple[str, ...] = ("infonce", "nwj")
#: Every aggregated field, in column order.
FIELDS: tuple[str, ...] = METRICS + tuple(f"readout_{r}" for r in READOUTS) + ("train_time_s",)

# (header, field, kind) of the Markdown table; kind: "pct" (x100, 1 decimal), "nats", "sec".
_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("R@1", "recall_at_1", "pct"),
    ("R@2", "recall_at_2", "pct"),
    ("R@4", "recall_at_4", "pct"),
    ("R@8", "recall_at_8", "pct"),
    ("P@1", "precision_at_1", "pct"),
    ("R-Prec", "r_precision", "pct"),
    ("MAP@R", "map_at_r", "pct"),
    ("NMI", "nmi", "pct"),
    ("Linear probe", "linear_probe", "pct"),
    ("k-NN", "knn_top1", "pct"),
    ("I_NCE (nats)", "readout_infonce", "nats"),
    ("I_NWJ (nats)", "readout_nwj", "nats"),
    ("Train time (s)", "train_time_s", "sec"),
)

FILES = {
    "json": "results.json",
    "csv": "results.csv",
    "markdown": "results.md",
    "map_probe": "map_probe.png",
    "mi_vs_accuracy": "mi_vs_accuracy.png",
    "curves": "curves.png",
}


# --------------------------------------------------------------------------- statistics


def _as_float(x: Any) -> float:
    """A finite float, or NaN for anything missing, non-numeric or non-finite."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _field_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The aggregated fields of one record, NaN where absent."""
    metrics = record.get("metrics") or {}
    readout = record.get("readout") or {}
    out = {m: _as_float(metrics.get(m)) for m in METRICS}
    out.update({f"readout_{r}": _as_float(readout.get(r)) for r in READOUTS})
    out["train_time_s"] = _as_float(record.get("train_time_s"))
    return out


def mean_std(values: Sequence[float], ddof: int = 1) -> tuple[float, float, int]:
    """``(mean, std, n)`` over the finite entries of ``values``; ``std = np.std(x, ddof=ddof)``,
    NaN when ``n <= ddof``; both NaN when there is no finite value."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    std = float(x.std(ddof=ddof)) if n > ddof else math.nan
    return mean, std, n


def _status(record: Mapping[str, Any]) -> str:
    return str(record.get("status", "ok"))


def _check_records(records: Any) -> list[Mapping[str, Any]]:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise TypeError(
            f"records must be a list of run-record dicts (one per loss and seed), got "
            f"{type(records).__name__}"
        )
    records = list(records)
    seen: set[tuple[str, str, Any]] = set()
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TypeError(f"records[{i}] must be a dict, got {type(r).__name__}")
        if "loss" not in r or "seed" not in r:
            raise ValueError(
                f"records[{i}] has no 'loss' or 'seed' key; every record needs at least "
                f"{{'loss': name, 'seed': int}}"
            )
        if _status(r) not in ("ok", "failed"):
            raise ValueError(
                f"records[{i}]['status'] must be 'ok' or 'failed', got {r['status']!r}"
            )
        key = (str(r["loss"]), str(r.get("critic", "")), r["seed"])
        if key in seen:
            raise ValueError(
                f"records[{i}] repeats the cell loss={key[0]!r}, critic={key[1]!r}, "
                f"seed={key[2]!r}; keep one record per (loss, critic, seed)"
            )
        seen.add(key)
    return records


def aggregate(records: Iterable[Mapping[str, Any]], ddof: int = 1) -> list[dict[str, Any]]:
    """One row per (loss, critic), in the order the losses first appear in ``records``.

    Each row has ``loss``, ``critic``, ``n_seeds`` (successful cells), ``seeds``, ``n_failed``,
    ``failed`` (``[{"seed", "error"}]``), ``n_missing`` (``{field: count}`` of successful cells
    without a finite value) and, for every field ``f`` in :data:`FIELDS`, ``f_mean`` and
    ``f_std`` = ``np.mean(x)``, ``np.std(x, ddof=ddof)`` over the finite values of the successful
    cells (sample std by default; NaN when fewer than ``ddof + 1`` values).
    """
    records = _check_records(records)
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof!r}")
    # A failed cell may carry no critic (the loss could not be built): it joins the first row of
    # its loss. Rows follow the losses' first appearance, then the critics'.
    first_seen: dict[str, int] = {}
    for i, r in enumerate(records):
        first_seen.setdefault(str(r["loss"]), i)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    orphans = []
    for r in records:
        if _status(r) != "ok" and not r.get("critic"):
            orphans.append(r)
        else:
            groups.setdefault((str(r["loss"]), str(r.get("critic", ""))), []).append(r)
    for r in orphans:
        key = next((k for k in groups if k[0] == str(r["loss"])), (str(r["loss"]), ""))
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=lambda k: first_seen[k[0]])  # stable: critics keep their order
    rows = []
    for loss, critic in keys:
        cells = groups[(loss, critic)]
        ok = [c for c in cells if _status(c) == "ok"]
        bad = [c for c in cells if _status(c) != "ok"]
        values = [_field_values(c) for c in ok]
        row: dict[str, Any] = {
            "loss": loss,
            "critic": critic,
            "n_seeds": len(ok),
            "seeds": [c["seed"] for c in ok],
            "n_failed": len(bad),
            "failed": [{"seed": c["seed"], "error": str(c.get("error", ""))} for c in bad],
        }
        missing = {}
        for f in FIELDS:
            mean, std, n = mean_std([v[f] for v in values], ddof)
            row[f"{f}_mean"], row[f"{f}_std"] = mean, std
            if n < len(ok):
                missing[f] = len(ok) - n
        row["n_missing"] = missing
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- table


def _fmt(mean: float, std: float, kind: str) -> str:
    if not math.isfinite(mean):
        return "—"
    scale, digits = {"pct": (100.0, 1), "nats": (1.0, 2), "sec": (1.0, 1)}[kind]
    text = f"{mean * scale:.{digits}f}"
    if math.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def _footnote(rows: Sequence[Mapping[str, Any]], ddof: int) -> list[str]:
    done = [r for r in rows if int(r["n_seeds"]) > 0]
    ns = sorted({int(r["n_seeds"]) for r in done})
    if not done:
        seeds = "seeds: no cell finished"
    elif len(ns) == 1 and len(done) == len(rows):
        seeds = f"{ns[0]} seed{'s' if ns[0] != 1 else ''} per loss"
    else:
        seeds = "successful seeds per loss: " + ", ".join(
            f"{r['loss']} {r['n_seeds']}" for r in rows)
    std = "sample std, ddof=1" if ddof == 1 else "population std, ddof=0"
    lines = [
        f"Mean ± std over {seeds} ({std}; a single seed shows the mean alone). "
        "Retrieval, clustering and accuracy columns in %: Recall@K and Precision@1 / "
        "R-Precision / MAP@R from k-NN retrieval on the test split, NMI of k-means clusters, "
        "linear-probe and weighted k-NN classification accuracy on frozen embeddings. "
        "I_NCE and I_NWJ are the final readouts, in nats, of the InfoNCE and NWJ lower bounds "
        "on mutual information computed from each loss's own critic scores on a training batch "
        "(I_NCE cannot exceed log of the batch size); a higher readout does not mean a better "
        "representation (Tschannen et al., ICLR 2020).",
    ]
    failed = [(r["loss"], f["seed"]) for r in rows for f in r.get("failed", [])]
    if failed:
        cells = ", ".join(f"{loss} seed {seed}" for loss, seed in failed)
        lines.append(f"Failed cells, left out of the statistics: {cells}.")
    missing = [(r["loss"], r["n_missing"]) for r in rows if r.get("n_missing")]
    if missing:
        parts = "; ".join(
            f"{loss}: " + ", ".join(f"{k} ×{v}" for k, v in m.items()) for loss, m in missing
        )
        lines.append(f"Missing or non-finite values, left out: {parts}.")
    return lines


def format_table(
    rows: Sequence[Mapping[str, Any]], *, footnote: bool = True, ddof: int = 1
) -> str:
    """The Markdown table of :func:`aggregate`'s rows (columns padded so it also reads in a
    terminal), followed by a footnote on seeds, units and readouts unless ``footnote=False``.
    ``ddof`` only words the footnote; pass the value the rows were aggregated with."""
    header = ["Loss", "Critic"] + [h for h, _, _ in _TABLE_COLUMNS]
    body = []
    for r in rows:
        name = str(r["loss"])
        if int(r.get("n_failed", 0)) and int(r.get("n_seeds", 0)):
            name += f" ({int(r['n_failed'])} failed)"  # the mean is over fewer seeds: say so
        cells = [name, str(r.get("critic", ""))]
        if int(r.get("n_seeds", 0)) == 0:
            cells += ["failed"] + ["—"] * (len(_TABLE_COLUMNS) - 1)
        else:
            cells += [
                _fmt(r.get(f"{f}_mean", math.nan), r.get(f"{f}_std", math.nan), k)
                for _, f, k in _TABLE_COLUMNS
            ]
        body.append(cells)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 2)) if i < 2 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
    ) + "|"
    text = "\n".join([line(header), rule] + [line(b) for b in body])
    if footnote and rows:
        text += "\n\n" + "\n\n".join(_footnote(rows, ddof))
    return text


# --------------------------------------------------------------------------- files


def _jsonable(x: Any) -> Any:
    """Plain JSON: NaN / Inf become ``null``, numpy and torch scalars Python numbers, paths
    strings, tuples and sets lists."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "item") and callable(x.item):  # torch / numpy 0-d
        try:
            return _jsonable(x.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(x)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = ["loss", "critic", "n_seeds", "n_failed"]
    for f in FIELDS:
        columns += [f"{f}_mean", f"{f}_std"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([
            repr(float(r[c])) if isinstance(r[c], float) else r[c] for c in columns
        ])
    return buf.getvalue()


def _markdown(
    rows: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    title: str,
    ddof: int,
    plots: Sequence[str],
) -> str:
    parts = [f"# {title}", "", format_table(rows, ddof=ddof)]
    failed = [r for r in records if _status(r) != "ok"]
    if failed:
        parts += ["", "## Failed cells", ""]
        for r in failed:
            err = " ".join(str(r.get("error") or "no error message").split())
            err = err if len(err) <= 300 else err[:297] + "..."
            parts.append(f"- `{r['loss']}` seed {r['seed']}: {err}")
    if plots:
        parts += ["", "## Plots", ""]
        captions = {
            "map_probe.png": "MAP@R and linear-probe accuracy per loss",
            "mi_vs_accuracy.png": "final MI readout vs linear-probe accuracy",
            "curves.png": "training curves",
        }
        parts += [f"![{captions.get(p, p)}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def write_report(
    records: Iterable[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    title: str | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    ddof: int = 1,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and (``plots=True``) the PNG plots
    into ``output_dir`` (created if needed); returns ``{kind: path}`` with kinds ``json``,
    ``csv``, ``markdown``, ``map_probe``, ``mi_vs_accuracy``, ``curves``.

    ``results.json`` holds ``{"title", "created", "ddof", "meta", "aggregate", "records"}``;
    NaN values are written as ``null`` (strict JSON). ``meta`` is any JSON-able dict (config,
    versions, wall time...).
    """
    records = _check_records(records)
    if not records:
        raise ValueError("records is empty: there is nothing to report; run at least one cell")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict (config, versions, wall time...), got "
                        f"{type(meta).__name__}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} exists and is not a folder; pick another path")
    out.mkdir(parents=True, exist_ok=True)
    title = title or "Contrastive losses side by side"
    rows = aggregate(records, ddof=ddof)
    paths = {k: out / v for k, v in FILES.items()}

    if plots:
        for kind, fn in (
            ("map_probe", plot_map_probe),
            ("mi_vs_accuracy", plot_mi_vs_accuracy),
            ("curves", plot_curves),
        ):
            atomic_write_bytes(paths[kind], _png(fn(rows, records)))
    else:
        for kind in ("map_probe", "mi_vs_accuracy", "curves"):
            paths.pop(kind)
    payload = {
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ddof": ddof,
        "meta": dict(meta or {}),
        "aggregate": rows,
        "records": records,
    }
    atomic_write_text(
        paths["json"], json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n"
    )
    atomic_write_text(paths["csv"], _csv_text(rows))
    plot_files = [paths[k].name for k in ("map_probe", "mi_vs_accuracy", "curves") if k in paths]
    atomic_write_text(paths["markdown"], _markdown(rows, records, title, ddof, plot_files))
    return paths


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    """A figure on the Agg canvas, without pyplot's global state (safe in any backend), with an
    ``nrows x ncols`` array of axes (none when ``ncols=0``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False) if ncols else None
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _label(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The loss name, plus the critic when one loss appears with several critics."""
    dup = sum(r["loss"] == row["loss"] for r in rows) > 1
    return f"{row['loss']} [{row['critic']}]" if dup else str(row["loss"])


def _no_data(ax, text: str = "no successful runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _err(std: float) -> float:
    return std if math.isfinite(std) else 0.0


def plot_map_probe(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping] = ()):
    """Grouped bars: MAP@R and linear-probe accuracy (%) per loss, mean ± std over seeds."""
    rows = [r for r in rows if r["n_seeds"] > 0]
    fig, axes = _figure(max(6.0, 1.05 * len(rows) + 2.5), 4.2)
    ax = axes[0, 0]
    if not rows:
        _no_data(ax)
        return fig
    x = np.arange(len(rows))
    width = 0.38
    series = (("map_at_r", "MAP@R", "#4C72B0"), ("linear_probe", "linear-probe accuracy",
                                                 "#DD8452"))
    for j, (f, name, color) in enumerate(series):
        m = np.array([r[f"{f}_mean"] for r in rows]) * 100
        s = np.array([_err(r[f"{f}_std"]) for r in rows]) * 100
        pos = x + (j - 0.5) * width
        bars = ax.bar(pos, np.nan_to_num(m), width, yerr=s, capsize=3, color=color, label=name,
                      error_kw={"elinewidth": 1, "ecolor": "0.2"})
        for b, v, e in zip(bars, m, s):
            if math.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + e + 1, f"{v:.1f}", ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, [_label(r, rows) for r in rows], rotation=20 if len(rows) > 5 else 0,
                  ha="right" if len(rows) > 5 else "center")
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.set_title("Retrieval (MAP@R) and linear-probe accuracy per loss (mean ± std over seeds)",
                 fontsize=10)
    ax.legend(loc="upper left", ncols=2, fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        return math.nan

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for u in np.unique(v):  # average ties
            r[v == u] = r[v == u].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def plot_mi_vs_accuracy(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping] = ()):
    """Two panels: final I_NCE (left) and I_NWJ (right) readout against linear-probe accuracy,
    one labelled point per loss with std error bars on both axes, Spearman's rho in the title."""
    all_rows = list(rows)
    colors = dict(zip([id(r) for r in all_rows], _colors(len(all_rows))))
    rows = [r for r in all_rows if r["n_seeds"] > 0]
    fig, axes = _figure(11.0, 4.6, ncols=2)
    for ax, (field, name) in zip(axes[0], (("readout_infonce", "I_NCE"),
                                           ("readout_nwj", "I_NWJ"))):
        pts = [r for r in rows if math.isfinite(r[f"{field}_mean"])
               and math.isfinite(r["linear_probe_mean"])]
        if not pts:
            _no_data(ax, f"no finite {name} readout and probe accuracy")
            ax.set_title(f"final {name} readout vs linear-probe accuracy", fontsize=10)
            continue
        xs = np.array([r[f"{field}_mean"] for r in pts])
        ys = np.array([r["linear_probe_mean"] for r in pts]) * 100
        for r, x, y in zip(pts, xs, ys):
            ax.errorbar(x, y, xerr=_err(r[f"{field}_std"]), yerr=_err(r["linear_probe_std"]) * 100,
                        fmt="o", ms=7, capsize=3, color=colors[id(r)], ecolor="0.5")
            ax.annotate(_label(r, rows), (x, y), xytext=(6, 5), textcoords="offset points",
                        fontsize=8)
        rho = _spearman(xs, ys)
        rho_txt = (f"\nSpearman ρ = {rho:+.2f} over {len(pts)} losses" if math.isfinite(rho)
                   else "")
        ax.set_title(f"final {name} readout vs linear-probe accuracy{rho_txt}", fontsize=10)
        ax.set_xlabel(f"{name} readout (nats, training batch)")
        ax.set_ylabel("linear-probe accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.18, y=0.15)
    fig.suptitle("A higher MI readout does not mean a better representation "
                 "(mean ± std over seeds)", fontsize=11)
    return fig


def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], key: str):
    """``(steps, mean over seeds)`` of ``key`` at every step where some seed has a finite value."""
    by_step: dict[float, list[float]] = {}
    for h in histories:
        for e in h or ():
            if not isinstance(e, Mapping) or "step" not in e:
                continue
            v = _as_float(e.get(key))
            if math.isfinite(v):
                by_step.setdefault(float(e["step"]), []).append(v)
    steps = np.array(sorted(by_step))
    return steps, np.array([np.mean(by_step[s]) for s in steps])


def _smooth(y: np.ndarray, points: int = 60) -> tuple[np.ndarray, int]:
    """Trailing moving average with a window of ``len(y) // points`` (1 = no smoothing)."""
    w = max(1, y.size // points)
    if w == 1:
        return y, 1
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    out[w - 1:] = (c[w:] - c[:-w]) / w
    out[: w - 1] = c[1:w] / np.arange(1, w)
    return out, w


def plot_curves(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]):
    """Training curves, mean over the successful seeds of each loss: the I_NCE readout and
    Recall@1 (evaluation steps, when logged) of all losses on shared axes in the top row, then
    one small panel per loss for its own training loss (the losses live on different scales)."""
    all_rows = list(rows)
    color_of = dict(zip([(r["loss"], r["critic"]) for r in all_rows], _colors(len(all_rows))))
    hist: dict[tuple[str, str], list] = {}
    for rec in records:
        if _status(rec) == "ok" and rec.get("history"):
            hist.setdefault((str(rec["loss"]), str(rec.get("critic", ""))), []).append(
                rec["history"])
    series = [(r, hist[(r["loss"], r["critic"])]) for r in all_rows
              if (r["loss"], r["critic"]) in hist]
    n = len(series)
    ncols = 4 if n > 6 else max(2, min(3, n))
    loss_rows = max(1, math.ceil(n / ncols))
    fig, _ = _figure(3.3 * ncols, 3.0 * (1 + loss_rows), ncols=0)
    if not series:
        fig.set_size_inches(5.0, 3.0)
        _no_data(fig.add_subplot(), "no training history")
        return fig
    gs = fig.add_gridspec(1 + loss_rows, ncols)

    top = [("infonce", "I_NCE readout (nats)"), ("recall_at_1", "Recall@1 (eval, %)")]
    half = max(1, ncols // 2)
    shared = [fig.add_subplot(gs[0, :half]), fig.add_subplot(gs[0, half:])]
    for ax, (key, name) in zip(shared, top):
        drawn, window = False, 1
        for r, hs in series:
            steps, y = _mean_curve(hs, key)
            if steps.size == 0:
                continue
            color = color_of[(r["loss"], r["critic"])]
            if key == "recall_at_1":
                ax.plot(steps, y * 100, "o-", ms=3, lw=1.4, color=color, label=_label(r, all_rows))
            else:
                ys, window = _smooth(y)
                ax.plot(steps, ys, lw=1.4, color=color, label=_label(r, all_rows))
            drawn = True
        if not drawn:
            _no_data(ax, f"no {name} logged")
            ax.set_title(name, fontsize=10)
            continue
        suffix = f" — moving avg of {window} steps" if window > 1 else ""
        ax.set_title(name + suffix, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, labels = shared[0].get_legend_handles_labels()
    if not handles:
        handles, labels = shared[1].get_legend_handles_labels()
    if handles:
        shared[1].legend(handles, labels, fontsize=7, frameon=False, loc="center left",
                         bbox_to_anchor=(1.01, 0.5))

    for i, (r, hs) in enumerate(series):
        ax = fig.add_subplot(gs[1 + i // ncols, i % ncols])
        steps, y = _mean_curve(hs, "loss")
        if steps.size == 0:
            _no_data(ax, "no loss logged")
        else:
            ys, window = _smooth(y)
            ax.plot(steps, ys, lw=1.3, color=color_of[(r["loss"], r["critic"])])
            ax.grid(alpha=0.3)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        ax.set_title(f"{_label(r, all_rows)}: training loss", fontsize=9)
    fig.suptitle(f"Training curves, mean over seeds ({n} losses)", fontsize=11)
    return fig
