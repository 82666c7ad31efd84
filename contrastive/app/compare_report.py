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
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..jsonsafe import to_jsonable
from .compare_plots import (
    _as_float,
    _label,
    _png,
    _status,
    plot_curves,
    plot_map_probe,
    plot_mi_vs_accuracy,
    plot_tuning_history,
)
from .results import format_mean_std, markdown_table, mean_std

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
    "aggregate_ci",
    "ci_column",
    "significance",
    "format_tuned_table",
    "write_tuned_report",
    "plot_tuning_history",
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


def _field_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The aggregated fields of one record, NaN where absent."""
    metrics = record.get("metrics") or {}
    readout = record.get("readout") or {}
    out = {m: _as_float(metrics.get(m)) for m in METRICS}
    out.update({f"readout_{r}": _as_float(readout.get(r)) for r in READOUTS})
    out["train_time_s"] = _as_float(record.get("train_time_s"))
    return out


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


def _failed_note(row: Mapping[str, Any]) -> str:
    """``" (n failed)"`` after a loss name when some of its cells failed and some did not: its
    statistics are over fewer seeds than the others'. Empty otherwise (a row with no
    successful cell says ``failed`` in its cells)."""
    n = int(row.get("n_failed", 0))
    return f" ({n} failed)" if n and int(row.get("n_seeds", 0)) else ""


def _fmt(mean: float, std: float, kind: str) -> str:
    scale, digits = {"pct": (100.0, 1), "nats": (1.0, 2), "sec": (1.0, 1)}[kind]
    return format_mean_std(mean, std, f".{digits}f", scale=scale, missing="—")


def _spread(row: Mapping[str, Any], f: str) -> float:
    """``row``'s std of field ``f``; NaN when fewer than two seeds have a value: one seed has no
    measured spread, whatever the ``ddof`` (``ddof=0`` would give ``0.0``)."""
    n = int(row.get("n_seeds", 0)) - int((row.get("n_missing") or {}).get(f, 0))
    return row.get(f"{f}_std", math.nan) if n >= 2 else math.nan


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
        cells = [str(r["loss"]) + _failed_note(r), str(r.get("critic", ""))]
        if int(r.get("n_seeds", 0)) == 0:
            cells += ["failed"] + ["—"] * (len(_TABLE_COLUMNS) - 1)
        else:
            cells += [
                _fmt(r.get(f"{f}_mean", math.nan), _spread(r, f), k)
                for _, f, k in _TABLE_COLUMNS
            ]
        body.append(cells)
    text = markdown_table(header, body, align="ll" + "r" * len(_TABLE_COLUMNS), pad=True)
    if footnote and rows:
        text += "\n\n" + "\n\n".join(_footnote(rows, ddof))
    return text


# --------------------------------------------------------------------------- files


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


def _code(text: str) -> str:
    """``text`` (line breaks as spaces) as one Markdown inline code span whatever it holds
    (CommonMark 0.31, section 6.1): fenced by one backtick more than its longest run of
    backticks, and padded with a space inside each fence when it begins or ends with a backtick
    or a space (a parser strips one such pair of spaces, so the text reads back unchanged)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if not text or text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _one_line(message: object, limit: int = 300) -> str:
    """An error message on one line (runs of white space as one space), cut to ``limit``
    characters with ``...`` at the end when it is longer."""
    text = " ".join(str(message or "no error message").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failed_section(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The Markdown lines of the "Failed cells" section (none when every cell succeeded): one
    item per failed cell, its loss as inline code, its seed and its error on one line."""
    failed = [r for r in records if _status(r) != "ok"]
    if not failed:
        return []
    return ["", "## Failed cells", ""] + [
        f"- {_code(r['loss'])} seed {r['seed']}: {_one_line(r.get('error'))}" for r in failed]


def _output_folder(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as a folder, created if needed; ``ValueError`` naming the path when it is
    a file."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} exists and is not a folder; pick another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _markdown(
    rows: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    title: str,
    ddof: int,
    plots: Sequence[str],
) -> str:
    parts = [f"# {title}", "", format_table(rows, ddof=ddof), *_failed_section(records)]
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
    out = _output_folder(output_dir)
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
        paths["json"], json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n"
    )
    atomic_write_text(paths["csv"], _csv_text(rows))
    plot_files = [paths[k].name for k in ("map_probe", "mi_vs_accuracy", "curves") if k in paths]
    atomic_write_text(paths["markdown"], _markdown(rows, records, title, ddof, plot_files))
    return paths


# --------------------------------------------------------------------------- the tuned report

TUNED_FILES = {**FILES, "tuning_history": "tuning_history.png"}

# (header, field) of the tuned table; every value in % with its 95% t-interval half width.
_TUNED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("MAP@R", "map_at_r"),
    ("R@1", "recall_at_1"),
    ("R-Prec", "r_precision"),
    ("NMI", "nmi"),
    ("Linear probe", "linear_probe"),
    ("k-NN", "knn_top1"),
)
#: The metrics whose indistinguishable-from-best set is reported.
SIGNIFICANCE_METRICS = ("map_at_r", "linear_probe")


def ci_column(confidence: float) -> str:
    """The suffix of the half-width column of a ``confidence`` interval: ``"ci"`` and the
    percentage with up to six significant digits, ``ci95`` for 0.95, ``ci90``, ``ci99``,
    ``ci99.9`` for 0.999."""
    return f"ci{100.0 * float(confidence):.6g}"


def aggregate_ci(records: Iterable[Mapping[str, Any]], confidence: float = 0.95
                 ) -> list[dict[str, Any]]:
    """:func:`aggregate`'s rows with, for every field ``f``, the half width of the two-sided
    Student-t ``confidence`` interval over the successful seeds
    (:func:`contrastive.app.statistics.t_interval`), ``f_ci_low`` and ``f_ci_high``.

    The half-width column is named after the confidence used (:func:`ci_column`): ``f_ci95``
    at the default 0.95 -- the column of the tuned report's files, tables and plots
    (``err="ci95"``) -- and e.g. ``f_ci90`` at 0.9, so that no column claims a 95% interval it
    does not hold. ``confidence`` must lie in (0, 1) (``ValueError``)."""
    from .statistics import t_interval

    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not (
            0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
    half = ci_column(confidence)
    records = _check_records(records)
    rows = aggregate(records)
    for row in rows:
        ok = [r for r in records if _status(r) == "ok" and str(r["loss"]) == row["loss"]
              and str(r.get("critic", "")) == row["critic"]]
        values = [_field_values(r) for r in ok]
        for f in FIELDS:
            iv = t_interval([v[f] for v in values], confidence)
            row[f"{f}_{half}"], row[f"{f}_ci_low"], row[f"{f}_ci_high"] = (iv.half_width, iv.low,
                                                                           iv.high)
    return rows


def significance(records: Iterable[Mapping[str, Any]], metric: str, alpha: float = 0.05
                 ) -> dict[str, Any]:
    """:func:`contrastive.app.statistics.indistinguishable_from_best` of ``metric`` over the
    seeds of each (loss, critic) row of :func:`aggregate` (successful cells only), in the rows'
    order. A row is named as in the plots: its loss, or ``"loss [critic]"`` when the loss has
    several critics, so that one critic's seeds never overwrite another's; with one critic per
    loss the names are the loss names."""
    from .statistics import indistinguishable_from_best

    records = _check_records(records)
    rows = aggregate(records)
    names = {(r["loss"], r["critic"]): _label(r, rows) for r in rows}
    per_seed: dict[str, dict[Any, float]] = {name: {} for name in names.values()}
    for r in records:
        if _status(r) == "ok":  # a successful cell is in the row of its own (loss, critic)
            v = _field_values(r)[metric]
            if math.isfinite(v):
                per_seed[names[(str(r["loss"]), str(r.get("critic", "")))]][r["seed"]] = v
    return indistinguishable_from_best(per_seed, alpha=alpha)


def _ci_cell(row: Mapping[str, Any], f: str) -> str:
    return format_mean_std(row.get(f"{f}_mean", math.nan), row.get(f"{f}_ci95", math.nan),
                           ".1f", scale=100.0, missing="—")


def _params_text(params: Mapping[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def format_tuned_table(rows: Sequence[Mapping[str, Any]],
                       tuning: Mapping[str, Mapping[str, Any]],
                       sig: Mapping[str, Mapping[str, Any]] | None = None,
                       references: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The tuned comparison as a Markdown table: per loss the best validation MAP@R of its
    search, test-class metrics as ``mean ± half width of the 95% t-interval`` (%), ``*`` on the
    losses indistinguishable from the best MAP@R (``sig["map_at_r"]``), the I_NCE readout and
    the chosen hyper-parameters; ``references`` (row name -> retrieval metrics of an untrained
    embedding, e.g. ``(raw input)`` and ``(true latent)``) adds one last row each.

    A row is named by its loss, ``"loss [critic]"`` when the loss has several critics (the
    names of :func:`significance`), with ``" (n failed)"`` when some of its cells failed, as in
    :func:`format_table`. ``tuning`` is looked up by loss."""
    best_set = set((sig or {}).get("map_at_r", {}).get("indistinguishable", []))
    header = (["Loss", "Val MAP@R"] + [h for h, _ in _TUNED_COLUMNS]
              + ["I_NCE (nats)", "Chosen (lr, loss keywords)"])
    body = []
    for r in rows:
        t = tuning.get(r["loss"], {})
        label = _label(r, rows)
        name = label + _failed_note(r) + (" *" if label in best_set else "")
        if int(r.get("n_seeds", 0)) == 0:
            cells = [name, "—"] + ["failed"] + ["—"] * (len(_TUNED_COLUMNS) - 1) + ["—", "—"]
        else:
            val = t.get("best_value")
            cells = [name, f"{100 * val:.1f}" if val is not None else "—"]
            cells += [_ci_cell(r, f) for _, f in _TUNED_COLUMNS]
            cells.append(format_mean_std(r.get("readout_infonce_mean"),
                                         r.get("readout_infonce_ci95"), ".2f"))
            cells.append(_params_text(t.get("best_params", {})))
        body.append(cells)
    for row, ref in (references or {}).items():
        body.append([row, "—"] + [
            f"{100 * ref[f]:.1f}" if f in ref else "—" for _, f in _TUNED_COLUMNS]
            + ["—", "no training"])
    return markdown_table(header, body, align="l" + "r" * (len(_TUNED_COLUMNS) + 2) + "l",
                          pad=True)


def _tuned_footnote(rows, tuning, sig, meta) -> list[str]:
    ns = sorted({int(r["n_seeds"]) for r in rows if int(r["n_seeds"]) > 0})
    seeds = f"{ns[0]} seeds" if len(ns) == 1 else "seeds: " + ", ".join(
        f"{_label(r, rows)} {r['n_seeds']}" for r in rows)
    lines = [
        f"Test classes never seen in training or tuning. Mean ± half width of the 95% Student-t "
        f"interval over {seeds} (t_(0.975, n-1) · s / √n), in %. Val MAP@R: the best trial's "
        "mean MAP@R over the class-disjoint validation folds of the training classes. "
        "Linear probe and k-NN: trained on a stratified half of the test classes, scored on the "
        "other half. I_NCE: final readout on a training batch, nats.",
    ]
    if meta.get("budget"):
        lines.append(f"Budget, the same for every loss: {meta['budget']}.")
    refs = meta.get("references") or {}
    if "(raw input)" in refs:
        lines.append("(raw input): the same retrieval on the flattened input itself, no model "
                     "-- the floor a learned embedding has to clear.")
    if "(true latent)" in refs:
        lines.append("(true latent): the same retrieval on the signal the data were generated "
                     "from (the data set's known answer) -- the ceiling of an encoder that "
                     "recovers it.")
    for metric, res in (sig or {}).items():
        if res.get("best") is None:
            continue
        ps = ", ".join(f"{k} p={v:.3g}" for k, v in res["p_values"].items() if k != res["best"])
        lines.append(
            f"{metric}: best {res['best']}; indistinguishable from it (two-sided paired t-test "
            f"over seeds, Holm-corrected, α = {res['alpha']}): "
            f"{', '.join(res['indistinguishable'])}" + (f" ({ps})." if ps else ".")
            + (" `*` in the table." if metric == "map_at_r" else ""))
    return lines


def _tuned_csv(rows, tuning) -> str:
    columns = ["loss", "critic", "n_seeds", "n_failed", "val_map_at_r", "n_trials",
               "best_params"]
    for f in FIELDS:
        columns += [f"{f}_mean", f"{f}_std", f"{f}_ci95", f"{f}_ci_low", f"{f}_ci_high"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        t = tuning.get(r["loss"], {})
        extra = {"val_map_at_r": t.get("best_value"), "n_trials": t.get("n_trials"),
                 "best_params": json.dumps(t.get("best_params", {}), sort_keys=True)}
        w.writerow([repr(float(v)) if isinstance(v := {**r, **extra}[c], float) else v
                    for c in columns])
    return buf.getvalue()


def write_tuned_report(
    records: Iterable[Mapping[str, Any]],
    tuning: Mapping[str, Mapping[str, Any]],
    output_dir: str | os.PathLike,
    title: str | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """The report of ``contrastive compare --tune``: ``results.json`` (records, the rows with
    their intervals, the tuning of each loss, the significance sets, ``meta``), ``results.csv``
    (``*_mean``, ``*_std``, ``*_ci95``, ``*_ci_low``, ``*_ci_high`` per field, the validation
    MAP@R and the chosen hyper-parameters), ``results.md`` (:func:`format_tuned_table` and its
    footnote) and the plots ``map_probe.png`` (95% interval bars), ``mi_vs_accuracy.png``,
    ``curves.png`` and ``tuning_history.png``. ``tuning`` maps a loss to
    :func:`contrastive.app.tuning.tune_loss`'s summary."""
    records = _check_records(records)
    if not records:
        raise ValueError("records is empty: there is nothing to report; run at least one cell")
    out = _output_folder(output_dir)
    title = title or "Tuned comparison"
    meta = dict(meta or {})
    rows = aggregate_ci(records)
    sig = {m: significance(records, m) for m in SIGNIFICANCE_METRICS}
    paths = {k: out / v for k, v in TUNED_FILES.items()}
    if plots:
        atomic_write_bytes(paths["map_probe"], _png(plot_map_probe(rows, records, err="ci95",
                                                         references=meta.get("references"))))
        atomic_write_bytes(paths["mi_vs_accuracy"],
                           _png(plot_mi_vs_accuracy(rows, records, err="ci95")))
        atomic_write_bytes(paths["curves"], _png(plot_curves(rows, records)))
        atomic_write_bytes(paths["tuning_history"], _png(plot_tuning_history(tuning)))
    else:
        for kind in ("map_probe", "mi_vs_accuracy", "curves", "tuning_history"):
            paths.pop(kind)
    payload = {"title": title, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ddof": 1,
               "confidence": 0.95, "meta": meta, "aggregate": rows, "significance": sig,
               "tuning": tuning, "records": records}
    atomic_write_text(paths["json"],
                      json.dumps(to_jsonable(payload), indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["csv"], _tuned_csv(rows, tuning))
    parts = [f"# {title}", "", format_tuned_table(rows, tuning, sig, meta.get("references")), "",
             "\n\n".join(_tuned_footnote(rows, tuning, sig, meta)), *_failed_section(records)]
    plot_names = [paths[k].name for k in ("map_probe", "tuning_history", "mi_vs_accuracy",
                                          "curves") if k in paths]
    if plot_names:
        captions = {"map_probe.png": "MAP@R and linear-probe accuracy, 95% intervals",
                    "tuning_history.png": "best-so-far validation MAP@R per trial",
                    "mi_vs_accuracy.png": "final MI readout vs linear-probe accuracy",
                    "curves.png": "training curves of the final cells"}
        parts += ["", "## Plots", ""] + [f"![{captions[p]}]({p})" for p in plot_names]
    atomic_write_text(paths["markdown"], "\n".join(parts) + "\n")
    return paths
