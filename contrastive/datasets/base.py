"""Dataset containers shared by every reader: items are ``(x, y)`` with ``y`` an ``int`` and every
dataset carries ``.labels`` (int64 numpy array, for the sampler and the evaluation),
``.num_classes``, ``.classes`` (names or original ids, index = label) and ``.kind``
(``"vector"`` or ``"image"``).

Images are loaded lazily with PIL and converted to RGB (or kept as ``"L"`` for MNIST-style
arrays); ``transform`` is applied to ``x`` only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "LabeledDataset",
    "TensorDataset",
    "ImageFileDataset",
    "ImageArrayDataset",
    "remap_labels",
    "check_split",
    "require_root",
    "find_first",
    "subset",
]

KINDS = ("vector", "image")


def remap_labels(raw: Sequence[Any], classes: Sequence[Any] | None = None):
    """Map raw class ids or names to ``0..C-1``: ``(labels int64 [N], classes [C])``.

    ``classes`` defaults to the sorted distinct values of ``raw``; pass it to share one mapping
    between two splits (In-Shop query and gallery). Label ``k`` stands for ``classes[k]``.
    """
    raw_arr = np.asarray(raw)
    if classes is None:
        classes_arr, labels = np.unique(raw_arr, return_inverse=True)
    else:
        classes_arr = np.asarray(classes)
        labels = np.searchsorted(classes_arr, raw_arr)
        labels = np.clip(labels, 0, max(classes_arr.size - 1, 0))
        if raw_arr.size and not np.all(classes_arr[labels] == raw_arr):
            raise ValueError("a raw label is missing from the given classes")
    return labels.astype(np.int64).reshape(-1), classes_arr.tolist()


def check_split(split: str, allowed: Sequence[str], dataset: str) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)} for {dataset!r}, got {split!r}")
    return split


def require_root(root: str | os.PathLike | None, dataset: str, expected: str) -> Path:
    """``root`` as a Path that exists; a clear error otherwise."""
    if root is None:
        raise ValueError(
            f"root is required for {dataset!r}: pass root= (or --data-dir) pointing at the folder "
            f"that holds {expected}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"root {str(path)!r} for {dataset!r} is not a directory; expected {expected} there"
        )
    return path


def find_first(candidates: Sequence[Path], what: str, hint: str) -> Path:
    """The first existing path among ``candidates``; FileNotFoundError naming them all."""
    for path in candidates:
        if path.exists():
            return path
    tried = ", ".join(repr(str(c)) for c in candidates)
    raise FileNotFoundError(f"expected {what}; looked for {tried}. {hint}")


class LabeledDataset(Dataset):
    """Base class: ``labels`` (int64 [N]), ``classes`` (label -> name/original id), ``kind``,
    ``transform``; subclasses implement :meth:`load`."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[Any] | None = None,
        kind: str = "image",
        transform: Callable | None = None,
        name: str = "",
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.labels = labels
        self.classes = (
            list(classes) if classes is not None else list(range(int(labels.max(initial=-1)) + 1))
        )
        self.kind = kind
        self.transform = transform
        self.name = name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, index: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name or 'dataset'} of size {n}")
        index = int(index) % n
        x = self.load(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, kind={self.kind!r})"
        )


class TensorDataset(LabeledDataset):
    """In-memory tensors ``data [N, ...]`` (vectors or small images) with labels."""

    def __init__(self, data: Tensor, labels, classes=None, kind="vector", transform=None, name=""):
        super().__init__(labels, classes, kind, transform, name)
        if data.shape[0] != self.labels.shape[0]:
            raise ValueError(f"data has {data.shape[0]} rows but labels {self.labels.shape[0]}")
        self.data = data

    def load(self, index: int) -> Tensor:
        return self.data[index]


class ImageArrayDataset(LabeledDataset):
    """In-memory uint8 images ``[N, H, W]`` (mode ``"L"``) or ``[N, H, W, 3]`` (``"RGB"``),
    returned as PIL images (as torchvision's MNIST and CIFAR-10 do)."""

    def __init__(self, images: np.ndarray, labels, classes=None, transform=None, name=""):
        super().__init__(labels, classes, "image", transform, name)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} "
                f"{images.shape}"
            )
        if images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {self.labels.shape[0]} labels")
        self.images = images

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


class ImageFileDataset(LabeledDataset):
    """Image files read lazily with PIL and converted to RGB."""

    def __init__(self, paths: Sequence[str | os.PathLike], labels, classes=None, transform=None,
                 name=""):
        super().__init__(labels, classes, "image", transform, name)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != self.labels.shape[0]:
            raise ValueError(f"{len(self.paths)} paths but {self.labels.shape[0]} labels")

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"image {path!r} of {self.name or 'the dataset'} (item {index}) is missing; "
                "is the copy complete?"
            ) from exc


def subset(ds: LabeledDataset, indices, transform: Callable | None = None,
           name: str = "") -> LabeledDataset:
    """The items ``indices`` of ``ds`` as a data set of the same kind, its labels renumbered
    ``0..C'-1`` over the classes that remain and ``.classes`` keeping their original names / ids
    (so :func:`contrastive.app.protocol.class_disjoint` can compare two subsets); a
    ``.super_labels`` array (SOP) is kept item for item. The data are
    shared or sliced, never copied from disk; ``transform`` replaces ``ds.transform``."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    kept = np.unique(ds.labels[idx])
    labels = np.searchsorted(kept, ds.labels[idx]).astype(np.int64)
    classes = [ds.classes[int(c)] for c in kept]
    name = name or f"{ds.name}[subset]"
    if isinstance(ds, TensorDataset):
        out = TensorDataset(ds.data[idx], labels, classes, ds.kind, transform, name)
    elif isinstance(ds, ImageArrayDataset):
        out = ImageArrayDataset(ds.images[idx], labels, classes, transform, name)
    elif isinstance(ds, ImageFileDataset):
        out = ImageFileDataset([ds.paths[i] for i in idx], labels, classes, transform, name)
    else:
        out = _Subset(ds, idx, labels, classes, transform, name)
    super_labels = getattr(ds, "super_labels", None)  # SOP's super-classes, item by item
    if super_labels is not None:
        out.super_labels = np.asarray(super_labels, dtype=np.int64)[idx]
    return out


class _Subset(LabeledDataset):
    """Items of another :class:`LabeledDataset`, loaded through it (its transform not applied)."""

    def __init__(self, base: LabeledDataset, idx: np.ndarray, labels, classes, transform, name):
        super().__init__(labels, classes, base.kind, transform, name)
        self.base, self.idx = base, idx

    def load(self, index: int) -> Any:
        return self.base.load(int(self.idx[index]))
