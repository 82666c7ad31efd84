"""The self-supervised contrastive losses users bring from lightly, on the library's one interface.

* **SimCLR** (Chen et al. 2020): lightly's ``NTXentLoss(temperature)(out0, out1)`` is NT-Xent
  over the ``2B`` embeddings of two views with the instance id as label: each of the ``2B``
  anchors has one positive (its other view) and ``2B - 2`` negatives. :func:`simclr` is that call
  as one line, ``simclr(out0, out1, temperature)``; :class:`SimCLR` is the module, called either
  as lightly (``loss(out0, out1)``) or as every loss of the library (``loss(emb, instance_ids)``,
  the trainer's call on multi-view batches). The natural ``InfoNCE()(out0, ref_emb=out1,
  paired=True)`` is a different loss (each anchor against the ``B`` keys of the other view only).
* **DCL / DCLW** (Yeh et al., "Decoupled Contrastive Learning", ECCV 2022): the positive is left
  out of the denominator, ``l_ij = -w_ij S_ij + logsumexp_{k in Q_i} S_ik`` for ``(i, j)`` in
  ``P``; DCLW weighs the positive term by the negative von Mises-Fisher weight
  ``w_ij = 2 - |P| softmax_{(k, l) in P}(cos_kl / sigma)`` (a constant: no gradient flows through
  it). :func:`dcl` and :func:`dclw` are pure functions of ``(S, P, Q)`` with ``reduction=`` and
  ``check=`` as :mod:`losses.functional`; :class:`DCL` and :class:`DCLW` the modules (lightly's
  ``DCLLoss`` / ``DCLWLoss`` with ``loss(out0, out1)``).

:func:`views_batch` turns views ``(out0, out1, ...)`` into ``(embeddings, instance_ids)``, the
form in which any loss of the library takes multi-view data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.pairs import label_masks

from . import functional as LF
from . import kernels as K
from .modules import InfoNCE, PairLoss, _critic_or_temperature

__all__ = ["views_batch", "simclr", "dcl", "dclw", "vmf_weights", "SimCLR", "DCL", "DCLW"]


# --------------------------------------------------------------------------- views


def views_batch(*views: Tensor) -> tuple[Tensor, Tensor]:
    """``(embeddings [V*B, d], ids [V*B])`` from ``V`` views ``[B, d]`` of the same ``B``
    instances: the views stacked in order, each row labelled with its instance index."""
    if len(views) == 1 and isinstance(views[0], (list, tuple)):
        views = tuple(views[0])
    if len(views) < 2:
        raise ValueError(f"pass at least two views, got {len(views)}")
    first = views[0]
    for k, v in enumerate(views):
        if not isinstance(v, Tensor) or v.dim() != 2 or v.shape != first.shape:
            raise ValueError(
                f"every view must be a [B, d] tensor of the same shape as the first "
                f"{tuple(first.shape)}; view {k} has shape {tuple(getattr(v, 'shape', ()))}"
            )
    ids = torch.arange(first.shape[0], device=first.device).repeat(len(views))
    return torch.cat(views, 0), ids


def _is_view(x) -> bool:
    """Whether the second positional argument is a second view (a 2-D float tensor), as in
    lightly's ``loss(out0, out1)``, rather than labels."""
    return isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point()


