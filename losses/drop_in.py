"""pytorch-metric-learning (PML) names for our losses, so a PML training script switches by
changing one import::

    from losses import drop_in as losses      # was: from pytorch_metric_learning import losses
    loss_func = losses.NTXentLoss(temperature=0.07)
    loss = loss_func(embeddings, labels, miner(embeddings, labels))

Each class is one of our modules with PML's class name, PML's constructor arguments and PML's
defaults for the default distance (``NTXentLoss`` = ``InfoNCE(positives="pair")`` at 0.07,
``SupConLoss`` = ``InfoNCE(positives="all")`` at 0.1, ``TripletMarginLoss`` = ``Triplet`` with
margin 0.05 and the mean over non-zero triplets, ``ContrastiveLoss`` = ``Contrastive`` with
margins 0 and 1 on normalised Euclidean distances, ``NPairsLoss`` = ``MultiClassNPair`` with
PML's normalised dot product; the pair-based and proxy losses, ``MultiSimilarityLoss`` to
``ArcFaceLoss``, each on its PML default distance, their proxies drawn and kept as PML's). The
class name is what PML's ``CrossBatchMemory`` checks, and
the call takes PML's five positional arguments, so ``CrossBatchMemory(NTXentLoss(), 128,
memory_size=1024, miner=miner)`` accepts them.

Each also takes our ``reduction=`` (default: PML's reducer for that loss -- the mean for NT-Xent,
SupCon and N-pairs, the mean over non-zero terms for the triplet and contrastive losses; ``"none"``
gives the per-element terms) and ``check=`` (``False`` skips the checks that sync, for compiled
code; see :mod:`losses.modules`).

PML's ``distance=``, ``reducer=``, ``embedding_regularizer=`` and ``collect_stats=`` are PML
objects and are refused with a ``TypeError`` that names our equivalent (a ``critic=`` on the
generic class). ``DistributedLossWrapper`` tests ``isinstance(loss, BaseMetricLossFunction)``,
PML's base class, which none of our losses inherits (that would make PML a runtime dependency
and install its reducer and distance machinery under ours): wrap the loss with
:func:`to_pml`, or gather the global batch with ``contrastive.distributed.gather_embeddings``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.critics import Cosine

from .memory import CrossBatchMemory
from .modules import Contrastive, InfoNCE, MultiClassNPair, Triplet
from .pair_based import NCA, Circle, LiftedStructure, Margin, MultiSimilarity
from .proxies import ArcFace, CosFace, NormalizedSoftmax, ProxyAnchor, ProxyNCA

__all__ = [
    "NTXentLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "ContrastiveLoss",
    "NPairsLoss",
    "MultiSimilarityLoss",
    "CircleLoss",
    "GeneralizedLiftedStructureLoss",
    "MarginLoss",
    "NCALoss",
    "ProxyNCALoss",
    "ProxyAnchorLoss",
    "NormalizedSoftmaxLoss",
    "CosFaceLoss",
    "ArcFaceLoss",
    "CrossBatchMemory",
    "to_pml",
]

_GENERIC = {
    "NTXentLoss": 'losses.InfoNCE(critic=..., positives="pair")',
    "SupConLoss": 'losses.InfoNCE(critic=..., positives="all")',
    "TripletMarginLoss": "losses.Triplet(critic=..., reduction=...)",
    "ContrastiveLoss": "losses.Contrastive(critic=...)",
    "NPairsLoss": "losses.MultiClassNPair(critic=...)",
    "MultiSimilarityLoss": "losses.MultiSimilarity(critic=..., reduction=...)",
    "CircleLoss": "losses.Circle(critic=..., reduction=...)",
    "GeneralizedLiftedStructureLoss": "losses.LiftedStructure(critic=..., reduction=...)",
    "MarginLoss": "losses.Margin(critic=..., reduction=...)",
    "NCALoss": "losses.NCA(critic=..., reduction=...)",
    "ProxyNCALoss": "losses.ProxyNCA(critic=..., proxy_init=...)",
    "ProxyAnchorLoss": "losses.ProxyAnchor(critic=..., proxy_init=...)",
    "NormalizedSoftmaxLoss": "losses.NormalizedSoftmax(proxy_init=...)",
    "CosFaceLoss": "losses.CosFace(proxy_init=...)",
    "ArcFaceLoss": "losses.ArcFace(proxy_init=...)",
}


class _PmlCheckpoint:
    """A state dict saved from PML's loss of the same name loads (strictly) into the drop-in
    class. PML keeps its hyper-parameters as Python numbers, so its state dict holds only the
    learnable tensors (proxies, a learnable ``beta``; nothing for most losses), whereas ours
    also keeps the fixed ones in buffers (the critic's temperature, a fixed ``beta``). A state
    dict that carries none of our buffers is PML's: the buffers keep the values this loss was
    built with, as PML's constructor arguments do. A state dict with some of our buffers is
    ours and is loaded as it is (a missing tensor is still an error)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        own = self.state_dict(prefix=prefix)
        params = {prefix + name for name, _ in self.named_parameters()}
        buffers = [key for key in own if key not in params]
        if buffers and not any(key in state_dict for key in buffers):
            for key in buffers:
                state_dict[key] = own[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _refuse_pml_objects(cls: str, kwargs: dict) -> None:
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(
            f"{cls} does not take {names}: PML's distance, reducer and regularizer objects have "
            f"no meaning here. Use {_GENERIC[cls]} with one of contrastive.critics "
            "(Cosine, Dot, NegativeL2, ...) for another distance"
        )


class NTXentLoss(_PmlCheckpoint, InfoNCE):
    """PML's ``NTXentLoss(temperature=0.07)``: :class:`losses.InfoNCE` with
    ``positives="pair"`` and a cosine critic."""

    def __init__(self, temperature: float = 0.07, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("NTXentLoss", pml_only)
        super().__init__(temperature=temperature, positives="pair", strict=strict,
                         reduction=reduction, check=check)


class SupConLoss(_PmlCheckpoint, InfoNCE):
    """PML's ``SupConLoss(temperature=0.1)``: :class:`losses.InfoNCE` with
    ``positives="all"`` and a cosine critic."""

    def __init__(self, temperature: float = 0.1, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("SupConLoss", pml_only)
        super().__init__(temperature=temperature, positives="all", strict=strict,
                         reduction=reduction, check=check)


class TripletMarginLoss(_PmlCheckpoint, Triplet):
    """PML's ``TripletMarginLoss(margin=0.05, smooth_loss=False)`` on normalised Euclidean
    distances, all triplets, the mean over the non-zero ones. ``swap=True`` and a number for
    ``triplets_per_anchor`` (random triplet sampling) are refused: use a PML miner instead."""

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        triplets_per_anchor: str | int = "all",
        strict: bool = False,
        reduction: str = "nonzero",
        check: bool = True,
        **pml_only,
    ):
        _refuse_pml_objects("TripletMarginLoss", pml_only)
        if swap:
            raise ValueError(
                "TripletMarginLoss(swap=True) is not supported: the positive-negative distance "
                "swap needs a third distance per triplet; use PML's own loss for it"
            )
        _all_triplets("TripletMarginLoss", triplets_per_anchor)
        super().__init__(margin=margin, mining="all", soft=smooth_loss, reduction=reduction,
                         strict=strict, check=check)


class ContrastiveLoss(_PmlCheckpoint, Contrastive):
    """PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` on normalised Euclidean
    distances."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, strict: bool = False,
                 reduction: str = "nonzero", check: bool = True, **pml_only):
        _refuse_pml_objects("ContrastiveLoss", pml_only)
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, strict=strict,
                         reduction=reduction, check=check)


class NPairsLoss(_PmlCheckpoint, MultiClassNPair):
    """PML's ``NPairsLoss()``: multi-class N-pair on PML's default distance, the dot product of
    L2-normalised embeddings (``critic=Cosine(1.0)``)."""

    def __init__(self, strict: bool = False, reduction: str = "mean", check: bool = True,
                 **pml_only):
        _refuse_pml_objects("NPairsLoss", pml_only)
        super().__init__(critic=Cosine(1.0), strict=strict, reduction=reduction, check=check)


class MultiSimilarityLoss(_PmlCheckpoint, MultiSimilarity):
    """PML's ``MultiSimilarityLoss(alpha=2, beta=50, base=0.5)`` on cosine similarities, every
    pair (its pair mining is PML's ``MultiSimilarityMiner``, passed as the third argument, or
    our ``losses.MultiSimilarity(epsilon=...)``)."""

    def __init__(self, alpha: float = 2, beta: float = 50, base: float = 0.5,
                 strict: bool = False, reduction: str = "mean", check: bool = True, **pml_only):
        _refuse_pml_objects("MultiSimilarityLoss", pml_only)
        super().__init__(alpha, beta, base, strict=strict, reduction=reduction, check=check)


class CircleLoss(_PmlCheckpoint, Circle):
    """PML's ``CircleLoss(m=0.4, gamma=80)`` on cosine similarities, the mean over the non-zero
    terms."""

    def __init__(self, m: float = 0.4, gamma: float = 80, strict: bool = False,
                 reduction: str = "nonzero", check: bool = True, **pml_only):
        _refuse_pml_objects("CircleLoss", pml_only)
        super().__init__(m, gamma, strict=strict, reduction=reduction, check=check)


class GeneralizedLiftedStructureLoss(_PmlCheckpoint, LiftedStructure):
    """PML's ``GeneralizedLiftedStructureLoss(neg_margin=1, pos_margin=0)`` on normalised
    Euclidean distances. (PML's ``LiftedStructureLoss``, the original form of Oh Song et al.,
    is another loss and is not offered.)"""

    def __init__(self, neg_margin: float = 1, pos_margin: float = 0, strict: bool = False,
                 reduction: str = "mean", check: bool = True, **pml_only):
        _refuse_pml_objects("GeneralizedLiftedStructureLoss", pml_only)
        super().__init__(neg_margin, pos_margin, strict=strict, reduction=reduction,
                         check=check)


class MarginLoss(_PmlCheckpoint, Margin):
    """PML's ``MarginLoss(margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all",
    learn_beta=False, num_classes=None)``, its positional order included, on normalised
    Euclidean distances; a number for ``triplets_per_anchor`` (random triplet sampling) is
    refused, as for :class:`TripletMarginLoss`."""

    def __init__(self, margin: float = 0.2, nu: float = 0, beta: float = 1.2,
                 triplets_per_anchor: str | int = "all", learn_beta: bool = False,
                 num_classes: int | None = None, strict: bool = False,
                 reduction: str = "nonzero", check: bool = True, **pml_only):
        _refuse_pml_objects("MarginLoss", pml_only)
        _all_triplets("MarginLoss", triplets_per_anchor)
        super().__init__(margin, nu, beta, learn_beta, num_classes, strict=strict,
                         reduction=reduction, check=check)


class NCALoss(_PmlCheckpoint, NCA):
    """PML's ``NCALoss(softmax_scale=1)`` on squared Euclidean distances of normalised
    embeddings."""

    def __init__(self, softmax_scale: float = 1, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("NCALoss", pml_only)
        super().__init__(softmax_scale, strict=strict, reduction=reduction, check=check)


class _FollowsEmbeddings:
    """PML's proxy losses move their parameters to the embeddings' device and float type in
    place, on every call (``W.data = W.data.to(...)``), so that the optimizer built on
    ``loss.parameters()`` steps them there (float64 embeddings: float64 proxies, updated in
    float64). The drop-in classes do the same (the generic classes keep their parameters and
    cast a copy per call); float16 / bfloat16 embeddings leave float32 proxies, in which the
    losses compute."""

    proxies: nn.Parameter

    def forward(self, embeddings, *args, **kwargs):
        if isinstance(embeddings, Tensor) and embeddings.is_floating_point():
            dtype = embeddings.dtype
            dtype = dtype if dtype in (torch.float32, torch.float64) else self.proxies.dtype
            if self.proxies.dtype != dtype or self.proxies.device != embeddings.device:
                self.proxies.data = self.proxies.data.to(embeddings.device, dtype)
        return super().forward(embeddings, *args, **kwargs)


class ProxyNCALoss(_PmlCheckpoint, _FollowsEmbeddings, ProxyNCA):
    """PML's ``ProxyNCALoss(num_classes, embedding_size, softmax_scale=1)``: proxies
    ``[C, d]`` drawn as PML's (normal), so a seed gives the same ones."""

    def __init__(self, num_classes: int, embedding_size: int, softmax_scale: float = 1,
                 strict: bool = False, reduction: str = "mean", check: bool = True,
                 **pml_only):
        _refuse_pml_objects("ProxyNCALoss", pml_only)
        super().__init__(num_classes, embedding_size, softmax_scale, strict=strict,
                         reduction=reduction, check=check, proxy_init="normal")


class ProxyAnchorLoss(_PmlCheckpoint, _FollowsEmbeddings, ProxyAnchor):
    """PML's ``ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)``: proxies
    drawn as PML's (``kaiming_normal_``, fan-out), so a seed gives the same ones."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1,
                 alpha: float = 32, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("ProxyAnchorLoss", pml_only)
        super().__init__(num_classes, embedding_size, margin, alpha, strict=strict,
                         reduction=reduction, check=check, proxy_init="kaiming")


class _WeightMatrix:
    """PML's normalized-softmax, CosFace and ArcFace losses keep their class weights as
    ``W [d, C]`` (a linear layer's), ours as proxies ``[C, d]``: ``W`` reads them in PML's
    layout (a view: writing to it writes the proxies), the proxies are drawn in that layout (a
    seed gives PML's), and a state dict saved from PML's loss (key ``W``) loads."""

    proxies: nn.Parameter

    @property
    def W(self) -> Tensor:  # noqa: N802 - PML's attribute name
        return self.proxies.T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "W" in state_dict and prefix + "proxies" not in state_dict:
            state_dict[prefix + "proxies"] = state_dict.pop(prefix + "W").T
            # PML's checkpoint holds W alone: the rest (the critic's fixed temperature, a
            # constructor argument in PML) stays as constructed
            for key, value in self.state_dict(prefix=prefix).items():
                state_dict.setdefault(key, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class NormalizedSoftmaxLoss(_PmlCheckpoint, _FollowsEmbeddings, _WeightMatrix,
                            NormalizedSoftmax):
    """PML's ``NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=0.05)``."""

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05,
                 strict: bool = False, reduction: str = "mean", check: bool = True,
                 **pml_only):
        _refuse_pml_objects("NormalizedSoftmaxLoss", pml_only)
        super().__init__(num_classes, embedding_size, temperature, strict=strict,
                         reduction=reduction, check=check, proxy_init="normal_w")


class CosFaceLoss(_PmlCheckpoint, _FollowsEmbeddings, _WeightMatrix, CosFace):
    """PML's ``CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)``."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.35,
                 scale: float = 64, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("CosFaceLoss", pml_only)
        super().__init__(num_classes, embedding_size, margin, scale, strict=strict,
                         reduction=reduction, check=check, proxy_init="normal_w")


class ArcFaceLoss(_PmlCheckpoint, _FollowsEmbeddings, _WeightMatrix, ArcFace):
    """PML's ``ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)`` (the margin in
    degrees, as PML's)."""

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 28.6,
                 scale: float = 64, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("ArcFaceLoss", pml_only)
        super().__init__(num_classes, embedding_size, margin, scale, strict=strict,
                         reduction=reduction, check=check, proxy_init="normal_w")


def _all_triplets(cls: str, triplets_per_anchor) -> None:
    if triplets_per_anchor != "all":
        raise ValueError(
            f"{cls}(triplets_per_anchor={triplets_per_anchor!r}) samples random triplets, which "
            "is not supported: keep 'all' or pass a PML miner's triplets as the third argument"
        )


def to_pml(loss: nn.Module) -> nn.Module:
    """Our ``loss`` as a PML ``BaseMetricLossFunction`` (needs pytorch-metric-learning), for
    PML code that checks the base class, such as ``DistributedLossWrapper``. The returned module
    has the loss's class name (so ``CrossBatchMemory`` accepts it too when that is a PML name),
    calls ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` and hands PML the
    value as already reduced; it has no reducer, distance or regularizer of its own. It pickles
    (``torch.save``, spawned workers) as PML's losses do.

    Our :class:`CrossBatchMemory` is refused: it takes ``enqueue_mask`` where a loss takes
    ``ref_emb`` and gathers the batch under DDP itself (``gather=True``), so it needs no
    wrapper."""
    if isinstance(loss, CrossBatchMemory):
        raise TypeError(
            "to_pml does not wrap a CrossBatchMemory: ours gathers every rank's batch into the "
            "memory itself under DDP (gather=True), so use it without DistributedLossWrapper "
            "(or wrap the loss inside it: CrossBatchMemory(to_pml(loss), ...) is PML's)"
        )
    return _pml_class(type(loss).__name__)(loss)


_PML_CLASSES: dict[str, type] = {}


def _pml_class(name: str) -> type:
    """The ``BaseMetricLossFunction`` subclass named ``name`` behind :func:`to_pml`, one per
    name (so that its instances pickle: :func:`_new_pml` rebuilds the class from the name)."""
    if name not in _PML_CLASSES:
        from pytorch_metric_learning.losses import BaseMetricLossFunction

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            if ref_emb is embeddings:  # PML puts the batch in when no reference set was given
                ref_emb = ref_labels = None
            value = self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
            return {"loss": {"losses": value, "indices": None,
                             "reduction_type": "already_reduced"}}

        def init(self, inner):
            BaseMetricLossFunction.__init__(self)
            self.loss = inner

        def reduce(self):
            return _new_pml, (name,), self.__getstate__()

        _PML_CLASSES[name] = type(name, (BaseMetricLossFunction,), {
            "__init__": init, "compute_loss": compute_loss, "__reduce__": reduce,
            "__module__": __name__, "__qualname__": name})
    return _PML_CLASSES[name]


def _new_pml(name: str) -> nn.Module:
    """An empty instance of :func:`_pml_class` ``(name)``, filled in by unpickling."""
    cls = _pml_class(name)
    return cls.__new__(cls)
