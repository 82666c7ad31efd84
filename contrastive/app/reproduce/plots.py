"""Figures of the reproduction, in the spirit of the paper's: curves over training steps, mean
over seeds with a +-1 std band, and the raw-pixel (or true-MI) reference as a dashed line.
Pure functions of an experiment's result dict (as written to ``NAME.json``); matplotlib Agg."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

__all__ = ["plot", "figure_png", "mean_curve"]

_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
_NAMES = {"infonce": "I_NCE", "nce": "I_NCE", "nwj": "I_NWJ", "conv": "ConvNet", "mlp": "MLP"}


def mean_curve(curves: list[dict], metric: str, *, counts: bool = False,
               **match) -> tuple[np.ndarray, ...]:
    """Steps, mean and std over seeds of ``metric`` for the rows that match ``match``
    (missing values are skipped: a seed that diverged has no value after its last step);
    ``counts=True`` adds the number of seeds behind each step's mean as a fourth array."""
    by_step: dict[int, list[float]] = {}
    for r in curves:
        if all(r.get(k) == v for k, v in match.items()) and r.get(metric) is not None:
            by_step.setdefault(int(r["step"]), []).append(float(r[metric]))
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    mean = np.array([v.mean() for v in vals])
    std = np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])
    if counts:
        return steps, mean, std, np.array([v.size for v in vals], dtype=int)
    return steps, mean, std


def _line(ax, curves, metric, label, color, ls="-", marker="o", **match):
    """The mean curve with its +-1 std band. Where fewer seeds than at the start have a value
    (a seed diverged), the mean is over a different set of runs: those points are drawn
    hollow and the label says from which step and over how many seeds."""
    steps, mean, std, n = mean_curve(curves, metric, counts=True, **match)
    if steps.size == 0:
        return
    partial = n < n.max()
    if partial.any():
        first = int(steps[partial.argmax()])
        label = f"{label} (from step {first}: {int(n[partial].min())} of {int(n.max())} seeds)"
    ax.plot(steps, mean, linestyle=ls, color=color, label=label, marker=marker, ms=3.5)
    if partial.any():  # hollow markers over the filled ones where the mean is partial
        ax.plot(steps[partial], mean[partial], linestyle="none", marker=marker, ms=5,
                markerfacecolor="white", markeredgecolor=color)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.18, lw=0)


def _hline(ax, stats: dict | float, label: str, color="k"):
    mean = stats["mean"] if isinstance(stats, dict) else float(stats)
    ax.axhline(mean, color=color, ls="--", lw=1.2, label=label)
    if isinstance(stats, dict) and stats.get("std"):
        ax.axhspan(mean - stats["std"], mean + stats["std"], color=color, alpha=0.08, lw=0)


def _title(res: dict) -> str:
    seeds = len(res.get("seeds", []))
    return f"{res['experiment']} on {res.get('dataset', '?')} (mean +- std, {seeds} seeds)"


def _bijective(res, fig):
    axes = fig.subplots(1, 2)
    for i, est in enumerate(res["config"]["estimators"]):
        _line(axes[0], res["curves"], "bound", _NAMES[est], _COLORS[i], estimator=est)
        _line(axes[1], res["curves"], "accuracy", _NAMES[est], _COLORS[i], estimator=est)
    axes[0].set_ylabel("held-out bound (nats)")
    axes[1].set_ylabel("linear probe test accuracy")
    _hline(axes[1], res["baseline"]["raw_pixels_accuracy"], "raw pixels")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)


