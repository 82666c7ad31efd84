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

References: Movshovitz-Attias et al. 2017 (ProxyNCA); Kim et al. 2020 (Proxy-Anchor); Zhai & Wu
2019 (normalized softmax); Wang et al. 2018 (CosFace); Deng et al. 2019 (ArcFace).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive.critics import Cosine, NegativeL2
from contrastive.pairs import Pairs, check_call, require_positives
from contrastive.validation import check_temperature

from . import kernels as K
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
    scores, positives, negatives = K.prepare(scores, positives, negatives, check)
    if check:
        require_positives(positives, "Proxy-Anchor")
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
    log-sum-exps stacked, ``x = alpha (margin - S, S + margin)``; the gradient of
    ``softplus(lse_c)`` is ``e_ic / (exp(-m_c) + z_c)`` (``e_ic / z_c`` where ``lse_c > 20``,
    as torch's softplus), times ``-alpha`` / ``alpha``."""
    c = K.const((-1.0, 1.0, margin, margin), scores.dtype, scores.device)[:, None, None]
    x = torch.addcmul(c[2:], scores, c[:2]).mul_(alpha)
    lse, e, m, z = K.stacked_lse(x, torch.stack((positives, negatives)), dim=-2)
    sp = F.softplus(lse)
    if reduction == "sum":
        value, w_pos, w_neg = sp[0].sum() + sp[1].sum(), 1.0, 1.0
    else:
        with_pos = (z[0] >= 1.0).sum().clamp_min(1)
        value = sp[0].sum() / with_pos + sp[1].sum() / scores.shape[1]
        w_pos, w_neg = with_pos.to(scores.dtype).reciprocal(), 1.0 / scores.shape[1]
    if not need_grad:
        return value, None
    # softplus' = sigmoid(lse), and 1 above torch's threshold of 20 (F.softplus's backward)
    coef = torch.where(lse.unsqueeze(-2) > 20.0, z, m.neg_().exp_().add_(z)).reciprocal_()
    coef[0].mul_(-alpha * w_pos)
    coef[1].mul_(alpha * w_neg)
    return value, e.mul_(coef).sum(0)


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
    def target(c: Tensor) -> Tensor:
        return c - margin

    target.derivative = torch.ones_like
    return _target_softmax(scores, positives, negatives, target, scale, reduction, check,
                           weights, "the CosFace loss")


def arcface(scores: Tensor, positives: Tensor, negatives: Tensor | None = None,
            margin: float = math.radians(28.6), scale: float = 64.0, reduction: str = "mean",
            check: bool = True, weights: Tensor | None = None) -> Tensor:
    """ArcFace / additive angular margin (Deng et al. 2019, eq. 3; PML's ``ArcFaceLoss``) on
    cosine scores, ``margin`` in radians (PML's class takes degrees): the target's angle grows
    by the margin, ``z_iy = cos(theta_iy + m)`` with ``theta = acos(S)``, and where
    ``theta > pi - m`` (where that would no longer decrease) ``z_iy = S_iy - m sin m``; the
    cross-entropy of ``scale * z``."""

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

    target.derivative = derivative
    return _target_softmax(scores, positives, negatives, target, scale, reduction, check,
                           weights, "the ArcFace loss")


# --------------------------------------------------------------------------- modules


class ProxyLoss(PairLoss):
    """Base class of the proxy losses: the batch against ``C`` learnable proxies
    (``self.proxies [C, d]``, the reference set), ``P_ic = (y_i == c)``. Labels must be class
    indices in ``[0, C)``. ``ref_emb`` is not taken (the proxies are the reference set);
    a miner's ``indices_tuple`` weighs the embeddings (:func:`miner_weights`), as PML.

    ``proxy_init``: ``"normal"`` (PML's default) or ``"kaiming"`` (``kaiming_normal_`` with
    ``mode="fan_out"``, PML's for Proxy-Anchor)."""

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
        else:
            raise ValueError(f"proxy_init must be 'normal' or 'kaiming', got {proxy_init!r}")
        self._weights: Tensor | None = None

    def proxy_parameters(self) -> list[nn.Parameter]:
        """The proxies, for their own learning rate (:func:`param_groups`)."""
        return [self.proxies]

    def pairs(self, embeddings, labels=None, ref_emb=None, ref_labels=None, paired=False,
              indices_tuple=None) -> Pairs:
        if ref_emb is not None or ref_labels is not None or paired:
            raise ValueError(f"{type(self).__name__} scores the batch against its own proxies; "
                             "it takes no ref_emb, ref_labels or paired views")
        if labels is None:
            raise ValueError(f"{type(self).__name__} needs class labels in [0, num_classes)")
        c = check_call(embeddings, labels, check=self.check)
        y = c.labels.long()
        lowest, highest = torch.stack(y.aminmax()).tolist() if self.check and y.numel() else (0, 0)
        if lowest < 0 or highest >= self.num_classes:
            raise ValueError(f"labels must be class indices in [0, {self.num_classes}) for "
                             f"{type(self).__name__}(num_classes={self.num_classes})")
        if self.check:  # labels checked in range: a one-hot scatter (cheaper than a compare)
            pos = torch.zeros(y.numel(), self.num_classes, dtype=torch.bool, device=y.device)
            pos.scatter_(1, y[:, None], True)
        else:  # unchecked labels: a compare (an index outside [0, C) just matches nothing)
            classes = torch.arange(self.num_classes, device=y.device)
            pos = y[:, None] == classes[None, :]
        self._weights = None
        if indices_tuple is not None:
            self._weights = miner_weights(indices_tuple, y.numel(), self.weights_anchors_only,
                                          y.device)
        dtype = c.embeddings.dtype
        dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        proxies = self.proxies.to(device=c.embeddings.device, dtype=dtype)  # PML casts too
        return Pairs(c.embeddings, proxies, pos, ~pos, False)

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
