"""The loss zoo: MI bounds (InfoNCE, NWJ, JS, DV) and metric-learning losses (triplet,
multi-class N-pair, contrastive), each a pure function of ``(scores, positives, negatives)`` in
:mod:`losses.functional` plus an ``nn.Module`` shell with the pytorch-metric-learning call shape
(:mod:`losses.modules`); :mod:`losses.drop_in` gives them pytorch-metric-learning's class names.
"""

from contrastive.pairs import NoPairsError, NoPairsWarning

from . import drop_in, functional, memory, pair_based, proxies, self_supervised
from .drop_in import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    CosFaceLoss,
    GeneralizedLiftedStructureLoss,
    MarginLoss,
    MultiSimilarityLoss,
    NCALoss,
    NormalizedSoftmaxLoss,
    NPairsLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    ProxyNCALoss,
    SupConLoss,
    TripletMarginLoss,
    to_pml,
)
from .memory import CrossBatchMemory, NegativeQueue
from .modules import (
    DV,
    JS,
    NWJ,
    Contrastive,
    InfoNCE,
    MultiClassNPair,
    PairLoss,
    Triplet,
    first_pair_per_class,
)
from .pair_based import NCA, Circle, LiftedStructure, Margin, MultiSimilarity
from .proxies import ArcFace, CosFace, NormalizedSoftmax, ProxyAnchor, ProxyLoss, ProxyNCA
from .registry import ESTIMATORS, LOSSES, available, canonical, estimator, get, register
from .self_supervised import DCL, DCLW, SimCLR, simclr

__all__ = [
    "functional",
    "drop_in",
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
    "to_pml",
    "NoPairsError",
    "NoPairsWarning",
    "PairLoss",
    "InfoNCE",
    "NWJ",
    "JS",
    "DV",
    "MultiClassNPair",
    "Triplet",
    "Contrastive",
    "first_pair_per_class",
    "pair_based",
    "proxies",
    "MultiSimilarity",
    "Circle",
    "LiftedStructure",
    "Margin",
    "NCA",
    "ProxyLoss",
    "ProxyNCA",
    "ProxyAnchor",
    "NormalizedSoftmax",
    "CosFace",
    "ArcFace",
    "memory",
    "self_supervised",
    "simclr",
    "SimCLR",
    "DCL",
    "DCLW",
    "CrossBatchMemory",
    "NegativeQueue",
    "LOSSES",
    "ESTIMATORS",
    "available",
    "canonical",
    "estimator",
    "get",
    "register",
]
