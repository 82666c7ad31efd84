"""The loss zoo: MI bounds (InfoNCE, NWJ, JS, DV) and metric-learning losses (triplet,
multi-class N-pair, contrastive), each a pure function of ``(scores, positives, negatives)`` in
:mod:`losses.functional` plus an ``nn.Module`` shell with the pytorch-metric-learning call shape.
"""

from . import functional
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
