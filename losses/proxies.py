"""Proxy-based metric-learning losses on the one interface: ProxyNCA, Proxy-Anchor, normalized
softmax, CosFace and ArcFace.

A proxy loss is a loss on the score matrix ``S [N, C]`` between a batch of embeddings and a
reference set of ``C`` learnable class proxies, with the class mask ``P_ic = (y_i == c)`` and
``Q = ~P``: the same ``(S, P, Q)`` as every loss of :mod:`losses.functional`, whose conventions
(``reduction=``, ``check=``) the functions here follow. The modules own the proxies as one
``nn.Parameter [C, d]`` (``proxies``), used as the reference set of
:class:`losses.modules.PairLoss`'s path; they are called like pytorch-metric-learning's (PML)
classes, ``loss(embeddings, labels, indices_tuple=None)``, with PML's default critics and
hyper-parameters, so that copying PML's proxies into ``proxies`` gives PML's numbers (PML keeps
``W [d, C]`` for the softmax losses: ``proxies = W.T``).

Proxy losses learn best with a larger learning rate on the proxies than on the network (Kim et
al. 2020 use 100x); :meth:`ProxyLoss.proxy_parameters` and :func:`param_groups` give a trainer
the optimiser's parameter groups.

Indices tuples: PML's proxy losses do not restrict pairs with a miner's tuple; they weigh each
embedding by how often it occurs in the tuple over the most frequent (:func:`miner_weights`):
the softmax losses multiply the per-embedding terms, Proxy-Anchor adds ``w - 1`` inside its
exponents. The modules do the same.

Small batches: Proxy-Anchor computes its value and ``dL/dS`` in one pass without autograd below
:data:`losses.kernels.FUSED_MAX_ENTRIES` score entries; the softmax losses, when every row
has its class and every proxy is in the denominator, are one call of torch's fused
cross-entropy against the class.

The softmax modules' fast lane (ProxyNCA, normalized softmax, CosFace, ArcFace): a checked
eager call without a miner's tuple and with a reduced loss runs critic, margin and
cross-entropy as one autograd node from the embeddings and the proxies (:class:`_ProxySoftmax`),
the labels (checked in ``[0, C)``) being the classes: no mask is built or searched, the scale
multiplies the ``[C, d]`` proxies instead of the ``[N, C]`` logits, and the normalisation's
gradient is one in-place pass. The same values up to float rounding; the functions keep the
``(S, P, Q)`` interface, and every other call takes the general path.

References: Movshovitz-Attias et al. 2017 (ProxyNCA); Kim et al. 2020 (Proxy-Anchor); Zhai & Wu
2019 (normalized softmax); Wang et al. 2018 (CosFace); Deng et al. 2019 (ArcFace).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.critics import Cosine, NegativeL2, row_dot, row_norms
from contrastive.pairs import Pairs, check_call, require_positives
from contrastive.validation import check_embeddings, check_temperature

from . import kernels as K
from . import native as N
from .lane import CosineLane
from .modules import PairLoss
from .pair_based import miner_weights, nca

__all__ = [
    "proxy_nca",
    "proxy_anchor",
    "normalized_softmax",
    "cosface",
    "arcface",
    "ProxyLoss",
    "ProxyNCA",
    "ProxyAnchor",
    "NormalizedSoftmax",
    "CosFace",
    "ArcFace",
    "param_groups",
    "miner_weights",
]


def proxy_nca(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
              scale: float = 1.0, reduction: str = "mean", check: bool = True,
              weights: Tensor | None = None) -> Tensor:
    """ProxyNCA (Movshovitz-Attias et al. 2017; PML's ``ProxyNCALoss``): NCA against the
    proxies (:func:`losses.pair_based.nca`)::

        l_i = logsumexp_c (s S_ic) - logsumexp_{c in P_i} (s S_ic)

    with ``S = -||x_i - p_c||^2`` on normalised rows (PML's default critic): with one proxy
    per class, the cross-entropy of ``s S`` against the class. One term per embedding;
    ``"mean"`` over the embeddings with a class. Several positive proxies per row: NCA's
    form (:func:`losses.pair_based.nca`)."""
    positives = positives if positives.dtype == torch.bool else positives.bool()
    if check and positives.numel() and int(K.count_rows(positives).max()) > 1:
        return nca(scores, positives, negatives, scale, reduction, check, weights)
    return _target_softmax(scores, positives, negatives, None, scale, reduction, check, weights,
                           "ProxyNCA")


def proxy_anchor(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
                 alpha: float = 32.0, margin: float = 0.1, reduction: str = "mean",
                 check: bool = True, weights: Tensor | None = None) -> Tensor:
    """Proxy-Anchor loss (Kim et al. 2020, eq. 4; PML's ``ProxyAnchorLoss``), per proxy ``c``
    (a column of ``S``)::

        pos_c = log(1 + sum_{i in P_.c} exp(-alpha (S_ic - margin)))
        neg_c = log(1 + sum_{i in Q_.c} exp( alpha (S_ic + margin)))
        loss  = sum_c pos_c / |{c : P_.c nonempty}| + sum_c neg_c / C

    for cosine scores. ``weights [N]`` (a miner's, see :func:`miner_weights`) enter the
    exponents as ``+ (w_i - 1)``, as PML. One term per proxy, ``pos_c + neg_c`` (``[C]``);
    ``"mean"`` is the loss above (two divisors), ``"sum"`` the sum of the terms. With
    ``check``, no positive raises.
    """
    K.check_reduction(reduction)
    fused = K.fusable(scores, positives, negatives, check, reduction)
    scores, positives, negatives = K.prepare(scores, positives, negatives, check, "positives",
                                             "Proxy-Anchor")
    if fused and weights is None:
        return K.fused(_proxy_anchor_kernel, _proxy_anchor_slow, scores, positives, negatives,
                      alpha, margin, reduction)
    pos_x = (margin - scores) * alpha
    neg_x = (scores + margin) * alpha
    if weights is not None:
        shift = (weights.to(scores.dtype) - 1.0)[:, None]
        pos_x, neg_x = pos_x + shift, neg_x + shift
    # log(1 + sum exp) = softplus(logsumexp); an empty column gives softplus(-inf) = 0
    pos = torch.nn.functional.softplus(K.masked_lse(pos_x, positives, 0))
    neg = torch.nn.functional.softplus(K.masked_lse(neg_x, negatives, 0))
    if reduction == "none":
        return pos + neg
    if reduction == "sum":
        return pos.sum() + neg.sum()
    with_pos = K.count_rows(positives.T) > 0
    return K.reduce_terms(pos, "mean", with_pos.sum()) + neg.sum() / scores.shape[1]


def _proxy_anchor_slow(scores, positives, negatives, alpha, margin, reduction):
    return proxy_anchor(scores, positives, negatives, alpha, margin, reduction, check=False)


def _proxy_anchor_kernel(scores, positives, negatives, alpha, margin, reduction, need_grad):
    """:func:`proxy_anchor`'s value and ``dL/dS`` in one pass (``kernels.fused``): both column
    log-sum-exps stacked (:func:`losses.kernels.stacked_lse`), ``x = alpha (margin - S,
    S + margin)`` computed as ``(-alpha, alpha) S + alpha margin``; the gradient of
    ``softplus(lse_c)`` is ``e_ic / (exp(-m_c) + z_c)`` (``e_ic / z_c`` where ``lse_c > 20``,
    as torch's softplus), times ``-alpha`` / ``alpha`` over the divisors (``"mean"``: the
    proxies with a positive, at least 1, and all ``C``)."""
    dtype, device = scores.dtype, scores.device
    x = (scores * K.const((-alpha, alpha), dtype, device, (2, 1, 1))).add_(alpha * margin)
    lse, e, m, z = K.stacked_lse(x, K.stack_as_float((positives, negatives), dtype), dim=-2,
                               overwrite=True)
    total = F.softplus(lse).sum(-1, keepdim=True)
    scale = K.const((-alpha, alpha), dtype, device, (2, 1, 1))
    if reduction == "sum":
        value = total.sum()
    else:  # the divisors: the proxies with a positive (at least 1), all C proxies
        div = torch.maximum((z >= 1.0).sum(-1, keepdim=True),
                            K.const((1.0, float(scores.shape[1])), dtype, device, (2, 1, 1)))
        value = total.div_(div).sum()
        scale = scale / div
    if not need_grad:
        return value, None
    # softplus' = sigmoid(lse), and 1 above torch's threshold of 20 (F.softplus's backward)
    e.mul_(torch.div(scale, torch.where(lse > 20.0, z, m.neg_().exp_().add_(z))))
    return value, torch.add(e[0], e[1])


_proxy_anchor_kernel.native = N.proxy_anchor  # its C kernel (losses.native)


def _target_softmax(scores: Tensor, positives: Tensor, negatives: Tensor, target_fn, scale: float,
                    reduction: str, check: bool, weights: Tensor | None, what: str) -> Tensor:
    """Cross-entropy of each row against its class, the target score replaced by
    ``target_fn(S_iy)``, all logits times ``scale``::

        l_i = logsumexp_{c in P_i u Q_i} (scale z_ic) - scale z_iy,   z_iy = target_fn(S_iy)

    One positive (target) per row, taken as ``P``'s first column (static shapes); rows without
    one give 0 and are not counted by ``"mean"``. ``negatives=None`` (``Q = ~P``, as the proxy
    modules pass) uses torch's fused cross-entropy."""
    K.check_reduction(reduction)
    every_pair = negatives is None  # Q = ~P: every column is in the denominator
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    count = K.count_rows(positives)
    if check and count.numel():
        least, most = torch.stack(count.aminmax()).tolist()  # one sync
        if most == 0:
            require_positives(positives, what)
        if most > 1:
            raise ValueError(f"{what} takes one class (one positive proxy) per embedding")
        if least == 1 and every_pair and weights is None and reduction != "none":
            # every row has its class and every column counts: no row mask to apply
            return _class_cross_entropy(scores, positives, target_fn, scale, reduction)
    has = count > 0
    keep = None if every_pair else positives | negatives
    target = positives.view(torch.uint8).argmax(1, keepdim=True)
    z = scores
    if target_fn is not None:
        z = scores.scatter(1, target, target_fn(scores.gather(1, target)))
    logits = z * scale if scale != 1.0 else z
    if keep is None:  # every column counts: torch's fused cross-entropy
        terms = torch.where(has, F.cross_entropy(logits, target.squeeze(1), reduction="none"),
                            0.0)
    else:
        lse = K.masked_lse(logits, keep, 1)
        terms = torch.where(has, lse - logits.gather(1, target).squeeze(1), 0.0)
    if weights is not None:
        terms = terms * weights.to(terms.dtype)
    return K.reduce_terms(terms, reduction, has.sum())


def _class_cross_entropy(scores: Tensor, positives: Tensor, target_fn, scale: float,
                         reduction: str) -> Tensor:
    """:func:`_target_softmax` when every row has exactly one positive and every column is in
    the denominator: torch's fused cross-entropy against the class, the same terms and the
    same sum, without the row masks. Below :data:`~losses.kernels.FUSED_MAX_ENTRIES` score
    entries (and a ``target_fn`` that gives its ``derivative``), in one pass without autograd
    (:func:`_class_cross_entropy_kernel`)."""
    target = positives.view(torch.uint8).argmax(1, keepdim=True)
    if (0 < scores.numel() <= K.FUSED_MAX_ENTRIES
            and (target_fn is None or hasattr(target_fn, "derivative"))):
        return K.fused(_class_cross_entropy_kernel, _class_cross_entropy_slow, scores, target,
                      target_fn, scale, reduction)
    return _class_cross_entropy_slow(scores, target, target_fn, scale, reduction)


def _class_cross_entropy_slow(scores: Tensor, target: Tensor, target_fn, scale: float,
                              reduction: str) -> Tensor:
    z = scores
    if target_fn is not None:
        z = scores.scatter(1, target, target_fn(scores.gather(1, target)))
    logits = z * scale if scale != 1.0 else z
    total = F.cross_entropy(logits, target.squeeze(1), reduction="none").sum()
    return total if reduction == "sum" else total / scores.shape[0]


def _class_cross_entropy_kernel(scores: Tensor, target: Tensor, target_fn, scale: float,
                                reduction: str, need_grad: bool):
    """:func:`_class_cross_entropy_slow`'s value (the same operations) and ``dL/dS``: the
    softmax minus the one-hot class, times ``w * scale`` (``w = 1/N`` for ``"mean"``), the
    class's column times ``target_fn.derivative`` (the margin's chain rule)."""
    st = scores.gather(1, target) if target_fn is not None else None
    z = scores if target_fn is None else scores.scatter(1, target, target_fn(st))
    logits = z * scale if scale != 1.0 else z
    logp = torch.log_softmax(logits, 1)
    total = logp.gather(1, target).neg_().sum()  # cross_entropy's "none" terms, summed
    n = scores.shape[0]
    value = total if reduction == "sum" else total / n
    if not need_grad:
        return value, None
    w = scale if reduction == "sum" else scale / n
    grad = logp.exp_()
    grad.scatter_(1, target, grad.gather(1, target) - 1.0).mul_(w)
    if target_fn is not None:
        grad.scatter_(1, target, grad.gather(1, target) * target_fn.derivative(st))
    return value, grad


def normalized_softmax(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
                       reduction: str = "mean", check: bool = True,
                       weights: Tensor | None = None) -> Tensor:
    """Normalized softmax (Zhai & Wu 2019; PML's ``NormalizedSoftmaxLoss``): the cross-entropy
    of ``S = cos(x_i, p_c) / T`` against the class, ``l_i = logsumexp_c S_ic - S_iy``. One term
    per embedding; ``"mean"`` over the embeddings with a class."""
    return _target_softmax(scores, positives, negatives, None, 1.0, reduction, check, weights,
                           "the normalized softmax loss")


def cosface(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
            margin: float = 0.35, scale: float = 64.0, reduction: str = "mean",
            check: bool = True, weights: Tensor | None = None) -> Tensor:
    """CosFace / large-margin cosine loss (Wang et al. 2018, eq. 4; PML's ``CosFaceLoss``) on
    cosine scores: the cross-entropy of ``scale * S`` with the target's cosine lowered by the
    margin, ``z_iy = S_iy - margin``."""
    return _target_softmax(scores, positives, negatives, _cosface_target(margin), scale,
                           reduction, check, weights, "the CosFace loss")


def _cosface_target(margin: float):
    """CosFace's target cosine ``c - margin``, with its ``derivative`` (1)."""

    def target(c: Tensor) -> Tensor:
        return c - margin

    target.derivative = torch.ones_like
    return target


def arcface(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
            margin: float = math.radians(28.6), scale: float = 64.0, reduction: str = "mean",
            check: bool = True, weights: Tensor | None = None) -> Tensor:
    """ArcFace / additive angular margin (Deng et al. 2019, eq. 3; PML's ``ArcFaceLoss``) on
    cosine scores, ``margin`` in radians (PML's class takes degrees): the target's angle grows
    by the margin, ``z_iy = cos(theta_iy + m)`` with ``theta = acos(S)``, and where
    ``theta > pi - m`` (where that would no longer decrease) ``z_iy = S_iy - m sin m``; the
    cross-entropy of ``scale * z``."""
    return _target_softmax(scores, positives, negatives, _arcface_target(margin), scale,
                           reduction, check, weights, "the ArcFace loss")


def _arcface_target(margin: float):
    """ArcFace's target cosine ``cos(acos(c) + margin)`` (``c - margin sin margin`` past
    ``pi - margin``), with its ``derivative``."""

    def target(c: Tensor) -> Tensor:
        theta = torch.acos(c.clamp(-1.0, 1.0))
        return torch.where(theta <= math.pi - margin, torch.cos(theta + margin),
                           torch.cos(theta) - margin * math.sin(margin))

    def derivative(c: Tensor) -> Tensor:
        """``d target / dc`` as autograd takes it through ``target``: ``-sin(theta + m)`` (or
        ``-sin(theta)``) times ``acos' = -1 / sqrt(1 - c^2)``, 0 where the clamp holds ``c``
        (torch's clamp passes no gradient at its bounds either)."""
        cc = c.clamp(-1.0, 1.0)
        theta = torch.acos(cc)
        dcos = torch.where(theta <= math.pi - margin, -torch.sin(theta + margin),
                           -torch.sin(theta))
        dacos = -(1.0 - cc * cc).rsqrt()
        return torch.where((c > -1.0) & (c < 1.0), dcos * dacos, 0.0)

    def both(c: Tensor) -> tuple[Tensor, Tensor]:
        """``(target(c), derivative(c))`` with the shared ``acos`` once, bit for bit those of
        the two functions (``(-a)(-b) = a b`` exactly; ``|c| < 1`` is ``-1 < c < 1``): six
        fewer operations where a loss needs both (the fused lane and kernel)."""
        cc = c.clamp(-1.0, 1.0)
        theta = torch.acos(cc)
        near = theta <= math.pi - margin
        shifted = theta + margin
        value = torch.where(near, torch.cos(shifted), torch.cos(theta) - margin * math.sin(margin))
        slope = torch.where(near, torch.sin(shifted), torch.sin(theta))
        slope = slope.mul_((1.0 - cc * cc).rsqrt_())
        return value, torch.where(c.abs() < 1.0, slope, 0.0)

    target.derivative = derivative
    target.both = both
    return target


# --------------------------------------------------------------------------- module fast lane


class _Lane(NamedTuple):
    """How a softmax proxy module's logits come from the unit rows ``x_i``, ``p_c``: the
    critic's scores ``c = fold * x_i . p_c`` (``fold`` multiplies the ``[C, d]`` unit proxies,
    not the ``[N, C]`` scores: the same numbers up to float rounding), the target's score
    ``c_iy - shift`` (CosFace, whose ``scale`` is then folded too) or ``target_fn(c_iy)``
    (ArcFace), and the logits ``scale * z``."""

    fold: float | Tensor
    shift: float = 0.0
    target_fn: object = None
    scale: float = 1.0


def _unit_rows_backward(h: Tensor, x: Tensor, n: Tensor, small: Tensor) -> Tensor:
    """``dL/dx`` of ``xn = x / n`` (:func:`contrastive.critics.row_norms`) from
    ``h = (dL/dxn) / n``, in place on ``h``::

        dL/dx = (dL/dxn - xn (dL/dxn . xn)) / n = h - x (h . x) / n^2

    without the projection on the rows whose norm is below ``eps`` (the clamp passes no
    gradient there). No ``[N, d]`` buffer besides ``h``, where autograd's chain through
    ``F.normalize`` allocates five."""
    dot = row_dot(h, x).div_(n).div_(n)
    return h.addcmul_(x, dot.masked_fill_(small, 0.0), value=-1.0)


class _ProxySoftmax(torch.autograd.Function):
    """The softmax proxy modules' loss from the embeddings and the proxies in one node::

        l_i = logsumexp_c z_ic - z_iy,   z = lane(cos(x_i, p_c))   (:class:`_Lane`)

    the same terms as the module's general path (critic, masks, :func:`_target_softmax`), in
    fewer passes over ``[N, C]`` and ``[N, d]``: the normalisation's gradient is one in-place
    pass (:func:`_unit_rows_backward`), the scale sits on the ``[C, d]`` proxies where the
    logits are linear in the cosine, the class comes as an index (the labels) instead of a
    mask to search, and the forward pass leaves ``dL/dz = softmax - onehot`` in the logits'
    buffer (the exponent floored at :data:`losses.kernels.EXP_FLOOR`, no denormals), so
    backward is two matrix products. Double backward recomputes through ``slow(x, proxies)``,
    the general path."""

    @staticmethod
    def forward(ctx, x: Tensor, proxies: Tensor, target: Tensor, lane: _Lane, reduction: str,
                slow):
        nx, small_x = row_norms(x)
        npx, small_p = row_norms(proxies)
        y = target[:, None]
        w = (proxies / npx).mul_(lane.fold)
        z = (x @ w.T).div_(nx)  # (x / n) @ w.T without the [N, d] quotient
        cy = z.gather(1, y)
        zy, dy = cy, None
        if lane.target_fn is not None:  # ArcFace's margin on the cosine, and its derivative
            zy, dy = lane.target_fn.both(cy)
        elif lane.shift:  # CosFace: scale (c - m) = (scale c) - scale m
            zy = cy - lane.shift
        if lane.scale != 1.0:
            z.mul_(lane.scale)
            zy = zy * lane.scale
        if zy is not cy:
            z.scatter_(1, y, zy)
        m = z.amax(1, keepdim=True)
        e = z.sub_(m).clamp_min_(K.EXP_FLOOR.get(z.dtype, -87.0)).exp_()
        total = e.sum(1, keepdim=True)
        value = (total.log() + m - zy).sum()
        if reduction == "mean":
            value = value / x.shape[0]
        ctx.lane, ctx.reduction, ctx.slow = lane, reduction, slow
        if not any(ctx.needs_input_grad[:2]):
            return value
        grad = e.div_(total)  # softmax, minus the one-hot class
        column = grad.gather(1, y) - 1.0
        if dy is not None:  # the margin's chain rule on the class's column
            column = column * dy
        grad.scatter_(1, y, column)
        grad.div_(nx)  # dL/dz / n: the backward's products then take x, not x / n
        ctx.save_for_backward(x, proxies, target, nx, small_x, npx, small_p, w, grad)
        return value

    @staticmethod
    def backward(ctx, g: Tensor):
        x, proxies, target, nx, small_x, npx, small_p, w, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            wrt = [t for t, need in zip((x, proxies), ctx.needs_input_grad[:2], strict=True)
                   if need]
            grads = iter(torch.autograd.grad(ctx.slow(x, proxies, target), wrt, g,
                                             create_graph=True))
            return (*(next(grads) if need else None for need in ctx.needs_input_grad[:2]),
                    None, None, None, None)
        lane = ctx.lane
        coef = g if ctx.reduction == "sum" else g / x.shape[0]
        if lane.scale != 1.0:  # dL/dc = scale dL/dz
            coef = coef * lane.scale
        gx = gp = None
        if ctx.needs_input_grad[0]:  # grad holds dL/dz / n_x
            gx = _unit_rows_backward(grad @ (w * coef), x, nx, small_x)
        if ctx.needs_input_grad[1]:  # w = fold * p / n_p
            h = (grad.T @ x).mul_(coef * lane.fold).div_(npx)
            gp = _unit_rows_backward(h, proxies, npx, small_p)
        return gx, gp, None, None, None, None


# --------------------------------------------------------------------------- modules


class ProxyLoss(PairLoss):
    """Base class of the proxy losses: the batch against ``C`` learnable proxies
    (``self.proxies [C, d]``, the reference set), ``P_ic = (y_i == c)``. Labels must be class
    indices in ``[0, C)``. ``ref_emb`` is not taken (the proxies are the reference set);
    a miner's ``indices_tuple`` weighs the embeddings (:func:`miner_weights`), as PML.

    ``proxy_init``: ``"normal"`` (PML's default), ``"kaiming"`` (``kaiming_normal_`` with
    ``mode="fan_out"``, PML's for Proxy-Anchor) or ``"normal_w"``: normal, drawn in the
    ``W [d, C]`` layout of PML's normalized-softmax, CosFace and ArcFace losses and transposed,
    so that the same seed gives the same proxies as theirs (:mod:`losses.drop_in`)."""

    core_checks_terms = True

    mines_in_pairs = True
    #: whether a miner's weights count only the anchors (PML's ProxyNCA: query is not reference)
    weights_anchors_only = False

    def __init__(self, num_classes: int, embedding_size: int, critic: nn.Module | None = None,
                 strict: bool = False, reduction: str = "mean", check: bool = True,
                 proxy_init: str = "normal"):
        super().__init__(critic, strict, K.check_reduction(reduction), check)
        if int(num_classes) < 1 or int(embedding_size) < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got {num_classes} "
                             f"and {embedding_size}")
        self.num_classes, self.embedding_size = int(num_classes), int(embedding_size)
        self.proxies = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        if proxy_init == "normal":
            nn.init.normal_(self.proxies)
        elif proxy_init == "kaiming":
            nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        elif proxy_init == "normal_w":
            with torch.no_grad():
                self.proxies.copy_(nn.init.normal_(torch.empty(self.embedding_size,
                                                               self.num_classes)).T)
        else:
            raise ValueError(f"proxy_init must be 'normal', 'kaiming' or 'normal_w', got "
                             f"{proxy_init!r}")
        self._weights: Tensor | None = None

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The proxies, for their own learning rate (:func:`param_groups`)."""
        return [self.proxies]

    def _call(self, embeddings, labels, ref_emb=None, ref_labels=None, paired=False):
        """The call's shapes and types checked (:func:`~contrastive.pairs.check_call`, no value
        read but float labels' integrality): ``(embeddings, labels as int64, proxies in the
        embeddings' float type)``; the labels' range is not checked yet."""
        if ref_emb is not None or ref_labels is not None or paired:
            raise ValueError(f"{type(self).__name__} scores the batch against its own proxies; "
                             "it takes no ref_emb, ref_labels or paired views")
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs class labels in [0, num_classes)")
        # float labels (integral?) keep check_call's own reads
        float_labels = torch.as_tensor(labels).is_floating_point() if self.check else False
        c = check_call(embeddings, labels, check=float_labels)
        width = self.proxies.shape[1]
        if c.embeddings.shape[1] != width:
            raise ValueError(
                f"embeddings have dimension {c.embeddings.shape[1]} but "
                f"{type(self).__name__}(embedding_size={width}) holds proxies of dimension "
                f"{width}; build the loss with embedding_size={c.embeddings.shape[1]} (the "
                "encoder's output size)"
            )
        dtype = c.embeddings.dtype
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        proxies = self.proxies.to(device=c.embeddings.device, dtype=dtype)  # PML casts too
        return c.embeddings, c.labels.long(), proxies

    def _checked(self, embeddings, labels, ref_emb=None, ref_labels=None, paired=False):
        """:meth:`_call` with, under ``check``, one host read of the embeddings' sum (finite)
        with the labels' range (``[0, C)``)."""
        x, y, proxies = self._call(embeddings, labels, ref_emb, ref_labels, paired)
        if self.check:
            total = x.detach().sum().to(torch.float64)
            total, lowest, highest = torch.stack((total, *y.aminmax())).tolist()
            if not math.isfinite(total):  # NaN / Inf, or a sum of finite values that overflows
                check_embeddings(x, "embeddings")  # raises in the first case
            self._check_range(lowest, highest)
        return x, y, proxies

    def _check_range(self, lowest: float, highest: float) -> None:
        if lowest < 0 or highest >= self.num_classes:
            raise ValueError(f"labels must be class indices in [0, {self.num_classes}) for "
                             f"{type(self).__name__}(num_classes={self.num_classes})")

    def _lane_value(self, embeddings, labels, lane: _Lane) -> Tensor | None:
        """The fast lane's loss, one host read: the value is computed with the labels clamped
        into ``[0, C)`` (safe to index with), then read with the labels' range, which raises
        when outside. None (the general path) for an empty batch or a value that is not
        finite; it is finite iff the scores are (the folded cosine critic turns any NaN or Inf
        of the embeddings into a NaN score), so the embeddings need no read of their own."""
        x, y, proxies = self._call(embeddings, labels)
        if not y.numel():
            return None
        self._weights = None
        with K.no_autocast(x.device.type):
            value = _ProxySoftmax.apply(K.full_precision(x), proxies,
                                        y.clamp(0, self.num_classes - 1), lane, self.reduction,
                                        self._general)
        return self._read_with_range(value, y)

    def _read_with_range(self, value: Tensor, y: Tensor) -> Tensor | None:
        """The fast lanes' one host read: ``value`` with the labels' range, which raises when
        outside ``[0, C)``; ``value``, or None when it is not finite."""
        v, lowest, highest = torch.stack(
            (value.detach().to(torch.float64), *y.aminmax())).tolist()
        self._check_range(lowest, highest)
        return value if math.isfinite(v) else None

    def _one_hot(self, y: Tensor) -> Tensor:
        """``P_ic = (y_i == c)`` of labels checked in ``[0, C)``: a one-hot scatter (cheaper
        than a compare)."""
        pos = torch.zeros(y.numel(), self.num_classes, dtype=torch.bool, device=y.device)
        return pos.scatter_(1, y[:, None], True)

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None) -> Pairs:
        x, y, proxies = self._checked(embeddings, labels, ref_emb, ref_labels, paired)
        if self.check:
            pos = self._one_hot(y)
        else:  # unchecked labels: a compare (an index outside [0, C) just matches nothing)
            classes = torch.arange(self.num_classes, device=y.device)
            pos = y[:, None] == classes[None, :]
        self._weights = None
        if indices_tuple is not None:
            self._weights = miner_weights(indices_tuple, y.numel(), self.weights_anchors_only,
                                          y.device)
        return Pairs(x, proxies, pos, ~pos, False)

    def _lane(self) -> _Lane | None:
        """The fast lane's logits (:class:`_Lane`) for this module and critic; None (the
        general path) by default."""
        return None

    def _cosine_fold(self) -> float | None:
        """The scale ``1/t`` of a fixed-temperature :class:`~contrastive.critics.Cosine`
        critic (the only critic the fast lane folds), as the float the critic keeps with its
        cached scale (no operation per call), else None."""
        critic = self.critic
        if type(critic) is Cosine and not critic.log_inv_t.requires_grad:
            return critic.scale_and_value(torch.float64)[1]
        return None

    def forward(self, embeddings: Tensor, labels: Tensor | None = None,
                indices_tuple: tuple[Tensor, ...] | None = None, ref_emb: Tensor | None = None,
                ref_labels: Tensor | None = None, *, paired: bool = False) -> Tensor:
        """:meth:`losses.modules.PairLoss.forward`. The softmax losses' plain call (eager,
        ``check=True``, no miner's tuple, a reduced loss, the module's own critic) takes a
        fast lane with the same value: the labels, checked in ``[0, C)``, are the classes, so
        no mask is built or searched, and the critic, the margin and the cross-entropy are
        one autograd node (:class:`_ProxySoftmax`). Scores that are not finite go the general
        way, which raises. A subclass gives its own lane through :meth:`_fast_value`."""
        if (indices_tuple is None and ref_emb is None and ref_labels is None and not paired
                and self.check and self.reduction != "none"
                and not torch.compiler.is_compiling()):
            value = self._fast_value(embeddings, labels)
            if value is not None:
                return value
            # no lane, an empty batch, or scores that are not finite: the general way, whose
            # checks read the embeddings and raise what is wrong
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels,
                               paired=paired)

    def _fast_value(self, embeddings: Tensor, labels: Tensor | None) -> Tensor | None:
        """A plain call's loss from a fast lane, read once with the labels' range, or None
        for the general path: here the softmax losses' (:meth:`_lane`)."""
        lane = self._lane()
        return None if lane is None else self._lane_value(embeddings, labels, lane)

    def _general(self, x: Tensor, proxies: Tensor, y: Tensor) -> Tensor:
        """The general path's loss of checked inputs (the fast lane's double backward)."""
        pos = self._one_hot(y)
        return self.compute(self.critic(x, proxies), pos, ~pos, check=False)

    def has_terms(self, positives, negatives):
        return positives.shape[0] > 0  # labels in [0, C) were checked: one positive per row

    def require_terms(self, positives, negatives):
        require_positives(positives, self.what)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"reduction={self.reduction!r}")


