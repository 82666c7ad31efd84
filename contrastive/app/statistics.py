"""Confidence intervals over seeds and the set of losses statistically indistinguishable from the
best one: the numbers that say whether a gap in a comparison table is real.

* :func:`t_interval` -- the mean of ``n`` seeds and its two-sided Student-t interval,
  ``mean +- t_{1-a/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (ddof=1).
  With 3 seeds ``t_{0.975, 2} = 4.30``, so the interval is wide: that is the honest width.
* :func:`paired_t_test` -- two-sided paired t-test on the per-seed differences
  ``d_i = a_i - b_i``: ``t = mean(d) / (sd(d) / sqrt(n))`` with ``n - 1`` degrees of freedom.
* :func:`indistinguishable_from_best` -- the best loss by mean (among those with every seed),
  and every loss whose paired test against it does not reject equality at level ``alpha``
  after Holm's step-down correction over the ``m`` comparisons that could be made (Holm 1979:
  sort the p-values, compare the ``i``-th smallest with ``alpha / (m - i)``, stop at the first
  that is not rejected; a loss with no common seeds has no p-value and is not counted in
  ``m``).

Why a *paired* test over seeds: in ``contrastive compare`` every loss trains with the same seeds,
and seed ``k`` fixes the same encoder initialisation and the same order of P x m batches for
every loss, so most of the seed-to-seed variation is shared; the differences cancel it and a
paired test has far more power than comparing two independent intervals. Why a t-test and not a
bootstrap: with 3-5 seeds a bootstrap resamples 3-5 numbers (at most 10-126 distinct resamples)
and its intervals are too narrow; the t-test is exact for normal seed noise and says plainly how
little a few seeds can tell. Cells missing on one side (a failed seed) drop that seed from the
pair. Every function is a pure function of plain float sequences; ``scipy.stats.t`` supplies
the quantiles and tail probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "t_interval", "paired_t_test", "holm", "indistinguishable_from_best"]


@dataclass(frozen=True)
class Interval:
    """``mean`` and the two-sided ``confidence`` interval ``[low, high]`` over ``n`` values;
    ``half_width = high - mean`` (NaN when ``n < 2``; all NaN when ``n == 0``)."""

    mean: float
    low: float
    high: float
    half_width: float
    n: int
    confidence: float = 0.95


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([float(v) if v is not None else math.nan for v in values], dtype=np.float64)
    return x[np.isfinite(x)]


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of the finite ``values`` and its Student-t interval
    ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` (``s``: sample std, ddof=1); the same
    numbers as ``scipy.stats.t.interval(confidence, n - 1, mean, scipy.stats.sem(x))``."""
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, confidence)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1, confidence)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, half, n, confidence)


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """``(t, p, n)`` of the two-sided paired t-test of ``a`` against ``b`` (same length, one value
    per seed; pairs with a non-finite side are dropped): ``t = mean(d) / (sd(d) / sqrt(n))``,
    ``d = a - b``, ``p = 2 * P(T_{n-1} > |t|)`` -- ``scipy.stats.ttest_rel(a, b)``. With
    ``sd(d) = 0`` the test is degenerate: ``p = 1`` when ``mean(d) = 0`` (identical), else
    ``p = 0``; ``p`` is NaN with fewer than 2 pairs."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    x = np.asarray([math.nan if v is None else float(v) for v in a], dtype=np.float64)
    y = np.asarray([math.nan if v is None else float(v) for v in b], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    n = int(d.size)
    if n < 2:
        return math.nan, math.nan, n
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (0.0, 1.0, n) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0, n)
    t = mean / (sd / math.sqrt(n))
    return t, float(2.0 * stats.t.sf(abs(t), n - 1)), n


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down rejections of ``pvalues`` at family-wise level ``alpha``: sorted
    ascending, the ``i``-th (0-based) is rejected while ``p_(i) <= alpha / (m - i)``; the first
    that is not stops the procedure. A NaN p-value (no test was possible, e.g. fewer than two
    common seeds) is never rejected and is not one of the ``m`` tests: it does not tighten the
    others' thresholds."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = int(np.isfinite(p).sum())
    reject = [False] * int(p.size)
    order = np.argsort(np.where(np.isfinite(p), p, np.inf), kind="stable")
    for i, j in enumerate(order):
        if not (np.isfinite(p[j]) and p[j] <= alpha / (m - i)):
            break
        reject[int(j)] = True
    return reject


def indistinguishable_from_best(
    per_seed: Mapping[str, Mapping[int, float]], alpha: float = 0.05, correction: str = "holm"
) -> dict[str, object]:
    """Which losses the seeds cannot tell apart from the best.

    ``per_seed`` maps a loss to ``{seed: value}`` (higher is better). The best is the loss with
    the highest mean over its finite values among the losses with the most finite values
    (every seed, unless every loss lost one): a loss whose other seeds failed or diverged is
    not crowned on the seeds that survived, since a mean over one lucky seed is no mean over
    the seeds the table shows, and it would leave every other loss "indistinguishable" (fewer
    than two common seeds); such losses are listed as ``"incomplete"``. Every other loss is
    paired with the best on their common
    seeds and tested with :func:`paired_t_test`; ``correction="holm"`` applies :func:`holm` over
    the ``m`` tests that gave a p-value (a loss with no finite value, or fewer than 2 common
    seeds, does not count), ``"none"`` compares each p with ``alpha``. A loss whose equality
    with the best is not rejected (or that shares fewer than 2 seeds with it) is
    indistinguishable.

    Returns ``{"best", "indistinguishable" (the best first, then the table order), "p_values"
    ({loss: p}, the best's is 1.0), "incomplete" (the losses with fewer finite values than the
    most, in table order; those with none included), "alpha", "correction", "test": "paired
    t-test over seeds"}``."""
    if correction not in ("holm", "none"):
        raise ValueError(f"correction must be 'holm' or 'none', got {correction!r}")
    finite = {k: _finite(list(s.values())) for k, s in per_seed.items()}
    means = {k: float(np.mean(v)) for k, v in finite.items() if v.size}
    most = max((v.size for v in finite.values()), default=0)
    out: dict[str, object] = {"best": None, "indistinguishable": [], "p_values": {},
                              "incomplete": [k for k in per_seed if finite[k].size < most],
                              "alpha": alpha, "correction": correction,
                              "test": "paired t-test over seeds"}
    if not means:
        return out
    eligible = [k for k in means if finite[k].size == most]
    best = max(eligible, key=lambda k: (means[k], -list(per_seed).index(k)))
    others = [k for k in per_seed if k != best]
    pvals = []
    for k in others:
        seeds = sorted(set(per_seed[best]) & set(per_seed[k]))
        _, p, _ = paired_t_test([per_seed[best][s] for s in seeds],
                                [per_seed[k][s] for s in seeds])
        pvals.append(p)
    if correction == "holm":
        rejected = holm(pvals, alpha)
    else:
        rejected = [bool(np.isfinite(p) and p <= alpha) for p in pvals]
    out["best"] = best
    out["indistinguishable"] = [best] + [k for k, r in zip(others, rejected)
                                         if not r and k in means]
    out["p_values"] = {best: 1.0, **dict(zip(others, pvals))}
    return out
