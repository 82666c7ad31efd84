"""Multiple augmented views per instance, with instance ids as labels, and augmentation presets.

Self-supervised contrastive learning (SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple
Framework for Contrastive Learning of Visual Representations", ICML 2020) treats two random views
of one instance as a positive pair and every other view in the batch as a negative. With instance
ids as labels that is exactly the supervised loss call ``loss(embeddings, labels)``, so the same
losses, critics and trainer serve both regimes:

    views = MultiView(dataset, simclr_augmentation(32), n_views=2)
    loader = DataLoader(views, batch_size=256, shuffle=True, collate_fn=collate_views)
    x, ids = next(iter(loader))            # x [512, 3, 32, 32], ids [512]
    loss = InfoNCE()(model(x), ids)

Augmentations use ``torchvision.transforms.v2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .validation import check_int

__all__ = [
    "MultiView",
    "collate_views",
    "simclr_augmentation",
    "small_image_augmentation",
    "vector_augmentation",
    "VectorAugmentation",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _dataset_labels(dataset: Any) -> np.ndarray:
    """The class labels of a dataset of ``(x, y)``: its ``.labels`` or ``.targets``, else read
    item by item (slow for image sets: give the dataset a ``.labels`` attribute)."""
    for attr in ("labels", "targets"):
        value = getattr(dataset, attr, None)
        if value is not None:
            if isinstance(value, Tensor):
                value = value.cpu().numpy()
            return np.asarray(value, dtype=np.int64)
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"item {i} of the dataset is a {type(item).__name__}, not an (x, y) pair, so it "
                "has no class label; give the dataset a .labels attribute or items (x, y)"
            )
        labels.append(int(item[1]))
    return np.asarray(labels, dtype=np.int64)


def _item_input(item: Any) -> Any:
    """The input ``x`` of a dataset item: the first entry of an ``(x, y, ...)`` tuple or list,
    else the item itself (an unlabelled dataset, e.g. a tensor or array of rows)."""
    return item[0] if isinstance(item, (tuple, list)) else item


class MultiView(Dataset):
    """Wrap a dataset of ``(x, y)`` (or of inputs ``x`` alone, e.g. a tensor of rows): item ``i``
    becomes ``(views [n_views, ...], i)``.

    ``x`` may be a PIL image, a tensor or a numpy vector (numpy arrays are turned into float32
    tensors before ``transform``). ``transform`` is called once per view and must return tensors
    of one shape.

    Labels:
        ``labels``: the instance ids ``0..N-1``, the labels the items carry and the loss sees.
            With them, ``MPerClassSampler(views.labels, m=1, batch_size=B)`` is a plain shuffled,
            distributed-aware batch sampler of distinct instances (or use ``shuffle=True``).
        ``class_labels``: the wrapped dataset's class ids, for evaluation (k-NN, linear probe)
            and for class-balanced batches ``MPerClassSampler(views.class_labels, m, B)`` -- note
            that then same-class instances are negatives of each other under instance-id labels.
    """

    def __init__(self, dataset: Dataset, transform: Callable, n_views: int = 2) -> None:
        if not callable(transform):
            raise TypeError(
                "transform must be a callable producing one random view (e.g. "
                f"simclr_augmentation(32)), got {type(transform).__name__}"
            )
        n_views = check_int(n_views, "n_views", 2, why=" (a positive pair needs 2 views)")
        self.dataset = dataset
        self.transform = transform
        self.n_views = int(n_views)
        self._class_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> np.ndarray:
        """Instance ids ``0..N-1`` (int64): what ``__getitem__`` returns as the label."""
        return np.arange(len(self.dataset), dtype=np.int64)

    @property
    def class_labels(self) -> np.ndarray:
        """The wrapped dataset's class ids (int64), read once and cached."""
        if self._class_labels is None:
            self._class_labels = _dataset_labels(self.dataset)
        return self._class_labels

    @property
    def num_classes(self) -> int:
        """The number of instance ids (the number of "classes" the loss sees)."""
        return len(self.dataset)

    @property
    def kind(self) -> str | None:
        return getattr(self.dataset, "kind", None)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = _item_input(self.dataset[index])
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.asarray(x, dtype=np.float32))
        views = []
        for _ in range(self.n_views):
            v = self.transform(x)
            if not isinstance(v, Tensor):
                raise TypeError(
                    f"transform returned {type(v).__name__}, not a tensor; end it with "
                    "v2.ToImage() and v2.ToDtype(torch.float32, scale=True)"
                )
            views.append(v)
        return torch.stack(views), int(index)

    def __repr__(self) -> str:
        return f"MultiView(n_views={self.n_views}, n={len(self)}, transform={self.transform!r})"


