"""Pair-based metric-learning losses on the one interface: multi-similarity (with its pair
mining), Circle, generalized lifted structure, the margin loss with a learnable boundary and NCA.

Each is a pure function of the score matrix ``S [N, M]`` (higher = more similar, any critic) and
the boolean masks ``P`` (positives) and ``Q`` (negatives), with ``reduction=`` and ``check=`` as
in :mod:`losses.functional` (whose module docstring states the conventions), and a thin module
subclassing :class:`losses.modules.PairLoss`, called like the pytorch-metric-learning (PML) loss
of the same name (``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``). The
modules' default critics and hyper-parameters are PML's, so that ``MultiSimilarity()(x, y)``
equals ``MultiSimilarityLoss()(x, y)``.

Cost: every function does a few elementwise passes over ``S`` (masked log-sum-exps, hinges) and
nothing of size ``N x M x M``; the margin loss over all triplets, which PML evaluates on a list
of the ``sum_a |P_a| |Q_a|`` triplets, is a weighted sum over pairs (each positive pair of an
anchor occurs in ``|Q_a|`` triplets, each negative pair in ``|P_a|``). Below
:data:`losses.kernels.FUSED_MAX_ENTRIES` score entries each loss computes its value and
``dL/dS`` in one pass without autograd (a ``_..._kernel`` function here; the positive and
negative log-sum-exps stacked into one ``[2, N, M]`` pass), which removes most of the fixed
per-call cost at small batches; above it, the autograd forms (positives by index) run.

Margins and boundaries are in score units; for a distance critic (``is_distance``, ``S = -d``)
the modules convert PML's distance margins, as :class:`losses.modules.Contrastive` does.

References: Wang et al. 2019 (multi-similarity); Sun et al. 2020 (Circle); Oh Song et al. 2016
and Hermans et al. 2017 (generalized lifted structure); Wu et al. 2017 (margin loss);
Goldberger et al. 2005 and Movshovitz-Attias et al. 2017 (NCA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.critics import Cosine, NegativeL2
from contrastive.pairs import (
    mined_masks,
    mined_triplets,
    rows_any,
)

from . import kernels as K
from . import native as N
from .functional import _counts_or_none
from .modules import PairLoss

__all__ = [
    "multi_similarity",
    "multi_similarity_pairs",
    "circle",
    "lifted_structure",
    "margin",
    "nca",
    "MultiSimilarity",
    "Circle",
    "LiftedStructure",
    "Margin",
    "NCA",
]

_NEG_INF = float("-inf")
_POS_INF = float("inf")


def _lse_or_zero(x: Tensor, keep: Tensor) -> Tensor:
    """``logsumexp_{keep} x`` per row, 0 for a row without a kept entry."""
    lse = K.masked_lse(x, keep, 1)
    return torch.where(rows_any(keep), lse, torch.zeros_like(lse))


def _positive_lse(fn, scores: Tensor, positives: Tensor, check: bool) -> Tensor:
    """``logsumexp_{j in P_i} fn(S_ij)`` per row (-inf for a row without a positive). With
    ``check`` from the positives' indices (``[N, k]``, k = the most positives of a row; one
    sync): an anchor has few positives, and a masked ``[N, M]`` exponential of mostly ``-inf``
    entries costs several times more on CPU. Without ``check``, masked (static shapes)."""
    if not check:
        return K.masked_lse(fn(scores), positives, 1)
    rows, cols = positives.nonzero(as_tuple=True)
    count = torch.bincount(rows, minlength=positives.shape[0])
    idx, valid = K.padded_positives(K.PosIndex(rows, cols, count))
    return torch.logsumexp(fn(scores.gather(1, idx)).masked_fill(~valid, _NEG_INF), dim=1)


# --------------------------------------------------------------------------- fused-path pieces
# The small-batch kernels below (``kernels.fused``) do a few elementwise passes over a stacked
# ``[2, N, M]`` buffer; at B = 128 each operation's fixed cost is most of its time, so they keep
# the operations few and avoid the slow ones on CPU (``torch.where`` / comparisons on boolean
# masks, ``addcmul`` with broadcasting: each several times a multiplication).


# --------------------------------------------------------------------------- multi-similarity


def multi_similarity_pairs(scores: Tensor, positives: Tensor, negatives: Tensor,
                           epsilon: float = 0.1) -> tuple[Tensor, Tensor]:
    """Multi-similarity's pair mining (Wang et al. 2019, eq. 7-8; PML's
    ``MultiSimilarityMiner``): keep a positive pair if it is less similar than the anchor's most
    similar negative plus ``epsilon``, and a negative pair if it is more similar than the
    anchor's least similar positive minus ``epsilon``::

        P'_ij = P_ij and S_ij - eps < max_{k in Q_i} S_ik
        Q'_ij = Q_ij and S_ij + eps > min_{k in P_i} S_ik

    On the detached scores (mining selects pairs; it has no gradient). Masks in, masks out."""
    sd = scores.detach()
    hardest_neg = torch.where(negatives, sd, _NEG_INF).amax(1, keepdim=True)
    easiest_pos = torch.where(positives, sd, _POS_INF).amin(1, keepdim=True)
    pos = torch.lt(sd - epsilon, hardest_neg)
    pos &= positives
    neg = torch.gt(sd + epsilon, easiest_pos)
    neg &= negatives
    return pos, neg


def multi_similarity(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Multi-similarity loss (Wang et al. 2019, eq. 11; PML's ``MultiSimilarityLoss``)::

        l_i = (1/alpha) log(1 + sum_{j in P_i} exp(-alpha (S_ij - base)))
            + (1/beta)  log(1 + sum_{k in Q_i} exp( beta  (S_ik - base)))

    ``epsilon``: first restrict ``(P, Q)`` to the pairs of :func:`multi_similarity_pairs` (the
    paper's mining; PML's ``MultiSimilarityMiner(epsilon)``); None: all pairs (PML's loss
    without a miner). One term per anchor (``[N]``; 0 for an anchor without pairs); ``"mean"``
    averages over all N anchors, as PML. With ``check``, a batch without any pair raises
    :class:`~contrastive.pairs.NoPairsError` (a mining that keeps none gives 0).
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    # past the fused kernel's size, the mining's sparse form (checked calls: it reads the
    # positives' count)
    sparse = (not fused and epsilon is not None
              and K.fusable(scores, positives, negatives, check, reduction, scores.numel()))
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "any",
                                             "the multi-similarity loss")
    if fused:
        return K.fused(_multi_similarity_masks_kernel, _multi_similarity_slow, scores,
                       positives, negatives, alpha, beta, base, epsilon, reduction)
    if sparse:
        loss = _mined_sparse(scores, positives, negatives, alpha, beta, base, epsilon,
                             reduction)
        if loss is not None:
            return loss
    if epsilon is not None:
        positives, negatives = multi_similarity_pairs(scores, positives, negatives, epsilon)
    pos = K.softplus(_positive_lse(lambda v: (base - v) * alpha, scores, positives, check))
    neg = K.softplus(K.masked_lse((scores - base) * beta, negatives, 1))
    pos, neg = pos / alpha, neg / beta
    return K.reduce_terms(pos + neg, reduction)


def _mined_keep(scores: Tensor, positives: Tensor, negatives: Tensor,
                epsilon: float) -> tuple[Tensor, Tensor]:
    """:func:`multi_similarity_pairs` as :func:`kernels.stack_as_float` of the mined
    ``(P', Q')``, without boolean operations, and the row maxima ``r = (-min_P S, max_Q S)``
    (``[2, N, 1]``; about ``finfo.min`` for a row without P / Q) of ``y = (-S, S)`` masked by
    ``(P, Q)``: ``u = -epsilon - y = (S - eps, -(S + eps))`` is below ``r`` flipped exactly
    where the pair is mined (``S - eps < max_Q S`` on P, ``S + eps > min_P S`` on Q: a difference of
    floats is negative exactly when the first is smaller, so these are the same comparisons),
    and the masking makes ``u`` about ``finfo.max`` off ``(P, Q)``."""
    y = scores * K.const((-1.0, 1.0), scores.dtype, scores.device, (2, 1, 1))
    y.add_(K.stack_as_float((positives, negatives), scores.dtype).sub_(1.0),
           alpha=torch.finfo(y.dtype).max)
    r = y.amax(-1, keepdim=True)
    return torch.rsub(y, -epsilon).sub_(r.flip(0)).lt_(0.0), r


def _mined_sparse_kernel(scores, negatives, idx, valid, alpha, beta, base, epsilon, reduction,
                         need_grad):
    """:func:`multi_similarity` with its pair mining at large batches, in one pass without
    autograd (``kernels.fused``): the positives by index (``[N, k]``, k the most positives of a
    row, one host read) and the negatives as one ``[N, M]`` buffer, about ten passes over it
    where the masked form makes twenty (the two masked extremes, the comparisons into boolean
    masks, both log-sum-exps over the whole matrix and their autograd nodes). The same
    comparisons as :func:`multi_similarity_pairs` (``S - eps < max_Q S`` on P,
    ``S + eps > min_P S`` on Q). The negatives' buffer ``t = S`` on Q, ``-inf`` elsewhere gives
    ``max_Q S``; the unmined entries become ``-inf``, so ``exp(beta (t - max_Q S))`` is 0 there
    and at most 1 on the mined ones, whose maximum is the row's hardest negative whenever the
    row mines any (``S`` monotone). ``idx, valid``: the positives as
    :func:`kernels.padded_positives`."""
    n = scores.shape[0]
    dtype = scores.dtype
    w = 1.0 if reduction == "sum" else 1.0 / max(n, 1)
    t = torch.where(negatives, scores, _NEG_INF)
    hardest = t.amax(1, keepdim=True)  # -inf: no negative
    sp = scores.gather(1, idx)
    easiest = torch.where(valid, sp, _POS_INF).amin(1, keepdim=True)  # +inf: no positive
    # positives: [N, k]
    kept = torch.lt(sp - epsilon, hardest) & valid
    xp = torch.where(kept, (base - sp) * alpha, _NEG_INF)
    lse_p = torch.logsumexp(xp, 1, keepdim=True)  # -inf: nothing mined
    # negatives: [N, M], in place on t
    t.masked_fill_(torch.le(t + epsilon, easiest), _NEG_INF)
    t.sub_(torch.where(torch.isfinite(hardest), hardest, 0.0)).mul_(beta).exp_()
    z = t.sum(1, keepdim=True)  # >= 1 where a negative is mined (its hardest gives exp(0)), else 0
    lse_n = (hardest - base) * beta + z.log()
    value = (K.softplus(lse_p).sum() / alpha + K.softplus(lse_n).sum() / beta) * w
    if not need_grad:
        return value, None
    # d softplus(lse) / dx = sigmoid(lse) softmax(x); x = beta (S - base) on Q', -alpha (S - base)
    # on P', each divided by its own beta / alpha: the negatives' weight sigmoid(lse) e / z, the
    # positives' -sigmoid(lse) softmax
    t.mul_(torch.sigmoid(lse_n).mul_(w).div_(z.clamp_min(torch.finfo(dtype).tiny)))
    gp = torch.exp(xp - torch.where(torch.isfinite(lse_p), lse_p, 0.0))  # 0 off the mined
    gp.mul_(torch.sigmoid(lse_p).mul_(-w))
    return value, t.scatter_add_(1, idx, gp)


def _mined_sparse(scores, positives, negatives, alpha, beta, base, epsilon, reduction):
    """:func:`_mined_sparse_kernel`'s loss, or None where the batch has no positive or an anchor
    has more than a quarter of the columns as positives (the masked form then: indices would
    cost more than a pass)."""
    index = K.sparse_positives(positives)
    if index is None:  # no positive (nothing to mine against: the masked form's 0), or many
        return None
    idx, valid = index

    def slow(s, negatives, idx, valid, *args):
        return _multi_similarity_slow(s, positives, negatives, *args)

    return K.fused(_mined_sparse_kernel, slow, scores, negatives, idx, valid, alpha, beta, base,
                   epsilon, reduction)


def _multi_similarity_slow(scores, positives, negatives, alpha, beta, base, epsilon,
                           reduction):
    return multi_similarity(scores, positives, negatives, alpha, beta, base, epsilon,
                            reduction, check=False)


def _multi_similarity_kernel(scores, keep, extrema, alpha, beta, base, reduction, need_grad):
    """:func:`multi_similarity`'s value and ``dL/dS`` in one pass (``kernels.fused``), the
    masks as :func:`kernels.stack_as_float`: both log-sum-exps as one stacked ``[2, N, M]``
    pass,
    ``x = (S - base) * (-alpha, beta)``; the gradient of ``softplus(lse_i) / a`` is
    ``sign * sigmoid(lse_i) e_ij / z_i``. ``extrema``: :func:`_mined_keep`'s row maxima
    ``(-min_P S, max_Q S)``, which give the mined pairs' maxima of ``x`` without a masked
    maximum (a row with a mined pair keeps its extreme one, and ``x`` is monotone in ``S``);
    the dropped entries are then zeroed after the exponential (a row without a mined pair:
    ``z = 0``, ``lse = -inf``, a term and a gradient of 0)."""
    n = max(scores.shape[0], 1)
    dtype, device = scores.dtype, scores.device
    scale = K.const((-alpha, beta), dtype, device, (2, 1, 1))
    x = (scores - base).unsqueeze(0) * scale
    if extrema is None:
        lse, e, _, z = K.stacked_lse(x, keep, overwrite=True)
    else:
        m = (extrema * K.const((-1.0, 1.0), dtype, device, (2, 1, 1))).sub_(base).mul_(scale)
        e = x.sub_(m).clamp_(K.EXP_FLOOR.get(dtype, -87.0), 0.0).exp_().mul_(keep)
        z = e.sum(-1, keepdim=True)
        lse = m + z.log()
    w = 1.0 if reduction == "sum" else 1.0 / n
    # the sum of softplus(lse) / (alpha, beta), times w, as one product and one sum
    value = torch.mul(K.softplus(lse),
                      K.const((w / alpha, w / beta), dtype, device, (2, 1, 1))).sum()
    if not need_grad:
        return value, None
    # d softplus(lse) / dx = sigmoid(lse) e / z; a row without a mined pair has z = 0, e = 0
    # and lse = -inf (sigmoid 0): the floor on z keeps its coefficient 0 (a row of the stacked
    # log-sum-exp always has z > 0)
    coef = torch.sigmoid(lse).mul_(K.const((-w, w), dtype, device, (2, 1, 1)))
    e.mul_(coef.div_(z if extrema is None else z.clamp_min_(torch.finfo(dtype).tiny)))
    return value, torch.add(e[0], e[1])


def _multi_similarity_masks_kernel(scores, positives, negatives, alpha, beta, base, epsilon,
                                   reduction, need_grad):
    """:func:`_multi_similarity_kernel` from ``(S, P, Q)``: the masks as 0/1 values, or the
    pairs that the mining with ``epsilon`` keeps (:func:`_mined_keep`, on scores without a
    gradient). :func:`multi_similarity`'s fused path and :meth:`MultiSimilarity.lane_kernel`
    both take it."""
    if epsilon is None:
        keep, extrema = K.stack_as_float((positives, negatives), scores.dtype), None
    else:
        keep, extrema = _mined_keep(scores, positives, negatives, epsilon)
    return _multi_similarity_kernel(scores, keep, extrema, alpha, beta, base, reduction,
                                    need_grad)


_multi_similarity_masks_kernel.native = N.multi_similarity  # its C kernel (losses.native)


# --------------------------------------------------------------------------- Circle


def circle(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    m: float = 0.4,
    gamma: float = 80.0,
    reduction: str = "nonzero",
    check: bool = True,
) -> Tensor:
    """Circle loss (Sun et al. 2020, eq. 4 with the pair-wise labels; PML's ``CircleLoss``),
    for cosine scores::

        l_i = softplus( logsumexp_{j in P_i} -gamma a_ij (S_ij - (1 - m))
                      + logsumexp_{k in Q_i}  gamma b_ik (S_ik - m) )
        a_ij = relu(1 + m - S_ij),  b_ik = relu(S_ik + m)   (weights, no gradient)

    One term per anchor (``[N]``), 0 for an anchor without a positive or a negative.
    ``"nonzero"`` (default) averages the terms > 0 (PML's ``AvgNonZeroReducer``), ``"mean"``
    over the anchors with both. With ``check``, no anchor with both raises.
    """
    K.check_reduction(reduction, K.NONZERO)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "triplet",
                                             "the Circle loss")
    if fused:
        return K.fused(_circle_kernel, _circle_slow, scores, positives, negatives, m, gamma,
                      reduction)

    def pos(v: Tensor) -> Tensor:  # -gamma relu(1 + m - S) (S - (1 - m)), weight detached
        return (v.detach() - (1.0 + m)).clamp_max_(0.0).mul_(gamma) * (v - (1.0 - m))

    neg = (scores.detach() + m).clamp_min_(0.0).mul_(gamma) * (scores - m)
    ok = rows_any(positives) & rows_any(negatives)
    z = _positive_lse(pos, scores, positives, check) + K.masked_lse(neg, negatives, 1)
    terms = torch.where(ok, K.softplus(torch.where(ok, z, torch.zeros_like(z))), 0.0)
    return K.reduce_terms(terms, reduction, ok.sum())


def _circle_slow(scores, positives, negatives, m, gamma, reduction):
    return circle(scores, positives, negatives, m, gamma, reduction, check=False)


def _circle_kernel(scores, positives, negatives, m, gamma, reduction, need_grad):
    """:func:`circle`'s value and ``dL/dS`` in one pass (``kernels.fused``), both log-sum-exps
    stacked: ``x = W * (S - (1 - m, m))`` with the (constant) weights
    ``W = (-gamma relu(1 + m - S), gamma relu(S + m))``, so ``dx/dS = W`` and
    ``dL/dS = sum_k w sigmoid(z_i) e_k / z_k * W_k``. An anchor without a positive or a
    negative has a hugely negative ``z_i`` (:func:`kernels.stacked_lse`), so its term and its
    ``sigmoid`` are exactly 0. The caller has checked that there is a triplet
    (:func:`kernels.prepare`)."""
    dtype, device = scores.dtype, scores.device
    wts = (scores * K.const((-1.0, 1.0), dtype, device, (2, 1, 1))).add_(
        K.const((1.0 + m, m), dtype, device, (2, 1, 1))).clamp_min_(0.0).mul_(
        K.const((-gamma, gamma), dtype, device, (2, 1, 1)))
    x = (scores - K.const((1.0 - m, m), dtype, device, (2, 1, 1))).mul_(wts)
    lse, e, _, z = K.stacked_lse(x, K.stack_as_float((positives, negatives), dtype),
                                  overwrite=True)
    zi = lse.sum(0)
    terms = K.softplus(zi)
    total = terms.sum()
    if reduction == "sum":
        value, coef = total, torch.sigmoid(zi)
    else:
        count = (torch.count_nonzero(terms) if reduction == "nonzero"
                 else (z >= 1.0).all(0).sum()).clamp_min(1)
        value = total / count
        coef = torch.sigmoid(zi).div_(count)
    if not need_grad:
        return value, None
    e.mul_(coef.div(z)).mul_(wts)
    return value, torch.add(e[0], e[1])


_circle_kernel.native = N.circle  # its C kernel (losses.native)


# --------------------------------------------------------------------------- lifted structure


def lifted_structure(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    pos_threshold: float = 0.0,
    neg_threshold: float = -1.0,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Generalized lifted structure loss (Oh Song et al. 2016, as generalised by Hermans et al.
    2017, eq. 5; PML's ``GeneralizedLiftedStructureLoss``) in score form::

        l_i = relu( logsumexp_{j in P_i} (t_pos - S_ij) + logsumexp_{k in Q_i} (S_ik - t_neg) )

    (an empty set's log-sum-exp is 0). With ``S = -d`` and ``t_pos = -m_pos``,
    ``t_neg = -m_neg`` this is ``relu(lse_P (d - m_pos) + lse_Q (m_neg - d))``;
    :class:`LiftedStructure` converts distance margins. One term per anchor (``[N]``);
    ``"mean"`` averages over all N anchors, as PML. With ``check``, no pair at all raises.
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "any",
                                             "the lifted structure loss")
    if fused:
        return K.fused(_lifted_kernel, _lifted_slow, scores, positives, negatives,
                      pos_threshold, neg_threshold, reduction)
    pos = _positive_lse(lambda v: pos_threshold - v, scores, positives, check)
    pos = torch.where(rows_any(positives), pos, torch.zeros_like(pos))
    neg = _lse_or_zero(scores - neg_threshold, negatives)
    return K.reduce_terms(F.relu(pos + neg), reduction)


def _lifted_slow(scores, positives, negatives, pos_threshold, neg_threshold, reduction):
    return lifted_structure(scores, positives, negatives, pos_threshold, neg_threshold,
                            reduction, check=False)


def _lifted_kernel(scores, positives, negatives, pos_threshold, neg_threshold, reduction,
                   need_grad):
    """:func:`lifted_structure`'s value and ``dL/dS`` in one pass (``kernels.fused``), both
    log-sum-exps stacked, ``x = (t_pos - S, S - t_neg)``; an active row's gradient is
    ``w (e_neg / z_neg - e_pos / z_pos)`` (``e`` is 0 off the masks, so an empty part's
    coefficient, finite since ``z > 0``, multiplies only zeros)."""
    dtype, device = scores.dtype, scores.device
    n = max(scores.shape[0], 1)
    x = (scores * K.const((-1.0, 1.0), dtype, device, (2, 1, 1))).add_(
        K.const((pos_threshold, -neg_threshold), dtype, device, (2, 1, 1)))
    lse, e, _, z = K.stacked_lse(x, K.stack_as_float((positives, negatives), dtype),
                                  overwrite=True)
    hinge = torch.where(z >= 1.0, lse, 0.0).sum(0)  # an empty part's log-sum-exp is 0
    total = hinge.clamp_min(0.0).sum()
    value = total if reduction == "sum" else total / n
    if not need_grad:
        return value, None
    w = 1.0 if reduction == "sum" else 1.0 / n
    e.mul_(torch.where(hinge > 0, K.const((-w, w), dtype, device, (2, 1, 1)) / z, 0.0))
    return value, torch.add(e[0], e[1])


_lifted_kernel.native = N.lifted  # its C kernel (losses.native)


# --------------------------------------------------------------------------- margin


def _triplet_weights(positives: Tensor, negatives: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """How many triplets each pair is in: a positive pair ``(a, p)`` in ``|Q_a|``, a negative
    pair ``(a, n)`` in ``|P_a|`` (integer count masks weigh each occurrence, as PML's
    conversion of mined pairs to triplets)."""
    wp = positives.to(dtype)
    wq = negatives.to(dtype)
    return wp * wq.sum(1, keepdim=True), wq * wp.sum(1, keepdim=True)


def _margin_all(scores: Tensor, positives: Tensor, negatives: Tensor, b: Tensor, beta: Tensor,
                m: float, per_anchor: bool):
    """Sum, active half-terms, triplets and the per-anchor boundary's triplet sum of the margin
    loss over all triplets, for boolean masks. The hinges are piecewise linear: with the active
    pairs found without gradient, the sum is ``dot(S, coef)`` plus terms in ``b`` only, where
    ``coef = |P_a|`` on active negatives and ``-|Q_a|`` on active positives (one ``[N, M]``
    matrix; autograd then gives exactly the hinges' gradient, to ``S`` and to ``b``)."""
    n_pos = K.count_rows(positives).to(scores.dtype)
    n_neg = K.count_rows(negatives).to(scores.dtype)
    bcol = b[:, None] if per_anchor else b
    with torch.no_grad():
        sd = scores.detach()
        act_p = torch.lt(sd, (bcol + m).detach())  # m + b - S_ap > 0
        act_p &= positives
        act_n = torch.gt(sd, (bcol - m).detach())  # m + S_an - b > 0
        act_n &= negatives
        a_p = K.count_rows(act_p).to(scores.dtype)
        a_n = K.count_rows(act_n).to(scores.dtype)
        # n_pos on active negatives, -n_neg on active positives, as 0/1 products (a
        # torch.where on a boolean mask costs several passes on CPU); the two never overlap
        coef = K.as_float(act_n, scores.dtype).mul_(n_pos[:, None])
        coef.sub_(K.as_float(act_p, scores.dtype).mul_(n_neg[:, None]))
    w_p, w_n = n_neg * a_p, n_pos * a_n  # active positive / negative half-terms per anchor
    total = torch.dot(scores.reshape(-1), coef.reshape(-1)) + (w_p * (m + b)).sum() + (
        w_n * (m - b)).sum()
    n_anchor = n_pos * n_neg
    reg_sum = (n_anchor * beta).sum() if per_anchor else None
    return total, (w_p + w_n).sum(), n_anchor.sum(), reg_sum, coef


def _margin_value(total: Tensor, active, n_trip, reg_sum, beta: Tensor, nu: float,
                  per_anchor: bool, reduction: str):
    """The margin loss from its sum, counts and regulariser (see :func:`margin`); also the
    divisor of the sum (None for ``"sum"``)."""
    divisor = {"sum": None, "mean": n_trip, "nonzero": active}[reduction]
    value = total if divisor is None else K.reduce_terms(total, "mean", divisor)
    if nu:
        if per_anchor:
            value = value + nu * (reg_sum if divisor is None
                                  else K.reduce_terms(reg_sum, "mean", divisor))
        else:
            value = value + nu * beta
    return value, divisor


def _margin_slow(scores, positives, negatives, beta, m, nu, distance, reduction):
    return margin(scores, positives, negatives, beta, m, nu, distance, reduction, check=False)


def _margin_kernel(scores, positives, negatives, beta, m, nu, distance, reduction, need_grad):
    """:func:`margin` over all triplets (boolean masks, a boundary without gradient) in one
    pass (``kernels.fused``), with the masks as 0/1 values. The active positive pairs are
    ``P (b + m - S > 0)``, the active negatives ``Q (S - (b - m) > 0)`` (the comparisons of
    :func:`_margin_all`, exactly); weighing each by its number of triplets (``|Q_a|``,
    ``|P_a|``) gives the coefficient matrix ``coef = |P_a| on active negatives, -|Q_a| on
    active positives``, the sum ``dot(S - b, coef) + m * active`` and ``dL/dS = coef`` over
    the divisor. The caller has checked that there is a triplet (:func:`kernels.prepare`)."""
    b = -beta if distance else beta
    per_anchor = beta.numel() > 1
    if per_anchor:  # one boundary per anchor
        b, beta = b.view(-1, 1), beta.view(-1, 1)
    pf, qf = K.as_float(positives, scores.dtype), K.as_float(negatives, scores.dtype)
    n_pos, n_neg = pf.sum(1, keepdim=True), qf.sum(1, keepdim=True)
    # in-place comparisons of float values (a comparison into a bool tensor, and a bool times
    # a float, each cost several times more on CPU)
    pos = torch.sub(b + m, scores).gt_(0.0).mul_(pf).mul_(n_neg)  # m + b - S_ap > 0
    neg = torch.sub(scores, b - m).gt_(0.0).mul_(qf).mul_(n_pos)  # m + S_an - b > 0
    active = pos.sum() + neg.sum()
    coef = neg.sub_(pos)
    value = torch.dot((scores - b).view(-1), coef.view(-1)) + m * active
    n_anchor = n_pos * n_neg if reduction == "mean" or (nu and per_anchor) else None
    divisor = None if reduction == "sum" else (
        n_anchor.sum() if reduction == "mean" else active).clamp_min(1)
    if divisor is not None:
        value = value / divisor
    if nu and per_anchor:
        reg = (n_anchor * beta).sum()
        value = value + nu * (reg if divisor is None else reg / divisor)
    elif nu:
        value = value + nu * beta
    if not need_grad:
        return value, None
    return value, coef if divisor is None else coef.div_(divisor)


def _margin_lane_kernel(scores, positives, negatives, beta, m, distance, reduction,
                        need_grad):
    """:func:`_margin_kernel` for a fixed single boundary, ``beta`` cast as :func:`margin` casts
    it (no regulariser: ``nu`` applies only to a learnt boundary): the kernel of
    :meth:`Margin.lane_kernel`."""
    beta = beta.to(device=scores.device, dtype=scores.dtype).reshape(())
    return _margin_kernel(scores, positives, negatives, beta, float(m), 0.0, distance, reduction,
                          need_grad)


_margin_kernel.native = N.margin  # its C kernels (losses.native)
_margin_lane_kernel.native = N.margin_lane


def margin(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    beta: float | Tensor = 1.2,
    margin: float = 0.2,
    nu: float = 0.0,
    distance: bool = False,
    reduction: str = "nonzero",
    check: bool = True,
    triplets: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Margin loss (Wu et al. 2017, eq. 3-4; PML's ``MarginLoss`` over all triplets) in score
    form, with the boundary ``b`` in score units::

        l_apn = relu(margin + b_a - S_ap) + relu(margin + S_an - b_a)

    summed over every valid triplet ``(a, p, n)``, computed as a weighted sum over pairs (a
    positive pair is in ``|Q_a|`` triplets, a negative pair in ``|P_a|``): ``O(N M)``, no
    triplet list. ``distance=True``: the scores are ``S = -d`` and ``beta`` a distance, so
    ``b = -beta`` (then ``l = relu(d_ap - beta + m) + relu(beta - d_an + m)``, the paper's
    form). ``beta``: a number, a 0-d tensor or one value per anchor ``[N]`` (a learnable
    per-class boundary gathered by label); gradients reach it. ``nu``: Wu et al.'s boundary
    regulariser, ``+ nu * beta`` for one boundary, ``+ nu * sum_triplets beta_a / divisor``
    for one per anchor (as PML).

    ``"nonzero"`` (default): the sum over the number of active half-terms (positive hinges > 0
    plus negative hinges > 0, each counted once per triplet), PML's ``DivisorReducer``;
    ``"mean"``: over the number of triplets; ``"sum"``; ``"none"``: ``[N, M]``, each pair's
    hinge times its number of triplets (their sum is ``"sum"``; no regulariser).
    ``positives`` / ``negatives`` may be integer counts (mined pairs with repeats);
    ``triplets=(a, p, n)`` uses the given triplets (a miner's; ``"none"`` then gives ``[T]``).
    With ``check``, a batch without a triplet raises.
    """
    K.check_reduction(reduction, K.NONZERO)
    p_count, q_count = _counts_or_none(positives), _counts_or_none(negatives)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    # given triplets need none in the masks; else an anchor with a positive and a negative
    scores, positives, negatives = K.prepare(scores, positives, negatives, check,
                                             "triplet" if triplets is None else None,
                                             "the margin loss")
    m = float(margin)
    beta = beta if isinstance(beta, Tensor) else torch.tensor(float(beta), dtype=torch.float64)
    beta = beta.to(device=scores.device, dtype=scores.dtype)
    per_anchor = beta.numel() > 1
    beta = beta.reshape(-1) if per_anchor else beta.reshape(())
    if (fused and triplets is None and p_count is None and q_count is None
            and not beta.requires_grad):  # a constant boundary: one fused pass
        return K.fused(_margin_kernel, _margin_slow, scores, positives, negatives, beta, m,
                      nu, distance, reduction)
    b = -beta if distance else beta
    if triplets is not None:
        a, p, n = triplets
        ba = b[a] if per_anchor else b
        hp = F.relu(m + ba - scores[a, p])
        hn = F.relu(m + scores[a, n] - ba)
        if reduction == "none":
            return hp + hn
        total = (hp + hn).sum()
        active = (hp > 0).sum() + (hn > 0).sum()
        n_trip = a.numel()
        reg_sum = beta[a].sum() if per_anchor else None
    elif p_count is None and q_count is None and reduction != "none":
        total, active, n_trip, reg_sum, _ = _margin_all(scores, positives, negatives, b, beta,
                                                        m, per_anchor)
    else:
        wp, wn = _triplet_weights(positives if p_count is None else p_count,
                                  negatives if q_count is None else q_count, scores.dtype)
        bcol = b[:, None] if per_anchor else b
        hp = F.relu(m + bcol - scores)
        hn = F.relu(m + scores - bcol)
        if reduction == "none":
            return wp * hp + wn * hn
        total = (wp * hp).sum() + (wn * hn).sum()
        active = (wp * (hp > 0)).sum() + (wn * (hn > 0)).sum()
        n_anchor = wp.sum(1)  # |P_a| |Q_a|: the anchor's number of triplets
        n_trip = n_anchor.sum()
        reg_sum = (n_anchor * beta).sum() if per_anchor else None
    return _margin_value(total, active, n_trip, reg_sum, beta, nu, per_anchor, reduction)[0]


# --------------------------------------------------------------------------- NCA


def nca(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    scale: float = 1.0,
    reduction: str = "mean",
    check: bool = True,
    weights: Tensor | None = None,
) -> Tensor:
    """Neighbourhood components analysis (Goldberger et al. 2005; Movshovitz-Attias et al. 2017;
    PML's ``NCALoss``): the negative log of the probability that an anchor picks a positive
    under a softmax over its candidates::

        l_i = logsumexp_{k in P_i u Q_i} (s S_ik) - logsumexp_{j in P_i} (s S_ij)

    with ``S = -||a - b||^2`` (PML's default critic) and ``s`` the softmax scale. One term per
    anchor (``[N]``, 0 for an anchor without a positive); ``"mean"`` averages over the anchors
    with a positive, as PML. ``weights [N]`` multiply the terms (PML's weights of a miner's
    ``indices_tuple``; the mean still counts anchors). With ``check``, no positive raises.
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "positives",
                                             "NCA")
    if fused and weights is None:
        return K.fused(_nca_kernel, _nca_slow, scores, positives, negatives, scale, reduction)
    x = scores * scale if scale != 1.0 else scores
    has = K.count_rows(positives) > 0
    lse_all = K.masked_lse(x, positives | negatives, 1)
    lse_pos = _positive_lse(lambda v: v, x, positives, check)
    terms = torch.where(has, lse_all - torch.where(has, lse_pos, torch.zeros_like(lse_pos)), 0.0)
    if weights is not None:
        terms = terms * weights.to(terms.dtype)
    return K.reduce_terms(terms, reduction, has.sum())


def _nca_slow(scores, positives, negatives, scale, reduction):
    return nca(scores, positives, negatives, scale, reduction, check=False)


def _nca_kernel(scores, positives, negatives, scale, reduction, need_grad):
    """:func:`nca`'s value and ``dL/dS`` in one pass (``kernels.fused``): the log-sum-exps over
    ``P u Q`` and over ``P`` stacked; a row's gradient is ``s w (softmax_all - softmax_P)``."""
    dtype, device = scores.dtype, scores.device
    x = scores * scale if scale != 1.0 else scores
    lse, e, _, z = K.stacked_lse(x, K.stack_as_float((positives | negatives, positives), dtype))
    has = z[1] >= 1.0
    terms = torch.where(has, lse.mul_(K.const((1.0, -1.0), dtype, device, (2, 1, 1))).sum(0),
                        0.0)
    total = terms.sum()
    if reduction == "sum":
        value, w = total, scale
    else:
        count = has.sum(dtype=dtype).clamp_min_(1.0)
        value = total / count
        w = scale / count
    if not need_grad:
        return value, None
    e.mul_(torch.where(has, w / z, 0.0))
    return value, e[0].sub_(e[1])


_nca_kernel.native = N.nca  # its C kernel (losses.native)


# --------------------------------------------------------------------------- modules


def _distance_sign(critic: nn.Module) -> float:
    """-1 for a distance critic (margins in distance units), +1 for a similarity."""
    return -1.0 if getattr(critic, "is_distance", False) else 1.0


class MultiSimilarity(PairLoss):
    """Multi-similarity loss (:func:`multi_similarity`), PML's ``MultiSimilarityLoss(alpha=2,
    beta=50, base=0.5)`` with its default critic ``Cosine(1.0)`` (cosine similarity).
    ``epsilon``: the paper's pair mining (:func:`multi_similarity_pairs`, PML's
    ``MultiSimilarityMiner(epsilon)``) on this loss's own scores; None (default, as PML's loss
    alone) uses every pair; the registry's ``"multi_similarity"`` mines with 0.1. ``base`` is
    in the critic's units (a distance for a distance critic, as PML's). A miner's
    ``indices_tuple`` restricts the pairs first (a pair mined twice counts once, as PML)."""

    core_checks_terms = True

    what = "the multi-similarity loss"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: float | None = None, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction), check)
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.epsilon = None if epsilon is None else float(epsilon)

    def default_critic(self) -> nn.Module:
        return Cosine(1.0)

    terms = "any"

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        # ``base`` in the critic's units, as PML's ``distance.margin``: a distance critic
        # (S = -d) takes ``-base``, so the terms are ``exp(alpha (d - base))`` and
        # ``exp(beta (base - d))``, PML's with ``distance=LpDistance()``
        base = _distance_sign(self.critic) * self.base
        return multi_similarity(scores, positives, negatives, self.alpha, self.beta, base,
                                self.epsilon, self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction == "none":
            return None
        base = _distance_sign(self.critic) * self.base
        return _multi_similarity_masks_kernel, (self.alpha, self.beta, base, self.epsilon,
                                                self.reduction)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"epsilon={self.epsilon}, reduction={self.reduction!r}")


class Circle(PairLoss):
    """Circle loss (:func:`circle`), PML's ``CircleLoss(m=0.4, gamma=80)`` with its critic
    ``Cosine(1.0)``; ``reduction="nonzero"`` (default) is PML's ``AvgNonZeroReducer``. The
    paper's settings: m = 0.25, gamma = 256 (faces), 128 (re-id); m = 0.4, gamma = 80
    (fine-grained retrieval)."""

    core_checks_terms = True

    what = "the Circle loss"

    def __init__(self, m: float = 0.4, gamma: float = 80.0, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "nonzero", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction, K.NONZERO), check)
        self.m, self.gamma = float(m), float(gamma)

    def default_critic(self) -> nn.Module:
        return Cosine(1.0)

    terms = "triplet"

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return circle(scores, positives, negatives, self.m, self.gamma, self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction == "none":
            return None
        return _circle_kernel, (self.m, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}, reduction={self.reduction!r}"


class LiftedStructure(PairLoss):
    """Generalized lifted structure loss (:func:`lifted_structure`), PML's
    ``GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0)`` with its default critic
    ``NegativeL2(normalize=True)``. Margins as :class:`losses.modules.Contrastive`'s: distances
    for a distance critic, similarities (``relu(pos_margin - s)``-style) otherwise."""

    core_checks_terms = True

    what = "the lifted structure loss"

    def __init__(self, neg_margin: float = 1.0, pos_margin: float = 0.0,
                 critic: nn.Module | None = None, strict: bool = False,
                 reduction: str = "mean", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction), check)
        self.neg_margin, self.pos_margin = float(neg_margin), float(pos_margin)
        sign = _distance_sign(self.critic)
        self._t_pos, self._t_neg = sign * self.pos_margin, sign * self.neg_margin

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    terms = "any"

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return lifted_structure(scores, positives, negatives, self._t_pos, self._t_neg,
                                self.reduction, check)

    def lane_kernel(self, n):
        if self.reduction == "none":
            return None
        return _lifted_kernel, (self._t_pos, self._t_neg, self.reduction)

    def extra_repr(self) -> str:
        return (f"neg_margin={self.neg_margin}, pos_margin={self.pos_margin}, "
                f"reduction={self.reduction!r}")


class Margin(PairLoss):
    """Margin loss (:func:`margin`), PML's ``MarginLoss(margin=0.2, nu=0, beta=1.2,
    triplets_per_anchor="all")`` with its default critic ``NegativeL2(normalize=True)``
    (``beta`` and ``margin`` in distance units for a distance critic).

    ``learn_beta=True`` makes the boundary an ``nn.Parameter`` (one, or one per class with
    ``num_classes``, gathered by the anchors' labels, which must then be class indices);
    ``nu`` weighs Wu et al.'s regulariser ``nu * beta`` (applied only when learning beta, as
    PML). The boundary is in :meth:`proxy_parameters` so that a trainer can give it its own
    learning rate. A miner's pairs become triplets by anchor (each repeat counts, as PML); a
    triplet tuple is used as given."""

    core_checks_terms = True

    what = "the margin loss"
    counts_repeats = True

    def __init__(self, margin: float = 0.2, nu: float = 0.0, beta: float = 1.2,
                 learn_beta: bool = False, num_classes: int | None = None,
                 critic: nn.Module | None = None, strict: bool = False,
                 reduction: str = "nonzero", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction, K.NONZERO), check)
        self.margin, self.nu, self.learn_beta = float(margin), float(nu), bool(learn_beta)
        init = torch.full((int(num_classes) if num_classes else 1,), float(beta))
        if self.learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)
        self._labels: Tensor | None = None

    def default_critic(self) -> nn.Module:
        return NegativeL2(normalize=True)

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The learnable boundary (empty unless ``learn_beta``)."""
        return [self.beta] if self.learn_beta else []

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None):
        self._labels = labels  # for a per-class boundary
        return super().pairs(embeddings, labels, ref_emb, ref_labels, paired, indices_tuple)

    terms = "triplet"

    def mined(self, indices_tuple, positives, negatives):
        pos, neg = mined_masks(indices_tuple, positives, negatives, counts=True,
                               check=self.check)
        if len(indices_tuple) != 3:
            return pos, neg, None
        return pos, neg, mined_triplets(indices_tuple, positives, negatives, self.check)

    def _boundary(self) -> Tensor:
        beta = self.beta
        if beta.numel() > 1:
            if self._labels is None:
                raise ValueError("a per-class boundary (num_classes) needs class labels")
            y = torch.as_tensor(self._labels, device=beta.device).long()
            if self.check and y.numel():
                lowest, highest = torch.stack(y.aminmax()).tolist()  # one host read
                if lowest < 0 or highest >= beta.numel():
                    # a negative label would index from the end (another class's boundary)
                    raise ValueError(
                        f"labels must be class indices in [0, {beta.numel()}) for a per-class "
                        f"boundary (num_classes={beta.numel()}), got labels in "
                        f"[{lowest}, {highest}]; map the labels to 0..num_classes-1 or build "
                        "the loss without num_classes (one boundary)"
                    )
            beta = beta[y]
        return beta

    def lane_kernel(self, n):
        # a fixed single boundary (a learnt one, or one per class, takes the general path)
        if self.reduction == "none" or self.learn_beta or self.beta.numel() != 1:
            return None
        distance = bool(getattr(self.critic, "is_distance", False))
        return _margin_lane_kernel, (self.beta, self.margin, distance, self.reduction)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return margin(scores, positives, negatives, self._boundary(), self.margin,
                      self.nu if self.learn_beta else 0.0,
                      bool(getattr(self.critic, "is_distance", False)), self.reduction, check,
                      triplets)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, nu={self.nu}, learn_beta={self.learn_beta}, "
                f"classes={self.beta.numel()}, reduction={self.reduction!r}")


class NCA(PairLoss):
    """NCA (:func:`nca`), PML's ``NCALoss(softmax_scale=1)`` with its default critic
    ``NegativeL2(squared=True, normalize=True)`` (squared Euclidean distance of normalised
    embeddings). A miner's ``indices_tuple`` weighs the anchors by how often they occur in it
    (over the most frequent), as PML; it does not restrict the pairs."""

    core_checks_terms = True

    what = "NCA"
    mines_in_pairs = True  # the tuple gives weights, not a pair restriction

    def __init__(self, softmax_scale: float = 1.0, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True):
        super().__init__(critic, strict, K.check_reduction(reduction), check)
        self.softmax_scale = float(softmax_scale)
        self._weights: Tensor | None = None

    def default_critic(self) -> nn.Module:
        return NegativeL2(squared=True, normalize=True)

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None):
        p = super().pairs(embeddings, labels, ref_emb, ref_labels, paired, indices_tuple)
        self._weights = None
        if indices_tuple is not None:
            self._weights = miner_weights(indices_tuple, p.anchors.shape[0],
                                          anchors_only=not p.self_reference,
                                          device=p.anchors.device)
        return p

    terms = "positives"

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return nca(scores, positives, negatives, self.softmax_scale, self.reduction, check,
                   self._weights)

    def lane_kernel(self, n):
        if self.reduction == "none":
            return None
        return _nca_kernel, (self.softmax_scale, self.reduction)

    def extra_repr(self) -> str:
        return f"softmax_scale={self.softmax_scale}, reduction={self.reduction!r}"


def miner_weights(indices_tuple, n: int, anchors_only: bool = False,
                  device=None) -> Tensor:
    """PML's per-element weights of a miner's ``indices_tuple``: how often each of the ``n``
    batch items occurs in it (only as an anchor with ``anchors_only``, i.e. against a separate
    reference set) over the largest such count; all ones for an empty tuple."""
    idx = [torch.as_tensor(t, device=device).long().flatten() for t in indices_tuple]
    if all(t.numel() == 0 for t in idx):
        return torch.ones(n, device=device, dtype=torch.float64)
    if anchors_only:
        idx = [idx[0]] if len(idx) == 3 else [idx[0], idx[2]]
    counts = torch.bincount(torch.cat(idx), minlength=n)[:n].double()
    return counts / counts.max()

