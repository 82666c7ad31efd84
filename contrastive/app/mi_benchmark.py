"""Known-MI benchmark: how well does each variational MI bound track a mutual information we know?

The setting of Poole, Ozair, van den Oord, Alemi, Tucker, "On Variational Bounds of Mutual
Information" (ICML 2019, sec. 6 and fig. 2), used by Tschannen et al. (2020) as the sanity check
of their estimators: ``x ~ N(0, I_d)`` and ``y = rho x + sqrt(1 - rho^2) e`` with
``e ~ N(0, I_d)`` (the data and its closed forms: :mod:`evaluation.known_mi`), so::

    I(X; Y) = -(d / 2) log(1 - rho^2)  nats.

A critic is trained on fresh batches while the true MI follows a staircase (2, 4, 6, 8, 10 nats
by default, ``d = 20``, batch 64), one critic per estimator, and the estimate of every step is
recorded. InfoNCE saturates at ``log(batch)``; NWJ, JS and DV can go above it at the price of
variance. Any critic of :mod:`contrastive.critics` can be plugged in.

An *estimator* is a pair ``(loss_fn, bound_fn)`` of functions of ``(scores [B, B], positives,
negatives)``: the critic is trained by minimising ``loss_fn`` and the estimate is
``bound_fn`` of the same batch's scores, with the pairs ``(x_i, y_i)`` on the diagonal as
positives. Pass your own pairs in ``run(estimators={...})``; the default names ``"infonce"``,
``"nwj"``, ``"js"`` and ``"dv"`` resolve to :mod:`losses.functional`, and every name of the
family below (``"flo"``, ``"smile_1"``, ...) is taken too: :func:`run` and the command line
resolve names with the same :func:`family_estimators`.

The estimator family (:func:`.mi_family.run_family`, ``contrastive mi-bench --family``, run by
:mod:`.mi_family`): every lower bound (InfoNCE, NWJ, JS, DV, TUBA, MINE, SMILE at two clippings,
alpha-InfoNCE, FLO with its shadow head; :mod:`losses.bounds`) with the separable, bilinear and
concat critics, and the upper bounds (leave-one-out, CLUB) with a Gaussian conditional critic
(:mod:`contrastive.conditional`), on the Gaussian staircase and on its cubic transform ``y ->
y^3`` (same MI, a non-quadratic log density ratio); per estimator, critic, data and level the
bias, variance and MSE, a table and one Poole-style figure per data set (a panel per estimator, a
line per critic, the true MI dashed). ``docs/mi_estimators.md`` holds the formulas and the
measured table.

It trains critics and writes plots, so it is an experiment of the application layer, above
``losses`` and ``evaluation`` (``docs/architecture.md``).
"""

from __future__ import annotations

import csv
import json
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from evaluation.known_mi import (
    check_dim,
    cubic,
    mi_from_rho,
    optimal_critic,
    rho_from_mi,
    sample_gaussian,
    staircase,
)
from losses import bounds as LB
from losses.estimator_modules import FLO, MINE
from losses.registry import ESTIMATORS

from .. import critics as _critics
from ..conditional import GaussianConditional
from ..devices import resolve_device
from ..jsonsafe import to_jsonable
from ..pairs import diagonal_masks
from ..validation import check_int, check_positive_int
from .results import markdown_table as _pipe_table

__all__ = [
    "mi_from_rho",
    "rho_from_mi",
    "sample_gaussian",
    "optimal_critic",
    "staircase",
    "ema",
    "resolve_estimators",
    "make_critic",
    "run",
    "check_arguments",
    "diverged",
    "summarize",
    "markdown_table",
    "plot",
    "write_results",
    "DEFAULT_ESTIMATORS",
    "DEFAULT_CRITIC_KWARGS",
    "TRANSFORMS",
    "FAMILY",
    "UPPER_BOUNDS",
    "SHADOW_ESTIMATORS",
    "ShadowCritic",
    "family_estimators",
    "is_upper_bound",
    "gaussian_conditional",
]

ScoreFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Estimator = tuple[ScoreFn, ScoreFn]

DEFAULT_ESTIMATORS = ("infonce", "nwj", "js", "dv")
#: Poole et al.'s critic sizes: two hidden layers of 256 (ReLU), separable embeddings of 32.
DEFAULT_CRITIC_KWARGS: dict[str, dict] = {
    "separable": {"hidden_dim": 256, "out_dim": 32, "layers": 2},
    "concat": {"hidden_dim": 256, "layers": 2},
    "bilinear": {},
}


# --------------------------------------------------------------------------- summaries


def ema(values: Sequence[float], decay: float = 0.98) -> np.ndarray:
    """Exponential moving average ``s_t = decay s_{t-1} + (1 - decay) v_t``, started at the first
    finite value; non-finite values are skipped (the average is carried over)."""
    out = np.full(len(values), np.nan)
    s = math.nan
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v):
            s = v if math.isnan(s) else decay * s + (1.0 - decay) * v
        out[i] = s
    return out


# --------------------------------------------------------------------------- wiring


def resolve_estimators(
    estimators: Iterable[str] | Mapping[str, Estimator],
) -> dict[str, Estimator]:
    """``{name: (loss_fn, bound_fn)}``. A mapping is taken as is; names are resolved by
    :func:`family_estimators`, as ``contrastive mi-bench --estimators`` resolves them: names (or
    aliases: ``nce``, ``mine``, ...) of :data:`losses.registry.ESTIMATORS` map to
    :mod:`losses.functional`'s ``(infonce, infonce_bound)``, ``(nwj, nwj_bound)``, ...,
    keyed by their canonical names, and the family's own names (``flo``, ``smile_1``, ...;
    :data:`NEW_ESTIMATORS`) to theirs. One string is a comma-separated list of names."""
    if isinstance(estimators, Mapping):
        out = dict(estimators)
        for name, pair in out.items():
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(map(callable, pair))):
                raise TypeError(
                    f"estimators[{name!r}] must be a (loss_fn, bound_fn) pair of callables of "
                    "(scores, positives, negatives)"
                )
        if not out:
            raise ValueError("estimators is empty; pass at least one estimator")
        return out
    return family_estimators(estimators)


def _critic_settings(critic: str | Callable[[int], nn.Module], kwargs: Mapping) -> dict | None:
    """The keywords :func:`make_critic` builds a named critic with (its defaults with
    ``kwargs`` over them); None for a factory."""
    if not isinstance(critic, str):
        return None
    key = _critics.CRITICS.canonical(critic)
    return {**DEFAULT_CRITIC_KWARGS.get(key, {}), **dict(kwargs)}


def make_critic(critic: str | Callable[[int], nn.Module], dim: int, **kwargs) -> nn.Module:
    """A fresh critic on ``dim``-dimensional x and y: a name of :mod:`contrastive.critics`
    (``"separable"``, ``"concat"``, ``"bilinear"``, ...; :data:`DEFAULT_CRITIC_KWARGS` fill in
    Poole et al.'s sizes, ``kwargs`` override them) or a factory ``critic(dim) -> nn.Module``."""
    if callable(critic) and not isinstance(critic, str):
        if kwargs:
            raise ValueError("critic_kwargs only apply to a critic given by name")
        module = critic(dim)
        if not isinstance(module, nn.Module):
            raise TypeError(f"the critic factory must return an nn.Module, got {type(module)}")
        return module
    if not isinstance(critic, str):
        raise TypeError(f"critic must be a name or a factory dim -> nn.Module, got {critic!r}")
    key = _critics.CRITICS.canonical(critic)
    return _critics.create(key, dim, **{**DEFAULT_CRITIC_KWARGS.get(key, {}), **kwargs})


#: The data sets of the benchmark: the Gaussian pairs and their cubic transform (same MI).
TRANSFORMS: dict[str | None, Callable[[Tensor], Tensor]] = {
    None: lambda y: y,
    "gaussian": lambda y: y,
    "cubic": cubic,
}

