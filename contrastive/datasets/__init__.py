"""Data sets behind one registry: ``get_dataset(name, root, split, transform, **kw)``.

Every data set returns ``(x, y)`` items (``y`` an ``int``) and has ``.labels`` (int64 numpy array
-- pass it to :class:`contrastive.samplers.MPerClassSampler`), ``.num_classes``, ``.classes``
and ``.kind`` (``"vector"`` or ``"image"``).

==================  =========================================================  ===================
name                data                                                       splits
==================  =========================================================  ===================
``digits``          scikit-learn 8x8 digits as float32 vectors of 64 in [0,1]  train/test/all
``digits_image``    the same as ``[1, s, s]`` tensors (``size=``) or PIL       train/test/all
``latent_classes``  synthetic: 200 classes seen through a random nonlinear     train/test/all
                    mixing with nuisance factors, with a known answer
                    (:mod:`.latent`)
``folder``          ``ImageFolder`` layout                                     a sub-folder / all
``cub200``          CUB-200-2011, classes 1-100 / 101-200                      train/test
``cars196``         Stanford Cars, classes 1-98 / 99-196                       train/test
``sop``             Stanford Online Products (``Ebay_*.txt``)                  train/test
``inshop``          In-Shop Clothes (``list_eval_partition.txt``)              train/query/gallery
``mnist``           local MNIST idx files (torchvision reader)                 train/test
``cifar10``         local CIFAR-10 python batches (``verify_md5=``,            train/test
                    ``CONTRASTIVE_VERIFY_MD5=0``, ``--no-verify-md5``)
==================  =========================================================  ===================

``digits`` ships with scikit-learn and ``latent_classes`` is generated; every other set is read
from a local copy under ``root`` and never downloaded -- a missing or malformed copy raises
``FileNotFoundError``/``ValueError`` saying what was expected where. Layout details:
:mod:`.dml`, :mod:`.torchvision_sets`, :mod:`.latent`.

Class-disjoint splits (:mod:`contrastive.splits`). Every set also reads the split names
``"train_classes"`` / ``"test_classes"`` (train on some classes, retrieve among unseen ones) and
the folds of its training classes ``"fold{k}of{K}-train"`` / ``"fold{k}of{K}-val"`` (seed 0;
``"fold{k}of{K}s{seed}-..."`` for another), labels renumbered within the split and ``.classes``
keeping the original ids:

==================  ==========================================================================
name                ``train_classes`` / ``test_classes``
==================  ==========================================================================
``digits``,         all 1797 items: digits 0-5 (1083 items) / digits 6-9 (714 items), a fixed
``digits_image``    partition (the i.i.d. ``train`` / ``test`` stay available by name)
``latent_classes``  all 3200 items: classes 0-99 / 100-199 (the default of ``compare --tune``)
``cub200``,         the benchmark's own ``train`` / ``test`` (already class-disjoint)
``cars196``,
``sop``
``inshop``          ``train`` / -- (evaluate on ``test``: its query set against its gallery)
``mnist``,          ``train`` items of classes 0-4 / ``test`` items of classes 5-9
``cifar10``
``folder``          by the layout under ``root``. ``root/train/<class>/`` with
                    ``root/test/<class>/`` (the README's layout): if they share classes, as
                    ``mnist``: the ``train`` images of the first half of the sorted class names
                    (of both folders) / the ``test`` images of the second half; if they share
                    none, ``train`` / ``test`` as they are (already class-disjoint).
                    ``root/<class>/<image>``: all images, the first half of the sorted classes /
                    the second half. Any other layout: an error naming these two.
==================  ==========================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..registry import Registry
from ..splits import class_disjoint_folds, parse_split_name
from .base import (
    ImageArrayDataset,
    ImageFileDataset,
    LabeledDataset,
    TensorDataset,
    remap_labels,
    subset,
)
from .digits import digits, digits_image
from .dml import cars196, cub200, folder, folder_class_split, inshop, sop
from .latent import latent_classes
from .torchvision_sets import cifar10, mnist

__all__ = [
    "DATASETS",
    "get_dataset",
    "available_datasets",
    "register_dataset",
    "LabeledDataset",
    "TensorDataset",
    "ImageArrayDataset",
    "ImageFileDataset",
    "remap_labels",
    "subset",
    "class_split_sources",
    "digits",
    "digits_image",
    "latent_classes",
    "folder",
    "cub200",
    "cars196",
    "sop",
    "inshop",
    "mnist",
    "cifar10",
]

#: The data sets by name. ``meta``: ``kind`` (``"vector"`` / ``"image"``), ``splits`` (the
#: reader's own), ``class_disjoint`` (train and test share no class: the DML benchmarks'
#: protocol), ``embedded`` (ships with the library's dependencies; every other set needs
#: ``root``) and ``class_split``: how ``"train_classes"`` / ``"test_classes"`` are read --
#: ``{"train": split, "test": split}`` (the reader's splits, items kept by class),
#: ``"test_classes"`` (the held-out class ids; default the second half of the sorted classes)
#: and optionally ``"class_disjoint"`` (overrides the meta key for these splits); or a function
#: of ``root`` returning that dict, for a reader whose layout decides (``folder``).
#: Optional: ``class_disjoint_batch`` (``batch_size`` / ``m_per_class`` a class-disjoint run
#: starts from when the user sets none) and ``known_answer`` (reader keywords that give, item
#: for item, the embedding a perfect encoder would recover: a reference row of the reports).
DATASETS: Registry[LabeledDataset] = Registry("data set")
_DIGITS_SPLIT = {"train": "all", "test": "all", "test_classes": (6, 7, 8, 9)}
#: digits keep 6 training classes (3 per tuning fold): 3 classes x 16 items per batch; sets
#: with many classes use the DML convention of 4 items per class
_FEW_CLASSES_BATCH = {"batch_size": 48, "m_per_class": 16}
_MANY_CLASSES_BATCH = {"batch_size": 64, "m_per_class": 4}
_OWN_SPLIT = {"train": "train", "test": "test"}
for _name, _factory, _aliases, _meta in (
    ("digits", digits, (), {"kind": "vector", "splits": ("train", "test", "all"),
                            "class_disjoint": False, "embedded": True,
                            "class_split": _DIGITS_SPLIT,
                            "class_disjoint_batch": _FEW_CLASSES_BATCH}),
    ("digits_image", digits_image, (), {"kind": "image", "splits": ("train", "test", "all"),
                                        "class_disjoint": False, "embedded": True,
                                        "class_split": _DIGITS_SPLIT,
                                        "class_disjoint_batch": _FEW_CLASSES_BATCH}),
    ("latent_classes", latent_classes, (), {"kind": "vector", "splits": ("train", "test", "all"),
                                            "class_disjoint": False, "embedded": True,
                                            "class_split": {"train": "all", "test": "all"},
                                            "class_disjoint_batch": _MANY_CLASSES_BATCH,
                                            "known_answer": {"view": "latent"}}),
    ("folder", folder, ("imagefolder",), {"kind": "image", "splits": None,
                                          "class_disjoint": None, "embedded": False,
                                          "class_split": folder_class_split}),
    ("cub200", cub200, ("cub",), {"kind": "image", "splits": ("train", "test"),
                                  "class_disjoint": True, "embedded": False,
                                  "class_split": _OWN_SPLIT}),
    ("cars196", cars196, ("cars",), {"kind": "image", "splits": ("train", "test"),
                                     "class_disjoint": True, "embedded": False,
                                     "class_split": _OWN_SPLIT}),
    ("sop", sop, (), {"kind": "image", "splits": ("train", "test"), "class_disjoint": True,
                      "embedded": False, "class_split": _OWN_SPLIT,
                      "class_disjoint_batch": _MANY_CLASSES_BATCH}),
    ("inshop", inshop, ("in_shop",), {"kind": "image", "splits": ("train", "query", "gallery"),
                                      "class_disjoint": True, "embedded": False,
                                      "class_disjoint_batch": _MANY_CLASSES_BATCH,
                                      "class_split": {
                                          "train": "train", "test": None,
                                          "test_hint": "its 'query' split searched against its "
                                          "'gallery' split (split 'test' of the trainer and "
                                          "`contrastive eval`)"}}),
    ("mnist", mnist, (), {"kind": "image", "splits": ("train", "test"), "class_disjoint": False,
                          "embedded": False, "class_split": _OWN_SPLIT}),
    ("cifar10", cifar10, (), {"kind": "image", "splits": ("train", "test"),
                              "class_disjoint": False, "embedded": False,
                              "class_split": _OWN_SPLIT}),
):
    DATASETS.register(_name, _factory, aliases=_aliases, meta=_meta)


def available_datasets() -> list[str]:
    """Registered data set names (sorted; aliases not listed)."""
    return DATASETS.available()


def register_dataset(name: str, factory: Callable[..., LabeledDataset],
                     meta: dict[str, Any] | None = None) -> None:
    """Add ``factory(root, split, transform, **kw)`` under ``name`` (overwriting is refused)."""
    DATASETS.register(name, factory, meta=meta)


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
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    spec = parse_split_name(split)
    entry = DATASETS.get(name)
    if spec is None:
        return entry.factory(root, split=split, transform=transform, **kw)
    src = class_split_sources(name, root)
    if spec.kind == "test_classes":
        return _class_side(name, root, "test", transform, kw, src)
    train = _class_side(name, root, "train", None, kw, src)
    if spec.kind == "train_classes":
        return subset(train, range(len(train)), transform, f"{name}[{split}]")
    tr, va = class_disjoint_folds(train.labels, spec.n_folds, seed=spec.seed)[spec.fold]
    return subset(train, tr if spec.part == "train" else va, transform, f"{name}[{split}]")


def class_split_sources(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """How ``name`` reads ``"train_classes"`` / ``"test_classes"``: ``{"train": split, "test":
    split, "test_classes": ids or None, "class_disjoint": bool}`` (see the module table; optional
    ``"test_hint"``: how to evaluate a set whose ``"test"`` is ``None``). For
    ``folder`` it depends on the layout under ``root`` (:func:`.dml.folder_class_split`)."""
    meta = DATASETS.get(name).meta
    spec = meta.get("class_split")
    out = dict((spec(root) if callable(spec) else spec) or {"train": "all", "test": "all"})
    out.setdefault("test_classes", None)
    out.setdefault("class_disjoint", bool(meta.get("class_disjoint")))
    return out


def _class_side(name: str, root, side: str, transform, kw: dict[str, Any],
                src: dict[str, Any]) -> LabeledDataset:
    """The training (``side="train"``) or test classes of ``name``, read as ``src``
    (:func:`class_split_sources`) says."""
    entry = DATASETS.get(name)
    split = src[side]
    if split is None:
        raise ValueError(f"{name!r} has no {side}_classes split; evaluate on its own test: "
                         f"{src.get('test_hint') or 'its test split (class-disjoint already)'}")
    ds = entry.factory(root, split=split, transform=None, **kw)
    if src["class_disjoint"]:  # the benchmark's own splits are class-disjoint
        return subset(ds, range(len(ds)), transform, f"{name}[{side}_classes]")
    # classes are judged by their original ids, so the partition is the same on both sides
    all_ids = [str(c) for c in ds.classes]  # every reader lists its classes sorted
    test_ids = src["test_classes"]
    if test_ids is None:  # the second half of the classes (the CUB / Cars convention)
        test_ids = all_ids[len(all_ids) - len(all_ids) // 2:]
    held_out = {str(c) for c in test_ids}
    is_test = np.asarray([str(c) in held_out for c in ds.classes], dtype=bool)[ds.labels]
    keep = np.flatnonzero(is_test if side == "test" else ~is_test)
    if keep.size == 0:
        wanted = sorted(held_out) if side == "test" else sorted(set(all_ids) - held_out)
        raise ValueError(f"{name!r} split {split!r} holds no item of the {side} classes "
                         f"{wanted[:10]}{' ...' if len(wanted) > 10 else ''}")
    return subset(ds, keep, transform, f"{name}[{side}_classes]")