def simclr(
    out0: Tensor | None = None,
    out1: Tensor | None = None,
    temperature: float = 0.5,
    *,
    views: list[Tensor] | tuple[Tensor, ...] | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """SimCLR's NT-Xent of two views, equal to lightly's ``NTXentLoss(temperature)(out0,
    out1)``::

        z = [out0; out1],  S = cos(z, z) / t,  P_ij = [id_i == id_j, i != j],  Q_ij = [id_i != id_j]
        l_i = -log( exp(S_ip(i)) / sum_{k != i} exp(S_ik) ),   mean over the 2B anchors

    (:func:`losses.functional.ntxent` on that ``(S, P, Q)``; Chen et al. 2020). ``views=[v0,
    v1, ...]`` instead of ``out0, out1`` takes any number of views (every other view of an
    instance is a positive, one term per positive pair). ``reduction="none"`` gives the
    ``[VB, VB]`` pair terms of :func:`losses.functional.ntxent`.
    """
    if views is None:
        if out0 is None or out1 is None:
            raise ValueError("pass two views, simclr(out0, out1, temperature), or views=[...]")
        views = (out0, out1)
    elif out0 is not None or out1 is not None:
        raise ValueError("pass the views either as out0, out1 or as views=[...], not both")
    z, ids = views_batch(*views)
    return LF.ntxent(_cosine(z, temperature), *label_masks(ids), reduction, check)


def _cosine(z: Tensor, temperature: float) -> Tensor:
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    zn = nn.functional.normalize(z, dim=1)
    return (zn * (1.0 / float(temperature))) @ zn.T


# --------------------------------------------------------------------------- DCL


def vmf_weights(scores: Tensor, positives: Tensor, scale: float = 1.0) -> Tensor:
    """DCLW's negative von Mises-Fisher weights (Yeh et al. 2022) of the positive pairs::

        w_ij = 2 - |P| exp(scale S_ij) / sum_{(k, l) in P} exp(scale S_kl),   (i, j) in P

    ``[N, M]``, 0 off ``P``, without gradient. With the cosine critic ``S = cos / t``, so
    ``scale = t / sigma`` gives the paper's ``cos / sigma`` (lightly's
    ``negative_mises_fisher_weights(out0, out1, sigma)``)."""
    positives = positives if positives.dtype == torch.bool else positives.bool()
    s = scores.detach()
    s = s if s.dtype in (torch.float32, torch.float64) else s.float()
    logits = s * scale
    lse = K.masked_lse(logits, positives, None)
    n = K.count(positives).clamp_min(1).to(s.dtype)
    w = 2.0 - n * torch.exp(logits - lse)
    return torch.where(positives, w, torch.zeros_like(w))


def dcl(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022, eq. 6): NT-Xent with the positive taken out
    of the denominator, one term per positive pair::

        l_ij = -w_ij S_ij + logsumexp_{k in Q_i} S_ik,    (i, j) in P

    ``w = 1`` (DCL) unless ``weights [N, M]`` is given (DCLW: :func:`vmf_weights`). Averaged
    over the positive pairs; a pair whose anchor has no negative gives 0 and still counts (as
    :func:`losses.functional.ntxent`). Needs a positive and a negative somewhere in the batch
    (:class:`~contrastive.pairs.NoPairsError` with ``check``, else 0).

    One term is one pair: ``reduction="none"`` gives ``l [N, M]``, 0 off ``P``; ``"mean"`` is
    the mean of ``l[P]``.
    """
    K.check_reduction(reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "both", "DCL")
    has_neg = K.count_rows(negatives) > 0
    lse_neg = K.masked_lse(scores, negatives, 1)
    lse_neg = torch.where(has_neg, lse_neg, torch.zeros_like(lse_neg))
    pos_s = scores if weights is None else scores * weights.to(scores.dtype)
    if check:  # one term per positive pair, gathered by index
        pi = K.positive_index(positives, "DCL")
        terms = lse_neg[pi.rows] - pos_s[pi.rows, pi.cols]
        terms = torch.where(has_neg[pi.rows], terms, torch.zeros_like(terms))
        if reduction == "none":
            return scores.new_zeros(scores.shape).index_put((pi.rows, pi.cols), terms)
        return K.reduce_terms(terms, reduction, pi.rows.numel())
    terms = lse_neg[:, None] - pos_s
    terms = torch.where(positives & has_neg[:, None], terms, torch.zeros_like(terms))
    if reduction == "none":
        return terms
    terms = K.gate(terms, K.any_pair(positives, negatives))
    return K.reduce_terms(terms, reduction, K.count(positives))


def dclw(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    sigma: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Weighted DCL (Yeh et al. 2022): :func:`dcl` with ``weights = vmf_weights(S, P,
    temperature / sigma)``, i.e. ``w = 2 - |P| softmax_P(cos / sigma)`` when ``S = cos /
    temperature`` (the cosine critic); lightly's ``DCLWLoss(temperature, sigma)``."""
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    s, p, _ = K.prepare(scores, positives, negatives, False)
    w = vmf_weights(s, p, float(temperature) / float(sigma))
    return dcl(scores, positives, negatives, w, reduction, check)


# --------------------------------------------------------------------------- modules


class _TwoViews:
    """lightly's call ``loss(out0, out1)``: a 2-D float second argument is a second view, and
    the two views become ``(embeddings, instance_ids)`` (:func:`views_batch`); every other call
    is the library's (:meth:`losses.modules.PairLoss.forward`)."""

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                *, paired: bool = False):
        if _is_view(labels):
            if ref_emb is not None or ref_labels is not None or paired:
                raise ValueError(
                    "loss(out0, out1) takes two views and nothing else; for a reference set "
                    "pass labels: loss(emb, labels, ref_emb=..., ref_labels=...)"
                )
            embeddings, labels = views_batch(embeddings, labels)
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               paired=paired)


class SimCLR(_TwoViews, InfoNCE):
    """SimCLR's loss (NT-Xent, Chen et al. 2020) with lightly's defaults: temperature 0.5,
    cosine critic. ``SimCLR(t)(out0, out1)`` equals lightly's ``NTXentLoss(t)(out0, out1)``;
    ``SimCLR(t)(emb, instance_ids)`` is the same loss on a stacked multi-view batch (any number
    of views), and every other call is :class:`~losses.modules.InfoNCE`'s
    (``positives="pair"``)."""

    what = "SimCLR's NT-Xent"

    def __init__(self, temperature: float | None = 0.5, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        if critic is not None and temperature == 0.5:
            temperature = None  # the default gives way to an explicit critic
        super().__init__(temperature, critic, "pair", strict, reduction, check)


class DCL(_TwoViews, PairLoss):
    """Decoupled contrastive loss (Yeh et al. 2022; :func:`dcl`): the positive left out of the
    denominator. Default critic ``Cosine(temperature)``, ``temperature=0.1`` (lightly's
    ``DCLLoss``). ``DCL(t)(out0, out1)`` equals lightly's ``DCLLoss(t)(out0, out1)``;
    ``DCL(t)(emb, labels)`` takes class labels or instance ids as every loss of the library."""

    core_checks_terms = True

    what = "DCL"

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1), strict,
                         K.check_reduction(reduction), check)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return dcl(scores, positives, negatives, None, self.reduction, check)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class DCLW(DCL):
    """Weighted DCL (Yeh et al. 2022; :func:`dclw`): the positive term weighted by
    ``2 - |P| softmax_P(cos / sigma)``, ``sigma=0.5``, ``temperature=0.1`` (lightly's
    ``DCLWLoss``). The weight reads the cosine back from the scores through the critic's
    ``temperature`` (1 for a critic without one)."""

    what = "DCLW"

    def __init__(self, temperature: float | None = None, sigma: float = 0.5,
                 critic: nn.Module | None = None, strict: bool = False, reduction: str = "mean",
                 check: bool = True):
        super().__init__(temperature, critic, strict, reduction, check)
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        t = float(getattr(self.critic, "temperature", 1.0))
        return dclw(scores, positives, negatives, self.sigma, t, self.reduction, check)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, reduction={self.reduction!r}"