#: Estimators whose critic is a conditional density (scores ``log q(y_j | x_i)``).
UPPER_BOUNDS = frozenset({"l1out", "club"})
#: Estimators that also read a shadow ``u(x, y)`` next to the scores: their critic is wrapped in
#: :class:`ShadowCritic`, and their ``(loss_fn, bound_fn)`` take it as a fourth argument.
SHADOW_ESTIMATORS = frozenset({"flo"})


class ShadowCritic(nn.Module):
    """A critic and FLO's shadow head (Guo et al. 2022; the head of
    :class:`losses.estimator_modules.FLO`, ``u_ii = h([x_i; y_i; S_ii]) - S_ii`` on the paired
    diagonal): ``forward(x, y) -> (S, U)``, trained together by the FLO loss."""

    def __init__(self, critic: nn.Module, dim: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.flo = FLO(critic=critic, embedding_size=dim, shadow_hidden=hidden_dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.flo.critic(x, y)
        paired = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        return scores, self.flo.shadow(x, y, scores, paired)


def is_upper_bound(name: str) -> bool:
    """Whether the estimator ``name`` reads a conditional log-density (:data:`UPPER_BOUNDS`, or
    registered with ``meta["critic"] == "conditional"``)."""
    if name in UPPER_BOUNDS:
        return True
    return name in ESTIMATORS and ESTIMATORS.meta(name).get("critic") == "conditional"


def _transform(transform: str | None) -> Callable[[Tensor], Tensor]:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {[t for t in TRANSFORMS if t]} or None, got "
                         f"{transform!r}")
    return TRANSFORMS[transform]


def _critic_name(critic: str | Callable) -> str:
    return critic if isinstance(critic, str) else getattr(critic, "__name__", "custom")


def gaussian_conditional(dim: int) -> nn.Module:
    """The upper bounds' critic: :class:`contrastive.conditional.GaussianConditional` on
    ``dim``-dimensional x and y, mean and log-variance MLPs of two hidden layers of 256 (the
    separable critic's sizes)."""
    return GaussianConditional(dim, hidden_dim=256, layers=2)


def _mine_ma() -> Estimator:
    """MINE with a fresh moving average (state of the returned loss function's module)."""
    return MINE(momentum=0.01).compute, LB.mine_bound


def _partial(fn: Callable, **kw) -> Callable:
    def bound(scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        return fn(scores, positives, negatives, **kw)

    bound.__name__ = f"{fn.__name__}({', '.join(f'{k}={v}' for k, v in kw.items())})"
    return bound


#: The estimators of :mod:`losses.bounds` by benchmark name: a factory of ``(loss_fn, bound_fn)``
#: (a factory because MINE's loss carries state).
NEW_ESTIMATORS: dict[str, Callable[[], Estimator]] = {
    "tuba": lambda: (LB.tuba, LB.tuba_bound),
    "mine_ma": _mine_ma,
    "smile_1": lambda: (_partial(LB.smile, tau=1.0), _partial(LB.smile_bound, tau=1.0)),
    "smile_5": lambda: (_partial(LB.smile, tau=5.0), _partial(LB.smile_bound, tau=5.0)),
    "alpha_infonce": lambda: (_partial(LB.interpolated, alpha=0.5),
                              _partial(LB.interpolated_bound, alpha=0.5)),
    "flo": lambda: (LB.flo, LB.flo_bound),
    "l1out": lambda: (LB.conditional_nll, LB.l1out_bound),
    "club": lambda: (LB.conditional_nll, LB.club_bound),
}

#: Every estimator of the family benchmark, lower bounds first.
FAMILY = ("infonce", "nwj", "js", "dv", "tuba", "mine_ma", "smile_1", "smile_5",
          "alpha_infonce", "flo", "l1out", "club")


def family_estimators(names: Iterable[str] | str = FAMILY) -> dict[str, Estimator]:
    """``{name: (loss_fn, bound_fn)}`` for names of :data:`losses.registry.ESTIMATORS` (and
    aliases) or of :data:`NEW_ESTIMATORS` (``tuba``, ``mine_ma``, ``smile_1``, ``smile_5``,
    ``alpha_infonce``, ``flo``, ``l1out``, ``club``), fresh state each call."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: dict[str, Estimator] = {}
    for name in names:
        key = str(name).strip().lower()
        if key in ESTIMATORS:
            out[ESTIMATORS.canonical(key)] = ESTIMATORS.get(key).factory()
        elif key in NEW_ESTIMATORS:
            out[key] = NEW_ESTIMATORS[key]()
        else:
            raise ValueError(f"unknown estimator {name!r}; choose from "
                             f"{sorted({*ESTIMATORS.available(), *NEW_ESTIMATORS})} (or, in "
                             "Python, pass a mapping name -> (loss_fn, bound_fn))")
    if not out:
        raise ValueError("estimators is empty; pass at least one estimator")
    return out


def _check_levels(levels: Sequence[float]) -> list[float]:
    try:
        out = [float(v) for v in levels]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"levels must be a sequence of MI values in nats, got {levels!r}") from exc
    if not out or any(not math.isfinite(v) or v <= 0 for v in out):
        raise ValueError(f"levels must be a non-empty sequence of MI values > 0, got {levels!r}")
    return out


# --------------------------------------------------------------------------- the benchmark


def check_arguments(
    estimators: Iterable[str] | Mapping[str, Estimator] = DEFAULT_ESTIMATORS,
    critic: str | Callable[[int], nn.Module] = "separable",
    dim: int = 20,
    batch_size: int = 64,
    levels: Sequence[float] = (2, 4, 6, 8, 10),
    steps_per_level: int = 1000,
    lr: float = 5e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    critic_kwargs: Mapping | None = None,
    transform: str | None = None,
    estimator_critics: Mapping[str, str | Callable[[int], nn.Module]] | None = None,
) -> tuple[dict[str, Estimator], list[float]]:
    """Check :func:`run`'s arguments without training anything (``ValueError`` / ``TypeError``
    naming the argument); returns the resolved estimators and levels."""
    est = resolve_estimators(estimators)
    dim = check_dim(dim)
    check_int(batch_size, "batch_size", 2, why=" (positives need negatives)")
    check_positive_int(steps_per_level, "steps_per_level")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    check_int(seed, "seed", 0)
    levels = _check_levels(levels)
    try:  # the largest level must have a rho below 1 in this dimension
        rho_from_mi(max(levels), dim)
    except ValueError as exc:
        raise ValueError(f"levels: {exc}") from None
    _transform(transform)
    for name in estimator_critics or {}:
        if name not in est:
            raise ValueError(f"estimator_critics names {name!r}, which is not one of the "
                             f"estimators {list(est)}")
    with torch.random.fork_rng(devices=[]):
        _check_trainable(make_critic(critic, dim, **dict(critic_kwargs or {})), critic)
        for name, own in (estimator_critics or {}).items():
            _check_trainable(make_critic(own, dim), own, f"estimator_critics[{name!r}]")
    return est, levels


def _check_trainable(model: nn.Module, critic: object, where: str = "critic") -> None:
    """``ValueError`` naming ``where`` and the critic when ``model`` has nothing to train."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{where} {_critic_name(critic)!r} has no trainable parameters; use "
                         "separable, concat or bilinear")