def collate_views(batch: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Collate ``MultiView`` items into ``(x [B * n_views, ...], ids [B * n_views])``.

    View-major order: rows ``v * B : (v + 1) * B`` hold view ``v`` of the ``B`` instances, so
    ``x.chunk(n_views)`` gives aligned per-view batches (paired views for ``ref_emb``) and
    ``ids`` is the ``B`` instance ids tiled ``n_views`` times.
    """
    if len(batch) == 0:
        raise ValueError("batch is empty; collate_views needs at least one MultiView item")
    views = torch.stack([item[0] for item in batch])  # [B, V, ...]
    ids = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.long)
    b, n_views = views.shape[:2]
    x = views.transpose(0, 1).reshape(b * n_views, *views.shape[2:])
    return x, ids.repeat(n_views)


def _check_size(size: int | Sequence[int], name: str = "size") -> int | tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if (
        isinstance(size, Sequence)
        and len(size) == 2
        and all(isinstance(s, int) and s > 0 for s in size)
    ):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {size!r}")


def _check_unit(value: float, name: str, upper: float = 1.0) -> float:
    value = float(value)
    if not 0.0 <= value <= upper:
        raise ValueError(f"{name} must be in [0, {upper}], got {value}")
    return value


def simclr_augmentation(
    size: int | Sequence[int],
    strength: float = 1.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
) -> v2.Compose:
    """The SimCLR view distribution (Chen et al. 2020, appendix A):

    random resized crop to ``size`` (area ``scale``), horizontal flip p=0.5, colour jitter
    (brightness, contrast, saturation ``0.8 s``, hue ``0.2 s`` for ``s = strength``) with p=0.8,
    grayscale p=0.2, Gaussian blur (kernel ~10% of the size, sigma in [0.1, 2]) with p=0.5 when
    ``blur`` (SimCLR leaves it out on CIFAR), then a float tensor in [0, 1] normalised by
    ``mean``/``std``. Inputs: PIL images or image tensors; grayscale is turned into RGB first.
    """
    size = _check_size(size)
    s = _check_unit(strength, "strength", upper=2.5)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 entries (the output is RGB)")
    ops: list = [
        v2.ToImage(),
        v2.RGB(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        side = size if isinstance(size, int) else min(size)
        kernel = max(3, int(0.1 * side) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(ops)


def small_image_augmentation(
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.7, 1.0),
    degrees: float = 10.0,
    translate: float = 0.1,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Mild views for small grayscale digits (8x8 ``digits_image``, MNIST): random resized crop to
    ``size`` keeping ``scale`` of the area (aspect 3/4..4/3), a small affine (rotation up to
    ``degrees``, shift up to ``translate`` of the side), float tensor in [0, 1], optionally
    normalised. No flips or colour changes: they change a digit's identity or do nothing."""
    size = _check_size(size)
    _check_unit(translate, "translate")
    ops: list = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomAffine(degrees=float(degrees), translate=(translate, translate)),
    ]
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std to normalise, or neither")
    if mean is not None:
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    return v2.Compose(ops)


class VectorAugmentation:
    """``x' = x * mask + eps``: feature dropout (each feature zeroed with ``drop_prob``, no
    rescaling -- a masked measurement, not a regulariser) plus Gaussian noise ``eps ~
    N(0, noise_std^2)``. Takes a tensor or numpy vector, returns a float32 tensor."""

    def __init__(self, noise_std: float = 0.1, drop_prob: float = 0.1) -> None:
        noise_std = float(noise_std)
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = noise_std
        self.drop_prob = _check_unit(drop_prob, "drop_prob")
        if self.drop_prob >= 1.0:
            raise ValueError("drop_prob must be < 1 (1 would zero every feature)")

    def __call__(self, x: Tensor | np.ndarray) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if self.drop_prob > 0:
            x = x * (torch.rand_like(x) >= self.drop_prob)
        if self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return x

    def __repr__(self) -> str:
        return f"VectorAugmentation(noise_std={self.noise_std}, drop_prob={self.drop_prob})"


def vector_augmentation(noise_std: float = 0.1, drop_prob: float = 0.1) -> VectorAugmentation:
    """Views of vector data (e.g. the 64-d ``digits``): see :class:`VectorAugmentation`."""
    return VectorAugmentation(noise_std, drop_prob)
