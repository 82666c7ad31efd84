"""The five experiments of Tschannen et al., "On Mutual Information Maximization for
Representation Learning" (ICLR 2020), on 8x8 digits by default and on MNIST as a flag.

Each experiment is a function ``experiment(data, cfg, seeds, device, progress) -> dict`` built
from the project's pieces: critics from :mod:`contrastive.critics`, bounds from
:mod:`losses.functional` on the critic's score matrix with diagonal positives
(:func:`contrastive.pairs.diagonal_masks`), and the paper's linear evaluation
:func:`evaluation.probe.linear_probe` with ``protocol="tschannen2020"``.

=============  ============================================================================
``bijective``  RealNVP (additive couplings) encoders g1, g2 + bilinear critic, trained with
               I_NCE and with I_NWJ; bound and probe accuracy of g1(top half) over training
``adversarial``  an affine RealNVP g1 trained against a linear classifier so that its output is
               linearly uninformative (cross-entropy against uniform labels)
``critics``    MLP encoders with bilinear / separable / concat critics x I_NCE / I_NWJ
``encoders``   ConvNet vs MLP encoders trained on ``|I_EST - t|``, t in {2, 4}
``noniid``     concat critic on a 2-D Gaussian, non-i.i.d. batches vs i.i.d. batches
=============  ============================================================================

Sizes live in one dataclass per experiment: ``DEFAULTS`` fit a few minutes on 2 CPU cores for
digits, ``PAPER`` are the official protocol's (docs/architecture.md, The paper's protocol).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from contrastive.critics import Bilinear, Concat, create
from contrastive.pairs import diagonal_masks
from contrastive.registry import Registry
from losses.registry import ESTIMATORS as _ESTIMATORS

from ..results import mean_std
from .data import (
    MARGINAL_COV,
    NEGATIVE_PAIR_COV,
    NOISE_SIGMA,
    TRUE_MI,
    HalvesData,
    add_noise,
    gaussian_kl,
    sample_iid,
    sample_noniid,
)
from .encoders import make_encoder, mlp_encoder
from .flows import Flow

__all__ = [
    "BijectiveConfig",
    "AdversarialConfig",
    "CriticsConfig",
    "EncodersConfig",
    "NoniidConfig",
    "DEFAULTS",
    "PAPER",
    "EXPERIMENTS",
    "estimate",
    "summarise",
]

#: The bounds the paper trains and reports (names of :data:`losses.registry.ESTIMATORS`).
ESTIMATORS = ("infonce", "nwj")

#: The critics of the ``critics`` experiment, and the alias "mlp" (the paper's name of concat).
_CRITIC_KINDS = {"bilinear": "bilinear", "separable": "separable", "concat": "concat",
                 "mlp": "concat"}


# --------------------------------------------------------------------------- configurations


@dataclass
class _Common:
    steps: int = 1000
    eval_every: int | None = None  # None: steps // evals
    evals: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    n_train: int | None = None  # subsets of the data (tiny test runs)
    n_test: int | None = None
    eval_batches: int = 10  # held-out batches for the bound readouts
    noise: float = NOISE_SIGMA

    def every(self) -> int:
        if self.eval_every is not None:
            return max(1, int(self.eval_every))
        return max(1, int(self.steps) // max(1, int(self.evals)))


@dataclass
class BijectiveConfig(_Common):
    """Additive RealNVP g1, g2 + bilinear critic. Paper (MNIST, 392-d halves): 30 couplings of
    [512, 512], Adam 1e-4, batch 128, 21k steps, evaluation every 1k."""

    couplings: int = 30
    hidden: int = 512
    layers: int = 2
    init_std: float = 1e-4
    estimators: tuple[str, ...] = ESTIMATORS


@dataclass
class AdversarialConfig(_Common):
    """Affine RealNVP g1 vs a linear classifier (Adam ``lr_classifier``) on true labels; the
    encoder (Adam ``lr``) minimises the classifier's cross-entropy against uniform labels;
    ``warmup`` classifier steps, then ``inner_steps`` classifier steps per encoder step."""

    couplings: int = 30
    hidden: int = 512
    layers: int = 2
    init_std: float = 1e-4
    lr: float = 1e-5
    lr_classifier: float = 1e-3
    warmup: int = 1000
    inner_steps: int = 10


@dataclass
class CriticsConfig(_Common):
    """MLP encoders (300-300-100) with each critic and each estimator. Critics: bilinear
    (100 x 100), separable (g, h: 100-100-100), concat (200-200-1)."""

    encoder_hidden: int = 300
    out_dim: int = 100
    critics: tuple[str, ...] = ("bilinear", "separable", "concat")
    estimators: tuple[str, ...] = ESTIMATORS
    separable_hidden: int = 100
    separable_layers: int = 2
    concat_hidden: int = 200
    concat_layers: int = 2


@dataclass
class EncodersConfig(_Common):
    """ConvNet vs MLP encoders (and the same kind for g2) with a bilinear critic, trained on
    ``|I_EST - t|``."""

    encoders: tuple[str, ...] = ("conv", "mlp")
    targets: tuple[float, ...] = (2.0, 4.0)
    estimators: tuple[str, ...] = ESTIMATORS
    out_dim: int = 100


@dataclass
class NoniidConfig(_Common):
    """Concat critic (hidden ``hidden``, ``layers`` hidden layers) on the 2-D Gaussian,
    trained on non-i.i.d. or i.i.d. batches; estimates averaged over ``eval_batches`` fresh
    batches of the same kind."""

    hidden: int = 10
    layers: int = 5
    estimators: tuple[str, ...] = ESTIMATORS
    samplers: tuple[str, ...] = ("noniid", "iid")
    eval_batches: int = 200


# Digits defaults: sized for 2 shared CPU cores (see docs/reproduction.md for the timings).
DEFAULTS: dict[str, _Common] = {
    # 32-d halves: 10 couplings of [64, 64] instead of 30 of [512, 512]; higher learning rates
    # and fewer steps than the paper everywhere (1,347 training images instead of 60,000)
    "bijective": BijectiveConfig(steps=2000, couplings=10, hidden=64, lr=3e-4, evals=10),
    "adversarial": AdversarialConfig(
        steps=2000, couplings=10, hidden=64, lr=1e-4, warmup=500, inner_steps=10, evals=10
    ),
    "critics": CriticsConfig(steps=1200, lr=3e-4, evals=6),
    "encoders": EncodersConfig(steps=2000, lr=3e-4, evals=10),
    "noniid": NoniidConfig(steps=4000, lr=1e-3, evals=10),
}

PAPER: dict[str, _Common] = {
    "bijective": BijectiveConfig(steps=21000, eval_every=1000),
    "adversarial": AdversarialConfig(steps=10000, eval_every=500),
    "critics": CriticsConfig(steps=21000, eval_every=1000),
    "encoders": EncodersConfig(steps=21000, eval_every=1000),
    "noniid": NoniidConfig(steps=20000, eval_every=1000),
}


def config_fields(cfg: _Common) -> set[str]:
    return {f.name for f in fields(cfg)}


def _check_sizes(cfg: _Common) -> None:
    """Refuse sizes that would fail late with a message about something else: a batch needs
    two pairs (I_NCE and I_NWJ read negatives off the other pairs of the batch), and the subset
    sizes are row counts (a negative one would silently drop rows from the end)."""
    b = cfg.batch_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 2:
        raise ValueError(
            f"batch_size must be an integer >= 2 (the bounds need negatives from the other "
            f"pairs of the batch), got {b!r}; e.g. batch_size=128 (the paper's)"
        )
    for key in ("n_train", "n_test"):
        v = getattr(cfg, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise ValueError(
                f"{key} must be None (the whole split) or an integer >= 2 (the first {key} "
                f"rows), got {v!r}"
            )


def make_config(name: str, paper_size: bool, steps: int | None, sizes: dict) -> _Common:
    """The configuration of experiment ``name``: defaults (or the paper's), ``steps`` and any
    field overrides in ``sizes``; unknown names raise ``ValueError``."""
    base = (PAPER if paper_size else DEFAULTS)[name]
    unknown = set(sizes) - config_fields(base)
    if unknown:
        raise ValueError(
            f"unknown size(s) {sorted(unknown)} for experiment {name!r}; valid: "
            f"{sorted(config_fields(base))}"
        )
    over = dict(sizes)
    if steps is not None:
        if int(steps) < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        over["steps"] = int(steps)
    if (steps is not None or "evals" in sizes) and "eval_every" not in sizes:
        over["eval_every"] = None  # spread cfg.evals evaluations over the steps
    for key in ("estimators", "critics", "encoders", "targets", "samplers"):
        if key in over and isinstance(over[key], (str, int, float)):
            over[key] = (over[key],)
    cfg = replace(base, **over)
    _check_sizes(cfg)
    if hasattr(cfg, "estimators"):
        for est in cfg.estimators:
            if str(est) not in _ESTIMATORS or _ESTIMATORS.canonical(str(est)) not in ESTIMATORS:
                raise ValueError(f"estimators must be among {ESTIMATORS} (or an alias such as "
                                 f"'nce'), got {est!r}")
        cfg = replace(cfg, estimators=tuple(_ESTIMATORS.canonical(str(e))
                                            for e in cfg.estimators))
    if hasattr(cfg, "critics"):
        # one name per critic: the verdict, the claims and the figure look for "concat"
        for kind in cfg.critics:
            if str(kind) not in _CRITIC_KINDS:
                raise ValueError(f"critics must be among {tuple(_CRITIC_KINDS)} (or 'mlp' for "
                                 f"'concat', the paper's MLP critic), got {kind!r}")
        cfg = replace(cfg, critics=tuple(_CRITIC_KINDS[str(k)] for k in cfg.critics))
    return cfg


# --------------------------------------------------------------------------- small pure helpers


def estimate(scores: Tensor, estimator: str) -> Tensor:
    """``I_NCE`` or ``I_NWJ`` (nats) of a paired score matrix ``S [B, B]`` with positives on the
    diagonal (:func:`losses.functional.infonce_bound` / :func:`~losses.functional.nwj_bound`)."""
    pos, neg = diagonal_masks(scores.shape[0], scores.device)
    _, bound = _ESTIMATORS.get(estimator).factory()
    return bound(scores, pos, neg)


def summarise(rows: list[dict], keys: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Group ``rows`` by ``keys``; per group ``n``, its number of rows (seeds), and per metric
    ``m`` the mean ``m_mean``, the sample std ``m_std`` (ddof=1; None for one seed: one value
    has no spread to report) and ``m_n``, the
    number of seeds the two are over. A ``None`` value (a diverged run's probe) is left out, so
    ``m_n < n`` marks a mean over only some of the seeds; a NaN is kept (both statistics NaN)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["n"] = len(rs)
        for m in metrics:
            mean, std, n = mean_std([r[m] for r in rs if r.get(m) is not None],
                                    skip_nonfinite=False)
            row[f"{m}_mean"] = mean if n else None
            row[f"{m}_std"] = std if n > 1 else None
            row[f"{m}_n"] = n
        out.append(row)
    return out


def _stats(values: Sequence[float]) -> dict:
    """Mean, sample std (None for one value: no spread was measured) and the values."""
    mean, std, n = mean_std(values, skip_nonfinite=False)
    return {"mean": mean, "std": std if n > 1 else None, "values": [float(x) for x in values]}


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation per epoch, the last partial batch dropped."""
    b = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - b + 1, b):
            yield perm[s : s + b]


