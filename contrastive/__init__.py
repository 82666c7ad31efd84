"""contrastive: the common interface of the library -- critics, positive masks, samplers, data
sets, embedders, distributed helpers, the trainer and the command line.

Heavy submodules (datasets, embedders, trainer) are imported lazily so that ``import losses``
stays light.
"""

from __future__ import annotations

import importlib

from . import critics, pairs, validation
from .critics import Bilinear, Concat, Cosine, Dot, NegativeL2, Separable
from .pairs import diagonal_masks, label_masks, resolve_pairs

__version__ = "0.1.0"

_LAZY = {
    # name -> module that defines it
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'contrastive' has no attribute {name!r}")


__all__ = [
    "critics",
    "pairs",
    "validation",
    "Dot",
    "Cosine",
    "NegativeL2",
    "Bilinear",
    "Separable",
    "Concat",
    "label_masks",
    "diagonal_masks",
    "resolve_pairs",
]
