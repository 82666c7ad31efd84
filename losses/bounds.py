"""More MI estimators as pure functions of one score matrix: lower bounds on a critic's scores
``S [N, M]`` and upper bounds on a conditional log-density matrix ``L_ij = log q(y_j | x_i)``.

Same interface as :mod:`losses.functional`: ``(scores, positives, negatives)`` with boolean masks
``P`` (positive pairs: the diagonal for paired samples, or from labels) and ``Q`` (negatives;
``~P`` when omitted). Each ``*_bound`` returns the estimate in nats, and the loss of a lower
bound is its negation unless its docstring says otherwise. All compute in float32 (float64 stays
float64).

``reduction`` (``"mean"``, default; ``"sum"``; ``"none"``), as in :mod:`losses.functional`:
``"none"`` gives one term per anchor ``t_i`` whose mean over the ``N`` anchors is the
``"mean"`` value, ``"sum"`` their sum. A mean over pairs becomes ``(N / n) sum`` of the anchor's
own pairs (``n`` the number of pairs), and a batch-level term (a log-mean-exp over all negatives)
appears in every anchor's term, as :func:`losses.functional.dv_bound` does. ``"mean"`` runs the
batch-level code, so its numbers are those of the per-anchor terms' mean up to rounding.

``check`` (default ``True``), as in :mod:`losses.functional`: the input is validated by
:func:`losses.kernels.prepare` -- finite scores (``ValueError`` "scores contain NaN or Inf")
and a positive and a negative pair (:class:`~contrastive.pairs.NoPairsError`) -- in one host
read; ``check=False`` skips that read and those checks (the shapes are always checked). The
estimators that index the pairs (``nonzero``) or count them still read those on the host.

Notation: ``mean_P x`` is the mean of ``x_ij`` over the positive pairs, ``mean_Q`` over the
negative pairs, ``logmeanexp_Q x = log mean_Q exp(x)``; ``Q_i`` the negatives of anchor ``i`` and
``n_i = |Q_i|``.

Lower bounds (a critic's scores):

* :func:`tuba_bound` -- TUBA with a (log-)baseline (Poole et al. 2019, eq. 8);
* :func:`mine` -- DV with MINE's moving-average correction of the gradient's bias
  (Belghazi et al. 2018, sec. 3.2); the value is the DV bound;
* :func:`smile_bound` / :func:`smile` -- DV with the partition term's scores clipped to
  ``[-tau, tau]`` (Song & Ermon 2020);
* :func:`interpolated_bound` -- alpha-InfoNCE, the interpolation between InfoNCE (``alpha = 1``)
  and TUBA (``alpha = 0``) of Poole et al. 2019, eq. 12, with its leave-one-out baseline;
* :func:`flo_bound` -- FLO (Guo et al. 2022), which needs a second network output (the "shadow"
  ``u(x, y)``) next to the scores (the loss :class:`losses.estimator_modules.FLO` owns a shadow
  head).

Upper bounds (a conditional log-density matrix, e.g. of
:class:`contrastive.conditional.GaussianConditional`):

* :func:`l1out_bound` -- the leave-one-out upper bound (Poole et al. 2019, eq. 13);
* :func:`club_bound` -- CLUB (Cheng et al. 2020);
* :func:`conditional_nll` -- the loss that fits ``q`` (negative log-likelihood of the positives).

As training losses (:class:`losses.estimator_modules.L1Out`, ``CLUB``) ``q`` is fitted by the NLL
and the encoder maximises the bound in the same step, each with its own gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as LF
from . import kernels as K

__all__ = [
    "tuba_bound",
    "tuba",
    "mine",
    "mine_bound",
    "smile_bound",
    "smile",
    "interpolated_bound",
    "interpolated",
    "flo_bound",
    "flo",
    "l1out_bound",
    "club_bound",
    "conditional_nll",
]

def _fill(x: Tensor) -> float:
    """The "minus infinity" of masked log-sum-exps: the most negative number of ``x``'s dtype,
    below every finite score (a fixed ``-1e30`` outweighed real scores below it), finite so
    that logsumexp's and logcumsumexp's gradients stay finite on an empty slice."""
    return torch.finfo(x.dtype).min


# --------------------------------------------------------------------------- helpers


def _prepare(scores: Tensor, positives: Tensor, negatives: Tensor | None, check: bool,
             what: str):
    """The functional core's input checks (:func:`losses.kernels.prepare`): shapes; with
    ``check`` finite scores and a positive and a negative pair, in one host read. The masks
    are moved to the scores' device first."""
    if isinstance(scores, Tensor):
        positives = positives.to(scores.device)
        negatives = None if negatives is None else negatives.to(scores.device)
    return K.prepare(scores, positives, negatives, check, terms="both", what=what)


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def _logmeanexp(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``log mean exp`` of ``x`` over ``mask`` (all of it, or along ``dim``; the dtype's most
    negative number for an empty slice)."""
    masked = torch.where(mask, x, _fill(x))
    if dim is None:
        return masked.flatten().logsumexp(0) - math.log(int(mask.sum()))
    count = mask.sum(dim).clamp_min(1).to(x.dtype)
    return masked.logsumexp(dim) - count.log()


def _row_baseline(log_baseline: float | Tensor, scores: Tensor) -> Tensor:
    """A per-anchor log-baseline as a column ``[N, 1]`` (a number, ``[N]`` or ``[N, 1]``)."""
    b = torch.as_tensor(log_baseline, dtype=scores.dtype, device=scores.device)
    if b.dim() == 1:
        b = b[:, None]
    if b.dim() > 2 or (b.dim() == 2 and b.shape not in ((1, 1), (scores.shape[0], 1))):
        raise ValueError(f"log_baseline must be a number or a per-anchor tensor [N] or [N, 1] "
                         f"(N = {scores.shape[0]}), got shape {tuple(b.shape)}")
    return b


def _baseline_matrix(log_baseline: float | Tensor, scores: Tensor) -> Tensor:
    """A log-baseline broadcast to ``[N, M]``: a number, per anchor (``[N]``, ``[N, 1]``) or per
    candidate (``[1, M]``)."""
    b = torch.as_tensor(log_baseline, dtype=scores.dtype, device=scores.device)
    if b.dim() == 1:
        b = b[:, None]
    try:
        return torch.broadcast_to(b, scores.shape)
    except RuntimeError:
        raise ValueError(f"log_baseline must be a number, per anchor ([N] or [N, 1]) or per "
                         f"candidate ([1, M]) for scores {tuple(scores.shape)}, got shape "
                         f"{tuple(b.shape)}") from None


def _dv_value(scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
    return _mean(scores, positives) - _logmeanexp(scores, negatives)


def _reduce(terms: Tensor, reduction: str) -> Tensor:
    """``"none"``: the per-anchor terms; ``"sum"``: their sum; ``"mean"``: their mean."""
    if reduction == "none":
        return terms
    return terms.sum() if reduction == "sum" else terms.mean()


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of 'mean', 'sum', 'none', got {reduction!r}")
    return reduction


def _mask_terms(x: Tensor, mask: Tensor) -> Tensor:
    """``t_i = (N / |mask|) sum_{j: mask_ij} x_ij``: per-anchor terms whose mean over the ``N``
    anchors is ``mean_mask x``."""
    return torch.where(mask, x, 0.0).sum(1) * (x.shape[0] / mask.sum().to(x.dtype))


def _exp_mask_terms(x: Tensor, mask: Tensor) -> Tensor:
    """:func:`_mask_terms` of ``exp(x)``, from a per-row log-sum-exp (no overflow in a row whose
    sum is finite)."""
    row = torch.where(mask, x, _fill(x)).logsumexp(1)
    return torch.exp(row + math.log(x.shape[0]) - mask.sum().to(x.dtype).log())


def _pair_terms(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Per-anchor terms of a mean over a list of pairs (``values[k]`` belongs to anchor
    ``rows[k]``): ``t_i = (N / n_pairs) sum_{k: rows_k = i} values_k``."""
    return values.new_zeros(n).index_add(0, rows, values) * (n / values.numel())


# --------------------------------------------------------------------------- TUBA


def tuba_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
               log_baseline: float | Tensor = 0.0, reduction: str = "mean",
               check: bool = True) -> Tensor:
    """TUBA, the tractable unnormalised Barber-Agakov bound (Poole et al. 2019, eq. 8), with
    log-baseline ``b = log a`` (a number; per anchor, ``[N]`` / ``[N, 1]``; or per candidate,
    ``[1, M]``, Poole's ``a(y)``)::

        I_TUBA = 1 + mean_P (S - b) - mean_Q exp(S - b)

    Valid for any baseline that depends on one side of the pair only; tight at
    ``S - b = log p(y|x)/p(y)``; for a given critic the best baseline is
    ``a(y) = E_{p(x)} e^{S(x, y)}`` (per candidate). ``b = 1`` is NWJ
    (:func:`losses.functional.nwj_bound`). A learned baseline is the same bound on the shifted
    critic ``S - b`` (:class:`losses.estimator_modules.TUBA` with ``baseline="learned"``).
    Terms per anchor: ``t_i = 1 + (N/n_P) sum_{P_i} (S - b) - (N/n_Q) sum_{Q_i} exp(S - b)``.
    """
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the TUBA bound")
    shifted = scores - _baseline_matrix(log_baseline, scores)
    if reduction != "mean":
        return _reduce(1.0 + _mask_terms(shifted, positives)
                       - _exp_mask_terms(shifted, negatives), reduction)
    return 1.0 + _mean(shifted, positives) - torch.exp(_logmeanexp(shifted, negatives))