def _eval_index_batches(n: int, batch_size: int, count: int, seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    b = min(batch_size, n)
    return [torch.randperm(n, generator=gen)[:b] for _ in range(max(1, count))]


@torch.no_grad()
def _embed(encoder: nn.Module, x: Tensor, chunk: int = 8192) -> Tensor:
    was = encoder.training
    encoder.eval()
    out = torch.cat([encoder(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])
    encoder.train(was)
    return out


def _probe(ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor, seed: int) -> float:
    """The paper's linear evaluation (MinMax + saga LogisticRegression, C=10, tol=0.1)."""
    from evaluation.probe import linear_probe

    res = linear_probe(
        ftr.detach().cpu().numpy(), ytr.cpu().numpy(), fte.detach().cpu().numpy(),
        yte.cpu().numpy(), protocol="tschannen2020", seed=seed,
    )
    return float(res["accuracy"])


@dataclass
class _EvalViews:
    """One fixed noise draw of the train/test halves for a seed (evaluation features)."""

    x_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_train: Tensor
    labels_test: Tensor
    test_batches: list[Tensor] = field(default_factory=list)


def _eval_views(data: HalvesData, cfg: _Common, seed: int) -> _EvalViews:
    gen = torch.Generator().manual_seed(1_000 + seed)
    noisy = [add_noise(t.cpu(), cfg.noise, gen).to(t.device) for t in
             (data.x_train, data.x_test, data.y_test)]
    return _EvalViews(
        *noisy, data.labels_train, data.labels_test,
        _eval_index_batches(data.x_test.shape[0], cfg.batch_size, cfg.eval_batches, seed),
    )


def _raw_baseline(ev: _EvalViews, seed: int) -> float:
    return _probe(ev.x_train, ev.labels_train, ev.x_test, ev.labels_test, seed)


def _bound_readouts(g1, g2, critic, ev: _EvalViews) -> dict:
    """I_NCE and I_NWJ averaged over the fixed held-out batches."""
    nce, nwj = [], []
    with torch.no_grad():
        fx, fy = _embed(g1, ev.x_test), _embed(g2, ev.y_test)
        for idx in ev.test_batches:
            idx = idx.to(fx.device)
            s = critic(fx[idx], fy[idx])
            if not torch.isfinite(s).all():
                return {"infonce": math.nan, "nwj": math.nan}
            nce.append(float(estimate(s, "infonce")))
            nwj.append(float(estimate(s, "nwj")))
    return {"infonce": float(np.mean(nce)), "nwj": float(np.mean(nwj))}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- a paired-views trainer


def _train_views(
    g1: nn.Module,
    g2: nn.Module,
    critic: nn.Module,
    data: HalvesData,
    ev: _EvalViews,
    cfg: _Common,
    seed: int,
    estimator: str,
    desc: str,
    progress: bool,
    objective: Callable[[Tensor], Tensor] | None = None,
    extra_eval: Callable[[], dict] | None = None,
) -> tuple[list[dict], dict]:
    """Train g1, g2 and the critic with Adam on ``objective(I_EST)`` (default ``-I_EST``) over
    noisy paired halves; evaluate at step 0, every ``cfg.every()`` steps and at the end.

    Returns the curve (one row per evaluation) and the final row.
    """
    params = [*g1.parameters(), *g2.parameters(), *critic.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data.x_train.shape[0], cfg.batch_size, gen)
    objective = objective or (lambda est: -est)
    every, curve, running, diverged = cfg.every(), [], [], None

    def evaluate(step: int) -> dict:
        row = {"step": step, "train_bound": float(np.mean(running)) if running else None}
        row.update(_bound_readouts(g1, g2, critic, ev))
        row["bound"] = row[_ESTIMATORS.canonical(estimator)]
        ftr, fte = _embed(g1, ev.x_train), _embed(g1, ev.x_test)
        ok = bool(torch.isfinite(ftr).all() and torch.isfinite(fte).all())
        row["accuracy"] = _probe(ftr, ev.labels_train, fte, ev.labels_test, seed) if ok else None
        if extra_eval is not None:
            row.update(extra_eval())
        return row

    curve.append(evaluate(0))
    bar = _bar(cfg.steps, desc, progress)
    for step in range(1, cfg.steps + 1):
        idx = next(batches).to(data.x_train.device)
        x = add_noise(data.x_train[idx], cfg.noise)
        y = add_noise(data.y_train[idx], cfg.noise)
        s = critic(g1(x), g2(y))
        if not torch.isfinite(s).all():
            diverged = step
            break
        est = estimate(s, estimator)
        opt.zero_grad(set_to_none=True)
        objective(est).backward()
        opt.step()
        running.append(float(est.detach()))
        bar.update(1)
        if step % every == 0 or step == cfg.steps:
            curve.append(evaluate(step))
            bar.set_postfix(bound=f"{curve[-1]['train_bound']:.3f}",
                            acc=f"{curve[-1]['accuracy'] or float('nan'):.3f}")
            running = []
    bar.close()
    if diverged is not None:
        row = evaluate(diverged)
        row["diverged_at"] = diverged
        curve.append(row)
    final = dict(curve[-1])
    final["diverged_at"] = diverged
    return curve, final


# --------------------------------------------------------------------------- 1. bijective


def _max_keep_nan(values: Iterable[float]) -> float:
    """The largest value, NaN if any value is NaN (``np.max``; Python's ``max`` skips a NaN that
    is not the first value, so a flow that broke would read as invertible)."""
    return float(np.max(np.asarray(list(values), dtype=float)))


def _recon_error(flow: Flow, x: Tensor, dtype: torch.dtype | None = None) -> float:
    """``max |g^{-1}(g(x)) - x|`` over the rows of ``x``, in ``flow``'s precision or, with
    ``dtype``, in a copy of the flow cast to ``dtype`` (float64 separates rounding in float32
    from a real loss of invertibility)."""
    if dtype is not None:
        flow, x = copy.deepcopy(flow).to(dtype), x.to(dtype)
    with torch.no_grad():
        return float((flow.inverse(flow(x)) - x).abs().max())


def bijective(data: HalvesData, cfg: BijectiveConfig, seeds, device, progress) -> dict:
    """The bijective experiment: bijective g1, g2 keep I(x; g1(x)) maximal, yet training them with
    I_NCE / I_NWJ changes the linear-probe accuracy of g1(x)."""
    d = data.dim
    curves, finals, base = [], [], []
    for seed in seeds:
        ev = _eval_views(data, cfg, seed)
        base.append(_raw_baseline(ev, seed))
        for est in cfg.estimators:
            _seed_all(seed)
            g1 = Flow(d, cfg.couplings, cfg.hidden, cfg.layers, False, cfg.init_std, 2 * seed)
            g2 = Flow(d, cfg.couplings, cfg.hidden, cfg.layers, False, cfg.init_std, 2 * seed + 1)
            g1, g2 = g1.to(device), g2.to(device)
            critic = Bilinear(d, init="random").to(device)
            curve, final = _train_views(
                g1, g2, critic, data, ev, cfg, seed, est, f"bijective {est} s{seed}", progress,
                extra_eval=lambda g1=g1, ev=ev: {"recon_error": _recon_error(g1, ev.x_test)},
            )
            tag = {"seed": seed, "estimator": est}
            curves += [{**tag, **r} for r in curve]
            accs = [r["accuracy"] for r in curve if r["accuracy"] is not None]
            finals.append({**tag, **final, "raw_accuracy": base[-1],
                           "initial_accuracy": curve[0]["accuracy"],
                           "initial_bound": curve[0]["bound"],
                           "max_accuracy": max(accs) if accs else None,
                           "max_recon_error": _max_keep_nan(r["recon_error"] for r in curve)})
    metrics = ["bound", "infonce", "nwj", "train_bound", "initial_bound", "accuracy",
               "max_accuracy", "initial_accuracy", "raw_accuracy", "recon_error",
               "max_recon_error"]
    return {
        "baseline": {"raw_pixels_accuracy": _stats(base)},
        "runs": finals,
        "curves": curves,
        "summary": summarise(finals, ["estimator"], metrics),
    }


# --------------------------------------------------------------------------- 2. adversarial


def _adversarial_run(data: HalvesData, cfg: AdversarialConfig, seed: int, ev: _EvalViews,
                     device, progress: bool) -> tuple[list[dict], int | None]:
    """One seed of :func:`adversarial`; returns the evaluation curve and the step at which
    training diverged (``None`` if it did not). As in :func:`_train_views`, a step whose
    encoder output or classifier logits are not finite stops the run before any update, and
    the curve ends with an evaluation at that step marked ``diverged_at``."""
    d, n_cls = data.dim, int(data.labels_train.max()) + 1
    _seed_all(seed)
    g1 = Flow(d, cfg.couplings, cfg.hidden, cfg.layers, True, cfg.init_std, 2 * seed).to(device)
    clf = nn.Linear(d, n_cls).to(device)
    opt_g = torch.optim.Adam(g1.parameters(), lr=cfg.lr)
    opt_c = torch.optim.Adam(clf.parameters(), lr=cfg.lr_classifier)
    batches = _batches(data.x_train.shape[0], cfg.batch_size, torch.Generator().manual_seed(seed))

    def classifier_steps(k: int) -> bool:
        """``k`` classifier steps on g1's features; ``False``, and no step, if they are not
        finite."""
        idx = torch.cat([next(batches) for _ in range(k)]).to(data.x_train.device)
        with torch.no_grad():
            feats = g1(add_noise(data.x_train[idx], cfg.noise))
        if not torch.isfinite(feats).all():
            return False
        for f, lab in zip(feats.chunk(k), data.labels_train[idx].chunk(k)):
            opt_c.zero_grad(set_to_none=True)
            F.cross_entropy(clf(f), lab).backward()
            opt_c.step()
        return True

    def evaluate(step: int, running: list[float]) -> dict:
        ftr, fte = _embed(g1, ev.x_train), _embed(g1, ev.x_test)
        ok = bool(torch.isfinite(ftr).all() and torch.isfinite(fte).all())
        with torch.no_grad():
            adv = float((clf(fte).argmax(1) == ev.labels_test).float().mean()) if ok else None
        return {
            "step": step,
            "accuracy": _probe(ftr, ev.labels_train, fte, ev.labels_test, seed) if ok else None,
            "adversary_accuracy": adv,
            "uniform_ce": float(np.mean(running)) if running else None,
            "recon_error": _recon_error(g1, ev.x_test),
            "recon_error_f64": _recon_error(g1, ev.x_test, torch.float64),
        }

    bar = _bar(cfg.warmup + cfg.steps * (cfg.inner_steps + 1), f"adversarial s{seed}", progress)
    for start in range(0, cfg.warmup, 50):  # warm-up in chunks of 50 steps
        k = min(50, cfg.warmup - start)
        classifier_steps(k)
        bar.update(k)
    curve, running, every, diverged = [evaluate(0, [])], [], cfg.every(), None
    for step in range(1, cfg.steps + 1):
        if not classifier_steps(cfg.inner_steps):
            diverged = step
            break
        idx = next(batches).to(data.x_train.device)
        logits = clf(g1(add_noise(data.x_train[idx], cfg.noise)))
        if not torch.isfinite(logits).all():  # the encoder's or the classifier's weights
            diverged = step
            break
        loss = -F.log_softmax(logits, dim=1).mean()  # CE against uniform labels
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        running.append(float(loss.detach()))
        bar.update(cfg.inner_steps + 1)
        if step % every == 0 or step == cfg.steps:
            curve.append(evaluate(step, running))
            bar.set_postfix(acc=f"{curve[-1]['accuracy'] or float('nan'):.3f}")
            running = []
    bar.close()
    if diverged is not None:
        curve.append({**evaluate(diverged, running), "diverged_at": diverged})
    return curve, diverged


def adversarial(data: HalvesData, cfg: AdversarialConfig, seeds, device, progress) -> dict:
    """The adversarial experiment: a bijective (so MI-maximising) g1 whose features a linear
    classifier cannot use: the encoder minimises the cross-entropy of an online linear
    classifier against uniform labels, the classifier its cross-entropy on the true labels."""
    curves, finals, base = [], [], []
    for seed in seeds:
        ev = _eval_views(data, cfg, seed)
        base.append(_raw_baseline(ev, seed))
        curve, diverged = _adversarial_run(data, cfg, seed, ev, device, progress)
        curves += [{"seed": seed, **r} for r in curve]
        accs = [r["accuracy"] for r in curve if r["accuracy"] is not None]
        finals.append({"seed": seed, **curve[-1], "raw_accuracy": base[-1],
                       "initial_accuracy": curve[0]["accuracy"],
                       "min_accuracy": min(accs) if accs else None,
                       "max_recon_error": _max_keep_nan(r["recon_error"] for r in curve),
                       "diverged_at": diverged})
    metrics = ["accuracy", "min_accuracy", "adversary_accuracy", "initial_accuracy",
               "raw_accuracy", "recon_error", "max_recon_error", "recon_error_f64", "uniform_ce"]
    for r in finals:
        r["encoder"] = "affine RealNVP"
    return {
        "baseline": {"raw_pixels_accuracy": _stats(base)},
        "runs": finals,
        "curves": curves,
        "summary": summarise(finals, ["encoder"], metrics),
    }


# --------------------------------------------------------------------------- 3. critics


def _make_critic(kind: str, cfg: CriticsConfig, dim: int) -> nn.Module:
    sizes = {
        "bilinear": {"init": "random"},
        "separable": {"hidden_dim": cfg.separable_hidden, "out_dim": cfg.separable_hidden,
                      "layers": cfg.separable_layers},
        "concat": {"hidden_dim": cfg.concat_hidden, "layers": cfg.concat_layers},
    }
    if kind not in ("bilinear", "separable", "concat", "mlp"):
        raise ValueError(f"critic must be 'bilinear', 'separable' or 'concat', got {kind!r}")
    return create(kind, dim, **sizes["concat" if kind == "mlp" else kind])


def critics(data: HalvesData, cfg: CriticsConfig, seeds, device, progress) -> dict:
    """The critics experiment: MLP encoders with bilinear / separable / concat critics, each
    trained with I_NCE and with I_NWJ."""
    curves, finals, base = [], [], []
    for seed in seeds:
        ev = _eval_views(data, cfg, seed)
        base.append(_raw_baseline(ev, seed))
        for kind in cfg.critics:
            for est in cfg.estimators:
                _seed_all(seed)
                g1 = mlp_encoder(data.dim, cfg.encoder_hidden, cfg.out_dim).to(device)
                g2 = mlp_encoder(data.dim, cfg.encoder_hidden, cfg.out_dim).to(device)
                critic = _make_critic(kind, cfg, cfg.out_dim).to(device)
                curve, final = _train_views(
                    g1, g2, critic, data, ev, cfg, seed, est, f"critics {kind}/{est} s{seed}",
                    progress,
                )
                tag = {"seed": seed, "critic": kind, "estimator": est}
                curves += [{**tag, **r} for r in curve]
                finals.append({**tag, **final, "raw_accuracy": base[-1]})
    return {
        "baseline": {"raw_pixels_accuracy": _stats(base)},
        "runs": finals,
        "curves": curves,
        "summary": summarise(finals, ["critic", "estimator"],
                             ["bound", "train_bound", "infonce", "nwj", "accuracy"]),
    }


# --------------------------------------------------------------------------- 4. encoders


def encoders(data: HalvesData, cfg: EncodersConfig, seeds, device, progress) -> dict:
    """The encoders experiment: ConvNet and MLP encoders trained to the same bound value t
    with the loss ``|I_EST - t|`` and a bilinear critic; compare their probe accuracy."""
    curves, finals, base = [], [], []
    for seed in seeds:
        ev = _eval_views(data, cfg, seed)
        base.append(_raw_baseline(ev, seed))
        for kind in cfg.encoders:
            for est in cfg.estimators:
                for t in cfg.targets:
                    _seed_all(seed)
                    g1 = make_encoder(kind, data.dim, data.half_shape, cfg.out_dim).to(device)
                    g2 = make_encoder(kind, data.dim, data.half_shape, cfg.out_dim).to(device)
                    critic = Bilinear(cfg.out_dim, init="random").to(device)
                    curve, final = _train_views(
                        g1, g2, critic, data, ev, cfg, seed, est,
                        f"encoders {kind}/{est}/t={t:g} s{seed}", progress,
                        objective=lambda e, t=t: (e - t).abs(),
                    )
                    tag = {"seed": seed, "encoder": kind, "estimator": est, "target": float(t)}
                    curves += [{**tag, **r} for r in curve]
                    finals.append({**tag, **final, "raw_accuracy": base[-1]})
    return {
        "baseline": {"raw_pixels_accuracy": _stats(base)},
        "runs": finals,
        "curves": curves,
        "summary": summarise(finals, ["estimator", "target", "encoder"],
                             ["train_bound", "bound", "accuracy"]),
    }


# --------------------------------------------------------------------------- 5. noniid

_SAMPLERS = {"noniid": sample_noniid, "iid": sample_iid}


def _mean_estimate(critic: nn.Module, pairs: Tensor, estimator: str) -> tuple[float, float]:
    """Mean of the estimator over a stack of batches ``[n_batches, B, 2]`` and its standard
    error ``std / sqrt(n_batches)`` (batches are independent draws)."""
    with torch.no_grad():
        vals = np.array([float(estimate(critic(b[:, :1], b[:, 1:]), estimator)) for b in pairs])
    se = float(vals.std(ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else 0.0
    return float(vals.mean()), se


def noniid(data, cfg: NoniidConfig, seeds, device, progress) -> dict:
    """The non-i.i.d. experiment: with negatives that are not independent of the positives (a
    shared component per batch) the "lower bounds" exceed the true MI; with i.i.d. batches from
    the same marginal they stay below it."""
    curves, finals = [], []
    chunk = 500
    for seed in seeds:
        for sampler in cfg.samplers:
            if sampler not in _SAMPLERS:
                raise ValueError(f"samplers must be among {tuple(_SAMPLERS)}, got {sampler!r}")
            egen = torch.Generator().manual_seed(20_000 + seed)
            eval_same = _SAMPLERS[sampler](cfg.eval_batches, cfg.batch_size, egen, device)
            eval_iid = sample_iid(cfg.eval_batches, cfg.batch_size, egen, device)
            for est in cfg.estimators:
                _seed_all(seed)
                critic = Concat(1, cfg.hidden, cfg.layers).to(device)
                opt = torch.optim.Adam(critic.parameters(), lr=cfg.lr)
                gen = torch.Generator().manual_seed(seed)
                every, running = cfg.every(), []

                def evaluate(step, critic=critic, est=est, eval_same=eval_same,
                             eval_iid=eval_iid, running=running):
                    same, same_se = _mean_estimate(critic, eval_same, est)
                    on_iid, on_iid_se = _mean_estimate(critic, eval_iid, est)
                    return {
                        "step": step,
                        "estimate": same,
                        "estimate_se": same_se,
                        "estimate_on_iid": on_iid,
                        "estimate_on_iid_se": on_iid_se,
                        "train_estimate": float(np.mean(running)) if running else None,
                    }

                curve = [evaluate(0)]
                bar = _bar(cfg.steps, f"noniid {sampler}/{est} s{seed}", progress)
                pool = None
                for step in range(1, cfg.steps + 1):
                    j = (step - 1) % chunk
                    if j == 0:
                        pool = _SAMPLERS[sampler](chunk, cfg.batch_size, gen, device)
                    b = pool[j]
                    val = estimate(critic(b[:, :1], b[:, 1:]), est)
                    opt.zero_grad(set_to_none=True)
                    (-val).backward()
                    opt.step()
                    running.append(float(val.detach()))
                    bar.update(1)
                    if step % every == 0 or step == cfg.steps:
                        curve.append(evaluate(step))
                        running.clear()
                        bar.set_postfix(est=f"{curve[-1]['estimate']:.4f}")
                bar.close()
                tag = {"seed": seed, "sampler": sampler, "estimator": est}
                curves += [{**tag, **r} for r in curve]
                finals.append({**tag, **curve[-1]})
    return {
        "baseline": {
            "true_mi": TRUE_MI,
            "nwj_optimum_noniid": gaussian_kl(MARGINAL_COV, NEGATIVE_PAIR_COV),
            "log_batch": math.log(cfg.batch_size),
        },
        "runs": finals,
        "curves": curves,
        "summary": summarise(finals, ["estimator", "sampler"],
                             ["estimate", "estimate_se", "estimate_on_iid", "train_estimate"]),
    }


#: The experiments by name: ``factory`` runs one (``fn(data, cfg, seeds, device, progress)``);
#: ``meta["needs_data"]``: whether it trains on image halves (MNIST / digits);
#: ``meta["description"]``: what it shows.
EXPERIMENTS: Registry[dict] = Registry("experiment")
_DESCRIPTIONS = {
    "bijective": "RealNVP (bijective) encoders trained with I_NCE / I_NWJ and a bilinear critic: "
    "the bound and the linear probe improve although MI is maximal throughout",
    "adversarial": "an MI-maximising bijective encoder trained so that a linear classifier fails: "
    "probe accuracy falls below raw pixels",
    "critics": "MLP encoders with bilinear, separable and concat critics under I_NCE and I_NWJ: "
    "a tighter bound need not give a better probe",
    "encoders": "ConvNet vs MLP encoders trained to the same bound value (|I_EST - t|, t = 2, 4): "
    "equal bounds, different probe accuracy",
    "noniid": "2-D Gaussian with a shared component per batch: non-i.i.d. negatives push the "
    "estimates above the true MI (0.0204 nats), i.i.d. ones stay below",
}
for _fn, _needs in ((bijective, True), (adversarial, True), (critics, True), (encoders, True),
                    (noniid, False)):
    EXPERIMENTS.register(_fn.__name__, _fn, meta={"needs_data": _needs,
                                                   "description": _DESCRIPTIONS[_fn.__name__]})


def run_experiment(name, data, cfg, seeds, device, progress) -> dict:
    """Run one experiment and add the configuration and the wall time."""
    fn = EXPERIMENTS.get(name).factory
    t0 = time.perf_counter()
    res = fn(data, cfg, tuple(seeds), device, progress)
    res["wall_time_s"] = time.perf_counter() - t0
    res["config"] = asdict(cfg)
    return res
