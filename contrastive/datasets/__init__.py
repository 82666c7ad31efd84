"""Data sets behind one registry: ``get_dataset(name, root, split, transform, **kw)``.

Every data set returns ``(x, y)`` items (``y`` an ``int``) and has ``.labels`` (int64 numpy array
-- pass it to :class:`contrastive.samplers.MPerClassSampler`), ``.num_classes``, ``.classes``
and ``.kind`` (``"vector"`` or ``"image"``).

==================  =========================================================  ===================
name                data                                                       splits
==================  =========================================================  ===================
``digits``          scikit-learn 8x8 digits as float32 vectors of 64 in [0,1]  train/test/all
``digits_image``    the same as ``[1, s, s]`` tensors (``size=``) or PIL       train/test/all
``folder``          ``ImageFolder`` layout                                     a sub-folder / all
``cub200``          CUB-200-2011, classes 1-100 / 101-200                      train/test
``cars196``         Stanford Cars, classes 1-98 / 99-196                       train/test
``sop``             Stanford Online Products (``Ebay_*.txt``)                  train/test
``inshop``          In-Shop Clothes (``list_eval_partition.txt``)              train/query/gallery
``mnist``           local MNIST idx files (torchvision reader)                 train/test
``cifar10``         local CIFAR-10 python batches (``verify_md5=``)            train/test
==================  =========================================================  ===================

``digits`` ships with scikit-learn; every other set is read from a local copy under ``root`` and
never downloaded -- a missing or malformed copy raises ``FileNotFoundError``/``ValueError`` saying
what was expected where. Layout details: :mod:`.dml`, :mod:`.torchvision_sets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .base import (
    ImageArrayDataset,
    ImageFileDataset,
    LabeledDataset,
    TensorDataset,
    remap_labels,
)
from .digits import digits, digits_image
from .dml import cars196, cub200, folder, inshop, sop
from .torchvision_sets import cifar10, mnist

__all__ = [
    "get_dataset",
    "available_datasets",
    "register_dataset",
    "LabeledDataset",
    "TensorDataset",
    "ImageArrayDataset",
    "ImageFileDataset",
    "remap_labels",
    "digits",
    "digits_image",
    "folder",
    "cub200",
    "cars196",
    "sop",
    "inshop",
    "mnist",
    "cifar10",
]

_REGISTRY: dict[str, Callable[..., LabeledDataset]] = {
    "digits": digits,
    "digits_image": digits_image,
    "folder": folder,
    "cub200": cub200,
    "cars196": cars196,
    "sop": sop,
    "inshop": inshop,
    "mnist": mnist,
    "cifar10": cifar10,
}
_ALIASES = {"cub": "cub200", "cars": "cars196", "in_shop": "inshop", "imagefolder": "folder"}


def available_datasets() -> list[str]:
    """Registered data set names (sorted; aliases not listed)."""
    return sorted(_REGISTRY)


def register_dataset(name: str, factory: Callable[..., LabeledDataset]) -> None:
    """Add ``factory(root, split, transform, **kw)`` under ``name`` (overwriting is refused)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    key = name.lower()
    if key in _REGISTRY or key in _ALIASES:
        raise ValueError(f"a data set named {name!r} is already registered")
    _REGISTRY[key] = factory


def get_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | None = None,
    **kw: Any,
) -> LabeledDataset:
    """Build the data set ``name`` (see the module table) for ``split``; ``kw`` goes to its
    reader (e.g. ``size=32`` for ``digits_image``, ``verify_md5=False`` for ``cifar10``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    return _REGISTRY[key](root, split=split, transform=transform, **kw)
