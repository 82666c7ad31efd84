"""contrastive: the common interface of the library (the core layer) -- critics, positive masks,
validation, samplers, views, data sets, embedders, distributed helpers, checkpoint I/O and the
registry type -- and, above it, the application (:mod:`contrastive.app`: trainer, compare,
reports, reproduction, the known-MI benchmark) and the command line (:mod:`contrastive.cli`).
The layers and what each module owns: ``docs/architecture.md``.

``losses`` imports this package, so importing it must stay cheap: the core modules that pull in
torchvision or timm (views, data sets, embedders; about 1-4 s each on a cold start) are imported
on first use of one of their names (:data:`_LAZY`), never at ``import contrastive``. The
application is not re-exported here: it sits above ``losses`` and ``evaluation`` and is reached
as ``contrastive.app``.
"""

from __future__ import annotations

import importlib

from . import critics, errors, pairs, registry, validation
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

#: Heavy core names -> the submodule that defines them (imported on first use).
_LAZY = {
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
    "embed": ".inference",
    "embed_distributed": ".inference",
    "check_call": ".pairs",
    "mined_masks": ".pairs",
}
_SUBMODULES = {"samplers", "views", "datasets", "checkpoint", "distributed", "embedders",
               "inference", "app",
               "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'contrastive' has no attribute {name!r}")


__all__ = [
    "check_own_packages",
    "critics",
    "errors",
    "pairs",
    "registry",
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