def diverged(results: Mapping) -> dict[str, int]:
    """``{estimator: number of non-finite estimates}`` for the estimators that diverged (any
    non-finite estimate: a score or loss overflowed, and no number after it can be trusted)."""
    out = {}
    for name, values in results["estimates"].items():
        n = int(np.sum(~np.isfinite(np.asarray(values, dtype=np.float64))))
        if n:
            out[name] = n
    return out


def run(
    estimators: Iterable[str] | Mapping[str, Estimator] = DEFAULT_ESTIMATORS,
    critic: str | Callable[[int], nn.Module] = "separable",
    dim: int = 20,
    batch_size: int = 64,
    levels: Sequence[float] = (2, 4, 6, 8, 10),
    steps_per_level: int = 1000,
    lr: float = 5e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    output: str | Path | None = None,
    critic_kwargs: Mapping | None = None,
    transform: str | None = None,
    estimator_critics: Mapping[str, str | Callable[[int], nn.Module]] | None = None,
) -> dict:
    """Train one critic per estimator on fresh correlated-Gaussian batches whose MI follows
    ``levels`` (each held ``steps_per_level`` steps) and record the estimate at every step.

    All estimators see the same batches and start from the same critic initialisation (from
    ``seed``); each has its own Adam optimiser (``lr``). A step whose loss is not finite is
    skipped (no update; counted in ``skipped_steps``) and its estimate recorded as NaN.

    Returns a dict: ``config``, ``true_mi`` (per step), ``log_batch_size``, ``estimates``
    (``{name: [per step]}``), ``skipped_steps``, ``summary`` (see :func:`summarize`),
    ``seconds``; with ``output`` (a directory, created) also ``files``: the JSON, CSV, Markdown
    and PNG written there by :func:`write_results`.

    ``transform``: ``None`` (the Gaussian pairs) or ``"cubic"`` (``y -> y^3``, the same MI).
    ``estimator_critics``: a critic (name or factory) per estimator instead of ``critic``; the
    upper bounds (:data:`UPPER_BOUNDS`) it does not name get :func:`gaussian_conditional`.
    """
    est, levels = check_arguments(estimators, critic, dim, batch_size, levels, steps_per_level,
                                  lr, seed, critic_kwargs=critic_kwargs, transform=transform,
                                  estimator_critics=estimator_critics)
    dim, batch_size, steps_per_level, seed = (int(operator.index(v)) for v in
                                              (dim, batch_size, steps_per_level, seed))
    dev = resolve_device(device)
    kw = dict(critic_kwargs or {})
    # the upper bounds read their scores as log q(y|x): they keep the conditional critic unless
    # estimator_critics names them (naming another estimator does not drop it)
    own = {**{n: gaussian_conditional for n in est if is_upper_bound(n)},
           **dict(estimator_critics or {})}
    apply = _transform(transform)

    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for name in est:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = (make_critic(own[name], dim) if name in own
                     else make_critic(critic, dim, **kw))
            _check_trainable(model, *((own[name], f"estimator_critics[{name!r}]")
                                      if name in own else (critic,)))
            if name in SHADOW_ESTIMATORS:
                model = ShadowCritic(model, dim)
            model = model.to(dev)
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = model
        opts[name] = torch.optim.Adam(params, lr=lr)

    gen = torch.Generator().manual_seed(seed)
    pos, neg = diagonal_masks(batch_size, dev)
    true_mi = staircase(levels, steps_per_level)
    estimates: dict[str, list[float]] = {name: [] for name in est}
    skipped = dict.fromkeys(est, 0)
    smooth = dict.fromkeys(est, math.nan)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(true_mi), disable=not progress, desc="known-MI benchmark", unit="step")
    for step, mi in enumerate(true_mi):
        rho = rho_from_mi(float(mi), dim)
        x, y = sample_gaussian(batch_size, dim, rho, generator=gen)
        x, y = x.to(dev), apply(y).to(dev)
        for name, (loss_fn, bound_fn) in est.items():
            model, opt = models[name], opts[name]
            opt.zero_grad(set_to_none=True)
            out = model(x, y)  # the scores, or (scores, shadow) for SHADOW_ESTIMATORS
            scores, extra = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
            if not bool(torch.isfinite(scores).all()):
                estimates[name].append(math.nan)
                skipped[name] += 1
                continue
            loss = loss_fn(scores, pos, neg, *extra)
            if not bool(torch.isfinite(loss)):
                estimates[name].append(math.nan)
                skipped[name] += 1
                continue
            loss.backward()
            opt.step()
            with torch.no_grad():
                value = float(bound_fn(scores.detach(), pos, neg,
                                       *(e.detach() for e in extra)))
            estimates[name].append(value)
            if math.isfinite(value):
                s = smooth[name]
                smooth[name] = value if math.isnan(s) else 0.98 * s + 0.02 * value
        bar.update(1)
        if progress and (step % 50 == 0 or step == len(true_mi) - 1):
            # one mapping, not keywords: an estimator may be named "true" or "refresh"
            bar.set_postfix({"true": f"{mi:.1f}", **{k: f"{v:.2f}" for k, v in smooth.items()}})
    bar.close()

    results = {
        "config": {
            "estimators": list(est),
            "critic": _critic_name(critic),
            "critic_kwargs": kw,
            # what the critic was built with: Poole et al.'s sizes (DEFAULT_CRITIC_KWARGS)
            # with critic_kwargs over them; None for a critic given as a factory
            "critic_settings": _critic_settings(critic, kw),
            "estimator_critics": {n: _critic_name(c) for n, c in own.items()},
            "transform": transform,
            "dim": dim,
            "batch_size": batch_size,
            "levels": levels,
            "steps_per_level": steps_per_level,
            "lr": lr,
            "seed": seed,
            "device": str(dev),
        },
        "true_mi": true_mi.tolist(),
        "log_batch_size": math.log(batch_size),
        "estimates": estimates,
        "skipped_steps": skipped,
        "seconds": time.perf_counter() - start,
    }
    results["summary"] = summarize(results)
    results["diverged"] = diverged(results)
    if output is not None:
        results["files"] = write_results(results, output)
    return results


