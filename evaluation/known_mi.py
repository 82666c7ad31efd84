"""Known-MI data: correlated Gaussians whose mutual information is known in closed form.

The setting of Poole, Ozair, van den Oord, Alemi, Tucker, "On Variational Bounds of Mutual
Information" (ICML 2019, sec. 6): ``x ~ N(0, I_d)`` and ``y = rho x + sqrt(1 - rho^2) e`` with
``e ~ N(0, I_d)``, so::

    I(X; Y) = -(d / 2) log(1 - rho^2)  nats,

plus the analytic optimal critic (the log density ratio), the true conditional log density (the
score matrix of the upper bounds) and the closed form of CLUB at it, the cubic transform of Poole
et al. / Song & Ermon (``y -> y^3``, invertible, so the MI is unchanged) and the staircase of true
MI values.
Pure functions over tensors; the benchmark that trains critics on this data is an experiment of
the application layer (:mod:`contrastive.app.mi_benchmark`; layers in ``docs/architecture.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from contrastive.validation import check_positive_int

__all__ = [
    "check_dim",
    "MAX_MI_PER_DIM",
    "mi_from_rho",
    "rho_from_mi",
    "sample_gaussian",
    "optimal_critic",
    "staircase",
    "cubic",
    "conditional_log_density",
    "club_at_truth",
]


def mi_from_rho(rho: float, dim: int) -> float:
    """``I = -(d/2) log(1 - rho^2)`` nats for ``d`` independent pairs with correlation ``rho``."""
    rho = float(rho)
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    return -0.5 * check_dim(dim) * math.log1p(-rho * rho)


#: The most nats per dimension whose ``rho`` is below 1 in float64: ``1 - rho^2 = exp(-2 I / d)``
#: must stay above the spacing of floats just below 1 (``2^-53``; ``exp(-36)`` does).
MAX_MI_PER_DIM = 18.0


def rho_from_mi(mi: float, dim: int) -> float:
    """Inverse of :func:`mi_from_rho` on ``rho >= 0``: ``rho = sqrt(1 - exp(-2 I / d))``.

    ``ValueError`` naming ``mi`` and ``dim`` when ``I / d`` exceeds :data:`MAX_MI_PER_DIM`
    (``rho`` would round to 1, where the pairs are deterministic and the MI infinite)."""
    mi = float(mi)
    if not math.isfinite(mi) or mi < 0:
        raise ValueError(f"mi must be a finite number of nats >= 0, got {mi!r}")
    dim = check_dim(dim)
    if mi > MAX_MI_PER_DIM * dim:
        raise ValueError(
            f"mi = {mi:g} nats in dim = {dim} is {mi / dim:g} nats per dimension, above "
            f"{MAX_MI_PER_DIM:g}: rho = sqrt(1 - exp(-2 mi / dim)) rounds to 1; use dim >= "
            f"{math.ceil(mi / MAX_MI_PER_DIM)} or a smaller mi"
        )
    return math.sqrt(-math.expm1(-2.0 * mi / dim))



def check_dim(dim: int) -> int:
    """``dim`` as an ``int`` if it is a positive integer (Python or NumPy); ``ValueError``
    naming it otherwise."""
    return check_positive_int(dim, "dim")


def sample_gaussian(
    batch_size: int,
    dim: int,
    rho: float,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of shape ``[batch_size, dim]`` with ``x ~ N(0, I)``,
    ``y = rho x + sqrt(1 - rho^2) e``, ``e ~ N(0, I)`` (``generator`` must live on ``device``)."""
    batch_size = check_positive_int(batch_size, "batch_size")
    dim = check_dim(dim)
    rho = float(rho)
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    x = torch.randn(batch_size, dim, generator=generator, device=device, dtype=dtype)
    e = torch.randn(batch_size, dim, generator=generator, device=device, dtype=dtype)
    return x, rho * x + math.sqrt(1.0 - rho * rho) * e


