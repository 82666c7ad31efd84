"""The functional core: every loss and every MI readout is a pure function of a score matrix
``S [N, M]`` (higher = more similar, from any critic) and boolean masks ``P`` (positives) and
``Q`` (negatives) of the same shape. Pairs in neither mask (an item with itself) are ignored.

Losses are *minimised*; MI readouts are lower bounds in nats. All functions compute in float32 (or
float64 when given float64), whatever the input dtype, so bf16/fp16 autocast cannot overflow the
exponentials. If ``negatives`` is omitted it is ``~positives``.

References: van den Oord et al. 2018 (CPC/InfoNCE); Nguyen, Wainwright, Jordan 2010 (NWJ);
Nowozin et al. 2016 (f-GAN, JS); Donsker & Varadhan 1983, Belghazi et al. 2018 (DV/MINE);
Poole et al. 2019 (the bounds as used here); Sohn 2016 (multi-class N-pair); Schroff et al. 2015
and Hermans et al. 2017 (triplet mining); Hadsell et al. 2006 (contrastive);
Tschannen et al. 2020 (InfoNCE with a separable critic is the multi-class N-pair loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.pairs import require_negatives, require_positives

__all__ = [
    "infonce",
    "nwj",
    "js",
    "dv",
    "multiclass_npair",
    "triplet",
    "contrastive",
    "infonce_bound",
    "nwj_bound",
    "js_bound",
    "dv_bound",
    "logmeanexp",
]

_NEG_INF = float("-inf")


def _prepare(scores: Tensor, positives: Tensor, negatives: Tensor | None):
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [N, M], got shape {tuple(scores.shape)}")
    if positives.shape != scores.shape:
        raise ValueError(
            f"positives has shape {tuple(positives.shape)} but scores {tuple(scores.shape)}"
        )
    positives = positives.bool()
    negatives = ~positives if negatives is None else negatives.bool()
    if negatives.shape != scores.shape:
        raise ValueError(
            f"negatives has shape {tuple(negatives.shape)} but scores {tuple(scores.shape)}"
        )
    if scores.dtype != torch.float64:
        scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError(
            "scores contain NaN or Inf; check the embeddings and the critic "
            "(temperature too small?)"
        )
    return scores, positives, negatives


def logmeanexp(x: Tensor, mask: Tensor) -> Tensor:
    """``log( mean_{mask} exp(x) )`` over all masked entries, computed stably."""
    return torch.logsumexp(x.masked_fill(~mask, _NEG_INF).flatten(), 0) - math.log(
        int(mask.sum())
    )


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


# --------------------------------------------------------------------------- InfoNCE


def _infonce_rows(scores: Tensor, positives: Tensor, negatives: Tensor):
    """Per-anchor InfoNCE terms and the mask of anchors that have a positive."""
    valid = positives | negatives
    lse = torch.logsumexp(scores.masked_fill(~valid, _NEG_INF), dim=1, keepdim=True)
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    log_prob = (scores - lse).masked_fill(~positives, 0.0)
    rows = -log_prob.sum(1) / n_pos.clamp_min(1)
    return rows, has_pos, valid


def infonce(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """Multi-positive InfoNCE (CPC; NT-Xent with one positive; SupCon with several)::

        l_i = -(1/|P_i|) sum_{j in P_i} [ S_ij - logsumexp_{k in P_i u Q_i} S_ik ]

    averaged over anchors with at least one positive.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "InfoNCE")
    rows, has_pos, _ = _infonce_rows(scores, positives, negatives)
    return rows[has_pos].mean()


def infonce_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """The InfoNCE lower bound on MI in nats (van den Oord et al. 2018; Poole et al. 2019)::

        I_NCE = mean_i [ log K_i - l_i ],   K_i = |P_i u Q_i|

    For K paired samples (positives on the diagonal) this is
    ``log K + mean_i (S_ii - logsumexp_j S_ij) <= log K``.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the InfoNCE bound")
    rows, has_pos, valid = _infonce_rows(scores, positives, negatives)
    log_k = valid.sum(1).to(scores.dtype).log()
    return (log_k - rows)[has_pos].mean()


# --------------------------------------------------------------------------- NWJ / JS / DV


def nwj_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """NWJ / f-divergence lower bound (Nguyen et al. 2010; Poole et al. 2019, "I_NWJ")::

        I_NWJ = mean_P S - e^{-1} mean_Q exp(S) = mean_P S - exp(logmeanexp_Q S - 1)

    Tight at ``S* = 1 + log p(y|x)/p(y)``.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the NWJ bound")
    require_negatives(negatives, "the NWJ bound")
    return _masked_mean(scores, positives) - torch.exp(logmeanexp(scores, negatives) - 1.0)


