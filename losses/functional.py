"""The functional core: every loss and every MI readout is a pure function of a score matrix
``S [N, M]`` (higher = more similar, from any critic) and boolean masks ``P`` (positives) and
``Q`` (negatives) of the same shape. Pairs in neither mask (an item with itself) are ignored.

Reductions. Every function takes ``reduction``, as torch's own losses do: ``"mean"`` (the
default, the loss as published), ``"sum"`` or ``"none"`` (the per-element terms, so that sample
weights need no copy of a loss); the triplet and contrastive losses also take ``"nonzero"``, the
mean over the terms > 0 (pytorch-metric-learning's ``AvgNonZeroReducer``). Each docstring says
what one term is. ``"none"`` keeps static shapes: per anchor ``[N]``, per pair ``[N, M]`` (0 off
the pairs), per triplet ``[N, M, M]``; ``"mean"`` divides the sum of the terms by the number of
terms that exist (anchors with a term, pairs in the mask), as ``cross_entropy(...,
ignore_index=...)`` does, so it equals ``terms.mean()`` exactly when every slot holds a term.

Checks. ``check=True`` (default) validates the input with one device-to-host read
(:func:`losses.kernels.prepare`, one sync on a GPU): finite scores, and a batch that leaves a
loss nothing to average (no positive pair, no negative, no triplet) raises
:class:`contrastive.pairs.NoPairsError` (a ``ValueError``); the modules in
:mod:`losses.modules` turn that case into pytorch-metric-learning's zero loss (or keep the error
with ``strict=True``), letting this check stand for their own, so a module call reads the host
twice in all: once for finite embeddings, once here (``tests/test_host_reads.py``).
``check=False`` reads no tensor value on the host and branches on no tensor data: every shape
is static (positives as masks, not indices), and a batch without a term gives 0 through masks
and clamped counts. That is the form for ``torch.compile`` and CUDA graphs
(``tests/test_compile.py``). With ``check=True`` positives are gathered by index (``nonzero``,
one sync; the fastest form in eager mode when anchors have few positives); both forms give the
same values.

Losses are *minimised*; MI readouts are lower bounds in nats. All functions compute in float32 (or
float64 when given float64), whatever the input dtype, so bf16/fp16 autocast cannot overflow the
exponentials. If ``negatives`` is omitted it is ``~positives``.

Cost: every function does a few elementwise passes over ``S`` and nothing of size ``N x M x M``
(except ``reduction="none"`` of the all-triplets loss, whose terms are that size). Positive pairs
(usually few per anchor) are handled as indices; the log-sum-exp over the denominator is a fused
autograd function with one work buffer (double backward supported); triplet mining compares each
anchor's j-th positive with its negatives, one ``[N, M]`` pass per j < k, or sorts the negatives
once per anchor when k is large (always with ``check=False``, where k is not read). Small
batches: at B = 128 a loss's time is mostly the fixed cost per operation and per autograd node,
so below :data:`~losses.kernels.FUSED_MAX_ENTRIES` score entries (``check=True``, a reduced
loss, boolean masks) InfoNCE in both forms, NWJ, JS, DV, the triplet loss (all triplets with
few positives per anchor, batch-hard; the hinge) and the contrastive loss take a fused path, as
the pair and proxy losses (:mod:`losses.pair_based`, :mod:`losses.proxies`) do: value and
gradient ``dL/dS`` from one pass of plain tensor code (masks as 0/1 values, which multiply
several times faster than ``torch.where`` selects on CPU), the backward pass one multiplication
(:class:`~losses.kernels.FusedLoss`; the same values, gradients equal to rounding, double
backward by recomputation; ``tests/test_fused_core.py``). The building blocks (validation,
reductions, masked log-sum-exps, the fused path) are :mod:`losses.kernels`.

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

from contrastive.critics import SparseRows
from contrastive.pairs import require_negatives, require_positives

from . import kernels as K
from . import native as N
from .kernels import REDUCTIONS

__all__ = [
    "infonce",
    "ntxent",
    "supcon",
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
    "REDUCTIONS",
]

def logmeanexp(x: Tensor, mask: Tensor, check: bool = True) -> Tensor:
    """``log( mean_{mask} exp(x) )`` over all masked entries, computed stably (``-inf`` for an
    empty mask with ``check=False``)."""
    mask = mask if mask.dtype == torch.bool else mask.bool()
    x = K.full_precision(x)
    if check:
        return K.masked_lse(x, mask, None) - math.log(int(K.count(mask)))
    return K.masked_lse(x, mask, None) - K.count(mask).clamp_min(1).to(x.dtype).log()


# --------------------------------------------------------------------------- InfoNCE


def _infonce_rows(scores: Tensor, positives: Tensor, negatives: Tensor, pi: K.PosIndex | None):
    """Per-anchor InfoNCE terms (0 for anchors without a positive), ``|P_i|`` and the mask of
    pairs in the denominator; positives by index (``pi``) or, when None, by mask."""
    valid = K.valid(positives, negatives)
    lse = K.masked_lse(scores, valid, 1)
    if pi is None:
        count = K.count_rows(positives)
        psum = K.masked_row_sum(scores, positives)
    else:
        count = pi.count
        psum = K.positive_sum(scores, pi)
    n_pos = count.clamp_min(1).to(scores.dtype)
    rows = torch.where(count > 0, lse - psum / n_pos, 0.0)
    return rows, count, valid


def _counts_or_none(mask: Tensor | None) -> Tensor | None:
    """A mask given as integer counts (mined pairs with repeats), else None."""
    if mask is None or mask.dtype == torch.bool or mask.is_floating_point():
        return None
    return mask


def supcon(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Multi-positive InfoNCE in SupCon's form (Khosla et al. 2020, ``L_out``; CPC / NT-Xent
    with one positive)::

        l_i = -(1/|P_i|) sum_{j in P_i} [ S_ij - logsumexp_{k in P_i u Q_i} S_ik ]

    averaged over the anchors with a positive and at least two pairs in ``P_i u Q_i`` (the
    others have ``l_i = 0``; pytorch-metric-learning's ``SupConLoss`` averages over non-zero
    terms, which is the same set unless an ``exp`` underflows). Needs a positive and a negative
    somewhere in the batch (:class:`~contrastive.pairs.NoPairsError` with ``check``, else 0).

    One term is one anchor row: ``reduction="none"`` gives ``l [N]`` (0 for the anchors left
    out); ``"mean"`` is ``l.sum() / #anchors used``, the mean of ``"none"`` when every anchor
    has a positive and a negative.
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "both",
                                             "InfoNCE")
    if fused:
        return K.fused(_supcon_kernel, _supcon_slow, scores, positives, negatives, reduction)
    pi = K.positive_index(positives, "InfoNCE") if check else None
    rows, count, valid = _infonce_rows(scores, positives, negatives, pi)
    used = (count > 0) & (K.count_rows(valid) > 1)
    if not check:
        rows = K.gate(rows, K.any_pair(positives, negatives))
    return K.reduce_terms(rows, reduction, used.sum())


def _supcon_slow(scores, positives, negatives, reduction):
    return supcon(scores, positives, negatives, reduction, check=False)


def _supcon_kernel(scores, positives, negatives, reduction, need_grad):
    """:func:`supcon`'s value and ``dL/dS`` in one pass (``kernels.fused``): with ``V = P u Q``
    and ``w`` the reduction's weight, row i's gradient is
    ``w (softmax_V(S_i.) - P_i. / |P_i|)`` for an anchor with a positive, 0 otherwise."""
    dt = scores.dtype
    pf, qf = K.as_float(positives, dt), K.as_float(negatives, dt)
    keep = torch.maximum(pf, qf)  # V as 0/1 values
    lse, e, _, z = K.stacked_lse(scores, keep)
    count = pf.sum(1, keepdim=True)
    has = count.clamp_max(1.0)  # 1 for an anchor with a positive, else 0
    inv_count = count.clamp_min(1.0).reciprocal_()
    pulled = (scores * pf).sum(1, keepdim=True).mul_(inv_count)  # mean_P S
    total = lse.sub_(pulled).mul_(has).sum()  # sum of lse - mean_P S
    if reduction == "sum":
        value, weight = total, has
    else:
        used = has.mul(keep.sum(1, keepdim=True) > 1).sum().clamp_min_(1.0)
        value = total / used
        weight = has * used.reciprocal()
    if not need_grad:
        return value, None
    return value, e.mul_(z.reciprocal_()).addcmul_(pf, inv_count, value=-1.0).mul_(weight)


_supcon_kernel.native = N.supcon  # its C kernel (losses.native)


def ntxent(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """InfoNCE in NT-Xent's pair form (Chen et al. 2020; pytorch-metric-learning's
    ``NTXentLoss``): one term per positive pair, the positive against the anchor's negatives
    only (the anchor's other positives are left out of the denominator)::

        l_ij = -log( exp(S_ij) / (exp(S_ij) + sum_{k in Q_i} exp(S_ik)) )
             = softplus( logsumexp_{k in Q_i} S_ik - S_ij ),    (i, j) in P

    averaged over all positive pairs (a pair whose anchor has no negative gives 0 and still
    counts, as in PML). One positive per anchor makes it equal to :func:`supcon`. Cost: one
    masked log-sum-exp over ``[N, M]`` and a gather per positive pair (no ``N x M x M``).
    Needs a positive and a negative somewhere in the batch.

    ``positives`` / ``negatives`` may also be integer counts (how often a miner returned each
    pair, :func:`contrastive.pairs.mined_masks` with ``counts=True``): a positive pair then
    weighs its count in the mean and in the sum, and a negative its count in the denominator,
    as in PML.

    One term is one (anchor, positive) pair: ``reduction="none"`` gives ``l [N, M]``, 0 off the
    positive pairs (with counts: one term per distinct pair, unweighted); ``"mean"`` is the mean
    of ``l[P]`` (count-weighted with counts).
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    p_count = _counts_or_none(positives)
    q_count = _counts_or_none(negatives)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "both",
                                             "NT-Xent")
    if fused:
        return K.fused(_ntxent_kernel, _ntxent_slow, scores, positives, negatives, reduction)
    has_neg = K.count_rows(negatives) > 0
    logits = scores if q_count is None else scores + q_count.clamp_min(1).to(scores.dtype).log()
    lse_neg = K.masked_lse(logits, negatives, 1)
    lse_neg = torch.where(has_neg, lse_neg, torch.zeros_like(lse_neg))  # -inf -> 0, masked below
    if check:  # one term per positive pair, gathered by index
        pi = K.positive_index(positives, "NT-Xent")
        z = lse_neg[pi.rows] - scores[pi.rows, pi.cols]
        terms = K.softplus(z)
        terms = torch.where(has_neg[pi.rows], terms, torch.zeros_like(terms))
        if reduction == "none":
            return scores.new_zeros(scores.shape).index_put((pi.rows, pi.cols), terms)
        n = pi.rows.numel()
        w = None if p_count is None else p_count[pi.rows, pi.cols].to(scores.dtype)
    else:  # the same terms as an [N, M] matrix, 0 off the positive pairs
        terms = K.softplus(lse_neg[:, None] - scores)
        terms = torch.where(positives & has_neg[:, None], terms, torch.zeros_like(terms))
        if reduction == "none":
            return terms
        n = K.count(positives)
        w = None if p_count is None else p_count.to(scores.dtype)
    if w is None:
        return K.reduce_terms(terms, reduction, n)
    return K.reduce_terms(terms * w, reduction, w.sum())