def _gaussian_terms(x: Tensor, y: Tensor, rho: float) -> tuple[float, int, Tensor, Tensor]:
    """``(1 - rho^2, d, ||y_j - rho x_i||^2 [N, M], ||y_j||^2 [M])`` after checking the input:
    the pieces of the conditional ``p(y | x) = N(rho x, (1 - rho^2) I)``."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be 2-D with the same dimension, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    rho = float(rho)
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    var = 1.0 - rho * rho
    yy = (y * y).sum(1)
    # ||y_j - rho x_i||^2 from the differences, not expanded as ||y||^2 - 2 rho x.y + ...: near
    # rho = 1 the expansion cancels (float32, 10 nats in d = 2: 0.03 nats wrong on the diagonal)
    sq = torch.cdist(rho * x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
    return var, x.shape[1], sq, yy


def optimal_critic(x: Tensor, y: Tensor, rho: float) -> Tensor:
    """The log density ratio on all pairs, ``S_ij = log p(y_j | x_i) / p(y_j)``::

        S_ij = -(d/2) log(1 - rho^2) - ||y_j - rho x_i||^2 / (2 (1 - rho^2)) + ||y_j||^2 / 2

    (``p(y | x) = N(rho x, (1 - rho^2) I)``, ``p(y) = N(0, I)``). Its mean over the diagonal is
    the MI; InfoNCE, DV and JS are tight at it up to their own limits, NWJ at ``S + 1``.
    """
    var, d, sq, yy = _gaussian_terms(x, y, rho)
    return -0.5 * d * math.log(var) - sq / (2.0 * var) + 0.5 * yy[None, :]


def staircase(levels: Sequence[float], steps_per_level: int) -> np.ndarray:
    """True MI per step: each level (nats, finite, ``>= 0``) held for ``steps_per_level`` (a
    positive integer) steps, the schedule of Poole et al. (2019, fig. 2)."""
    steps = check_positive_int(steps_per_level, "steps_per_level")
    try:
        values = np.asarray(levels, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"levels must be a sequence of MI values in nats, got {levels!r}") from exc
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values) & (values >= 0)):
        raise ValueError(f"levels must be a non-empty sequence of finite MI values >= 0 nats, got "
                         f"{levels!r}")
    return np.repeat(values, steps)


def cubic(y: Tensor) -> Tensor:
    """The cubic transform ``y -> y^3`` of Poole et al. (2019, fig. 2) and Song & Ermon (2020):
    elementwise and invertible, so ``I(X; Y^3) = I(X; Y)``, but the log density ratio is no longer
    a quadratic form, which separable and bilinear critics cannot represent."""
    return y * y * y


def conditional_log_density(x: Tensor, y: Tensor, rho: float) -> Tensor:
    """``L_ij = log p(y_j | x_i)`` with ``p(y | x) = N(rho x, (1 - rho^2) I)``: the true
    conditional, at which the leave-one-out and CLUB upper bounds hold. Equals
    :func:`optimal_critic` ``+ log p(y_j)``."""
    var, d, sq, _ = _gaussian_terms(x, y, rho)
    return -0.5 * d * math.log(2.0 * math.pi * var) - sq / (2.0 * var)


def club_at_truth(rho: float, dim: int) -> float:
    """CLUB (Cheng et al. 2020) at the true Gaussian conditional, in closed form::

        E_{p(x,y)} log p(y|x) - E_{p(x)p(y)} log p(y|x) = d rho^2 / (1 - rho^2)

    (``E||y - rho x||^2`` is ``d (1 - rho^2)`` on the joint and ``d (1 + rho^2)`` on the product
    of marginals), above ``I = -(d/2) log(1 - rho^2)`` for every ``rho != 0``."""
    rho = float(rho)
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1), got {rho!r}")
    return check_dim(dim) * rho * rho / (1.0 - rho * rho)