def nwj(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """NWJ loss ``-I_NWJ`` (see :func:`nwj_bound`): unbiased, high variance."""
    return -nwj_bound(scores, positives, negatives)


def js(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """Jensen-Shannon (f-GAN) critic loss (Nowozin et al. 2016; Hjelm et al. 2019)::

        loss = -( mean_P[-softplus(-S)] - mean_Q[softplus(S)] )

    Its optimum is ``S* = log p(y|x)/p(y)``; read MI off with :func:`js_bound`.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the JS loss")
    require_negatives(negatives, "the JS loss")
    pos_term = _masked_mean(-F.softplus(-scores), positives)
    neg_term = _masked_mean(F.softplus(scores), negatives)
    return -(pos_term - neg_term)


def js_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """MI readout of a JS-trained critic: ``I_NWJ(S + 1)``.

    JS's optimal critic is the log density ratio, while NWJ is tight at ``1 +`` that ratio, so the
    shift makes the readout tight at the JS optimum (``I_NWJ(S)`` would sit ``1/e`` nats below).
    Any shift of a critic still gives a valid NWJ lower bound.
    """
    return nwj_bound(scores + 1.0, positives, negatives)


def dv_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """Donsker-Varadhan lower bound (MINE, Belghazi et al. 2018)::

        I_DV = mean_P S - logmeanexp_Q S
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the DV bound")
    require_negatives(negatives, "the DV bound")
    return _masked_mean(scores, positives) - logmeanexp(scores, negatives)


def dv(scores: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
    """DV loss ``-I_DV`` (plain mini-batch gradient; MINE's moving-average correction is not
    applied)."""
    return -dv_bound(scores, positives, negatives)


# --------------------------------------------------------------------------- N-pair


def multiclass_npair(
    scores: Tensor, positives: Tensor, negatives: Tensor | None = None
) -> Tensor:
    """Multi-class N-pair loss (Sohn 2016), one positive ``p(i)`` per anchor::

        l_i = log(1 + sum_{k in Q_i} exp(S_ik - S_ip(i)))

    On anchors x positives with a dot critic this is the cross-entropy of each anchor against
    its own positive, i.e. InfoNCE with one positive (Tschannen et al. 2020, sec. 4).
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the multi-class N-pair loss")
    n_pos = positives.sum(1)
    if bool((n_pos > 1).any()):
        raise ValueError(
            "the multi-class N-pair loss takes exactly one positive per anchor; use "
            "losses.MultiClassNPair on labels (it picks one pair per class) or InfoNCE"
        )
    has_pos = n_pos == 1
    s_pos = scores.masked_fill(~positives, 0.0).sum(1, keepdim=True)
    diff = (scores - s_pos).masked_fill(~negatives, _NEG_INF)
    zeros = torch.zeros_like(s_pos)
    rows = torch.logsumexp(torch.cat([zeros, diff], dim=1), dim=1)
    return rows[has_pos].mean()


# --------------------------------------------------------------------------- triplet


def _sorted_negatives(scores: Tensor, negatives: Tensor):
    """Per anchor: negatives' scores sorted descending (non-negatives last), as values for sums
    (non-negatives = 0) and as keys for search (ascending ``-S``, non-negatives = +inf)."""
    keyed = scores.masked_fill(~negatives, _NEG_INF)
    order = keyed.argsort(dim=1, descending=True)
    vals = scores.gather(1, order).masked_fill(~negatives.gather(1, order), 0.0)
    keys = (-keyed.gather(1, order)).contiguous()
    return vals, keys


def _triplet_all(scores, positives, negatives, margin):
    """Exact sum and count of non-zero ``relu(m - S_ap + S_an)`` over all valid triplets in
    O(N M log M) time and O(N M) memory: a triplet is active iff ``S_an > S_ap - m``; with each
    anchor's negatives sorted once, the active ones for a positive are a prefix whose size comes
    from a binary search and whose sum comes from a prefix sum."""
    vals, keys = _sorted_negatives(scores, negatives)
    prefix = F.pad(vals.cumsum(dim=1), (1, 0))  # prefix[:, c] = sum of the c largest
    threshold = -(scores - margin)  # S_an > S_ap - m  <=>  -S_an < m - S_ap
    count = torch.searchsorted(keys, threshold.detach().contiguous(), right=False)
    count = count.masked_fill(~positives, 0)
    top_sum = prefix.gather(1, count)
    total = (count * (margin - scores) + top_sum).masked_fill(~positives, 0.0)
    return total.sum(), count.sum()


def _triplet_soft_all(scores, positives, negatives, chunk: int = 1 << 22):
    """Sum of ``softplus(S_an - S_ap)`` over all valid triplets, in anchor chunks so memory stays
    at ``chunk`` elements."""
    n, m = scores.shape
    rows = max(1, chunk // max(1, m * m))
    total = scores.new_zeros(())
    count = 0
    for s in range(0, n, rows):
        sc, p, q = scores[s : s + rows], positives[s : s + rows], negatives[s : s + rows]
        valid = p[:, :, None] & q[:, None, :]
        x = F.softplus(sc[:, None, :] - sc[:, :, None])
        total = total + x.masked_fill(~valid, 0.0).sum()
        count += int(valid.sum())
    return total, count


def triplet(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    margin: float = 0.05,
    mining: str = "all",
    soft: bool = False,
) -> Tensor:
    """Triplet loss in score form ``max(0, m - S_ap + S_an)`` (with ``S = -d`` this is the usual
    ``max(0, d_ap - d_an + m)``); ``soft=True`` uses ``softplus(S_an - S_ap)`` (Hermans 2017).

    Mining:

    * ``"all"``: every valid triplet; the mean over triplets with non-zero loss (0 when none),
      as pytorch-metric-learning's ``TripletMarginLoss``; with ``soft`` the mean over all.
    * ``"hard"``: batch-hard (Hermans et al. 2017): per anchor its hardest positive
      ``min_p S_ap`` and hardest negative ``max_n S_an``; mean over anchors that have both.
    * ``"semihard"``: FaceNet (Schroff et al. 2015): per (a, p) the hardest negative that is
      still less similar than the positive, ``max{S_an : S_an < S_ap}``, or the easiest negative
      when none is; mean over positive pairs of anchors that have a negative.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the triplet loss")
    require_negatives(negatives, "the triplet loss")
    if mining not in ("all", "hard", "semihard"):
        raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
    margin = float(margin)
    if mining == "all":
        if soft:
            total, count = _triplet_soft_all(scores, positives, negatives)
            return total / max(count, 1)
        total, count = _triplet_all(scores, positives, negatives, margin)
        return total / count.clamp_min(1)
    has_neg = negatives.any(1)
    if mining == "hard":
        ok = positives.any(1) & has_neg
        s_ap = scores.masked_fill(~positives, float("inf")).min(1).values
        s_an = scores.masked_fill(~negatives, _NEG_INF).max(1).values
        diff = (s_an - s_ap)[ok]
    else:
        vals, keys = _sorted_negatives(scores, negatives)
        # keys ascending (= -S_an descending); first index with -S_an > -S_ap is S_an < S_ap
        idx = torch.searchsorted(keys, (-scores).detach().contiguous(), right=True)
        n_neg = negatives.sum(1, keepdim=True)
        has_semi = idx < n_neg
        semi = vals.gather(1, idx.clamp_max(vals.shape[1] - 1))
        easiest = vals.gather(1, (n_neg - 1).clamp_min(0)).expand_as(semi)
        s_an = torch.where(has_semi, semi, easiest)
        ok = positives & has_neg[:, None]
        diff = (s_an - scores)[ok]
    if diff.numel() == 0:
        raise ValueError("no anchor has both a positive and a negative; check the batch labels")
    return (F.softplus(diff) if soft else F.relu(diff + margin)).mean()


# --------------------------------------------------------------------------- contrastive


def _mean_nonzero(x: Tensor) -> Tensor:
    nz = x > 0
    return x.sum() / nz.sum().clamp_min(1)


def contrastive(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    pos_threshold: float = 1.0,
    neg_threshold: float = 0.0,
) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) in score form::

        mean_nz_P relu(t_pos - S) + mean_nz_Q relu(S - t_neg)

    where ``mean_nz`` averages over the non-zero terms (pytorch-metric-learning's
    ``AvgNonZeroReducer``). With ``S = -d`` and thresholds ``t_pos = -m_pos``, ``t_neg = -m_neg``
    this is ``relu(d - m_pos)`` on positives plus ``relu(m_neg - d)`` on negatives;
    :class:`losses.Contrastive` does that conversion for distance critics.
    """
    scores, positives, negatives = _prepare(scores, positives, negatives)
    require_positives(positives, "the contrastive loss")
    pos = F.relu(pos_threshold - scores).masked_fill(~positives, 0.0)
    neg = F.relu(scores - neg_threshold).masked_fill(~negatives, 0.0)
    return _mean_nonzero(pos) + _mean_nonzero(neg)