def _ntxent_slow(scores, positives, negatives, reduction):
    return ntxent(scores, positives, negatives, reduction, check=False)


def _ntxent_kernel(scores, positives, negatives, reduction, need_grad):
    """:func:`ntxent`'s value and ``dL/dS`` in one pass (``kernels.fused``), without gathering
    the positive pairs. With ``m_i`` the row maximum over ``P u Q``, ``e = exp(S - m)`` (the
    exponent floored at ``kernels.EXP_FLOOR``) and ``z_i = sum_{Q_i} e``, a pair's term is
    ``log(e_ij + z_i) - (S_ij - m_i)`` (the softplus without ``log1p``, which is not vectorised
    on CPU; the absolute error is below one float ulp of the term's ``log``), its gradient
    ``-z_i / (e_ij + z_i)`` at the positive and ``e_ik / (e_ij + z_i)`` at each negative k,
    times the reduction's weight. A row has a negative exactly when ``z_i > 0`` (every ``e`` on
    ``Q`` is at least ``exp(EXP_FLOOR)``); its pairs are the ones that count. Written for few
    operations (each costs several microseconds at B = 128 on CPU, more than its arithmetic):
    the masks as 0/1 values once, ``P u Q`` as their maximum, the drop of the other entries as
    one addition of ``(keep - 1) * finfo.max``."""
    dt = scores.dtype
    big = torch.finfo(dt).max
    pf, qf = K.as_float(positives, dt), K.as_float(negatives, dt)
    w = torch.add(scores, torch.maximum(pf, qf).sub_(1.0), alpha=big)  # S - max off P u Q
    m = w.amax(1, keepdim=True).clamp_min_(-0.5 * big)
    e = w.sub_(m).clamp_min_(K.EXP_FLOOR.get(dt, -87.0)).exp_()
    eq = e * qf  # e on the negatives
    z = eq.sum(1, keepdim=True)
    n = pf.sum()
    pairs = pf.mul_(z > 0)
    # e + z in e's buffer; off P u Q e is exp(floor) > tiny, and the pairs' mask drops those
    # entries (each term finite there, so 0 after the product); the clamp keeps log and 1/x
    # finite for any score
    ez = e.add_(z).clamp_min_(torch.finfo(dt).tiny)
    total = ez.log().sub_(scores).add_(m).mul_(pairs).sum()
    if reduction == "sum":
        value, scale = total, 1.0
    else:
        value = total / n
        scale = n.reciprocal()
    if not need_grad:
        return value, None
    inv = ez.reciprocal_().mul_(pairs).mul_(scale)
    return value, eq.mul_(inv.sum(1, keepdim=True)).addcmul_(inv, z, value=-1.0)


_ntxent_kernel.native = N.ntxent  # its C kernel (losses.native)