def tuba(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
         log_baseline: float | Tensor = 0.0, reduction: str = "mean",
         check: bool = True) -> Tensor:
    """TUBA loss ``-I_TUBA`` (:func:`tuba_bound`; its terms negated)."""
    return -tuba_bound(scores, positives, negatives, log_baseline, reduction, check)


# --------------------------------------------------------------------------- MINE


def mine(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
         log_average: Tensor | None = None, momentum: float = 0.01,
         reduction: str = "mean", check: bool = True) -> tuple[Tensor, Tensor]:
    """MINE (Belghazi et al. 2018, sec. 3.2): the DV loss with the bias of its mini-batch
    gradient corrected by a moving average of the partition term. Returns
    ``(loss, new_log_average)``.

    With ``Z = mean_Q exp(S)`` and the running average (kept in log space, ``log_average``;
    ``None`` or NaN: not started, it starts at this batch's ``Z``)::

        avg' = (1 - momentum) avg + momentum Z
        loss = -(mean_P S - log Z)                        (the value: -I_DV)
        grad = -mean_P grad S + mean_Q(exp(S) grad S) / avg'

    The plain DV gradient divides by the batch's own ``Z`` instead, a biased estimate of the
    gradient of ``log E_Q exp(S)``. ``momentum = 1`` gives it back. The new average is detached.

    ``reduction="none"``: one term per anchor, valued as DV's,
    ``t_i = -(N/n_P) sum_{P_i} S + log Z`` (the batch's ``log Z`` in every term), whose gradient
    is the anchor's share of the corrected gradient: the partition part of ``t_i`` is
    ``(N/n_Q) sum_{Q_i} exp(S_ik) grad S_ik / avg'``, so the mean of the terms has exactly the
    corrected gradient above (a single term's gradient is not a DV gradient of that anchor
    alone: it divides by the batch-wide average). ``"sum"``: their sum (``N`` times the mean).
    """
    if not 0.0 < float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the MINE loss")
    log_z = _logmeanexp(scores, negatives)
    log_z0 = log_z.detach()
    if log_average is None or float(momentum) == 1.0:
        new = log_z0
    else:
        old = torch.as_tensor(log_average, dtype=scores.dtype, device=scores.device).detach()
        mixed = torch.logaddexp(old + math.log1p(-float(momentum)),
                                log_z0 + math.log(float(momentum)))
        new = torch.where(torch.isnan(old), log_z0, mixed)
    weight = torch.exp(log_z0 - new)  # Z / avg'
    if reduction != "mean":
        # exp(S_ik) / (n_Q avg') = weight * p_ik, p the softmax over all negatives (sums to 1;
        # taken as one softmax, not exp(S - log Z) / n_Q, whose log n_Q is lost to rounding
        # where |S| is large); the term p (S - sg S) is 0 in value and carries that weight in
        # its gradient
        p = torch.where(negatives, scores.detach(), _fill(scores)).flatten().softmax(0)
        p = torch.where(negatives, p.view(scores.shape), 0.0)
        share = (p * (scores - scores.detach())).sum(1) * (weight * scores.shape[0])
        return _reduce(-_mask_terms(scores, positives) + log_z0 + share, reduction), new
    loss = -_mean(scores, positives) + log_z0 + weight * (log_z - log_z0)
    return loss, new


