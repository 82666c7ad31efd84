"""What every report of the application shares: the Markdown table, the mean and standard
deviation over seeds, and the ``mean ± std`` cell.

The comparison (:mod:`.compare_report`), the known-MI benchmark (:mod:`.mi_benchmark`), the
reproduction (:mod:`.reproduce`) and the command line write their tables and statistics with
these, each formatting its own cells. JSON cleaning is :func:`contrastive.jsonsafe.to_jsonable`
(core, since checkpoints need it too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["markdown_table", "mean_std", "format_mean_std", "is_rate", "format_metric",
           "metrics_csv", "metrics_markdown"]


def _cell(value: object) -> str:
    """One table cell: ``str(value)`` with line breaks as spaces and every pipe not already
    escaped written ``\\|``."""
    return re.sub(r"(?<!\\)\|", r"\\|", " ".join(str(value).splitlines()))


def markdown_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    align: str | None = None,
    pad: bool = False,
) -> str:
    """A pipe table (no trailing newline) of ``header`` and ``rows`` of already formatted cells.

    ``align``: one letter per column, ``"l"`` (the default alignment, rule ``---``) or ``"r"``
    (right, rule ``---:``); ``None`` leaves every column at the default. ``pad=True`` pads each
    column to its widest cell (left-aligned columns with ``ljust``, right-aligned with
    ``rjust``) so that the table also reads in a terminal; the rule then spans the column.

    Cells are text, not Markdown table syntax: a pipe is written ``\\|`` (a literal pipe in a
    GitHub-flavoured Markdown cell) and a line break as a space, so a name such as ``"a|b"``
    keeps the row's column count.
    """
    header = [_cell(h) for h in header]
    body = [[_cell(c) for c in r] for r in rows]
    ncol = len(header)
    align = "l" * ncol if align is None else align
    if len(align) != ncol or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one letter 'l' or 'r' per column ({ncol}), got {align!r}")
    for i, r in enumerate(body):
        if len(r) != ncol:
            raise ValueError(f"rows[{i}] has {len(r)} cells, the header {ncol}")
    if not pad:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(c) for c in col) for col in zip(header, *body)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)
    ) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in body])


def mean_std(
    values: Iterable[float], ddof: int = 1, *, skip_nonfinite: bool = True
) -> tuple[float, float, int]:
    """``(mean, std, n)`` of ``values`` as float64: ``mean = sum(x) / n`` (``np.mean``) and
    ``std = sqrt(sum((x - mean)^2) / (n - ddof))`` (``np.std(x, ddof=ddof)``; ``ddof=1`` the sample
    standard deviation, ``ddof=0`` the population one).

    ``n`` counts the values used: the finite ones when ``skip_nonfinite`` (default), else all
    (a NaN then makes both statistics NaN). ``std`` is NaN when ``n <= ddof``; both are NaN when
    ``n == 0``.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if skip_nonfinite:
        x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    std = float(x.std(ddof=ddof)) if n > ddof else math.nan
    return mean, std, n


def format_mean_std(
    mean: float | None,
    std: float | None,
    fmt: str | Callable[[float], str] = ".3f",
    std_fmt: str | Callable[[float], str] | None = None,
    *,
    scale: float = 1.0,
    missing: str = "—",
) -> str:
    """The cell ``"<mean> ± <std>"``, both multiplied by ``scale`` and written with ``fmt`` (a
    format spec such as ``".1f"``, or a function of the number) and ``std_fmt`` (default
    ``fmt``); the mean alone when ``std`` is ``None`` or not finite (a single seed); ``missing``
    when ``mean`` is ``None`` or not finite."""

    def text(v: float, f: str | Callable[[float], str]) -> str:
        v = v * scale if scale != 1.0 else v  # an int stays an int for a callable ``fmt``
        return f(v) if callable(f) else format(v, f)

    if mean is None or not math.isfinite(mean):
        return missing
    out = text(mean, fmt)
    if std is not None and math.isfinite(std):
        out += " ± " + text(std, fmt if std_fmt is None else std_fmt)
    return out


#: the evaluation metrics that are rates in [0, 1] (shown in %), besides ``recall_at_k``
RATES = frozenset({"precision_at_1", "r_precision", "map_at_r", "linear_probe", "knn_top1",
                   "knn_top5", "nmi", "ami"})


def is_rate(name: str) -> bool:
    """Whether the evaluation metric ``name`` is a rate in [0, 1] (printed in %)."""
    return name.startswith("recall_at_") or name in RATES


def format_metric(name: str, value: float) -> str:
    """A final metric as the command line prints it: rates in % to two decimals, the rest
    (counts, flags) with ``:g``."""
    return f"{100 * value:6.2f} %" if is_rate(name) else f"{value:g}"


def metrics_csv(row: Mapping[str, Any]) -> str:
    """One header line and one line of values, floats written exactly (``repr``), as the
    JSON holds them."""
    def number(v: Any) -> str:
        return repr(float(v)) if isinstance(v, float) else str(v)

    return ",".join(row) + "\n" + ",".join(number(v) for v in row.values()) + "\n"


def metrics_markdown(row: Mapping[str, Any], backend: str | None = None) -> str:
    """``row`` as a two-column Markdown table as the command line prints it (rates in %,
    ``train_time_s`` in s, ``readout_*`` in nats, counts as they are), and the search behind
    the retrieval metrics when ``backend`` is given."""
    def shown(k: str, v: Any) -> str:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return str(v)
        if k == "train_time_s":
            return f"{float(v):.4g} s"
        if k.startswith("readout_"):
            return f"{float(v):.4g} nats"
        return str(v) if isinstance(v, int) else format_metric(k, float(v)).strip()

    text = markdown_table(["metric", "value"], [[k, shown(k, v)] for k, v in row.items()])
    return text + (f"\n\nRetrieval search: {backend}.\n" if backend else "\n")
