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


def check_own_packages() -> None:
    """Raise ``ImportError`` when ``losses`` or ``evaluation`` -- generic names -- would be
    imported from somewhere other than beside this package: a user's own ``losses.py`` or
    ``evaluation/`` in the working folder (first on ``sys.path`` under ``python -m`` and in
    scripts) shadows ours and would fail later with an unrelated ``AttributeError``. The message
    names the shadowing file and the fix."""
    import importlib.util
    import sys
    from pathlib import Path

    home = Path(__file__).resolve().parent.parent
    for name in ("losses", "evaluation"):
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if module is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                raise ImportError(f"the package {name!r} of contrastive-mi is not installed; "
                                  "reinstall it (pip install contrastive-mi)")
            origin = spec.origin
        if origin is None:
            continue
        path = Path(origin).resolve()
        if path.parent != home / name:
            raise ImportError(
                f"{path} shadows contrastive-mi's package {name!r} (expected "
                f"{home / name}); rename your {path.name if path.name != '__init__.py' else name}"
                f" or run from another folder (the working folder comes first on sys.path)"
            )

_LAZY = {
    # name -> submodule that defines it (imported on first use)
    "MPerClassSampler": ".samplers",
    "MultiView": ".views",
    "collate_views": ".views",
    "simclr_augmentation": ".views",
    "small_image_augmentation": ".views",
    "vector_augmentation": ".views",
    "get_dataset": ".datasets",
    "available_datasets": ".datasets",
    "register_dataset": ".datasets",
    "atomic_save": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "CheckpointError": ".checkpoint",
    "all_gather_with_grad": ".distributed",
    "gather_embeddings": ".distributed",
    "Embedder": ".embedders",
    "MLPEncoder": ".embedders",
    "embed": ".embedders",
    "TrainConfig": ".config",
    "fit": ".train",
    "CompareConfig": ".compare",
    "compare": ".compare",
    "write_report": ".report",
    "aggregate": ".report",
    "format_table": ".report",
    "check_call": ".pairs",
    "mined_masks": ".pairs",
}
_SUBMODULES = {"samplers", "views", "datasets", "checkpoint", "distributed", "embedders",
               "config", "train", "compare", "report", "cli", "reproduce", "mi_benchmark"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'contrastive' has no attribute {name!r}")


__all__ = [
    "check_own_packages",
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
    *_LAZY,
]
