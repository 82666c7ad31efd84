"""``nn.Module`` shells around :mod:`losses.functional`.

Each module holds a critic and its hyper-parameters, and is called like a
pytorch-metric-learning loss::

    loss(embeddings, labels)                       # supervised, or multi-view with instance ids
    loss(embeddings, labels, ref_emb, ref_labels)  # against a separate reference set
    loss(x_emb, ref_emb=y_emb)                     # paired views: positives on the diagonal

The critic and the loss always run in float32 (float64 inputs stay float64), with autocast
switched off locally, so mixed-precision training cannot overflow ``exp(S)`` at small
temperatures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.critics import Cosine, Critic, Dot, NegativeL2
from contrastive.pairs import (
    Pairs,
    check_call,
    diagonal_masks,
    mined_masks,
    require_positives,
    resolve_pairs,
)
from contrastive.validation import check_temperature

from . import functional as LF

__all__ = ["PairLoss", "InfoNCE", "NWJ", "JS", "DV", "MultiClassNPair", "Triplet", "Contrastive"]


def _full_precision(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class PairLoss(nn.Module):
    """Base class: resolve the call into (anchors, candidates, masks), score them with the
    critic in full precision, and hand ``(S, P, Q)`` to :meth:`compute`."""

    def __init__(self, critic: Critic | nn.Module | None = None):
        super().__init__()
        self.critic = critic if critic is not None else self.default_critic()

    def default_critic(self) -> nn.Module:
        return Cosine(0.1)

    # -- the shell -------------------------------------------------------------------------
    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None) -> Pairs:
        return resolve_pairs(embeddings, labels, ref_emb, ref_labels)

    def scores(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The score matrix ``S`` and masks ``(P, Q)`` this loss sees for a call."""
        p = self.pairs(embeddings, labels, ref_emb, ref_labels)
        with torch.autocast(device_type=p.anchors.device.type, enabled=False):
            a = _full_precision(p.anchors)
            b = a if p.self_reference else _full_precision(p.candidates)
            s = self.critic(a, b)
        return s, p.positives, p.negatives

    def compute(self, scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        indices_tuple: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """The loss of a batch. ``indices_tuple`` (keyword only) takes the output of a
        pytorch-metric-learning miner and restricts the positives and negatives to the mined
        pairs, as PML's pair-based losses do."""
        s, pos, neg = self.scores(embeddings, labels, ref_emb, ref_labels)
        if indices_tuple is not None:
            pos, neg = self.mined(indices_tuple, pos, neg)
        with torch.autocast(device_type=s.device.type, enabled=False):
            return self.compute(s, pos, neg)

    def mined(self, indices_tuple, positives: Tensor, negatives: Tensor):
        return mined_masks(indices_tuple, positives, negatives)

    @torch.no_grad()
    def readout(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> dict[str, float]:
        """I_NCE and I_NWJ (nats) of this loss's own score matrix on a batch."""
        s, pos, neg = self.scores(embeddings, labels, ref_emb, ref_labels)
        return {
            "infonce": float(LF.infonce_bound(s, pos, neg)),
            "nwj": float(LF.nwj_bound(s, pos, neg)) if bool(neg.any()) else float("nan"),
        }


def _critic_or_temperature(critic, temperature, default_t: float) -> nn.Module:
    if critic is not None and temperature is not None:
        raise ValueError(
            "pass either critic= or temperature=, not both; set the temperature on the critic "
            "(e.g. critics.Cosine(temperature=0.05))"
        )
    if critic is not None:
        return critic
    return Cosine(check_temperature(default_t if temperature is None else temperature))


class InfoNCE(PairLoss):
    """InfoNCE / NT-Xent / SupCon (:func:`losses.functional.infonce`).

    Default critic: ``Cosine(temperature)`` with ``temperature=0.1``.
    """

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1))

    def compute(self, scores, positives, negatives):
        return LF.infonce(scores, positives, negatives)


class NWJ(PairLoss):
    """NWJ bound as a loss, ``-I_NWJ`` (:func:`losses.functional.nwj`).
    Default critic: ``Cosine(0.1)`` (the same as InfoNCE, so comparisons isolate the objective)."""

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1))

    def compute(self, scores, positives, negatives):
        return LF.nwj(scores, positives, negatives)