def _adversarial(res, fig):
    ax = fig.subplots(1, 1)
    _line(ax, res["curves"], "accuracy", "linear probe (paper protocol)", _COLORS[0])
    _line(ax, res["curves"], "adversary_accuracy", "online adversary", _COLORS[1], ls=":")
    _hline(ax, res["baseline"]["raw_pixels_accuracy"], "raw pixels")
    ax.set_xlabel("encoder step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)


def _critics(res, fig):
    ests = res["config"]["estimators"]
    axes = np.atleast_2d(fig.subplots(len(ests), 2, squeeze=False))
    for row, est in enumerate(ests):
        for i, kind in enumerate(res["config"]["critics"]):
            _line(axes[row, 0], res["curves"], "bound", kind, _COLORS[i], estimator=est,
                  critic=kind)
            _line(axes[row, 1], res["curves"], "accuracy", kind, _COLORS[i], estimator=est,
                  critic=kind)
        _hline(axes[row, 1], res["baseline"]["raw_pixels_accuracy"], "raw pixels")
        axes[row, 0].set_ylabel(f"held-out {_NAMES[est]} (nats)")
        axes[row, 1].set_ylabel(f"probe accuracy ({_NAMES[est]})")
        for ax in axes[row]:
            ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("training step")


def _encoders(res, fig):
    ests = res["config"]["estimators"]
    axes = np.atleast_2d(fig.subplots(2, len(ests), squeeze=False))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "v"]
    for col, est in enumerate(ests):
        for i, kind in enumerate(res["config"]["encoders"]):
            for j, t in enumerate(res["config"]["targets"]):
                lab = f"{_NAMES.get(kind, kind)}, t={t:g}"
                kw = dict(estimator=est, encoder=kind, target=float(t))
                for row, metric in enumerate(("train_bound", "accuracy")):
                    _line(axes[row, col], res["curves"], metric, lab, _COLORS[i],
                          styles[j % 4], markers[j % 4], **kw)
        for t in res["config"]["targets"]:
            axes[0, col].axhline(t, color="gray", lw=0.8)
        _hline(axes[1, col], res["baseline"]["raw_pixels_accuracy"], "raw pixels")
        axes[0, col].set_title(f"{_NAMES[est]} (training batches)", fontsize=9)
        axes[0, col].set_ylabel("bound (nats)")
        axes[1, col].set_ylabel("probe accuracy")
        axes[1, col].set_xlabel("training step")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)


def _noniid(res, fig):
    ests = res["config"]["estimators"]
    axes = fig.subplots(1, len(ests), squeeze=False)[0]
    base = res["baseline"]
    for k, est in enumerate(ests):
        ax = axes[k]
        for i, sampler in enumerate(res["config"]["samplers"]):
            lab = "non-i.i.d. batches" if sampler == "noniid" else "i.i.d. batches"
            _line(ax, res["curves"], "estimate", lab, _COLORS[i], estimator=est, sampler=sampler)
        _hline(ax, base["true_mi"], f"true MI = {base['true_mi']:.4f}")
        if est == "nwj":
            _hline(ax, base["nwj_optimum_noniid"],
                   f"KL(pos || within-batch neg) = {base['nwj_optimum_noniid']:.3f}", "tab:gray")
        ax.set_title(_NAMES[est], fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("estimate on held-out batches (nats)")
        ax.legend(fontsize=8)


_PLOTS = {
    "bijective": (_bijective, (10, 4)),
    "adversarial": (_adversarial, (6, 4)),
    "critics": (_critics, (10, 7)),
    "encoders": (_encoders, (10, 7)),
    "noniid": (_noniid, (10, 4)),
}


def figure_png(name: str, res: dict) -> bytes:
    """The figure of experiment ``name`` drawn from its result dict, as PNG bytes (nothing is
    written: :func:`contrastive.app.reproduce.run` writes a run's files together)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if name not in _PLOTS:
        raise ValueError(f"no figure for experiment {name!r}; choose one of {sorted(_PLOTS)}")
    fn, size = _PLOTS[name]
    fig = Figure(figsize=size)
    fn(res, fig)
    fig.suptitle(_title(res), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")  # PNG through the Agg canvas
    return buf.getvalue()


def plot(name: str, res: dict, path: str | Path) -> Path:
    """Draw the figure of experiment ``name`` from its result dict into ``path`` (PNG), written
    atomically (:func:`contrastive.checkpoint.atomic_write_bytes`)."""
    from ...checkpoint import atomic_write_bytes

    return atomic_write_bytes(path, figure_png(name, res))