# --------------------------------------------------------------------------- reporting


def summarize(results: Mapping) -> list[dict]:
    """Per estimator and level, over the last half of the level's steps (the critic has had the
    first half to adapt): ``mean`` estimate, ``bias = mean - true MI``, ``variance`` (population)
    and ``mse = bias^2 + variance``; non-finite estimates are left out and counted in
    ``nonfinite``."""
    cfg = results["config"]
    spl = int(cfg["steps_per_level"])
    half = spl // 2
    rows = []
    for name, values in results["estimates"].items():
        arr = np.asarray(values, dtype=np.float64)
        for i, level in enumerate(cfg["levels"]):
            seg = arr[i * spl + half : (i + 1) * spl]
            finite = seg[np.isfinite(seg)]
            mean = float(finite.mean()) if finite.size else math.nan
            var = float(finite.var()) if finite.size else math.nan
            rows.append(
                {
                    "estimator": name,
                    "level": i,
                    "true_mi": float(level),
                    "mean": mean,
                    "bias": mean - float(level),
                    "variance": var,
                    "mse": (mean - float(level)) ** 2 + var,
                    "steps": int(seg.size),
                    "nonfinite": int(seg.size - finite.size),
                }
            )
    return rows


def nats(value: float) -> str:
    """A true MI level as the tables print it: every digit it was given, at least one decimal
    (``2.0``, ``1.25``), so the Markdown shows the level of the JSON and CSV."""
    text = f"{float(value):.10g}"
    return text if any(c in text for c in ".en") else text + ".0"


