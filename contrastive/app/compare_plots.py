"""The plots of a ``contrastive compare`` report (PNG, matplotlib's Agg canvas, no display):
MAP@R and linear-probe accuracy per loss with error bars (std over seeds, or the 95% t-interval
of a tuned run), the final MI readout against linear-probe accuracy (Tschannen et al. 2020: the
readout does not predict downstream accuracy), the training curves, and a tuned run's history
(best-so-far validation MAP@R against trial). Used by :mod:`.compare_report`."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _as_float(x: Any) -> float:
    """A finite float, or NaN for anything missing, non-numeric or non-finite."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def _status(record: Mapping[str, Any]) -> str:
    return str(record.get("status", "ok"))


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


def _err_name(err: str) -> str:
    """What the error bars of column suffix ``err`` are: ``"std"``, or ``"ci<p>"`` (the rows
    of :func:`~contrastive.app.compare_report.aggregate_ci`, named after their confidence:
    ``ci95``, ``ci90``, ``ci99.9``) as a ``p%`` t-interval; ``ValueError`` naming ``err``
    otherwise."""
    if err == "std":
        return "std"
    if err.startswith("ci"):
        try:
            pct = float(err[2:])
        except ValueError:
            pct = math.nan
        if 0.0 < pct < 100.0:
            return f"{err[2:]}% t-interval"
    raise ValueError(f"err must be 'std' or a confidence interval column such as 'ci95' or "
                     f"'ci90' (aggregate_ci's rows), got {err!r}")


def plot_map_probe(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping] = (),
                   err: str = "std",
                   references: Mapping[str, Mapping[str, float]] | None = None):
    """Grouped bars: MAP@R and linear-probe accuracy (%) per loss, mean ± std over seeds
    (``err="ci95"``: ± the half width of the 95% t-interval, rows of :func:`aggregate_ci`;
    ``"ci90"`` etc. for its other confidences, named so in the title);
    ``references`` (row name -> metrics of an untrained embedding, e.g. ``(raw input)``, ``(true
    latent)``) draws each one's MAP@R as a dashed horizontal line."""
    what = _err_name(err)
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
        s = np.array([_err(r[f"{f}_{err}"]) for r in rows]) * 100
        pos = x + (j - 0.5) * width
        # a metric no seed measured has no bar (height NaN, not a 0 % bar) and says "n/a"
        bars = ax.bar(pos, m, width, yerr=np.where(np.isfinite(m), s, np.nan), capsize=3,
                      color=color, label=name, error_kw={"elinewidth": 1, "ecolor": "0.2"})
        for b, v, e in zip(bars, m, s):
            x_mid = b.get_x() + b.get_width() / 2
            if math.isfinite(v):
                # above the error bar, but on the axes (under the legend) when the bar runs
                # past the top, as a 95% interval of 2-3 seeds easily does
                ax.text(x_mid, min(v + e + 1, 100.5), f"{v:.1f}", ha="center", va="bottom",
                        fontsize=7)
            else:
                ax.text(x_mid, 1, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
    for (name, ref), style in zip((references or {}).items(), ("--", ":", "-.")):
        if "map_at_r" in ref:
            ax.axhline(100 * ref["map_at_r"], color="0.35", lw=1, ls=style,
                       label=f"MAP@R {name} {100 * ref['map_at_r']:.1f}")
    ax.set_xticks(x, [_label(r, rows) for r in rows], rotation=20 if len(rows) > 5 else 0,
                  ha="right" if len(rows) > 5 else "center")
    ax.set_ylim(0, 112)  # room for the legend above 100 %
    ax.set_ylabel("%")
    ax.set_title(f"Retrieval (MAP@R) and linear-probe accuracy per loss\n(mean ± {what} over "
                 "seeds)", fontsize=10)
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


def plot_mi_vs_accuracy(rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping] = (),
                        err: str = "std"):
    """Two panels: final I_NCE (left) and I_NWJ (right) readout against linear-probe accuracy,
    one labelled point per loss with error bars on both axes (``err`` as
    :func:`plot_map_probe`'s), Spearman's rho in the title."""
    what = _err_name(err)
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
            ax.errorbar(x, y, xerr=_err(r[f"{field}_{err}"]),
                        yerr=_err(r[f"linear_probe_{err}"]) * 100,
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
                 f"(mean ± {what} over seeds)", fontsize=11)
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


def _window_text(spans: Sequence[str]) -> str:
    """``"moving avg of <span> steps"`` naming the smoothing windows ``spans`` (see
    :func:`_span`; a range when they differ); empty when nothing was smoothed."""
    spans = sorted(set(spans), key=lambda t: float(t.lstrip("~")))
    if not spans:
        return ""
    return "moving avg of " + (spans[0] if len(spans) == 1 else f"{spans[0]}–{spans[-1]}") \
        + " steps"


def _span(steps: np.ndarray, window: int) -> str:
    """How many training steps a moving average of ``window`` logged points covers: the
    history holds one row every ``log_every`` steps (plus evaluation steps), so ``window`` times
    the logging interval; ``~`` when the interval is not constant (its median)."""
    gaps = np.diff(steps)
    if gaps.size == 0:
        return f"{window:g}"
    gap = float(np.median(gaps))
    return ("" if np.all(gaps == gaps[0]) else "~") + f"{window * gap:g}"


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
        drawn, spans = False, []
        for r, hs in series:
            steps, y = _mean_curve(hs, key)
            if steps.size == 0:
                continue
            color = color_of[(r["loss"], r["critic"])]
            if key == "recall_at_1":
                ax.plot(steps, y * 100, "o-", ms=3, lw=1.4, color=color, label=_label(r, all_rows))
            else:
                ys, window = _smooth(y)
                if window > 1:
                    spans.append(_span(steps, window))
                ax.plot(steps, ys, lw=1.4, color=color, label=_label(r, all_rows))
            drawn = True
        if not drawn:
            _no_data(ax, f"no {name} logged")
            ax.set_title(name, fontsize=10)
            continue
        text = _window_text(spans)
        ax.set_title(name + (f" — {text}" if text else ""), fontsize=10)
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
        smoothing = ""
        if steps.size == 0:
            _no_data(ax, "no loss logged")
        else:
            ys, window = _smooth(y)
            if window > 1:
                smoothing = f"\n({_window_text([_span(steps, window)])})"
            ax.plot(steps, ys, lw=1.3, color=color_of[(r["loss"], r["critic"])])
            ax.grid(alpha=0.3)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        ax.set_title(f"{_label(r, all_rows)}: training loss{smoothing}", fontsize=9)
    fig.suptitle(f"Training curves, mean over seeds ({n} losses)", fontsize=11)
    return fig


def plot_tuning_history(tuning: Mapping[str, Mapping[str, Any]]):
    """Best-so-far validation MAP@R (%) against trial, one line per loss (each loss's own trial
    count; the dots are the trials' own values)."""
    fig, axes = _figure(7.5, 4.4)
    ax = axes[0, 0]
    items = [(k, v) for k, v in tuning.items() if v.get("history")]
    if not items:
        _no_data(ax, "no finished trials")
        return fig
    for (loss, t), color in zip(items, _colors(len(items))):
        values = np.array([h["value"] for h in t["history"]]) * 100
        x = np.arange(1, values.size + 1)
        ax.plot(x, np.maximum.accumulate(values), "-", lw=1.6, color=color, label=loss)
        ax.plot(x, values, "o", ms=3, color=color, alpha=0.4)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation MAP@R (%)")
    ax.set_title("Tuning history: best-so-far validation MAP@R per loss (dots: each trial)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
