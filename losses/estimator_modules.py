"""``nn.Module`` shells around the estimators of :mod:`losses.bounds`, called like every loss of
:mod:`losses.modules` (pytorch-metric-learning's call shape: ``loss(embeddings, labels)``,
``loss(x, ref_emb=y, paired=True)``, ...): a critic (default ``Cosine(0.1)``, as InfoNCE's) turns
the batch into ``(S, P, Q)`` and one function of :mod:`losses.bounds` gives the loss.

:class:`MINE` keeps its moving average of the partition term as a buffer (``log_average``), so it
is saved and restored with the module's ``state_dict``; it is updated on every training-mode call
that builds a graph. These estimators read the batch on the host (``check=False`` is not
sync-free for them); a batch without a positive or a negative pair gives the zero loss of
:class:`~losses.modules.PairLoss` (or its error with ``strict=True``). Only ``reduction="mean"``:
the bounds are batch-level quantities.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import bounds as LB
from .modules import PairLoss, _critic_or_temperature

__all__ = ["TUBA", "MINE", "SMILE", "AlphaInfoNCE"]


class _Estimator(PairLoss):
    """A critic and one estimator of :mod:`losses.bounds`."""

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        if reduction != "mean":
            raise ValueError(f"{type(self).__name__} is a batch-level bound: reduction must be "
                             f"'mean', got {reduction!r}")
        super().__init__(_critic_or_temperature(critic, temperature, 0.1), strict, reduction,
                         check)

    def loss(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        if not (bool(positives.any()) and bool(negatives.any())):
            return scores.sum() * 0.0  # the zero loss of a batch without a term, in the graph
        return self.loss(scores, positives, negatives)


class TUBA(_Estimator):
    """TUBA loss ``-I_TUBA`` (:func:`losses.bounds.tuba_bound`) with a constant log-baseline
    ``log_baseline`` (``1`` is NWJ). A learned baseline ``b(y)`` is the same loss with the critic
    ``S_ij - b(y_j)``."""

    what = "the TUBA loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 log_baseline: float = 0.0, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        self.log_baseline = float(log_baseline)

    def loss(self, scores, positives, negatives):
        return LB.tuba(scores, positives, negatives, self.log_baseline)

    def extra_repr(self) -> str:
        return f"log_baseline={self.log_baseline}"


class MINE(_Estimator):
    """MINE: the DV loss with the moving-average gradient correction
    (:func:`losses.bounds.mine`, Belghazi et al. 2018). The average (``log_average``, a buffer,
    NaN until the first training step) is checkpointed with the module."""

    what = "the MINE loss"
    log_average: Tensor

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 momentum: float = 0.01, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("log_average", torch.tensor(math.nan))

    def loss(self, scores, positives, negatives):
        value, new = LB.mine(scores, positives, negatives, self.log_average, self.momentum)
        if self.training and torch.is_grad_enabled():
            self.log_average.copy_(new.to(self.log_average.dtype))
        return value

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"


class SMILE(_Estimator):
    """SMILE loss (:func:`losses.bounds.smile`): valued ``-I_SMILE`` with clipping ``tau``, the
    critic trained by the Jensen-Shannon gradient (``gradient="js"``, Song & Ermon's) or by
    ``-I_SMILE``'s own (``"dv"``)."""

    what = "the SMILE loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 tau: float = 5.0, gradient: str = "js", **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not float(tau) > 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if gradient not in ("js", "dv"):
            raise ValueError(f"gradient must be 'js' or 'dv', got {gradient!r}")
        self.tau, self.gradient = float(tau), gradient

    def loss(self, scores, positives, negatives):
        return LB.smile(scores, positives, negatives, self.tau, self.gradient)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, gradient={self.gradient!r}"


class AlphaInfoNCE(_Estimator):
    """alpha-InfoNCE loss ``-I_alpha`` (:func:`losses.bounds.interpolated_bound`, Poole et al.
    2019 eq. 12): ``alpha = 1`` InfoNCE (leave-one-out), ``alpha = 0`` TUBA with the constant
    ``log_baseline``."""

    what = "the alpha-InfoNCE loss"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 alpha: float = 0.5, log_baseline: float = 0.0, **kwargs):
        super().__init__(temperature, critic, **kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha, self.log_baseline = float(alpha), float(log_baseline)

    def loss(self, scores, positives, negatives):
        return LB.interpolated(scores, positives, negatives, self.alpha, self.log_baseline)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, log_baseline={self.log_baseline}"
