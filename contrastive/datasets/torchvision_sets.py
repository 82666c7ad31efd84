"""MNIST and CIFAR-10 from a local copy (never downloaded), as PIL images with labels.

* ``mnist``: torchvision's ``MNIST(root, download=False)`` reader; it needs the four
  uncompressed idx files ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (``gunzip`` the ``.gz`` downloads). torchvision only checks that they exist.
* ``cifar10``: the "python version" batches ``root/cifar-10-batches-py/{data_batch_1..5,
  test_batch, batches.meta}``. With ``verify_md5=True`` (default) torchvision's ``CIFAR10``
  reader is used, which checks every file against the official MD5 sums; ``verify_md5=False``
  reads the same standard format -- pickled dicts with ``data`` (uint8 ``[n, 3072]``, channel-major
  32x32) and ``labels`` -- with this module's own small reader and no checksums, for re-packed or
  subset copies (and the tests' fake copies). Like torchvision, it unpickles the files: only read
  copies you trust. ``verify_md5=None`` (the default) takes the setting from the environment
  variable ``CONTRASTIVE_VERIFY_MD5`` (``0`` / ``false`` / ``no`` / ``off`` switch the check off;
  unset: on), which the command line's ``--no-verify-md5`` sets for the duration of one command
  (so the trainer, ``compare`` and ``eval`` read a re-packed copy without a reader keyword).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import ImageArrayDataset, check_split, require_root

__all__ = ["mnist", "cifar10", "read_cifar_batches", "verify_md5_default", "CIFAR10_TRAIN",
           "CIFAR10_TEST", "VERIFY_MD5_ENV"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
_CIFAR_DIR = "cifar-10-batches-py"
#: the environment variable behind ``verify_md5=None`` (set by the CLI's ``--no-verify-md5``)
VERIFY_MD5_ENV = "CONTRASTIVE_VERIFY_MD5"
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def verify_md5_default() -> bool:
    """Whether ``cifar10(verify_md5=None)`` checks the MD5 sums: ``CONTRASTIVE_VERIFY_MD5``
    (unset: yes; ``0``/``false``/``no``/``off``: no); any other value is a ValueError."""
    value = os.environ.get(VERIFY_MD5_ENV, "").strip().lower()
    if value in _OFF or value in _ON:
        return value not in _OFF
    raise ValueError(
        f"{VERIFY_MD5_ENV}={os.environ[VERIFY_MD5_ENV]!r}: expected 0 (read a re-packed "
        "CIFAR-10 without its MD5 check) or 1 (check it, the default)"
    )


def mnist(root, split: str = "train", transform: Callable | None = None) -> ImageArrayDataset:
    """MNIST (60000 train / 10000 test 28x28 grayscale digits) as PIL ``"L"`` images."""
    from torchvision.datasets import MNIST

    check_split(split, ("train", "test"), "mnist")
    root = require_root(root, "mnist", "MNIST/raw/")
    if root.name == "raw" and root.parent.name == "MNIST" and not (root / "MNIST").is_dir():
        root = root.parent.parent  # root given as .../MNIST/raw
    elif root.name == "MNIST" and not (root / "MNIST").is_dir():
        root = root.parent  # root given as .../MNIST
    raw = root / "MNIST" / "raw"
    missing = [f for s in ("train", "test") for f in MNIST_FILES[s] if not (raw / f).is_file()]
    if missing and not (root / "MNIST" / "processed").is_dir():
        raise FileNotFoundError(
            f"expected the uncompressed MNIST idx files under {str(raw)!r}; missing {missing}. "
            "Download MNIST (gunzip the .gz files there) and pass the folder holding MNIST/ as "
            "root (--data-dir)"
        )
    try:
        ds = MNIST(str(root), train=split == "train", download=False)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed MNIST files under {str(raw)!r}: {exc}") from exc
    images = ds.data.numpy()
    labels = ds.targets.numpy().astype(np.int64)
    return ImageArrayDataset(images, labels, list(range(10)), transform, f"mnist[{split}]")


def read_cifar_batches(folder: str | Path, names: tuple[str, ...]):
    """Read CIFAR-10 python batches: ``(images uint8 [N, 32, 32, 3], labels int64 [N],
    label_names or None)``, no checksums."""
    folder = Path(folder)
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"expected the CIFAR-10 batch {str(path)!r}")
        with open(path, "rb") as f:
            try:
                entry = pickle.load(f, encoding="latin1")
            except Exception as exc:
                raise ValueError(f"malformed CIFAR-10 batch {str(path)!r}: {exc}") from exc
        if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
            raise ValueError(
                f"malformed CIFAR-10 batch {str(path)!r}: expected a dict with 'data' and 'labels'"
            )
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(entry["labels"]):
            raise ValueError(
                f"malformed CIFAR-10 batch {str(path)!r}: data must be [n, 3072] with n labels, "
                f"got {data.shape} and {len(entry['labels'])} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(int(v) for v in entry["labels"])
    meta = folder / "batches.meta"
    label_names = None
    if meta.is_file():  # optional: without it the classes are the ids 0-9
        with open(meta, "rb") as f:
            try:
                entry = pickle.load(f, encoding="latin1")
            except Exception as exc:
                raise ValueError(f"malformed CIFAR-10 meta file {str(meta)!r}: {exc}") from exc
        if not isinstance(entry, dict):
            raise ValueError(
                f"malformed CIFAR-10 meta file {str(meta)!r}: expected a dict with 'label_names', "
                f"got {type(entry).__name__}"
            )
        label_names = entry.get("label_names")
        if label_names is not None and (
                not isinstance(label_names, (list, tuple))
                or len(label_names) <= max(labels, default=-1)):
            raise ValueError(
                f"malformed CIFAR-10 meta file {str(meta)!r}: 'label_names' must list a name for "
                f"every class id in the batches (0-{max(labels, default=0)}), got "
                f"{str(label_names)[:80]}"
            )
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, np.int64), label_names


def cifar10(
    root, split: str = "train", transform: Callable | None = None,
    verify_md5: bool | None = None,
) -> ImageArrayDataset:
    """CIFAR-10 (50000 train / 10000 test 32x32 colour images, 10 classes) as PIL RGB images.
    ``verify_md5``: check the official MD5 sums (torchvision's reader) or not (``False``: a
    re-packed copy in the same format); ``None``: ``CONTRASTIVE_VERIFY_MD5`` decides, on unless
    it is ``0`` (the command line's ``--no-verify-md5``)."""
    check_split(split, ("train", "test"), "cifar10")
    if verify_md5 is None:
        verify_md5 = verify_md5_default()
    root = require_root(root, "cifar10", f"{_CIFAR_DIR}/")
    if root.name == _CIFAR_DIR and not (root / _CIFAR_DIR).is_dir():
        root = root.parent
    folder = root / _CIFAR_DIR
    names = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
    # torchvision checks all six batches and the meta file whichever split is asked for
    needed = (*CIFAR10_TRAIN, *CIFAR10_TEST, "batches.meta") if verify_md5 else names
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected the CIFAR-10 python batches under {str(folder)!r}; missing {missing}. "
            "Download cifar-10-python.tar.gz, extract it there and pass its parent folder as "
            "root (--data-dir)"
        )
    if verify_md5:
        from torchvision.datasets import CIFAR10

        try:
            ds = CIFAR10(str(root), train=split == "train", download=False)
        except RuntimeError as exc:
            raise ValueError(
                f"the CIFAR-10 files under {str(folder)!r} fail torchvision's MD5 check ({exc}); "
                "they are not the official release. To read a re-packed copy in the same format "
                "without checksums, add --no-verify-md5 to the command (or set "
                f"{VERIFY_MD5_ENV}=0); from Python pass verify_md5=False "
                "(get_dataset('cifar10', root, split, verify_md5=False)). Or extract the "
                "official cifar-10-python.tar.gz there"
            ) from exc
        images, labels, classes = ds.data, np.asarray(ds.targets, np.int64), list(ds.classes)
    else:
        images, labels, classes = read_cifar_batches(folder, names)
        classes = list(classes) if classes is not None else list(range(10))
    return ImageArrayDataset(images, labels, classes, transform, f"cifar10[{split}]")