def markdown_table(results: Mapping) -> str:
    """The :func:`summarize` rows as a Markdown table (also of a ``results.json`` read back,
    whose non-finite statistics are ``null``)."""
    cfg = results["config"]
    head = (
        f"Known-MI benchmark: critic `{cfg['critic']}`, d = {cfg['dim']}, batch "
        f"{cfg['batch_size']} (log batch = {results['log_batch_size']:.2f} nats), "
        f"{cfg['steps_per_level']} steps per level, lr {cfg['lr']:g}; statistics over the last "
        "half of each level."
    )

    def num(v: float | None, fmt: str) -> str:  # None: a non-finite number read from the JSON
        return format(v, fmt) if v is not None and math.isfinite(v) else "non-finite"

    body = []
    for r in results.get("summary") or summarize(results):
        bad = int(r.get("nonfinite", 0))
        body.append([r["estimator"], nats(r["true_mi"]), num(r["mean"], ".3f"),
                     num(r["bias"], "+.3f"), num(r["variance"], ".3f"), num(r["mse"], ".3f"),
                     f"{bad} of {r['steps']}" if bad else "0"])
    header = ["estimator", "true MI (nats)", "mean estimate (nats)", "bias (nats)",
              "variance (nats²)", "MSE (nats²)", "non-finite"]
    lines = [head, "", _pipe_table(header, body, align="lrrrrrr")]
    bad = diverged(results)
    if bad:
        total = len(results["true_mi"])
        lines += ["", "DIVERGED (non-finite estimates; their statistics leave them out): "
                  + ", ".join(f"{k} {v} of {total} steps" for k, v in bad.items())]
    return "\n".join(lines) + "\n"