def infonce(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    form: str = "all",
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Multi-positive InfoNCE: ``form="all"`` is SupCon's term (:func:`supcon`, all positives
    of an anchor in one log-sum-exp, one term per anchor), ``form="pair"`` NT-Xent's
    (:func:`ntxent`, one term per positive pair). Both are CPC's InfoNCE with one positive per
    anchor."""
    if form == "all":
        return supcon(scores, positives, negatives, reduction, check)
    if form == "pair":
        return ntxent(scores, positives, negatives, reduction, check)
    raise ValueError(f"form must be 'all' (SupCon) or 'pair' (NT-Xent), got {form!r}")


def infonce_bound(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """The InfoNCE lower bound on MI in nats (van den Oord et al. 2018; Poole et al. 2019)::

        I_NCE = mean_i [ log K_i - l_i ],   K_i = |P_i u Q_i|

    For K paired samples (positives on the diagonal) this is
    ``log K + mean_i (S_ii - logsumexp_j S_ij) <= log K``. One term per anchor (``[N]``, 0 for
    anchors without a positive); ``"mean"`` averages over the anchors with a positive.
    """
    K.check_reduction(reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    pi = K.positive_index(positives, "the InfoNCE bound") if check else None
    rows, count, valid = _infonce_rows(scores, positives, negatives, pi)
    has = count > 0
    log_k = K.count_rows(valid).clamp_min(1).to(scores.dtype).log()
    return K.reduce_terms(torch.where(has, log_k - rows, 0.0), reduction, has.sum())


# --------------------------------------------------------------------------- NWJ / JS / DV
#
# These bounds are means over two different sets (positive pairs, negative pairs), and DV's
# log-mean-exp runs over all negatives at once, so they are not means of independent per-anchor
# terms. Their terms are per anchor and defined so that their mean over the N anchors is the
# value: with n_P = |P|, n_Q = |Q|,
#     t_i = (N / n_P) sum_{j in P_i} f(S_ij) + (N / n_Q) sum_{k in Q_i} g(S_ik)
# (for paired views, n_P = N: the positive's own term plus the mean over the anchor's
# negatives); DV adds the one batch-wide log-mean-exp to every anchor's term.


def _negative_count(negatives: Tensor, what: str) -> int:
    n = int(K.count(negatives))
    if n == 0:
        require_negatives(negatives, what)  # raises with the sampler hint
    return n


def _positive_scores(scores: Tensor, positives: Tensor, what: str) -> Tensor:
    """The scores of all positive pairs, as a vector."""
    pi = K.positive_index(positives, what)
    return scores[pi.rows, pi.cols]


def _positive_mean(scores: Tensor, positives: Tensor, what: str, check: bool) -> Tensor:
    """``mean_P S`` (0 without positives when not ``check``)."""
    if check:
        return _positive_scores(scores, positives, what).mean()
    return K.masked_row_sum(scores, positives).sum() / K.count(positives).clamp_min(1)


def _logmeanexp_negatives(scores: Tensor, negatives: Tensor, what: str, check: bool = True):
    if check:
        n = _negative_count(negatives, what)
        return K.masked_lse(scores, negatives, None) - math.log(n)
    return logmeanexp(scores, negatives, check=False)


def _anchor_terms(scores: Tensor, positives: Tensor, negatives: Tensor, f_pos: Tensor | None,
                  row_neg: Tensor | None) -> Tensor:
    """``(N / n_P) sum_{P_i} f_pos + (N / n_Q) row_neg_i`` per anchor (see the section note)."""
    n = scores.shape[0]
    t = scores.new_zeros(n)
    if f_pos is not None:
        n_p = K.count(positives).clamp_min(1).to(scores.dtype)
        t = t + K.masked_row_sum(f_pos, positives) * (n / n_p)
    if row_neg is not None:
        n_q = K.count(negatives).clamp_min(1).to(scores.dtype)
        t = t + row_neg * (n / n_q)
    return t


def _bound_terms(scores, positives, negatives, what, check, terms):
    """Per-anchor terms of a bound: the no-pair check, or the gate without ``check``."""
    if check:
        require_positives(positives, what)
        require_negatives(negatives, what)
        return terms
    return K.gate(terms, K.any_pair(positives, negatives))


def nwj_bound(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """NWJ / f-divergence lower bound (Nguyen et al. 2010; Poole et al. 2019, "I_NWJ")::

        I_NWJ = mean_P S - e^{-1} mean_Q exp(S) = mean_P S - exp(logmeanexp_Q S - 1)

    Tight at ``S* = 1 + log p(y|x)/p(y)``. Terms per anchor (see the note above the NWJ
    section): ``t_i = (N/n_P) sum_{P_i} S_ij - (N/n_Q) sum_{Q_i} exp(S_ik - 1)``, whose mean
    over the N anchors is ``I_NWJ``.
    """
    K.check_reduction(reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    what = "the NWJ bound"
    if reduction != "mean":
        neg = torch.exp(K.masked_lse(scores, negatives, 1) - 1.0)
        t = _anchor_terms(scores, positives, negatives, scores, -neg)
        return K.reduce_terms(_bound_terms(scores, positives, negatives, what, check, t), reduction)
    pos = _positive_mean(scores, positives, what, check)
    value = pos - torch.exp(_logmeanexp_negatives(scores, negatives, what, check) - 1.0)
    return value if check else K.gate(value, K.any_pair(positives, negatives))


def nwj(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
        reduction: str = "mean", check: bool = True) -> Tensor:
    """NWJ loss ``-I_NWJ`` (see :func:`nwj_bound`; its terms negated): unbiased, high
    variance."""
    fused = _fused_bound(_nwj_kernel, nwj, "the NWJ bound", scores, positives, negatives,
                         reduction, check)
    return -nwj_bound(scores, positives, negatives, reduction, check) if fused is None else fused


def _fused_bound(kernel, loss, what: str, scores, positives, negatives, reduction: str,
                 check: bool) -> Tensor | None:
    """The NWJ / JS / DV loss through its fused small-batch kernel (``kernels.fused``), or None
    where the autograd form runs (see :func:`kernels.fusable`). The kernels compute the
    ``"mean"`` value ``v`` (a mean over P plus a term over Q); ``"sum"`` of the per-anchor terms
    (see the note above the NWJ section) is ``N v``."""
    K.check_reduction(reduction)
    if not K.fusable(scores, positives, negatives, check, reduction):
        return None
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "both", what)
    scale = float(scores.shape[0]) if reduction == "sum" else 1.0
    return K.fused(kernel, _slow_bound(loss), scores, positives, negatives, scale)


def _slow_bound(loss):
    return lambda s, p, q, scale: loss(s, p, q, "sum" if scale != 1.0 else "mean", check=False)


def _bound_masks(scores: Tensor, positives: Tensor, negatives: Tensor):
    """``P`` and ``Q`` as 0/1 values, their sizes ``n_P``, ``n_Q`` (0-d) and ``mean_P S``: the
    pieces the fused NWJ / JS / DV kernels share."""
    dt = scores.dtype
    pf, qf = K.as_float(positives, dt), K.as_float(negatives, dt)
    n_p, n_q = pf.sum(), qf.sum()
    return pf, qf, n_p, n_q, torch.dot(scores.view(-1), pf.view(-1)) / n_p


def _negative_exp(scores: Tensor, qf: Tensor):
    """``(m, e, z)`` over the negatives of the whole matrix: ``m = max_Q S`` (0-d),
    ``e = exp(max(S - m, EXP_FLOOR))`` on Q and 0 elsewhere, ``z = sum e`` (so
    ``log sum_Q exp(S) = m + log z``, no overflow). The other entries are dropped by one
    addition of ``(qf - 1) * finfo.max`` (fewer operations than a masked fill and a flat
    view's log-sum-exp). Needs a negative."""
    big = torch.finfo(scores.dtype).max
    w = torch.add(scores, qf.sub(1.0), alpha=big)
    m = w.max()
    e = w.sub_(m).clamp_min_(K.EXP_FLOOR.get(scores.dtype, -87.0)).exp_().mul_(qf)
    return m, e, e.sum()


def _nwj_kernel(scores, positives, negatives, scale, need_grad):
    """:func:`nwj`'s value ``e^{-1} mean_Q exp(S) - mean_P S`` and ``dL/dS`` in one pass
    (``kernels.fused``): ``exp(S_ik - 1) / n_Q`` on the negatives, ``-1 / n_P`` on the
    positives (times ``scale``). ``mean_Q exp(S - 1) = c z`` with
    ``c = exp(m - 1 - log n_Q)`` (:func:`_negative_exp`), finite wherever the mean is."""
    pf, qf, n_p, n_q, pos = _bound_masks(scores, positives, negatives)
    m, e, z = _negative_exp(scores, qf)
    c = (m - n_q.log()).sub_(1.0).exp_()
    value = c * z - pos
    if not need_grad:
        return _times(value, scale), None
    grad = e.mul_(c).addcmul_(pf, n_p.reciprocal(), value=-1.0)
    return _times(value, scale), _times_(grad, scale)


_nwj_kernel.native = N.nwj  # its C kernel (losses.native)


def _times(x: Tensor, scale: float) -> Tensor:
    """``x * scale``, without an operation for ``scale == 1``."""
    return x if scale == 1.0 else x * scale


def _times_(x: Tensor, scale: float) -> Tensor:
    """``x *= scale`` in place, without an operation for ``scale == 1``."""
    return x if scale == 1.0 else x.mul_(scale)


def js(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Jensen-Shannon (f-GAN) critic loss (Nowozin et al. 2016; Hjelm et al. 2019)::

        loss = -( mean_P[-softplus(-S)] - mean_Q[softplus(S)] )

    Its optimum is ``S* = log p(y|x)/p(y)``; read MI off with :func:`js_bound`. Terms per
    anchor: ``t_i = (N/n_P) sum_{P_i} softplus(-S_ij) + (N/n_Q) sum_{Q_i} softplus(S_ik)``, whose
    mean over the N anchors is the loss.
    """
    fused = _fused_bound(_js_kernel, js, "the JS loss", scores, positives, negatives, reduction,
                         check)
    if fused is not None:
        return fused
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    what = "the JS loss"
    if reduction != "mean":
        neg = K.masked_row_sum(K.softplus(scores), negatives)
        t = _anchor_terms(scores, positives, negatives, K.softplus(-scores), neg)
        return K.reduce_terms(_bound_terms(scores, positives, negatives, what, check, t), reduction)
    if check:
        pos_term = -F.softplus(-_positive_scores(scores, positives, what)).mean()
        n = _negative_count(negatives, what)
    else:
        pos_term = -_positive_mean(K.softplus(-scores), positives, what, False)
        n = K.count(negatives).clamp_min(1)
    neg_term = K.masked_softplus_sum(scores, negatives) / n
    value = -(pos_term - neg_term)
    return value if check else K.gate(value, K.any_pair(positives, negatives))


def _js_kernel(scores, positives, negatives, scale, need_grad):
    """:func:`js`'s value ``mean_P softplus(-S) + mean_Q softplus(S)`` and ``dL/dS`` in one pass
    (``kernels.fused``): ``softplus(S) = max(S, 0) + log(1 + exp(-|S|))`` (no ``log1p``, which
    is not vectorised on CPU), ``softplus(-S) = softplus(S) - S`` (absolute errors below one
    float ulp of ``max(|S|, 1)``), and the gradient ``sigmoid(S) / n_Q`` on Q,
    ``-(1 - sigmoid(S)) / n_P`` on P (times ``scale``), i.e.
    ``sigmoid(S) (Q / n_Q + P / n_P) - P / n_P``."""
    dt = scores.dtype
    pf, qf = K.as_float(positives, dt), K.as_float(negatives, dt)
    inv_p, inv_q = _times(pf.sum().reciprocal(), scale), _times(qf.sum().reciprocal(), scale)
    sp = scores.abs().neg_().exp_().add_(1.0).log_().add_(scores.clamp_min(0.0))
    value = (torch.dot(sp.view(-1), qf.view(-1)) * inv_q
             + torch.dot(sp.sub_(scores).view(-1), pf.view(-1)) * inv_p)
    if not need_grad:
        return value, None
    coef = qf.mul_(inv_q).addcmul_(pf, inv_p)
    return value, torch.sigmoid(scores).mul_(coef).addcmul_(pf, inv_p, value=-1.0)


_js_kernel.native = N.js  # its C kernel (losses.native)


def js_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
             reduction: str = "mean", check: bool = True) -> Tensor:
    """MI readout of a JS-trained critic: ``I_NWJ(S + 1)`` (terms as :func:`nwj_bound`'s).

    JS's optimal critic is the log density ratio, while NWJ is tight at ``1 +`` that ratio, so the
    shift makes the readout tight at the JS optimum (``I_NWJ(S)`` would sit ``1/e`` nats below).
    Any shift of a critic still gives a valid NWJ lower bound.
    """
    # the shift in float32 (float64 stays): a bf16 / fp16 score shifted first would be rounded
    # to its own precision before the core's cast
    return nwj_bound(K.full_precision(scores) + 1.0, positives, negatives, reduction, check)


def dv_bound(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Donsker-Varadhan lower bound (MINE, Belghazi et al. 2018)::

        I_DV = mean_P S - logmeanexp_Q S

    The log-mean-exp runs over all negatives of the batch at once, so the bound is no mean of
    independent terms. Terms per anchor: ``t_i = (N/n_P) sum_{P_i} S_ij - logmeanexp_Q S``
    (the batch-wide log-mean-exp in every anchor's term), so that their mean is ``I_DV``.
    """
    K.check_reduction(reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    what = "the DV bound"
    if reduction != "mean":
        t = _anchor_terms(scores, positives, negatives, scores, None)
        t = t - _logmeanexp_negatives(scores, negatives, what, False)
        return K.reduce_terms(_bound_terms(scores, positives, negatives, what, check, t), reduction)
    pos = _positive_mean(scores, positives, what, check)
    value = pos - _logmeanexp_negatives(scores, negatives, what, check)
    return value if check else K.gate(value, K.any_pair(positives, negatives))


def dv(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
       reduction: str = "mean", check: bool = True) -> Tensor:
    """DV loss ``-I_DV`` (its terms negated; plain mini-batch gradient; MINE's moving-average
    correction is not applied)."""
    fused = _fused_bound(_dv_kernel, dv, "the DV bound", scores, positives, negatives,
                         reduction, check)
    return -dv_bound(scores, positives, negatives, reduction, check) if fused is None else fused


def _dv_kernel(scores, positives, negatives, scale, need_grad):
    """:func:`dv`'s value ``logmeanexp_Q S - mean_P S`` and ``dL/dS`` in one pass
    (``kernels.fused``): the softmax over all negatives, ``-1 / n_P`` on the positives (times
    ``scale``); ``logmeanexp_Q S = m + log(z / n_Q)`` (:func:`_negative_exp`)."""
    pf, qf, n_p, n_q, pos = _bound_masks(scores, positives, negatives)
    m, e, z = _negative_exp(scores, qf)
    value = (z / n_q).log_().add_(m).sub_(pos)
    if not need_grad:
        return _times(value, scale), None
    grad = e.mul_(z.reciprocal()).addcmul_(pf, n_p.reciprocal(), value=-1.0)
    return _times(value, scale), _times_(grad, scale)


_dv_kernel.native = N.dv  # its C kernel (losses.native)


# --------------------------------------------------------------------------- N-pair


def multiclass_npair(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    reduction: str = "mean",
    check: bool = True,
) -> Tensor:
    """Multi-class N-pair loss (Sohn 2016), one positive ``p(i)`` per anchor::

        l_i = log(1 + sum_{k in Q_i} exp(S_ik - S_ip(i))) = logsumexp_{{p(i)} u Q_i} S_i. - S_ip(i)

    On anchors x positives with a dot critic this is the cross-entropy of each anchor against
    its own positive, i.e. InfoNCE with one positive (Tschannen et al. 2020, sec. 4). One term
    per anchor (``[N]``, 0 for an anchor without a positive); ``"mean"`` averages over the
    anchors with a positive (all of them on paired rows, where it is the mean of ``"none"``).
    ``check`` also verifies that no anchor has two positives.
    """
    K.check_reduction(reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "positives",
                                             "the multi-class N-pair loss")
    # every anchor has one positive and all its other candidates are negatives (the paired
    # rows the module builds): the cross-entropy against the positive's column, torch's fused
    # kernel, which is what the loss computed before it had this core; the C check where it
    # can (losses.native), else the torch one
    target = N.partition_targets(positives, negatives) if check else None
    if target is not None:
        return F.cross_entropy(scores, target.to(scores.device), reduction=reduction)
    if check and bool((positives ^ negatives).all() & (K.count_rows(positives) == 1).all()):
        target = positives.to(torch.uint8).argmax(1)
        return F.cross_entropy(scores, target, reduction=reduction)
    pi = K.positive_index(positives, "the multi-class N-pair loss") if check else None
    rows, count, _ = _infonce_rows(scores, positives, negatives, pi)
    if check and int(count.max()) > 1:
        raise ValueError(
            "the multi-class N-pair loss takes exactly one positive per anchor; use "
            "losses.MultiClassNPair on labels (it picks one pair per class) or InfoNCE"
        )
    return K.reduce_terms(rows, reduction, (count > 0).sum())


# --------------------------------------------------------------------------- triplet


def _use_dense(k: int, m: int) -> bool:
    """Dense comparisons cost ~k passes over [N, M]; a per-row sort ~ c log2 M. The constant
    was measured on CPU (torch's batched sort and searchsorted are slow)."""
    return k <= max(8, 7 * math.log2(max(m, 2)))


#: entries of one float pass over several positive slots ``[j, N, M]`` (triplet counts, the
#: semi-hard search); a matrix too large for two slots per pass takes one ``[N, M]`` pass per
#: slot instead (the semi-hard search in 0/1 float values: its boolean form, a comparison, an
#: ``&`` and a conversion, cost 29 ms against 23 at B = 1024 on CPU)
SLOT_PASS_ENTRIES = 1 << 20


def _triplet_counts(sd: Tensor, negatives: Tensor, s_ap: Tensor, valid: Tensor, margin: float):
    """For every anchor's padded positive slot j: ``c_ap [N, k]``, how many of its negatives
    are active (``S_an > S_ap - m``), and ``c_an [N, M]``, for how many of its positives each
    negative is active, as counts in ``sd``'s dtype (``sd`` the detached scores); several slots
    per pass as 0/1 values (float arithmetic is several times faster than boolean masks on
    CPU), or one boolean pass per slot (:data:`SLOT_PASS_ENTRIES`)."""
    thr = (s_ap - margin).masked_fill(~valid, K.POS_INF)
    (n, m), k = sd.shape, s_ap.shape[1]
    step = SLOT_PASS_ENTRIES // max(n * m, 1)  # slots per pass
    if step >= 2:
        thr = thr.T[:, :, None]  # [k, N, 1], a view (the broadcast reads it as it is)
        qf = K.as_float(negatives, sd.dtype)
        if step >= k:  # every slot in one pass
            act = (sd - thr).gt_(0.0).mul_(qf)
            return act.sum(2).T.contiguous(), act.sum(0)
        c_an = torch.zeros_like(sd)
        c_ap = torch.empty(k, n, dtype=sd.dtype, device=sd.device)
        for j in range(0, k, step):
            act = (sd - thr[j:j + step]).gt_(0.0).mul_(qf)
            c_an += act.sum(0)
            c_ap[j:j + step] = act.sum(2)
        return c_ap.T.contiguous(), c_an
    c_ap = torch.empty(s_ap.shape, dtype=torch.int32, device=sd.device)
    # c_an <= k: count in bytes (bool viewed as uint8 adds without a conversion pass)
    c_an = torch.zeros(sd.shape, dtype=torch.uint8 if k < 256 else torch.int32, device=sd.device)
    for j in range(k):
        act = torch.gt(sd, thr[:, j, None])
        act &= negatives
        c_ap[:, j] = K.count_rows(act)
        c_an += act.view(torch.uint8)
    return c_ap.to(sd.dtype), c_an.to(sd.dtype)


def _triplet_all_dense(scores, negatives, idx, valid, margin):
    """Sum and count of active triplets (``S_an > S_ap - m``) by comparing every anchor's j-th
    positive with all its negatives (:func:`_triplet_counts`, O(k N M)). The value is rebuilt
    from the counts, ``sum_{a,p} c_ap (m - S_ap) + sum_{a,n} c_an S_an``, whose autograd
    gradient is exactly the hinge's (it is piecewise linear), so only O(N M) is kept for
    backward."""
    s_ap = scores.gather(1, idx)
    c_ap, c_an = _triplet_counts(scores.detach(), negatives, s_ap.detach(), valid, margin)
    total = (c_ap * (margin - s_ap)).sum() + torch.dot(c_an.reshape(-1), scores.reshape(-1))
    return total, c_ap.sum(dtype=torch.int64)


def _triplet_all_kernel(scores, positives, negatives, idx, valid, margin, reduction, n_triplets,
                        need_grad):
    """:func:`triplet`'s all-triplets hinge loss and ``dL/dS`` in one pass (``kernels.fused``):
    from the counts of active triplets (:func:`_triplet_counts`), ``c_ap`` per anchor and
    positive and ``c_an`` per anchor and negative, the loss being linear in ``S`` on the active
    triplets, ``dL/dS = w G`` with ``G = c_an - c_ap`` (``c_ap`` placed at the positives'
    columns) and the value ``w (sum G * S + m sum c_ap)``
    (``= w (sum c_ap (m - S_ap) + sum c_an S_an)``), ``w`` one over the reduction's count."""
    s_ap = scores.gather(1, idx)
    c_ap, c_an = _triplet_counts(scores, negatives, s_ap, valid, margin)
    active = c_ap.sum()
    g = c_an.scatter_add_(1, idx, c_ap.neg_())  # G, in c_an's buffer
    total = torch.dot(g.view(-1), scores.reshape(-1)).add_(active * margin)
    if reduction == "sum":
        return total, (g if need_grad else None)
    w = (active if reduction == "nonzero" else n_triplets.to(scores.dtype))
    w = w.clamp_min(1).reciprocal()
    return total * w, (g.mul_(w) if need_grad else None)


def _n_triplets(positives: Tensor, negatives: Tensor) -> Tensor:
    """The number of valid triplets, ``sum_a |P_a| |Q_a|`` (int64: a row's product passes
    int32 beyond ~92k reference items), for the means that divide by it."""
    return (K.count_rows(positives).to(torch.int64) * K.count_rows(negatives)).sum()


def _triplet_kernel(scores, positives, negatives, margin, mining, reduction, need_grad):
    """:func:`triplet`'s hinge loss (boolean masks, no given triplets, a reduced loss) and its
    ``dL/dS`` in one pass (``kernels.fused``; the module's one-node lane,
    :meth:`losses.modules.Triplet.lane_kernel`, takes the same kernel): batch-hard and
    semi-hard from their kernels, all triplets from the dense one when an anchor has few
    positives, else from the sorted autograd form, its gradient taken here."""
    if mining == "hard":
        return _triplet_hard_kernel(scores, positives, negatives, margin, reduction,
                                    need_grad)
    pi = K.positive_index(positives, "the triplet loss")
    idx, valid = K.padded_positives(pi)
    if mining == "semihard":
        return _triplet_semihard_kernel(scores, positives, negatives, idx, valid,
                                        K.count_rows(negatives) > 0, margin, reduction,
                                        need_grad)
    n_triplets = _n_triplets(positives, negatives) if reduction == "mean" else None
    if _use_dense(idx.shape[1], scores.shape[1]):
        return _triplet_all_kernel(scores, positives, negatives, idx, valid, margin, reduction,
                                   n_triplets, need_grad)
    with torch.enable_grad():
        s = scores.detach().requires_grad_()
        total, count = _triplet_all(s, positives, negatives, margin, "auto", pi, (idx, valid))
        value = total if reduction == "sum" else total / (
            n_triplets if reduction == "mean" else count).clamp_min(1)
        (grad,) = torch.autograd.grad(value, s) if need_grad else (None,)
    return value.detach(), grad


_triplet_kernel.native = N.triplet  # its C kernel (losses.native)


def _triplet_slow(scores, positives, negatives, margin, mining, reduction):
    return triplet(scores, positives, negatives, margin, mining, False, reduction, check=False)


def _triplet_hard_kernel(scores, positives, negatives, margin, reduction, need_grad):
    """:func:`triplet`'s batch-hard hinge loss and ``dL/dS`` in one pass (``kernels.fused``):
    per anchor with both a positive and a negative, ``+w`` at its hardest negative's column
    and ``-w`` at its hardest positive's where the hinge is active."""
    p_col, n_col = _hardest_columns(scores, positives, negatives)
    value, coef = _hard_terms(scores, positives, negatives, p_col, n_col, margin, reduction)
    if not need_grad:
        return value, None
    grad = torch.zeros_like(scores).scatter_add_(1, n_col, coef)
    return value, grad.scatter_add_(1, p_col, coef.neg_())


def _hard_terms(scores: Tensor, positives: Tensor, negatives: Tensor, p_col: Tensor,
                n_col: Tensor, margin: float, reduction: str) -> tuple[Tensor, Tensor]:
    """The batch-hard loss from each anchor's hardest columns, and each anchor's coefficient
    ``[N, 1]`` (``w`` where its hinge is active, else 0): ``dL/dS`` is ``+coef`` at the
    negative's column and ``-coef`` at the positive's. An anchor has a term when its columns
    are a positive and a negative (the searches give a row without one a column outside its
    mask): two ``[N]`` reads instead of two row counts over ``[N, M]`` (1 ms each at
    N = 1024 on CPU)."""
    ok = (positives.gather(1, p_col) & negatives.gather(1, n_col)).squeeze(1)
    diff = (scores.gather(1, n_col) - scores.gather(1, p_col)).squeeze(1).add_(margin)
    terms = diff.clamp_min_(0.0).mul_(ok)
    active = terms > 0
    if reduction == "sum":
        w = torch.ones((), dtype=scores.dtype, device=scores.device)
    else:
        w = (active if reduction == "nonzero" else ok).sum().clamp_min(1).to(scores.dtype)
        w = w.reciprocal()
    return terms.sum() * w, (active.to(scores.dtype) * w)[:, None]


def _triplet_hard_sparse_kernel(scores, positives, negatives, margin, reduction, need_grad):
    """:func:`_triplet_hard_kernel` with its ``dL/dS`` as two entries per row
    (:class:`~contrastive.critics.SparseRows`: ``+coef`` at the hardest negative, ``-coef`` at
    the hardest positive) instead of an ``[N, M]`` matrix: the kernel of the batch-hard
    triplet loss's one-node lane (:meth:`losses.modules.Triplet.lane_kernel`), whose critic
    backward then needs no ``[N, N]`` product (:func:`~contrastive.critics.
    unit_gram_sparse_backward`). The same value, bit for bit; the gradient to rounding. Past
    :data:`losses.kernels.FUSED_MAX_ENTRIES` scores and with few positives per anchor the
    search takes the positives by index (:func:`_hardest_by_index`: the lane's label masks of
    a batch against itself, its only caller)."""
    index = K.sparse_positives(positives) if scores.numel() > K.FUSED_MAX_ENTRIES else None
    p_col, n_col = (_hardest_columns(scores, positives, negatives) if index is None
                    else _hardest_by_index(scores, *index))
    value, coef = _hard_terms(scores, positives, negatives, p_col, n_col, margin, reduction)
    if not need_grad:
        return value, None
    return value, SparseRows(torch.cat((n_col, p_col), 1), torch.cat((coef, coef.neg()), 1))


_triplet_hard_sparse_kernel.sparse = True  # its gradient is SparseRows (losses.lane)


def _hardest_by_index(scores: Tensor, idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_hardest_columns` for the label masks of a batch against itself (the lane's:
    ``Q`` is everything but the positives and the diagonal), with the positives by index
    (``idx, valid`` of :func:`losses.kernels.padded_positives`; a few per anchor): the hardest
    positive is the first smallest of the ``[N, k]`` gathered scores (the index lists a row's
    columns in order); for the hardest negative the positives and the diagonal of ``scores``
    are set to ``-inf`` in place, the first largest of each row taken (``torch.max``), and
    the entries put back: one pass over ``[N, M]`` instead of a stacked ``[2, N, M]`` search
    or a masked copy (``torch.where``, 0.67 ms at N = 1024 on CPU). The same columns; a row
    without a positive (or a negative) gets a column outside ``P`` (or ``Q``)."""
    n = scores.shape[0]
    own = torch.arange(n, device=scores.device)[:, None]
    cols = torch.where(valid, idx, own)  # padding points at the row's own diagonal entry
    kept = scores.gather(1, cols)
    diag = scores.diagonal().clone()
    scores.scatter_(1, cols, -math.inf)
    scores.diagonal().fill_(-math.inf)
    n_col = scores.max(1, keepdim=True).indices
    scores.scatter_(1, cols, kept)
    scores.diagonal().copy_(diag)
    sp = torch.where(valid, kept, math.inf)
    return idx.gather(1, sp.argmin(1, keepdim=True)), n_col


def _triplet_semihard_kernel(scores, positives, negatives, idx, valid, has_neg, margin,
                             reduction, need_grad):
    """:func:`triplet`'s semi-hard hinge loss and ``dL/dS`` in one pass (``kernels.fused``):
    each padded (anchor, positive) slot's semi-hard negative (:func:`_semihard_negative`), then
    ``+w`` at that negative's column and ``-w`` at the positive's where the hinge is active,
    scattered as autograd's two ``gather`` backward passes would (the same gradient, bit for
    bit)."""
    value, coef, n_col = _semihard_terms(scores, negatives, idx, valid, has_neg, margin,
                                         reduction, need_grad)
    if not need_grad:
        return value, None
    # one buffer: a row's negative columns (n_col) and positive columns (idx, padding at a
    # column with coefficient 0) never meet, so each entry gets the one sum autograd's two
    # gather backward passes would give it
    grad = torch.zeros_like(scores).scatter_add_(1, n_col, coef)
    return value, grad.scatter_add_(1, idx, coef.neg_())


def _semihard_terms(scores, negatives, idx, valid, has_neg, margin, reduction, need_grad):
    """The semi-hard loss over the padded (anchor, positive) slots, each slot's coefficient
    ``[N, k]`` (``w`` where its hinge is active; None without ``need_grad``) and its
    negative's column: ``dL/dS`` is ``+coef`` there and ``-coef`` at the positive's."""
    s_ap = scores.gather(1, idx)
    n_col = _semihard_negative(scores, negatives, idx, valid, has_neg)
    ok = valid & has_neg[:, None]
    x = scores.gather(1, n_col).sub_(s_ap).add_(margin)
    active = (x > 0) & ok
    value = x.clamp_min_(0.0).mul_(ok).sum()
    if reduction != "sum":
        count = (active if reduction == "nonzero" else ok).sum().clamp_min(1)
        value = value / count
    if not need_grad:
        return value, None, n_col
    w = (torch.ones((), dtype=scores.dtype, device=scores.device) if reduction == "sum"
         else count.to(scores.dtype).reciprocal())
    return value, torch.where(active, w, 0.0), n_col


def _triplet_semihard_sparse_kernel(scores, positives, negatives, margin, reduction,
                                    need_grad):
    """:func:`_triplet_semihard_kernel` with its ``dL/dS`` as :class:`~contrastive.critics.
    SparseRows` (each slot's ``+coef`` at its negative, ``-coef`` at its positive): the
    semi-hard triplet loss's one-node lane past ``modules.SPARSE_LANE_MIN_ROWS``
    (:mod:`losses.lane`, its only caller: label masks of a batch against itself). The same
    value, bit for bit; the gradient to rounding."""
    idx, valid = K.padded_positives(K.positive_index(positives, "the triplet loss"))
    # the lane's label masks of a batch against itself, checked to hold a negative pair: two
    # labels at least, so every anchor has a negative (no [N, M] row count, 1 ms at N = 1024)
    has_neg = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    value, coef, n_col = _semihard_terms(scores, negatives, idx, valid, has_neg, margin,
                                         reduction, need_grad)
    if not need_grad:
        return value, None
    return value, SparseRows(torch.cat((n_col, idx), 1), torch.cat((coef, coef.neg()), 1))


_triplet_semihard_sparse_kernel.sparse = True


def _sorted_negatives(scores: Tensor, negatives: Tensor):
    """Per anchor: the negatives' scores sorted descending, as differentiable values (0 past
    the last negative) and as ascending search keys ``-S`` (+inf past the last negative)."""
    keyed = scores.detach().masked_fill(~negatives, K.NEG_INF)
    sorted_keyed, order = keyed.sort(dim=1, descending=True)
    keys = sorted_keyed.neg_()
    vals = scores.gather(1, order).masked_fill(torch.isinf(keys), 0.0)
    return vals, keys


def _triplet_all_sorted(scores, negatives, idx, valid, margin):
    """The same sum and count in O(N M log M): with each anchor's negatives sorted once, the
    active ones for a positive are a prefix whose size comes from a binary search and whose sum
    comes from a prefix sum. ``idx=None``: every column is a slot and ``valid`` is the positive
    mask (static shapes)."""
    vals, keys = _sorted_negatives(scores, negatives)
    prefix = F.pad(vals.cumsum(dim=1), (1, 0))  # prefix[:, c] = sum of the c largest
    s_ap = scores if idx is None else scores.gather(1, idx)
    # S_an > S_ap - m  <=>  -S_an < m - S_ap ; padding queries -inf count nothing
    thr = (margin - s_ap.detach()).masked_fill(~valid, K.NEG_INF).contiguous()
    count = torch.searchsorted(keys, thr, right=False)
    top = prefix.gather(1, count)
    total = (count.to(scores.dtype) * (margin - s_ap) + top).masked_fill(~valid, 0.0).sum()
    return total, count.sum()


def _triplet_all(scores, positives, negatives, margin, method: str = "auto", pi=None,
                 padded=None):
    """Exact sum and count of non-zero ``relu(m - S_ap + S_an)`` over all valid triplets without
    B^3 memory: ``"dense"`` (few positives per anchor) or ``"sorted"`` (many); ``"masked"`` is
    ``"sorted"`` with every column a slot (no sync, static shapes). ``pi`` / ``padded``: the
    positives' index and its padded ``(idx, valid)`` form when the caller has them."""
    if method == "masked":
        return _triplet_all_sorted(scores, negatives, None, positives, margin)
    if padded is None:
        pi = K.positive_index(positives, "the triplet loss") if pi is None else pi
        padded = K.padded_positives(pi)
    idx, valid = padded
    if method == "auto":
        method = "dense" if _use_dense(idx.shape[1], scores.shape[1]) else "sorted"
    fn = _triplet_all_dense if method == "dense" else _triplet_all_sorted
    return fn(scores, negatives, idx, valid, margin)


def _triplet_terms(scores, positives, negatives, margin: float, soft: bool) -> Tensor:
    """Every triplet's term ``[N, M, M]`` (anchor, positive, negative), 0 off the valid ones."""
    d = scores[:, None, :] - scores[:, :, None] + margin
    t = K.softplus(d) if soft else F.relu(d)
    keep = positives[:, :, None] & negatives[:, None, :]
    return torch.where(keep, t, torch.zeros_like(t))


def _triplet_soft_masked(scores, positives, negatives, margin: float) -> Tensor:
    """Sum of ``softplus(m + S_an - S_ap)`` over all valid triplets without reading k: blocks
    of anchors, ``[b, M, M]`` each (O(N M^2) time; blocks of at most ~4M entries)."""
    n, m = scores.shape
    step = max(1, (1 << 22) // max(m * m, 1))
    total = scores.new_zeros(())
    for r in range(0, n, step):
        rows = slice(r, r + step)
        total = total + _triplet_terms(scores[rows], positives[rows], negatives[rows], margin,
                                       True).sum()
    return total


def _triplet_soft_all(scores, positives, negatives, margin: float = 0.0, pi=None):
    """Sum and count of ``softplus(m + S_an - S_ap)`` over all valid triplets, one ``[N, M]``
    pass per positive slot j < k (softplus does not decompose, so this is O(N k M))."""
    pi = K.positive_index(positives, "the triplet loss") if pi is None else pi
    idx, valid = K.padded_positives(pi)
    s_ap = scores.gather(1, idx) - margin
    total = scores.new_zeros(())
    for j in range(idx.shape[1]):
        keep = negatives & valid[:, j, None]
        total = total + K.masked_softplus_sum(scores - s_ap[:, j, None], keep)
    count = (pi.count * K.count_rows(negatives)).sum()
    return total, count


def _semihard_negative(scores, negatives, idx, valid, has_neg, method: str = "auto"):
    """Column of the FaceNet semi-hard negative for every padded (anchor, positive);
    ``idx=None``: for every (anchor, column), by the sorted method (static shapes)."""
    sd = scores.detach()
    s_ap = sd if idx is None else sd.gather(1, idx)
    if idx is None:
        method = "sorted"
    if method == "auto":
        method = "dense" if _use_dense(idx.shape[1], scores.shape[1]) else "sorted"
    if method == "dense":
        (n, m), k = sd.shape, idx.shape[1]
        step = SLOT_PASS_ENTRIES // max(n * m, 1)  # slots per pass
        if step >= k:  # every slot in one pass, the easiest negative folded in
            return _semihard_one_pass(sd, negatives, s_ap)
        # excluded entries are pushed below every score (:func:`_drop_offset`; arithmetic:
        # masked_fill with a data-dependent mask is ~5x slower on CPU); the negatives as 0/1
        # values and the offset serve the easiest-negative fallback below too
        big, qf = _drop_offset(sd), K.as_float(negatives, sd.dtype)
        arg = torch.empty(idx.shape, dtype=torch.long, device=sd.device)
        has_semi = torch.empty(idx.shape, dtype=torch.bool, device=sd.device)
        if step >= 2:
            # below[a, j, c]: S_ac < S_ap(j) for a negative c, as 0/1 values
            for j in range(0, k, step):
                below = (s_ap[:, j:j + step, None] - sd[:, None, :]).gt_(0.0).mul_(qf[:, None])
                has_semi[:, j:j + step] = below.amax(2) > 0
                arg[:, j:j + step] = _first_argmax(below.sub_(1.0).mul_(big).add_(sd[:, None, :]))
        else:  # one [N, M] pass per slot (SLOT_PASS_ENTRIES), in one reused buffer
            below = torch.empty_like(sd)
            for j in range(k):
                torch.lt(sd, s_ap[:, j, None], out=below)  # 0/1 values: no boolean pass
                below.mul_(qf)
                has_semi[:, j] = below.amax(1) > 0
                arg[:, j] = _first_argmax(below.sub_(1.0).mul_(big).add_(sd))  # sd, or sd - big
        easiest = _easiest_negative(sd, qf, big)
    else:
        keyed = sd.masked_fill(~negatives, K.NEG_INF)
        sorted_keyed, order = keyed.sort(dim=1, descending=True)
        keys = sorted_keyed.neg_()
        # keys ascending (= -S_an descending): first index with -S_an > -S_ap is S_an < S_ap
        pos_in_sorted = torch.searchsorted(keys, (-s_ap).contiguous(), right=True)
        n_neg = K.count_rows(negatives)[:, None]
        has_semi = pos_in_sorted < n_neg
        arg = order.gather(1, pos_in_sorted.clamp_max(order.shape[1] - 1))
        easiest = _easiest_negative(sd, K.as_float(negatives, sd.dtype), _drop_offset(sd))
    return torch.where(has_semi, arg, easiest)


def _easiest_negative(sd: Tensor, qf: Tensor, offset: Tensor) -> Tensor:
    """Per anchor, the column ``[N, 1]`` of the first smallest score among its negatives
    (``qf``: their 0/1 values; ``argmin`` of the masked scores; any column for a row without
    negatives), from one :func:`_first_argmax` of ``-S`` with the other columns pushed
    ``offset`` (:func:`_drop_offset`) below, as :func:`_hardest_columns`."""
    return _first_argmax((qf - 1.0).mul_(offset).sub_(sd))[:, None]


def _first_argmax(x: Tensor) -> Tensor:
    """``x.argmax(-1)``, the first maximum, as ``torch.max(x, -1)``'s indices (documented to be
    the first maximal value's): faster on CPU than ``argmax`` itself and than the three
    vectorised passes this was before (measured, one thread: ``[128, 128]`` 12.7 us against
    53.6 and 22.3; ``[128, 3, 128]`` 32 against 184 and 41; ``[1024, 1024]`` 0.47 ms against
    3.9 and 1.1). Finite values."""
    return x.max(-1).indices


def _drop_offset(sd: Tensor) -> Tensor:
    """``2 (max S - min S) + 1`` (0-d, not read on the host): subtracted from a dropped entry
    of ``sd`` or ``-sd``, it puts that entry below every kept one; clamped to the type's
    largest value so that ``0 * offset`` stays 0."""
    lo, hi = torch.aminmax(sd)
    return (hi - lo).mul_(2.0).add_(1.0).clamp_max_(torch.finfo(sd.dtype).max)


def _hardest_columns(sd: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """Per anchor, the column ``[N, 1]`` of its hardest positive (the first smallest ``S`` in
    ``P``) and of its hardest negative (the first largest in ``Q``), as ``argmin`` / ``argmax``
    of the masked scores, from one :func:`_first_argmax` over ``[-S; S]`` ``[2, N, M]``.
    The masks enter as 0/1 values: a kept entry is its value plus 0 (exact), a dropped one
    its value minus ``2 (max S - min S) + 1``, below every kept entry; a row with nothing kept
    gets an arbitrary column (its term is dropped by the caller). ``sd``: finite scores without
    a gradient. Instead of two ``torch.where`` and torch's CPU ``argmin`` / ``argmax``
    (measured on CPU: B = 128, 73 us against 61; B = 1024, 4.1 ms against 3.7)."""
    keep = K.stack_as_float((positives, negatives), sd.dtype).sub_(1.0)  # 0 kept, -1 dropped
    x = keep.mul_(_drop_offset(sd))
    x[0].sub_(sd)
    x[1].add_(sd)
    cols = _first_argmax(x)
    return cols[0, :, None], cols[1, :, None]


def _semihard_one_pass(sd: Tensor, negatives: Tensor, s_ap: Tensor) -> Tensor:
    """:func:`_semihard_negative` with every slot ``j`` in one ``[N, k, M]`` pass and the
    easiest-negative fallback in the same search: one arg-maximum over candidates ``c`` of

    * ``S_ac`` for a negative below the positive (``S_ac < S_ap``): the semi-hard ones, exact,
      and above every value below;
    * ``L - S_ac`` for a negative at or above it, ``L = 2 min(S) - 1`` (so at most
      ``min(S) - 1``): the largest is the easiest negative (smallest ``S_ac``);
    * ``L - max(S) - 1`` for a column that is no negative, below everything.

    A row with a semi-hard negative takes the hardest of them, one without takes the easiest;
    a row without negatives gets column 0 (its term is dropped). Each candidate is one
    product by a 0/1 value plus a zero, so the semi-hard values are the scores themselves.
    ``sd``: the detached scores (finite), ``s_ap [N, k]``: each slot's positive score."""
    lo, hi = torch.aminmax(sd)
    flip = lo.mul(2.0).sub_(1.0)  # L
    floor = flip - hi - 1.0
    qf = K.as_float(negatives, sd.dtype)
    off = (1.0 - qf).mul_(floor)  # the floor on the columns that are no negative, else 0
    below_val = (sd * qf).add_(off)  # S_ac on negatives
    above_val = (flip - sd).mul_(qf).add_(off)  # L - S_ac on negatives
    below = (s_ap[:, :, None] - sd[:, None, :]).gt_(0.0)  # S_ac < S_ap, as 0/1
    cand = below * below_val[:, None, :]
    cand.add_(below.neg_().add_(1.0).mul_(above_val[:, None, :]))
    return _first_argmax(cand)


_TRIPLET_MINING = ("all", "hard", "semihard")


def _check_triplet_args(mining: str, reduction: str | None) -> str:
    if mining not in _TRIPLET_MINING:
        raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
    if reduction is None:
        return "nonzero" if mining == "all" else "mean"
    if reduction not in K.NONZERO:
        raise ValueError(
            f"reduction must be 'nonzero' (mean over non-zero terms, PML's AvgNonZeroReducer), "
            f"'mean' (over all terms), 'sum', 'none' (the terms) or None (the mining's "
            f"default), got {reduction!r}"
        )
    return reduction


def _hinge(x: Tensor, soft: bool) -> Tensor:
    return F.softplus(x) if soft else F.relu(x)


def _triplet_counted(scores: Tensor, p_count: Tensor, q_count: Tensor, margin: float,
                     soft: bool, reduction: str, check: bool) -> Tensor:
    """All triplets with multiplicities ``w_apn = P_ap Q_an`` (count masks, see
    :func:`triplet`): ``sum w h(S_an - S_ap + m)`` over the weighted number of terms (``"mean"``:
    all, ``"nonzero"``: those > 0). With ``check`` each anchor's positives are padded slots
    (``[N, k, M]`` per block of slots); without, every column is a slot (``[N, M, M]``)."""
    wq = q_count.to(scores.dtype)
    if check:
        idx, valid = K.padded_positives(K.positive_index(p_count > 0, "the triplet loss"))
        wp = p_count.gather(1, idx).to(scores.dtype) * valid
        s_ap = scores.gather(1, idx)
    else:
        wp, s_ap = p_count.to(scores.dtype), scores
    total = scores.new_zeros(())
    count = scores.new_zeros(())
    terms = []
    step = max(1, (1 << 24) // max(scores.numel(), 1))  # [N, step, M] blocks of slots
    for j in range(0, s_ap.shape[1], step):
        h = _hinge(scores[:, None, :] - s_ap[:, j:j + step, None] + margin, soft)
        w = wp[:, j:j + step, None] * wq[:, None, :]
        if reduction == "none":
            terms.append(h * w)
            continue
        total = total + (h * w).sum()
        count = count + (w if reduction == "mean" else w * (h.detach() > 0)).sum()
    if reduction == "none":
        out = torch.cat(terms, 1)  # k >= 1 slots: prepare found a triplet, or no check
        if not check:
            return out
        full = scores.new_zeros(scores.shape[0], scores.shape[1], scores.shape[1])
        return full.scatter_add(1, idx[:, :, None].expand_as(out), out)
    return total if reduction == "sum" else total / count.clamp_min(1)


def triplet(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    margin: float = 0.05,
    mining: str = "all",
    soft: bool = False,
    reduction: str | None = None,
    check: bool = True,
    triplets: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Triplet loss in score form ``max(0, m - S_ap + S_an)`` (with ``S = -d`` this is the usual
    ``max(0, d_ap - d_an + m)``); ``soft=True`` uses ``softplus(m - S_ap + S_an)``
    (pytorch-metric-learning's ``smooth_loss=True``; Hermans et al. 2017's soft margin is
    ``m = 0``).

    Mining:

    * ``"all"``: every valid triplet. Exact, in O(N M) memory: each anchor's k positives are
      compared with its negatives, one [N, M] pass per positive slot (O(k N M) time), or, for
      many positives per anchor, the negatives are sorted once and each positive's hinge sum is
      a prefix sum (O(N M log M)).
    * ``"hard"``: batch-hard (Hermans et al. 2017): per anchor its hardest positive
      ``min_p S_ap`` and hardest negative ``max_n S_an``; one term per anchor that has both.
    * ``"semihard"``: FaceNet (Schroff et al. 2015): per (a, p) the hardest negative that is
      still less similar than the positive, ``max{S_an : S_an < S_ap}``, or the easiest negative
      when none is; one term per positive pair of an anchor that has a negative.
    * ``triplets=(a, p, n)``: the given triplets (a miner's, as index tensors, already checked
      against the masks by :func:`contrastive.pairs.mined_triplets`), duplicates included, as
      PML; ``mining`` is then ignored and no triplet gives 0.
    * integer count masks (how often a miner's pair tuple holds each pair,
      :func:`contrastive.pairs.mined_masks` with ``counts=True``) with ``"all"``: triplet
      ``(a, p, n)`` counts ``P_ap Q_an`` times, as PML's conversion of mined pairs to triplets
      (every positive pair of an anchor with every negative pair of it, repeats included);
      ``"none"`` gives each term times its count. The other minings read them as boolean.

    Reduction: ``"nonzero"`` averages over the terms > 0 (pytorch-metric-learning's
    ``AvgNonZeroReducer``, the default of its ``TripletMarginLoss``; 0 when none), ``"mean"``
    over all terms, ``"sum"`` sums them, ``"none"`` returns them. ``None`` picks ``"nonzero"``
    for ``"all"`` and given triplets (as PML) and ``"mean"`` for ``"hard"``/``"semihard"`` (as
    Hermans et al.); PML's ``BatchHardMiner`` + ``TripletMarginLoss()`` is
    ``mining="hard", reduction="nonzero"``. A soft term is never 0, so for ``"all"`` both means
    count every triplet. One term is one triplet: ``"none"`` gives ``[N]`` for ``"hard"`` (per
    anchor), ``[N, M]`` for ``"semihard"`` (per anchor and positive column), ``[N, M, M]`` for
    ``"all"`` (anchor, positive, negative; O(N M^2) memory) and ``[T]`` for given triplets, 0
    where there is no triplet; ``"mean"`` divides by the number of triplets that exist. With
    ``check``, no anchor with both a positive and a negative raises
    :class:`~contrastive.pairs.NoPairsError`.
    """
    if triplets is None:
        reduction = _check_triplet_args(mining, reduction)
    p_count = _counts_or_none(positives) if mining == "all" and triplets is None else None
    q_count = _counts_or_none(negatives) if mining == "all" and triplets is None else None
    # given triplets need none in the masks (none given: 0); else an anchor with both is needed
    scores, positives, negatives = K.prepare(scores, positives, negatives, check,
                                             "triplet" if triplets is None else None,
                                             "the triplet loss")
    margin = float(margin)
    if p_count is not None or q_count is not None:
        return _triplet_counted(scores, positives if p_count is None else p_count,
                                negatives if q_count is None else q_count, margin, soft,
                                reduction, check)
    if triplets is not None:
        reduction = _check_triplet_args("all", reduction)
        a, p, n = triplets
        terms = _hinge(scores[a, n] - scores[a, p] + margin, soft)
        return K.reduce_terms(terms, reduction, terms.numel())
    if reduction == "none" and mining == "all":
        return _triplet_terms(scores, positives, negatives, margin, soft)
    if not soft and K.fusable(scores, positives, negatives, check, reduction):
        return K.fused(_triplet_kernel, _triplet_slow, scores, positives, negatives, margin,
                       mining, reduction)
    if mining == "all":
        n_triplets = _n_triplets(positives, negatives) if soft or reduction == "mean" else None
    else:
        has_neg = K.count_rows(negatives) > 0
    if mining == "hard":  # per anchor, from the masks: no index of the positives needed
        ok = (K.count_rows(positives) > 0) & has_neg
        p_col, n_col = _hardest_columns(scores.detach(), positives, negatives)
        diff = (scores.gather(1, n_col) - scores.gather(1, p_col)).squeeze(1)
        terms = torch.where(ok, _hinge(diff + margin, soft), 0.0)
        return K.reduce_terms(terms, reduction, ok.sum())
    pi = K.positive_index(positives, "the triplet loss") if check else None
    if mining == "all":
        if soft:
            if check:
                total, _ = _triplet_soft_all(scores, positives, negatives, margin, pi)
            else:
                total = _triplet_soft_masked(scores, positives, negatives, margin)
            return total if reduction == "sum" else total / n_triplets.clamp_min(1)
        total, count = _triplet_all(scores, positives, negatives, margin,
                                    "auto" if check else "masked", pi)
        if reduction == "sum":
            return total
        if reduction == "mean":
            count = n_triplets
        return total / count.clamp_min(1)
    # semihard: per (anchor, positive slot); slots are the padded positives with check, else
    # every column (static shapes)
    if check:
        idx, valid = K.padded_positives(pi)
        s_ap = scores.gather(1, idx)
    else:
        idx, valid, s_ap = None, positives, scores
    n_col = _semihard_negative(scores, negatives, idx, valid, has_neg)
    ok = valid & has_neg[:, None]
    terms = torch.where(ok, _hinge(scores.gather(1, n_col) - s_ap + margin, soft), 0.0)
    if reduction == "none" and idx is not None:  # slots back to columns
        return scores.new_zeros(scores.shape).scatter_add(1, idx, terms)
    return K.reduce_terms(terms, reduction, ok.sum())


# --------------------------------------------------------------------------- contrastive


def contrastive(
    scores: Tensor,
    positives: Tensor,
    negatives: Tensor | None = None,
    pos_threshold: float = 1.0,
    neg_threshold: float = 0.0,
    reduction: str = "nonzero",
    check: bool = True,
) -> Tensor:
    """Contrastive loss (Hadsell et al. 2006) in score form::

        mean_nz_P relu(t_pos - S) + mean_nz_Q relu(S - t_neg)

    where ``mean_nz`` averages over the non-zero terms (integer count masks weigh each pair
    by its count, as PML does with repeated mined pairs; pytorch-metric-learning's
    ``AvgNonZeroReducer``; 0 when none, so a batch without positives or without negatives keeps
    the other part, as in PML). With ``S = -d`` and thresholds ``t_pos = -m_pos``,
    ``t_neg = -m_neg`` this is ``relu(d - m_pos)`` on positives plus ``relu(m_neg - d)`` on
    negatives; :class:`losses.Contrastive` does that conversion for distance critics.

    One term is one pair: ``reduction="none"`` gives ``[N, M]`` (the positive hinge on P, the
    negative hinge on Q, 0 elsewhere; one term per distinct pair with count masks). The loss is
    a sum of two means, so no reduction is the mean of ``"none"``: ``"nonzero"`` (default) is
    the formula above, ``"mean"`` the same with the means over all pairs of each part, ``"sum"``
    the (count-weighted) sum of all terms.
    """
    K.check_reduction(reduction, K.NONZERO)
    p_count = _counts_or_none(positives)
    q_count = _counts_or_none(negatives)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "any",
                                             "the contrastive loss")
    if p_count is None and q_count is None and K.fusable(scores, positives, negatives, check,
                                                         reduction):
        return K.fused(_contrastive_kernel, _contrastive_slow, scores, positives, negatives,
                       pos_threshold, neg_threshold, reduction)
    if reduction == "none":
        pos_h = F.relu(pos_threshold - scores)
        neg_h = F.relu(scores - neg_threshold)
        zero = torch.zeros_like(scores)
        return torch.where(positives, pos_h, zero) + torch.where(negatives, neg_h, zero)
    if check:  # the positive pairs by index
        pi = positives.nonzero(as_tuple=True)
        h = F.relu(pos_threshold - scores[pi])
        c = None if p_count is None else p_count[pi].to(scores.dtype)
        n_pairs = pi[0].numel() if c is None else c.sum()
    else:  # the same hinges as an [N, M] matrix, 0 off the positives
        h = torch.where(positives, F.relu(pos_threshold - scores), torch.zeros_like(scores))
        c = None if p_count is None else p_count.to(scores.dtype)
        n_pairs = K.count(positives) if c is None else c.sum()
    if p_count is None:
        pos_sum, pos_nz = h.sum(), (h > 0).sum()
    else:  # mined pairs with repeats: each occurrence is a term, as in PML
        pos_sum, pos_nz = (c * h).sum(), (c * (h > 0)).sum()
    # negatives: sum of S - t_neg over the active pairs (S > t_neg); the mask is constant
    # almost everywhere, so the gradient of the dot product is the hinge's
    with torch.no_grad():
        active = torch.gt(scores, neg_threshold)
        active &= negatives
        weight = active.to(scores.dtype)
        if q_count is not None:
            weight *= q_count
    n_active = weight.sum()
    total = torch.dot(scores.reshape(-1), weight.reshape(-1)) - neg_threshold * n_active
    if reduction == "sum":
        return pos_sum + total
    if reduction == "mean":
        n_neg = K.count(negatives) if q_count is None else q_count.sum()
        return K.reduce_terms(pos_sum, "mean", n_pairs) + K.reduce_terms(total, "mean", n_neg)
    pos = pos_sum / pos_nz.clamp_min(1)
    neg = total / n_active.clamp_min(1)
    return pos + neg


def _contrastive_slow(scores, positives, negatives, pos_threshold, neg_threshold, reduction):
    return contrastive(scores, positives, negatives, pos_threshold, neg_threshold, reduction,
                       check=False)


def _contrastive_kernel(scores, positives, negatives, pos_threshold, neg_threshold, reduction,
                        need_grad):
    """:func:`contrastive`'s value and ``dL/dS`` in one pass (``kernels.fused``): both hinges are
    linear where active, so ``dL/dS`` is ``-w_P`` on the active positives and ``w_Q`` on the
    active negatives, ``w`` one over each part's count (non-zero terms, pairs, or 1)."""
    dtype = scores.dtype
    pf, qf = K.as_float(positives, dtype), K.as_float(negatives, dtype)
    hp = (pos_threshold - scores).clamp_min_(0.0).mul_(pf)
    hn = (scores - neg_threshold).clamp_min_(0.0).mul_(qf)
    # the active pairs as 0/1 values: the hinges are >= 0, so their sign (one operation
    # instead of a comparison and a cast)
    ap, an = torch.sign(hp), torch.sign(hn)
    if reduction == "sum":
        value = hp.sum() + hn.sum()
        if not need_grad:
            return value, None
        return value, an.sub_(ap)
    if reduction == "mean":
        wp, wn = pf.sum().clamp_min(1).reciprocal(), qf.sum().clamp_min(1).reciprocal()
    else:
        wp, wn = ap.sum().clamp_min(1).reciprocal(), an.sum().clamp_min(1).reciprocal()
    value = hp.sum() * wp + hn.sum() * wn
    if not need_grad:
        return value, None
    return value, an.mul_(wn).addcmul_(ap, wp, value=-1.0)


_contrastive_kernel.native = N.contrastive  # its C kernel (losses.native)
