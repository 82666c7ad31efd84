"""The known-MI benchmark of the whole estimator family (``contrastive mi-bench --family``):
every lower bound with the separable, bilinear and concat critics and the upper bounds with the
Gaussian conditional critic, on the correlated-Gaussian staircase and its cubic transform; per
estimator and level the bias, variance and MSE over the last half of the level, as a table and
a Poole-style panel plot (Poole et al. 2019, fig. 2). Built on :mod:`.mi_benchmark`'s run."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import critics as _critics
from ..conditional import GaussianConditional
from ..jsonsafe import to_jsonable
from .mi_benchmark import (
    FAMILY,
    _transform,
    check_arguments,
    ema,
    family_estimators,
    is_upper_bound,
    run,
)
from .results import markdown_table as _pipe_table

#: Budgets of :func:`run_family`: ``quick`` (under 3 minutes on 2 CPU cores) and ``default``
#: (under 15 minutes): steps per level and the critics' sizes (Poole et al.'s are 256-wide and
#: 4,000 steps per level; these are smaller so that the whole family fits on a CPU).
FAMILY_BUDGETS: dict[str, dict] = {
    "quick": {
        "steps_per_level": 100,
        "critic_kwargs": {"separable": {"hidden_dim": 64, "out_dim": 32, "layers": 1},
                          "concat": {"hidden_dim": 64, "layers": 1}, "bilinear": {}},
        "conditional_kwargs": {"hidden_dim": 64, "layers": 1},
        "lr": 2e-3,
    },
    "default": {
        "steps_per_level": 400,
        "critic_kwargs": {"separable": {"hidden_dim": 128, "out_dim": 32, "layers": 2},
                          "concat": {"hidden_dim": 128, "layers": 2}, "bilinear": {}},
        "conditional_kwargs": {"hidden_dim": 128, "layers": 2},
        "lr": 1e-3,
    },
}


def _names(value: Sequence[str] | str) -> list[str]:
    """A comma-separated string as its list of names (a plain string is one list, not its
    letters); a sequence as a list."""
    if isinstance(value, str):
        return [n.strip() for n in value.split(",") if n.strip()]
    return list(value)


def zero_bilinear(dim: int) -> nn.Module:
    """The bilinear critic started at ``W = 0`` (every score 0, as the MLP critics nearly start):
    the registry's identity start scores ``x . y^3`` on the cubic data, whose exponentials
    overflow in the first step of NWJ, TUBA and JS."""
    critic = _critics.create("bilinear", dim)
    with torch.no_grad():
        critic.weight.zero_()
    return critic


zero_bilinear.__name__ = "bilinear"


def _once_each(what: str, given: Sequence, labels: Sequence[str]) -> None:
    """``ValueError`` when two entries of ``given`` have the same ``labels`` entry: their runs
    would share one (estimator, data, critic) row of the summary and of the table."""
    seen: dict[str, object] = {}
    for g, label in zip(given, labels):
        if label in seen:
            raise ValueError(f"{what} names {label!r} twice ({seen[label]!r} and {g!r}): the two "
                             "runs would share one row of the table; give each once")
        seen[label] = g


def run_family(
    estimators: Iterable[str] | str = FAMILY,
    critics: Sequence[str] | str = ("separable", "bilinear", "concat"),
    transforms: Sequence[str] | str = ("gaussian", "cubic"),
    budget: str = "default",
    dim: int = 20,
    batch_size: int = 64,
    levels: Sequence[float] = (2, 4, 6, 8, 10),
    steps_per_level: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    output: str | Path | None = None,
) -> dict:
    """Every estimator with every critic on every data set: the lower bounds once per critic
    of ``critics`` and data set of ``transforms``, the upper bounds (:data:`UPPER_BOUNDS`) once
    per data set with the Gaussian conditional critic. ``budget`` (:data:`FAMILY_BUDGETS`) sets
    the critics' sizes, the steps per level and the learning rate unless given. The bilinear
    critic starts at zero (:func:`zero_bilinear`). ``estimators``, ``critics`` and
    ``transforms`` also take one comma-separated string (``"bilinear,concat"``). Each critic and
    data set is named once (``ValueError`` otherwise): ``None`` is the ``"gaussian"`` data, and
    two names of one critic (an alias) are that critic twice.

    Returns ``config``, ``runs`` (the :func:`run` results, each with ``config["transform"]``),
    ``summary`` (the :func:`summarize` rows with ``critic`` and ``data`` added), ``diverged``
    (``{"estimator/critic/data": count}``) and ``seconds``; with ``output`` the files of
    :func:`write_family`.
    """
    if budget not in FAMILY_BUDGETS:
        raise ValueError(f"budget must be one of {list(FAMILY_BUDGETS)}, got {budget!r}")
    plan = FAMILY_BUDGETS[budget]
    spl = plan["steps_per_level"] if steps_per_level is None else steps_per_level
    lr = plan["lr"] if lr is None else lr
    names = list(family_estimators(estimators))
    critics, transforms = _names(critics), _names(transforms)
    lower = [n for n in names if not is_upper_bound(n)]
    upper = [n for n in names if is_upper_bound(n)]
    for t in transforms:
        _transform(t)
    _once_each("transforms", transforms, [t or "gaussian" for t in transforms])
    if lower:  # the upper bounds' runs use the conditional critic, not these
        _once_each("critics", critics, [_critics.CRITICS.canonical(c) for c in critics])
    ck = plan["critic_kwargs"]

    def conditional(d: int) -> nn.Module:
        return GaussianConditional(d, **plan["conditional_kwargs"])

    conditional.__name__ = "gaussian_conditional"
    common = dict(dim=dim, batch_size=batch_size, levels=levels, steps_per_level=spl, lr=lr,
                  seed=seed, device=device, progress=progress)
    def critic_of(c: str):
        key = _critics.CRITICS.canonical(c)
        return (zero_bilinear if key == "bilinear" else c), ck.get(key, {})

    jobs = [(t, c) for t in transforms for c in (critics if lower else ())]
    jobs += [(t, None) for t in (transforms if upper else ())]
    for t, c in jobs:  # every mistake before anything trains
        if c is None:
            check_arguments(family_estimators(upper), conditional, dim, batch_size, levels, spl,
                            lr, seed, transform=t,
                            estimator_critics=dict.fromkeys(upper, conditional))
        else:
            crit, kw = critic_of(c)
            check_arguments(family_estimators(lower), crit, dim, batch_size, levels, spl, lr,
                            seed, critic_kwargs=kw, transform=t)
    start = time.perf_counter()
    runs, rows, bad = [], [], {}
    for t, c in jobs:
        if c is None:
            res = run(family_estimators(upper), conditional, transform=t,
                      estimator_critics=dict.fromkeys(upper, conditional), **common)
        else:
            crit, kw = critic_of(c)
            res = run(family_estimators(lower), crit, transform=t, estimator_critics={},
                      critic_kwargs=kw, **common)
        data = t or "gaussian"
        for r in res["summary"]:
            rows.append({**r, "critic": res["config"]["critic"], "data": data})
        for name, n in res["diverged"].items():
            bad[f"{name}/{res['config']['critic']}/{data}"] = n
        runs.append(res)
    results = {
        "config": {"estimators": names, "critics": list(critics), "transforms": list(transforms),
                   "budget": budget, "dim": dim, "batch_size": batch_size,
                   "levels": [float(v) for v in levels], "steps_per_level": spl, "lr": lr,
                   "seed": seed, "critic_kwargs": ck,
                   "conditional_kwargs": plan["conditional_kwargs"]},
        "log_batch_size": math.log(batch_size),
        "runs": runs,
        "summary": rows,
        "diverged": bad,
        "seconds": time.perf_counter() - start,
    }
    if output is not None:
        results["files"] = write_family(results, output)
    return results


def family_table(results: Mapping) -> str:
    """The family's summary as one Markdown table: a row per estimator, data set and critic,
    per level the cell ``bias / variance / MSE`` (nats, nats^2) over the last half of the
    level (also of a ``family.json`` read back, whose non-finite statistics are ``null``)."""
    cfg = results["config"]
    levels = cfg["levels"]
    head = (f"Known-MI estimator family: d = {cfg['dim']}, batch {cfg['batch_size']} (log batch "
            f"= {results['log_batch_size']:.2f} nats), {cfg['steps_per_level']} steps per level, "
            f"lr {cfg['lr']:g}, budget `{cfg['budget']}`; per level `bias / variance / MSE` "
            "over the last half of the level.")
    cells: dict[tuple[str, str, str], dict[int, str]] = {}
    for r in results["summary"]:
        key = (r["estimator"], r["data"], r["critic"])
        if r["mean"] is not None and math.isfinite(r["mean"]):  # None: NaN read from the JSON
            txt = f"{r['bias']:+.2f} / {r['variance']:.2f} / {r['mse']:.2f}"
        else:
            txt = "non-finite"
        if r.get("nonfinite"):
            txt += f" ({r['nonfinite']} non-finite)"
        cells.setdefault(key, {})[r["level"]] = txt
    order = {n: i for i, n in enumerate(cfg["estimators"])}
    body = [[e, d, c, *(cells[(e, d, c)].get(i, "") for i in range(len(levels)))]
            for (e, d, c) in sorted(cells, key=lambda k: (order.get(k[0], 99), k[1], k[2]))]
    header = ["estimator", "data", "critic", *(f"I = {v:g}" for v in levels)]
    lines = [head, "", _pipe_table(header, body, align="lll" + "r" * len(levels))]
    if results.get("diverged"):
        lines += ["", "DIVERGED (non-finite estimates; left out of the statistics): "
                  + ", ".join(f"{k} {v}" for k, v in results["diverged"].items())]
    return "\n".join(lines) + "\n"


def plot_family(results: Mapping, path: str | Path, data: str = "gaussian") -> Path:
    """Poole et al. (2019) fig. 2 for the family on one data set: a panel per estimator, in
    each the EMA-smoothed estimate of every critic against the step, the true MI (black, dashed)
    and ``log(batch)`` (gray, dotted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in results["runs"] if (r["config"]["transform"] or "gaussian") == data]
    names = [n for n in results["config"]["estimators"]
             if any(n in r["estimates"] for r in runs)]
    if not names:
        raise ValueError(f"no run on data {data!r}")
    spl = int(results["config"]["steps_per_level"])
    decay = max(0.5, 1.0 - 20.0 / spl)
    true_mi = np.asarray(runs[0]["true_mi"])
    steps = np.arange(true_mi.size)
    log_b = float(results["log_batch_size"])
    top = max(float(true_mi.max()), log_b) * 1.5
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig = Figure(figsize=(3.0 * cols, 2.6 * nrows), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    colors = {"separable": "C0", "bilinear": "C1", "concat": "C2", "gaussian_conditional": "C3"}
    for ax, name in zip(axes, names):
        for r in runs:
            if name not in r["estimates"]:
                continue
            critic = r["config"]["critic"]
            raw = np.asarray(r["estimates"][name], dtype=np.float64)
            smooth = ema(raw.tolist(), decay)
            smooth[~np.isfinite(raw)] = np.nan
            ax.plot(steps, np.clip(smooth, -1.0, top), color=colors.get(critic, "C4"),
                    linewidth=1.2, label=critic)
        ax.plot(steps, true_mi, color="black", linestyle="--", linewidth=1.0, label="true MI")
        ax.axhline(log_b, color="gray", linestyle=":", linewidth=1.0, label="log(batch)")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(-1.0, top)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    handles, labels = [], []
    for ax in axes[: len(names)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[0].legend(handles, labels, loc="upper left", fontsize=6)
    cfg = results["config"]
    fig.suptitle(f"{data} data, d={cfg['dim']}, batch={cfg['batch_size']}, "
                 f"{spl} steps per level", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_family(results: Mapping, output: str | Path) -> dict[str, str]:
    """Write ``family.json`` (everything), ``family_summary.csv`` (one row per estimator,
    critic, data set and level), ``family.md`` (:func:`family_table`) and one
    ``family_<data>.png`` per data set (:func:`plot_family`) into ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "family.json", "csv": out / "family_summary.csv",
             "markdown": out / "family.md"}
    datas = list(dict.fromkeys((r["config"]["transform"] or "gaussian")
                               for r in results["runs"]))
    for d in datas:
        files[f"png_{d}"] = out / f"family_{d}.png"
    payload = {k: v for k, v in results.items() if k != "files"}
    payload["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(to_jsonable(payload), allow_nan=False))
    keys = ["estimator", "data", "critic", "level", "true_mi", "mean", "bias", "variance", "mse",
            "steps", "nonfinite"]
    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in results["summary"]:
            w.writerow([r[k] for k in keys])
    files["markdown"].write_text(family_table(results))
    for d in datas:
        plot_family(results, files[f"png_{d}"], d)
    return {k: str(v) for k, v in files.items()}