def plot(results: Mapping, path: str | Path, decay: float | None = None) -> Path:
    """Poole et al. (2019) fig. 2: per estimator a panel of the estimate vs step (raw, faint;
    EMA-smoothed with ``decay``, by default ``1 - 20 / steps_per_level`` so that the average
    spans a twentieth of a level), the true MI staircase (black) and ``log(batch)`` (dashed).
    Writes a PNG with matplotlib's Agg canvas (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if decay is None:
        decay = max(0.5, 1.0 - 20.0 / float(results["config"]["steps_per_level"]))
    names = list(results["estimates"])
    true_mi = np.asarray(results["true_mi"])
    steps = np.arange(true_mi.size)
    log_b = float(results["log_batch_size"])
    top = max(float(true_mi.max()), log_b) * 1.3
    fig = Figure(figsize=(3.2 * len(names), 3.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    for i, (ax, name) in enumerate(zip(axes, names)):
        raw = np.asarray(results["estimates"][name], dtype=np.float64)
        c = colors[i % len(colors)]
        ax.plot(steps, raw, color=c, alpha=0.25, linewidth=0.6)
        bad = ~np.isfinite(raw)
        smooth = ema(raw.tolist(), decay)
        smooth[bad] = np.nan  # a gap, not a line carried flat through the diverged steps
        ax.plot(steps, smooth, color=c, linewidth=1.6, label="estimate (EMA)")
        ax.plot(steps, true_mi, color="black", linewidth=1.2, label="true MI")
        ax.axhline(log_b, color="gray", linestyle="--", linewidth=1.0, label="log(batch)")
        if bad.any():
            ax.plot(steps[bad], np.full(int(bad.sum()), 0.95 * top), linestyle="none",
                    marker="|", color="red", markersize=8, label="non-finite estimate")
            ax.set_title(f"{name}: DIVERGED ({int(bad.sum())} non-finite)", color="red",
                         fontsize=9)
        else:
            ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(-1.0, top)
    axes[0].set_ylabel("MI (nats)")
    axes[0].legend(loc="upper left", fontsize=7)
    cfg = results["config"]
    fig.suptitle(f"critic: {cfg['critic']}, d={cfg['dim']}, batch={cfg['batch_size']}",
                 fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_results(results: Mapping, output: str | Path) -> dict[str, str]:
    """Write ``results.json``, ``results.csv`` (estimator, step, true_mi, estimate),
    ``results.md`` (:func:`markdown_table`) and ``mi_benchmark.png`` (:func:`plot`) into the
    directory ``output``; return their paths."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / "results.json",
        "csv": out / "results.csv",
        "markdown": out / "results.md",
        "png": out / "mi_benchmark.png",
    }
    payload = {k: v for k, v in results.items() if k != "files"}
    payload["files"] = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps(to_jsonable(payload), allow_nan=False))
    with files["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["estimator", "step", "true_mi", "estimate"])
        for name, values in results["estimates"].items():
            for step, (t, v) in enumerate(zip(results["true_mi"], values)):
                w.writerow([name, step, repr(float(t)), repr(float(v))])
    files["markdown"].write_text(markdown_table(results))
    plot(results, files["png"])
    return {k: str(v) for k, v in files.items()}
