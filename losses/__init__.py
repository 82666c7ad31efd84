"""The loss zoo: MI bounds (InfoNCE, NWJ, JS, DV) and metric-learning losses (triplet,
multi-class N-pair, contrastive), each a pure function of ``(scores, positives, negatives)`` in
:mod:`losses.functional` plus an ``nn.Module`` shell with the pytorch-metric-learning call shape
(:mod:`losses.modules`); :mod:`losses.drop_in` gives them pytorch-metric-learning's class names.
"""

from contrastive.pairs import NoPairsError, NoPairsWarning

from . import drop_in, functional
from .drop_in import ContrastiveLoss, NPairsLoss, NTXentLoss, SupConLoss, TripletMarginLoss, to_pml
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
from .registry import available, get, register

__all__ = [
    "functional",
    "drop_in",
    "NTXentLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "ContrastiveLoss",
    "NPairsLoss",
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
    "available",
    "get",
    "register",
]