class ProxyNCA(ProxyLoss):
    """ProxyNCA (:func:`proxy_nca`), PML's ``ProxyNCALoss(num_classes, embedding_size,
    softmax_scale=1)`` with its critic ``NegativeL2(squared=True, normalize=True)``."""

    what = "ProxyNCA"
    weights_anchors_only = True

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1.0,
                 critic: nn.Module | None = None, strict: bool = False,
                 reduction: str = "mean", check: bool = True, proxy_init: str = "normal"):
        super().__init__(num_classes, embedding_size, critic, strict, reduction, check,
                         proxy_init)
        self.softmax_scale = float(softmax_scale)

    def default_critic(self) -> nn.Module:
        return NegativeL2(squared=True, normalize=True)

    def _lane(self) -> _Lane | None:
        # -||x - p||^2 = 2 x.p - 2 on unit rows; the softmax drops the constant
        critic = self.critic
        if type(critic) is NegativeL2 and critic.squared and critic.normalize:
            return _Lane(2.0 * self.softmax_scale)
        return None

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return proxy_nca(scores, positives, None, self.softmax_scale, self.reduction, check,
                         self._weights)


class ProxyAnchor(ProxyLoss):
    """Proxy-Anchor (:func:`proxy_anchor`), PML's ``ProxyAnchorLoss(num_classes,
    embedding_size, margin=0.1, alpha=32)`` with its critic ``Cosine(1.0)`` and its proxy
    initialisation (``kaiming_normal_``, fan-out)."""

    what = "Proxy-Anchor"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1,
                 alpha: float = 32.0, critic: nn.Module | None = None, strict: bool = False,
                 reduction: str = "mean", check: bool = True, proxy_init: str = "kaiming"):
        super().__init__(num_classes, embedding_size, critic, strict, reduction, check,
                         proxy_init)
        self.margin, self.alpha = float(margin), float(alpha)

    def default_critic(self) -> nn.Module:
        return Cosine(1.0)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return proxy_anchor(scores, positives, negatives, self.alpha, self.margin,
                            self.reduction, check, self._weights)

    def _fast_value(self, embeddings, labels) -> Tensor | None:
        """A plain call with a fixed-temperature cosine critic reads the host once, where the
        general path reads twice (the embeddings' sum with the labels' range, then the
        scores): the loss computed with the labels clamped into ``[0, C)`` (safe to index
        with) and without the core's read, then one host read of the value with the labels'
        range, which raises when outside. Every row then has its positive proxy, so there is
        always a term. None (the general path, whose checks name what is wrong) for another
        critic, an empty batch or a value that is not finite, which it is exactly when a
        score is: the cosine critic turns any NaN or Inf of the embeddings or the proxies into
        a NaN score, and a NaN score reaches the value through its log-sum-exp."""
        if self._cosine_fold() is None:
            return None
        x, y, proxies = self._call(embeddings, labels)
        if not y.numel():
            return None
        self._weights = None
        pos = self._one_hot(y.clamp(0, self.num_classes - 1))
        with K.no_autocast(x.device.type):
            xf = K.full_precision(x)
            value = self._one_node(xf, proxies, pos)
            if value is None:
                scores = self.critic(xf, proxies)
                if K.fusable(scores, pos, None, True, self.reduction):
                    value = K.fused(_proxy_anchor_kernel, _proxy_anchor_slow, scores, pos,
                                    ~pos, self.alpha, self.margin, self.reduction)
                else:
                    value = proxy_anchor(scores, pos, ~pos, self.alpha, self.margin,
                                         self.reduction, check=False)
        return self._read_with_range(value, y)

    def _one_node(self, x: Tensor, proxies: Tensor, pos: Tensor) -> Tensor | None:
        """The loss through :class:`losses.lane.CosineLane` (the critic and the fused kernel in
        one node, both gradients in the forward pass: about 15% of a B = 128 call on CPU), or
        None where it does not apply (no gradient wanted, not float32 / float64, more than
        ``kernels.FUSED_MAX_ENTRIES`` scores, ``reduction="none"``, ``torch.compile``)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or proxies.requires_grad)
        if (not grad or x.dtype not in (torch.float32, torch.float64)
                or not K.fusable(pos, pos, None, True, self.reduction)  # S has pos's shape
                or torch.compiler.is_compiling()):
            return None
        alpha, margin, reduction = self.alpha, self.margin, self.reduction

        def general(a: Tensor, b: Tensor) -> Tensor:
            return proxy_anchor(self.critic(a, b), pos, ~pos, alpha, margin, reduction,
                                check=False)

        return CosineLane.apply(x, proxies, pos, ~pos, self.critic.scale(x.dtype),
                                _proxy_anchor_kernel, (alpha, margin, reduction), general)


class NormalizedSoftmax(ProxyLoss):
    """Normalized softmax (:func:`normalized_softmax`), PML's
    ``NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=0.05)``: the critic is
    ``Cosine(temperature)``."""

    what = "the normalized softmax loss"

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05,
                 strict: bool = False, reduction: str = "mean", check: bool = True,
                 proxy_init: str = "normal"):
        super().__init__(num_classes, embedding_size, Cosine(check_temperature(temperature)),
                         strict, reduction, check, proxy_init)

    def _lane(self) -> _Lane | None:
        fold = self._cosine_fold()
        return None if fold is None else _Lane(fold)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return normalized_softmax(scores, positives, None, self.reduction, check,
                                  self._weights)


class CosFace(ProxyLoss):
    """CosFace (:func:`cosface`), PML's ``CosFaceLoss(num_classes, embedding_size,
    margin=0.35, scale=64)``; critic ``Cosine(1.0)``."""

    what = "the CosFace loss"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35,
                 scale: float = 64.0, strict: bool = False, reduction: str = "mean",
                 check: bool = True, proxy_init: str = "normal"):
        super().__init__(num_classes, embedding_size, Cosine(1.0), strict, reduction, check,
                         proxy_init)
        self.margin, self.scale = float(margin), float(scale)

    def _lane(self) -> _Lane | None:
        fold = self._cosine_fold()
        return None if fold is None else _Lane(fold * self.scale, self.scale * self.margin)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return cosface(scores, positives, None, self.margin, self.scale, self.reduction,
                       check, self._weights)


class ArcFace(ProxyLoss):
    """ArcFace (:func:`arcface`), PML's ``ArcFaceLoss(num_classes, embedding_size,
    margin=28.6, scale=64)``: ``margin`` in degrees, as PML (28.6 degrees = 0.5 rad, the
    paper's); critic ``Cosine(1.0)``."""

    what = "the ArcFace loss"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64.0, strict: bool = False, reduction: str = "mean",
                 check: bool = True, proxy_init: str = "normal"):
        super().__init__(num_classes, embedding_size, Cosine(1.0), strict, reduction, check,
                         proxy_init)
        self.margin, self.scale = float(margin), float(scale)

    def _lane(self) -> _Lane | None:
        fold = self._cosine_fold()
        if fold is None:
            return None
        return _Lane(fold, target_fn=_arcface_target(math.radians(self.margin)),
                     scale=self.scale)

    def compute(self, scores, positives, negatives, *, triplets=None, check=True):
        return arcface(scores, positives, None, math.radians(self.margin), self.scale,
                       self.reduction, check, self._weights)


def param_groups(params: Iterable[nn.Parameter], loss: nn.Module, lr: float,
                 proxy_lr: float | None = None) -> list[dict]:
    """Optimiser parameter groups: ``params`` (the model's and the loss's other parameters,
    e.g. a learnable critic) at ``lr`` and the loss's :meth:`proxy_parameters` (proxies, a
    learnable margin-loss boundary) at ``proxy_lr`` (``lr`` when None); parameters listed in
    both go to the proxy group once. Only parameters that require a gradient are kept."""
    proxy = [p for p in getattr(loss, "proxy_parameters", list)() if p.requires_grad]
    ids = {id(p) for p in proxy}
    seen: set[int] = set()
    rest = []
    for p in params:
        if p.requires_grad and id(p) not in ids and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    groups = [{"params": rest, "lr": lr}]
    if proxy:
        groups.append({"params": proxy, "lr": lr if proxy_lr is None else proxy_lr})
    return groups
