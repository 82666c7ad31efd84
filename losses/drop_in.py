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
PML's normalised dot product). The class name is what PML's ``CrossBatchMemory`` checks, and
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

from torch import nn

from contrastive.critics import Cosine

from .modules import Contrastive, InfoNCE, MultiClassNPair, Triplet

__all__ = [
    "NTXentLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "ContrastiveLoss",
    "NPairsLoss",
    "to_pml",
]

_GENERIC = {
    "NTXentLoss": 'losses.InfoNCE(critic=..., positives="pair")',
    "SupConLoss": 'losses.InfoNCE(critic=..., positives="all")',
    "TripletMarginLoss": "losses.Triplet(critic=..., reduction=...)",
    "ContrastiveLoss": "losses.Contrastive(critic=...)",
    "NPairsLoss": "losses.MultiClassNPair(critic=...)",
}


def _refuse_pml_objects(cls: str, kwargs: dict) -> None:
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(
            f"{cls} does not take {names}: PML's distance, reducer and regularizer objects have "
            f"no meaning here. Use {_GENERIC[cls]} with one of contrastive.critics "
            "(Cosine, Dot, NegativeL2, ...) for another distance"
        )


class NTXentLoss(InfoNCE):
    """PML's ``NTXentLoss(temperature=0.07)``: :class:`losses.InfoNCE` with
    ``positives="pair"`` and a cosine critic."""

    def __init__(self, temperature: float = 0.07, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("NTXentLoss", pml_only)
        super().__init__(temperature=temperature, positives="pair", strict=strict,
                         reduction=reduction, check=check)


class SupConLoss(InfoNCE):
    """PML's ``SupConLoss(temperature=0.1)``: :class:`losses.InfoNCE` with
    ``positives="all"`` and a cosine critic."""

    def __init__(self, temperature: float = 0.1, strict: bool = False, reduction: str = "mean",
                 check: bool = True, **pml_only):
        _refuse_pml_objects("SupConLoss", pml_only)
        super().__init__(temperature=temperature, positives="all", strict=strict,
                         reduction=reduction, check=check)


class TripletMarginLoss(Triplet):
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
        if triplets_per_anchor != "all":
            raise ValueError(
                f"triplets_per_anchor={triplets_per_anchor!r} samples random triplets, which is "
                "not supported: keep 'all' or pass a PML miner's triplets as the third argument"
            )
        super().__init__(margin=margin, mining="all", soft=smooth_loss, reduction=reduction,
                         strict=strict, check=check)


class ContrastiveLoss(Contrastive):
    """PML's ``ContrastiveLoss(pos_margin=0, neg_margin=1)`` on normalised Euclidean
    distances."""

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, strict: bool = False,
                 reduction: str = "nonzero", check: bool = True, **pml_only):
        _refuse_pml_objects("ContrastiveLoss", pml_only)
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin, strict=strict,
                         reduction=reduction, check=check)


class NPairsLoss(MultiClassNPair):
    """PML's ``NPairsLoss()``: multi-class N-pair on PML's default distance, the dot product of
    L2-normalised embeddings (``critic=Cosine(1.0)``)."""

    def __init__(self, strict: bool = False, reduction: str = "mean", check: bool = True,
                 **pml_only):
        _refuse_pml_objects("NPairsLoss", pml_only)
        super().__init__(critic=Cosine(1.0), strict=strict, reduction=reduction, check=check)


def to_pml(loss: nn.Module) -> nn.Module:
    """Our ``loss`` as a PML ``BaseMetricLossFunction`` (needs pytorch-metric-learning), for
    PML code that checks the base class, such as ``DistributedLossWrapper``. The returned module
    has the loss's class name (so ``CrossBatchMemory`` accepts it too when that is a PML name),
    calls ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)`` and hands PML the
    value as already reduced; it has no reducer, distance or regularizer of its own."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if ref_emb is embeddings:  # PML puts the batch in when no reference set was given
            ref_emb = ref_labels = None
        value = self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}

    def init(self, inner):
        BaseMetricLossFunction.__init__(self)
        self.loss = inner

    cls = type(type(loss).__name__, (BaseMetricLossFunction,),
               {"__init__": init, "compute_loss": compute_loss, "__module__": __name__})
    return cls(loss)
