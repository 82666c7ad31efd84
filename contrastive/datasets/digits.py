"""scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``; shipped with
scikit-learn, no download): 1797 images, 10 classes -- the embedded default data set.

Splits: a fixed stratified 70/30 split (``train_test_split(..., stratify=y, random_state=0)``),
1257 train / 540 test items, every class on both sides (so a linear probe trained on ``train``
can be scored on ``test``); ``"all"`` is the whole set in its original order. Note that the
digits splits share classes (unlike the class-disjoint DML benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import ImageArrayDataset, LabeledDataset, TensorDataset, check_split

__all__ = ["digits", "digits_image", "digits_split_indices"]

SPLITS = ("train", "test", "all")


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of ``split`` (sorted ascending for train/test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    check_split(split, SPLITS, "digits")
    y = load_digits().target
    idx = np.arange(y.shape[0])
    if split == "all":
        return idx
    train, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=0)
    return np.sort(train if split == "train" else test)


def _load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] as float32 ``[n, 64]`` and int64 labels of ``split``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = digits_split_indices(split)
    x = (bunch.data[idx] / 16.0).astype(np.float32)
    return x, bunch.target[idx].astype(np.int64)


def digits(
    root=None, split: str = "train", transform: Callable | None = None
) -> TensorDataset:
    """The digits as float32 vectors of 64 pixels in [0, 1] (``kind="vector"``); ``root`` is
    ignored."""
    x, y = _load(split)
    return TensorDataset(torch.from_numpy(x), y, list(range(10)), "vector", transform,
                         f"digits[{split}]")


def digits_image(
    root=None,
    split: str = "train",
    transform: Callable | None = None,
    size: int | None = None,
    as_pil: bool = False,
) -> LabeledDataset:
    """The digits as small grayscale images (``kind="image"``): float32 tensors ``[1, s, s]`` in
    [0, 1] with ``s = size`` (default 8; e.g. ``size=32`` upsamples once, bilinearly, for CNNs),
    or PIL ``"L"`` images when ``as_pil`` (uint8, for PIL-based transforms). ``root`` is
    ignored."""
    x, y = _load(split)
    images = torch.from_numpy(x).reshape(-1, 1, 8, 8)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int (e.g. 32) or None, got {size!r}")
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False).clamp_(0.0, 1.0)
    name = f"digits_image[{split}]"
    if as_pil:
        arr = (images[:, 0] * 255.0).round().to(torch.uint8).numpy()
        return ImageArrayDataset(arr, y, list(range(10)), transform, name)
    return TensorDataset(images.contiguous(), y, list(range(10)), "image", transform, name)