def mine_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
               reduction: str = "mean", check: bool = True) -> Tensor:
    """MINE's estimate: the DV bound ``mean_P S - logmeanexp_Q S`` (the moving average only
    changes the gradient). Terms per anchor: ``t_i = (N/n_P) sum_{P_i} S - logmeanexp_Q S``."""
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the DV bound")
    if reduction != "mean":
        return _reduce(_mask_terms(scores, positives) - _logmeanexp(scores, negatives),
                       reduction)
    return _dv_value(scores, positives, negatives)


# --------------------------------------------------------------------------- SMILE


def smile_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
                tau: float = 5.0, reduction: str = "mean", check: bool = True) -> Tensor:
    """SMILE (Song & Ermon 2020, eq. 17): DV with the scores of the partition term clipped::

        I_SMILE = mean_P S - logmeanexp_Q clip(S, -tau, tau)

    Clipping bounds the variance of the partition term (by ``e^{2 tau}``-ish) at the price of
    a bias; ``tau = inf`` is the DV bound. Not a bound for finite ``tau``. Terms per anchor:
    ``t_i = (N/n_P) sum_{P_i} S - logmeanexp_Q clip(S, -tau, tau)``.
    """
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"tau must be > 0 (math.inf: no clipping), got {tau!r}")
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the SMILE bound")
    if reduction != "mean":
        return _reduce(_mask_terms(scores, positives)
                       - _logmeanexp(scores.clamp(-tau, tau), negatives), reduction)
    return _mean(scores, positives) - _logmeanexp(scores.clamp(-tau, tau), negatives)