class JS(PairLoss):
    """Jensen-Shannon critic loss (:func:`losses.functional.js`); default critic ``Cosine(0.1)``.
    Its MI readout is :func:`losses.functional.js_bound`."""

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1))

    def compute(self, scores, positives, negatives):
        return LF.js(scores, positives, negatives)


class DV(PairLoss):
    """Donsker-Varadhan / MINE loss ``-I_DV`` (:func:`losses.functional.dv`); default critic
    ``Cosine(0.1)``."""

    def __init__(self, temperature: float | None = None, critic: nn.Module | None = None):
        super().__init__(_critic_or_temperature(critic, temperature, 0.1))

    def compute(self, scores, positives, negatives):
        return LF.dv(scores, positives, negatives)


def _group_by_label(labels: Tensor):
    """Classes in ascending order, and for each its first position in a stable sort of
    ``labels`` (``order``) and its size."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return classes, order, starts, counts


def first_pair_per_class(labels: Tensor, ref_labels: Tensor | None = None):
    """Indices ``(anchor_idx, positive_idx)`` with one pair per class, in ascending class order.

    Without ``ref_labels``: for every label with two or more items, its first and second
    occurrence (the pair pytorch-metric-learning's ``NPairsLoss`` picks). With ``ref_labels``:
    the first occurrence in ``labels`` and the first in ``ref_labels`` of every shared label.
    """
    classes, order, starts, counts = _group_by_label(labels)
    if ref_labels is None:
        keep = counts >= 2
        return order[starts[keep]], order[starts[keep] + 1]
    ref_classes, ref_order, ref_starts, _ = _group_by_label(ref_labels)
    a = order[starts[torch.isin(classes, ref_classes)]]
    p = ref_order[ref_starts[torch.isin(ref_classes, classes)]]
    return a, p


class MultiClassNPair(PairLoss):
    """Multi-class N-pair loss (Sohn 2016; :func:`losses.functional.multiclass_npair`).

    From labels it takes one (anchor, positive) pair per class (see :func:`first_pair_per_class`)
    and scores anchors against positives with the critic (default ``Dot``), positives on the
    diagonal. ``l2_reg`` adds ``l2_reg * mean ||f||^2`` over the used embeddings (Sohn's
    regulariser; 0 by default).
    """

    def __init__(self, critic: nn.Module | None = None, l2_reg: float = 0.0):
        super().__init__(critic)
        self.l2_reg = float(l2_reg)

    def default_critic(self) -> nn.Module:
        return Dot()

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None) -> Pairs:
        c = check_call(embeddings, labels, ref_emb, ref_labels)
        if c.labels is None:  # paired views: anchors x ref_emb, positives on the diagonal
            pos, neg = diagonal_masks(c.embeddings.shape[0], c.embeddings.device)
            return Pairs(c.embeddings, c.ref_emb, pos, neg, False)
        if c.ref_emb is None:
            ai, pi = first_pair_per_class(c.labels)
            cand = c.embeddings
        else:
            ref = c.labels if c.ref_labels is None else c.ref_labels
            ai, pi = first_pair_per_class(c.labels, ref)
            cand = c.ref_emb
        if ai.numel() == 0:
            require_positives(torch.zeros(1, dtype=torch.bool), "the multi-class N-pair loss")
        pos, neg = diagonal_masks(ai.numel(), c.embeddings.device)
        return Pairs(c.embeddings[ai], cand[pi], pos, neg, False)

    def forward(self, embeddings, labels=None, ref_emb=None, ref_labels=None, *,
                indices_tuple=None):
        if indices_tuple is not None:
            raise ValueError(
                "MultiClassNPair picks its own pair per class and takes no indices_tuple; use "
                "InfoNCE(critic=Dot()) for mined pairs"
            )
        p = self.pairs(embeddings, labels, ref_emb, ref_labels)
        with torch.autocast(device_type=p.anchors.device.type, enabled=False):
            a, b = _full_precision(p.anchors), _full_precision(p.candidates)
            scores = self.critic(a, b)
            # pairs() puts the positives on the diagonal with every other pair negative, where
            # the N-pair loss is the cross-entropy of each anchor against its own positive
            target = torch.arange(scores.shape[0], device=scores.device)
            loss = F.cross_entropy(scores, target)
            if not bool(torch.isfinite(loss)):
                raise ValueError(
                    "scores contain NaN or Inf; check the embeddings and the critic "
                    "(embedding norms too large for the dot critic?)"
                )
            if self.l2_reg:
                loss = loss + self.l2_reg * 0.5 * ((a * a).sum(1).mean() + (b * b).sum(1).mean())
        return loss

    def compute(self, scores, positives, negatives):
        return LF.multiclass_npair(scores, positives, negatives)


class Triplet(PairLoss):
    """Triplet margin loss (:func:`losses.functional.triplet`).

    Default critic: ``NegativeL2(normalize=True)`` (Euclidean distance of L2-normalised
    embeddings) and ``margin=0.05``, pytorch-metric-learning's defaults; the margin is in score
    units, i.e. distance units for a distance critic.
    """

    def __init__(
        self,
        margin: float = 0.05,
        mining: str = "all",
        soft: bool = False,
        critic: nn.Module | None = None,
    ):
        super().__init__(critic)
        if mining not in ("all", "hard", "semihard"):
            raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
        if float(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.margin, self.mining, self.soft = float(margin), mining, bool(soft)

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    def compute(self, scores, positives, negatives):
        return LF.triplet(scores, positives, negatives, self.margin, self.mining, self.soft)

    def forward(self, embeddings, labels=None, ref_emb=None, ref_labels=None, *,
                indices_tuple=None):
        """As :meth:`PairLoss.forward`; mined ``(a, p, n)`` triplets are used as given (the
        mean of ``max(0, m - S_ap + S_an)`` over the non-zero ones, or of the softplus), mined
        pairs restrict the masks and ``mining`` then picks triplets among them."""
        if indices_tuple is None or len(indices_tuple) != 3:
            return super().forward(embeddings, labels, ref_emb, ref_labels,
                                   indices_tuple=indices_tuple)
        s, pos, neg = self.scores(embeddings, labels, ref_emb, ref_labels)
        mpos, mneg = mined_masks(indices_tuple, pos, neg)  # validates the indices
        a, p, n = (torch.as_tensor(t, device=s.device).long().flatten() for t in indices_tuple)
        ok = mpos[a, p] & mneg[a, n]
        a, p, n = a[ok], p[ok], n[ok]
        with torch.autocast(device_type=s.device.type, enabled=False):
            diff = s[a, n] - s[a, p]
            if diff.numel() == 0:
                return s.sum() * 0.0  # no mined triplet: zero loss, graph kept
            if self.soft:
                return torch.nn.functional.softplus(diff).mean()
            hinge = torch.relu(diff + self.margin)
            return hinge.sum() / (hinge > 0).sum().clamp_min(1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, soft={self.soft}"


class Contrastive(PairLoss):
    """Contrastive loss (Hadsell et al. 2006; :func:`losses.functional.contrastive`).

    For a distance critic (default ``NegativeL2(normalize=True)``) the margins are distances:
    ``relu(d - pos_margin)`` on positives, ``relu(neg_margin - d)`` on negatives, defaults 0 and 1.
    For a similarity critic they are similarities: ``relu(pos_margin - s)`` and
    ``relu(s - neg_margin)``, defaults 1 and 0 (pytorch-metric-learning's conventions).
    """

    def __init__(
        self,
        pos_margin: float | None = None,
        neg_margin: float | None = None,
        critic: nn.Module | None = None,
    ):
        super().__init__(critic)
        dist = bool(getattr(self.critic, "is_distance", False))
        self.pos_margin = float((0.0 if dist else 1.0) if pos_margin is None else pos_margin)
        self.neg_margin = float((1.0 if dist else 0.0) if neg_margin is None else neg_margin)
        sign = -1.0 if dist else 1.0
        self._t_pos, self._t_neg = sign * self.pos_margin, sign * self.neg_margin

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    def compute(self, scores, positives, negatives):
        return LF.contrastive(scores, positives, negatives, self._t_pos, self._t_neg)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


LossFactory = Callable[..., PairLoss]