def smile(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
          tau: float = 5.0, gradient: str = "js", reduction: str = "mean",
          check: bool = True) -> Tensor:
    """SMILE loss, valued ``-I_SMILE`` (:func:`smile_bound`). ``gradient="js"`` (Song & Ermon's
    training): the critic follows the Jensen-Shannon loss
    ``mean_P softplus(-S) + mean_Q softplus(S)`` (whose optimum is the log density ratio, where
    SMILE is read); ``gradient="dv"``: the gradient of ``-I_SMILE`` itself. With
    ``reduction="none"`` each anchor's term has the value of ``-t_i`` (:func:`smile_bound`) and
    the gradient of its JS term ``(N/n_P) sum_{P_i} softplus(-S) + (N/n_Q) sum_{Q_i}
    softplus(S)`` (:func:`losses.functional.js`'s terms). The JS gradient is
    :func:`losses.functional.js`'s own (its fused path included), so SMILE and JS trained from
    the same start on the same batches train the same critic."""
    value = -smile_bound(scores, positives, negatives, tau, reduction, check)
    if gradient == "dv":
        return value
    if gradient != "js":
        raise ValueError(f"gradient must be 'js' or 'dv', got {gradient!r}")
    js = LF.js(scores, positives, negatives, reduction, check)
    # the value exactly (js - js is 0 in any rounding), the gradient JS's
    return (js - js.detach()) + value.detach()


# --------------------------------------------------------------------------- alpha-InfoNCE


def _log_interpolate(log_m: Tensor, log_baseline: Tensor, alpha: float) -> Tensor:
    """``log(alpha exp(log_m) + (1 - alpha) exp(log_baseline))``, exact at both ends."""
    if alpha == 1.0:
        return log_m
    if alpha == 0.0:
        return torch.broadcast_to(log_baseline, log_m.shape)
    return torch.logaddexp(log_m + math.log(alpha), log_baseline + math.log1p(-alpha))


def _leave_one_out_lse(x: Tensor, keep: Tensor) -> Tensor:
    """``out_ij = logsumexp_{k in keep_i, k != j} x_ik`` (the dtype's most negative number when
    empty), from prefix and suffix log-cumsum-exps: O(N M), no cancellation."""
    masked = torch.where(keep, x, _fill(x))
    fill = masked.new_full((x.shape[0], 1), _fill(x))
    before = torch.cat([fill, masked.logcumsumexp(1)[:, :-1]], 1)
    after = torch.cat([masked.flip(1).logcumsumexp(1).flip(1)[:, 1:], fill], 1)
    return torch.logaddexp(before, after)


def interpolated_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
                       alpha: float = 0.5, log_baseline: float | Tensor = 0.0,
                       reduction: str = "mean", check: bool = True) -> Tensor:
    """alpha-InfoNCE, the interpolated bound of Poole et al. 2019 (eq. 12), normalised per anchor
    over its candidates, with the leave-one-out form of their code so that it is a bound at every
    ``alpha``.

    Each anchor ``i`` has ``n_i`` negatives. The baseline of a set ``C`` of ``n_i`` candidates is
    ``d(C) = alpha mean_{k in C} exp(S_ik) + (1 - alpha) exp(b_i)`` (``b``: the per-anchor
    log-baseline, Poole's ``q``). For a positive ``(i, p)`` the joint term takes the sets
    ``C = {p} u Q_i \\ {j}`` (the positive and ``n_i - 1`` negatives, averaged over the left-out
    ``j in Q_i``); the marginal term takes ``C = Q_i``, whose members are independent of ``x_i``::

        I_alpha = 1 + mean_{(i,p) in P} mean_{j in Q_i} [S_ip - log d({p} u Q_i \\ {j})]
                    - mean_{(i,k) in Q} exp(S_ik) / d(Q_i)

    ``alpha = 0`` is TUBA (:func:`tuba_bound` with per-anchor ``b``; NWJ at ``b = 1``);
    ``alpha = 1`` is InfoNCE on ``n_i`` candidates (the marginal term is exactly 1), averaged
    over the left-out negative: ``<= log n_i``. In between, the baseline trades InfoNCE's
    ``log K`` cap against TUBA's variance. Terms per anchor: ``1``, plus ``(N / n_pairs)`` times
    the sum of the anchor's positive-pair terms, minus ``(N/n_Q) sum_{Q_i} exp(S_ik) / d(Q_i)``.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the alpha-InfoNCE bound")
    b = _row_baseline(log_baseline, scores).expand(scores.shape[0], 1)
    n = negatives.sum(1)
    log_n = n.clamp_min(1).to(scores.dtype).log()
    # marginal term: sets Q_i
    log_d_q = _log_interpolate(_logmeanexp(scores, negatives, 1)[:, None], b, alpha)
    marginal = torch.exp(_logmeanexp(scores - log_d_q, negatives))
    # joint term: per positive pair (i, p) and left-out negative j
    rows, cols = (positives & (n > 0)[:, None]).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("no anchor has both a positive and a negative")
    s_pos = scores[rows, cols][:, None]  # [n_P, 1]
    loo = _leave_one_out_lse(scores, negatives)[rows]  # [n_P, M]
    log_m = torch.logaddexp(s_pos, loo) - log_n[rows][:, None]
    log_d = _log_interpolate(log_m, b[rows], alpha)
    keep = negatives[rows]
    per_pair = torch.where(keep, s_pos - log_d, 0.0).sum(1) / n[rows].to(scores.dtype)
    if reduction != "mean":
        return _reduce(1.0 + _pair_terms(per_pair, rows, scores.shape[0])
                       - _exp_mask_terms(scores - log_d_q, negatives), reduction)
    return 1.0 + per_pair.mean() - marginal


def interpolated(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
                 alpha: float = 0.5, log_baseline: float | Tensor = 0.0,
                 reduction: str = "mean", check: bool = True) -> Tensor:
    """alpha-InfoNCE loss ``-I_alpha`` (:func:`interpolated_bound`; its terms negated)."""
    return -interpolated_bound(scores, positives, negatives, alpha, log_baseline, reduction,
                               check)


# --------------------------------------------------------------------------- FLO


def flo_bound(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
              shadow: Tensor | None = None, reduction: str = "mean",
              check: bool = True) -> Tensor:
    """FLO, the Fenchel-Legendre optimisation bound (Guo et al. 2022, eq. 9) with the shadow
    ``u`` (a second output of the critic, one value per positive pair: a matrix ``[N, M]`` read
    at ``P``, or ``[N]`` per anchor with one positive each)::

        I_FLO = mean_{(i,p) in P} [1 - u_ip - exp(-u_ip) mean_{j in Q_i} exp(S_ij - S_ip)]

    Tight at ``S = log p(y|x)/p(y) + c(x)`` with ``u_ip = log mean_{Q_i} exp(S_ij - S_ip)`` in
    expectation (``u = -S_ip`` at the log density ratio). ``shadow=None`` plugs in the batch's
    own ``u`` (detached): then ``I_FLO = mean_P [S_ip - logmeanexp_{Q_i} S]``, which is no longer
    a bound (the estimate of ``u`` shares the negatives).

    The shadow is a second network output next to the scores, so the estimator registry (pure
    functions of ``(S, P, Q)``) does not carry FLO; the loss
    :class:`losses.estimator_modules.FLO` (registered as ``flo``) owns a shadow head over the
    positive pairs, and the known-MI benchmark wraps each critic with that head
    (``contrastive.app.mi_benchmark.ShadowCritic``). Terms per anchor: ``(N / n_pairs)`` times
    the sum of its pairs' terms.
    """
    _check_reduction(reduction)
    scores, positives, negatives = _prepare(scores, positives, negatives, check,
                                            "the FLO bound")
    lme = _logmeanexp(scores, negatives, 1)  # [N]
    rows, cols = (positives & negatives.any(1)[:, None]).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("no anchor has both a positive and a negative")
    s_pos = scores[rows, cols]
    inner = lme[rows] - s_pos  # log mean_{Q_i} exp(S_ij - S_ip)
    if shadow is None:
        u = inner.detach()
    elif shadow.dim() == 2 and shadow.shape == scores.shape:
        u = shadow[rows, cols].to(scores.dtype)
    elif shadow.dim() == 1 and shadow.shape[0] == scores.shape[0]:
        u = shadow[rows].to(scores.dtype)
    else:
        raise ValueError(f"shadow must be [N, M] (read at the positives) or [N], got shape "
                         f"{tuple(shadow.shape)}")
    terms = 1.0 - u - torch.exp(inner - u)
    if reduction != "mean":
        return _reduce(_pair_terms(terms, rows, scores.shape[0]), reduction)
    return terms.mean()


def flo(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
        shadow: Tensor | None = None, reduction: str = "mean", check: bool = True) -> Tensor:
    """FLO loss ``-I_FLO`` (:func:`flo_bound`; its terms negated); trains the critic and the
    shadow together."""
    return -flo_bound(scores, positives, negatives, shadow, reduction, check)


# --------------------------------------------------------------------------- upper bounds


def l1out_bound(log_density: Tensor, positives: Tensor,
                negatives: Tensor | None = None, reduction: str = "mean",
                check: bool = True) -> Tensor:
    """The leave-one-out upper bound (Poole et al. 2019, eq. 13) on a conditional log-density
    matrix ``L_ij = log q(y_j | x_i)``::

        I_L1Out = mean_{(i,p) in P} [L_ip - logmeanexp_{k: (k,p) in Q} L_kp]

    (for paired samples ``mean_i [log q(y_i|x_i) - log mean_{k != i} q(y_i|x_k)]``): the
    marginal ``p(y_p)`` is estimated by the mixture of the other anchors' conditionals. An upper
    bound when ``q`` is the true conditional; with a fitted ``q`` it is an estimate. Terms per
    anchor: ``(N / n_pairs)`` times the sum of its pairs' terms.
    """
    _check_reduction(reduction)
    log_density, positives, negatives = _prepare(log_density, positives, negatives,
                                                 check, "the L1Out bound")
    col = _logmeanexp(log_density, negatives, 0)  # [M]: log mean over the other anchors
    rows, cols = (positives & negatives.any(0)[None, :]).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError("no positive candidate is a negative of another anchor")
    terms = log_density[rows, cols] - col[cols]
    if reduction != "mean":
        return _reduce(_pair_terms(terms, rows, log_density.shape[0]), reduction)
    return terms.mean()


def club_bound(log_density: Tensor, positives: Tensor,
               negatives: Tensor | None = None, reduction: str = "mean",
               check: bool = True) -> Tensor:
    """CLUB, the contrastive log-ratio upper bound (Cheng et al. 2020, eq. 3)::

        I_CLUB = mean_P L - mean_Q L,   L_ij = log q(y_j | x_i)

    ``E_{p(x,y)} log q(y|x) - E_{p(x)p(y)} log q(y|x)``: an upper bound when ``q`` is the true
    conditional (and, for a fitted ``q``, when it is closer to the joint than to the product of
    marginals in KL, Cheng et al. thm. 3.2). Terms per anchor:
    ``t_i = (N/n_P) sum_{P_i} L - (N/n_Q) sum_{Q_i} L``.
    """
    _check_reduction(reduction)
    log_density, positives, negatives = _prepare(log_density, positives, negatives,
                                                 check, "the CLUB bound")
    if reduction != "mean":
        return _reduce(_mask_terms(log_density, positives)
                       - _mask_terms(log_density, negatives), reduction)
    return _mean(log_density, positives) - _mean(log_density, negatives)


def conditional_nll(log_density: Tensor, positives: Tensor,
                    negatives: Tensor | None = None, reduction: str = "mean",
                    check: bool = True) -> Tensor:
    """``-mean_P L``: the negative log-likelihood that fits the conditional ``q(y|x)`` behind
    :func:`l1out_bound` and :func:`club_bound` (Cheng et al. 2020, alg. 1: ``q`` is fitted by
    maximum likelihood on the positive pairs, the bound is then read or, for the encoder,
    optimised; :class:`losses.estimator_modules.CLUB`). Terms per anchor:
    ``t_i = -(N/n_P) sum_{P_i} L``."""
    _check_reduction(reduction)
    log_density, positives, negatives = _prepare(log_density, positives, negatives,
                                                 check, "the conditional NLL")
    if reduction != "mean":
        return _reduce(-_mask_terms(log_density, positives), reduction)
    return -_mean(log_density, positives)
