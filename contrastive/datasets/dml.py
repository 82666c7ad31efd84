"""Readers for image folders and the standard deep-metric-learning benchmarks, from local copies.

Splits are the standard class-disjoint ones of the DML literature (Oh Song et al., "Deep Metric
Learning via Lifted Structured Feature Embedding", CVPR 2016): train on one half of the classes,
test retrieval on the unseen other half.

=============  =====================================================  ============================
name           layout under ``root``                                  splits
=============  =====================================================  ============================
``folder``     ``<split>/<class>/<image>`` (or ``<class>/<image>``     ``<split>`` = a sub-folder;
               with ``split="all"``)                                   ``"all"`` = root itself
``cub200``     ``CUB_200_2011/images.txt``,                           train: classes 1-100,
               ``image_class_labels.txt``, ``images/...``             test: 101-200
``cars196``    ``cars_annos.mat`` + ``car_ims/`` (the all-images       train: classes 1-98,
               release), or the devkit release ``devkit/              test: 99-196
               cars_train_annos.mat`` + ``cars_train/`` with
               ``cars_test_annos_withlabels.mat`` + ``cars_test/``
``sop``        ``Stanford_Online_Products/Ebay_{train,test}.txt``     by the split files
``inshop``     ``list_eval_partition.txt`` (or ``Eval/...``) and       train / query / gallery by
               ``img/...`` (or ``Img/img/...``)                        the split file
=============  =====================================================  ============================

For ``cub200``, ``sop`` the folder named first may be ``root`` itself; ``cars196`` also finds
torchvision's ``root/stanford_cars/`` (the devkit release). Index files may start with a UTF-8
byte-order mark, CUB's with a header line; the path columns of CUB and SOP may hold spaces. The
split is by the official class ids (CUB 1-200, Cars 1-196): an id outside them (a 0-based
re-export) is a ``ValueError`` naming the file, never a silently shifted split. In-Shop has no
``"test"`` list: its test is ``"query"`` searched against ``"gallery"``. Labels are remapped to
``0..C-1`` within a split (``.classes[k]`` is the original id); In-Shop query and gallery share
one mapping so their labels match. Only the split's first image is checked at construction
(a full scan of 120k files would be slow on network disks); a missing image later raises
``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .base import ImageFileDataset, check_split, find_first, remap_labels, require_root

__all__ = ["folder", "folder_class_split", "FOLDER_LAYOUTS", "cub200", "cars196", "sop",
           "inshop"]


def _numbered_rows(path: Path, ncols: int, what: str,
                   maxsplit: int = -1) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of the whitespace-separated rows with at least ``ncols`` fields
    (blank lines skipped; a UTF-8 byte-order mark is dropped). With ``maxsplit`` the last field
    is the rest of the line, so a path in it may hold spaces."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split(maxsplit=maxsplit)
            if not fields:
                continue
            fields[-1] = fields[-1].rstrip()
            if len(fields) < ncols:
                raise ValueError(
                    f"malformed {what} {str(path)!r}: line {lineno} has {len(fields)} fields, "
                    f"expected {ncols}"
                )
            rows.append((lineno, fields))
    return rows


def _read_rows(path: Path, ncols: int, what: str, maxsplit: int = -1) -> list[list[str]]:
    """The fields of :func:`_numbered_rows`."""
    return [fields for _, fields in _numbered_rows(path, ncols, what, maxsplit)]


def _is_int(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _check_class_ids(raw: np.ndarray, lo: int, hi: int, source: str, name: str,
                     hint: str) -> None:
    """The benchmark's class ids are ``lo..hi`` and its split is by id: an id outside (a 0-based
    re-export, another data set's file) would move classes across the split silently."""
    bad = raw[(raw < lo) | (raw > hi)]
    if bad.size:
        raise ValueError(
            f"malformed {source}: {name} class ids are {lo}-{hi} (the official release's; the "
            f"train/test split is by id), got {sorted(set(bad.tolist()))[:5]}. Use the "
            f"official index files. {hint}"
        )


def _check_first_image(paths: list[str], name: str, hint: str) -> None:
    if not paths:
        raise ValueError(f"{name}: the split has no images; is the index file complete?")
    if not os.path.isfile(paths[0]):
        raise FileNotFoundError(f"{name}: expected the image {paths[0]!r}. {hint}")


def _labelled_images(
    paths: list[str], raw: np.ndarray, name: str, split: str, hint: str,
    transform: Callable | None, train_classes: int | None = None,
) -> ImageFileDataset:
    """The data set of ``paths`` with class ids ``raw`` (remapped to 0..C-1), its first image
    checked. ``train_classes``: the class-disjoint protocol (classes ``1..train_classes`` train,
    the rest test); only ``split``'s images are kept."""
    if train_classes is not None:
        keep = raw <= train_classes if split == "train" else raw > train_classes
        paths = [p for p, k in zip(paths, keep) if k]
        raw = raw[keep]
    y, classes = remap_labels(raw)
    _check_first_image(paths, name, hint)
    return ImageFileDataset(paths, y, classes, transform, f"{name}[{split}]")


# -- ImageFolder ---------------------------------------------------------------------------------


def folder(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """An ``ImageFolder``-style tree: ``root/<split>/<class>/<image>``, or ``root/<class>/<image>``
    with ``split="all"``. Classes are the sorted sub-folder names; files with torchvision's image
    extensions are used (sorted), in nested folders too."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    base = require_root(root, "folder", "one sub-folder per class")
    directory = base if split == "all" else base / split
    if not directory.is_dir():
        raise FileNotFoundError(
            f"expected class folders under {str(directory)!r} (layout "
            f"root/<split>/<class>/<image>); pass split='all' to use {str(base)!r}/<class>/<image>"
            " directly"
        )
    try:
        classes, class_to_idx = find_classes(str(directory))
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"expected one sub-folder per class with images ({', '.join(IMG_EXTENSIONS)}) under "
            f"{str(directory)!r}: {exc}"
        ) from exc
    paths = [p for p, _ in samples]
    labels = np.array([c for _, c in samples], dtype=np.int64)
    return ImageFileDataset(paths, labels, classes, transform, f"folder[{split}]")


#: The layouts the class-level split names of ``folder`` read (:func:`folder_class_split`).
FOLDER_LAYOUTS = (
    "root/train/<class>/<image> with root/test/<class>/<image> (the train/test layout), or "
    "root/<class>/<image> (one folder of class folders)"
)


def _class_folders(directory: Path) -> list[str]:
    """The sorted class folder names under ``directory`` (torchvision's ``find_classes``; hidden
    folders skipped); empty when there is none."""
    from torchvision.datasets.folder import find_classes

    try:
        return list(find_classes(str(directory))[0])
    except FileNotFoundError:
        return []


def folder_class_split(root) -> dict[str, Any]:
    """How ``folder`` reads the class-level split names under ``root`` (the
    :func:`contrastive.datasets.class_split_sources` dict), by its layout:

    * ``root/train/<class>/`` and ``root/test/<class>/`` (the layout of ``split="train"`` /
      ``"test"``): when the two hold different classes (a class-disjoint copy, as CUB and Cars
      are usually laid out) they are used as they are (``class_disjoint``); when they share
      classes it is the MNIST / CIFAR-10 rule: the ``train`` images of the first half of the
      sorted class names (of both folders together, so the two sides never share a class) and
      the ``test`` images of the second half.
    * ``root/<class>/<image>`` (``split="all"``): all images, the first half of the sorted classes
      / the second half.

    Anything else (only one of ``train/``, ``test/``; no class folder) is a
    ``FileNotFoundError`` naming both layouts."""
    base = require_root(root, "folder", FOLDER_LAYOUTS)
    present = [s for s in ("train", "test") if (base / s).is_dir()]
    if len(present) == 2:
        train, test = _class_folders(base / "train"), _class_folders(base / "test")
        for side, names in (("train", train), ("test", test)):
            if not names:
                raise FileNotFoundError(
                    f"folder: {str(base / side)!r} holds no class folder; the class-level splits "
                    f"read {FOLDER_LAYOUTS}"
                )
        if not set(train) & set(test):
            return {"train": "train", "test": "test", "class_disjoint": True}
        classes = sorted(set(train) | set(test))
        return {"train": "train", "test": "test",
                "test_classes": classes[len(classes) - len(classes) // 2:]}
    if present:
        missing = "test" if present == ["train"] else "train"
        raise FileNotFoundError(
            f"folder: {str(base)!r} holds {present[0]}/ but no {missing}/, so it is neither of the "
            f"layouts the class-level splits read: {FOLDER_LAYOUTS}"
        )
    if not _class_folders(base):
        raise FileNotFoundError(
            f"folder: {str(base)!r} holds no class folder; the class-level splits read "
            f"{FOLDER_LAYOUTS}"
        )
    return {"train": "all", "test": "all"}


# -- CUB-200-2011 --------------------------------------------------------------------------------

_CUB_HINT = (
    "Download CUB_200_2011.tgz (Caltech-UCSD Birds-200-2011), extract it and pass its parent "
    "folder as root (--data-dir)"
)


def cub200(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """CUB-200-2011, class-disjoint: train = classes 1-100 (5864 images), test = 101-200
    (5924)."""
    check_split(split, ("train", "test"), "cub200")
    root = require_root(root, "cub200", "CUB_200_2011/images.txt")
    index = find_first([root / "CUB_200_2011" / "images.txt", root / "images.txt"],
                       f"CUB_200_2011/images.txt under {str(root)!r}", _CUB_HINT)
    base = index.parent
    label_file = base / "image_class_labels.txt"
    if not label_file.is_file():
        raise FileNotFoundError(f"expected {str(label_file)!r} next to images.txt. {_CUB_HINT}")
    images = _cub_table(index, "CUB images.txt")
    labels = _cub_table(label_file, "CUB image_class_labels.txt")
    if images.keys() != labels.keys():
        missing = sorted(images.keys() ^ labels.keys())[:5]
        raise ValueError(
            f"malformed CUB index: images.txt and image_class_labels.txt list different image ids "
            f"(e.g. {missing})"
        )
    ids = sorted(images)
    classes = {}
    for i in ids:
        lineno, value = labels[i]
        if not _is_int(value):
            raise ValueError(
                f"malformed CUB image_class_labels.txt {str(label_file)!r}: line {lineno} gives "
                f"the class {value!r}, expected an integer class id (1-200)"
            )
        classes[i] = int(value)
    raw = np.array([classes[i] for i in ids], dtype=np.int64)
    _check_class_ids(raw, 1, 200, f"CUB image_class_labels.txt {str(label_file)!r}", "CUB",
                     _CUB_HINT)
    paths = [str(base / "images" / images[i][1]) for i in ids]
    return _labelled_images(paths, raw, "cub200", split, _CUB_HINT, transform, 100)


def _cub_table(path: Path, what: str) -> dict[int, tuple[int, str]]:
    """``{image_id: (line number, rest of the line)}`` of a CUB index file; a header line (a first
    row that does not start with an image id) is skipped."""
    rows = _numbered_rows(path, 2, what, maxsplit=1)
    if rows and not _is_int(rows[0][1][0]):
        rows = rows[1:]
    out = {}
    for lineno, (key, value) in rows:
        if not _is_int(key):
            raise ValueError(
                f"malformed {what} {str(path)!r}: line {lineno} starts with {key!r}, expected "
                "an integer image id"
            )
        out[int(key)] = (lineno, value)
    return out


# -- Cars196 -------------------------------------------------------------------------------------

_CARS_HINT = (
    "Use the Stanford Cars release with cars_annos.mat and car_ims/ (or the devkit release: "
    "devkit/cars_train_annos.mat, cars_train/, cars_test_annos_withlabels.mat, cars_test/) and "
    "pass its folder as root (--data-dir)"
)


def _mat_annotations(path: Path, fields: tuple[str, ...]) -> dict[str, list]:
    """The ``annotations`` struct array of a Stanford Cars ``.mat`` file as lists per field."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("reading Cars196 needs scipy (pip install scipy)") from exc
    try:
        # scipy raises MatReadError (truncated or empty), IndexError (not a MAT file at all),
        # OSError, ValueError, ... depending on how the file is broken: any of them is a
        # malformed copy, reported with the file's name
        contents = loadmat(str(path), squeeze_me=True)
    except Exception as exc:
        raise ValueError(
            f"malformed {str(path)!r}: not a readable MATLAB .mat file "
            f"({type(exc).__name__}: {exc}); is the download complete? {_CARS_HINT}"
        ) from exc
    if "annotations" not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ValueError(f"malformed {str(path)!r}: no 'annotations' struct (it holds {found})")
    ann = np.atleast_1d(contents["annotations"])
    names = ann.dtype.names or ()
    absent = [f for f in fields if f not in names]
    if absent:
        raise ValueError(
            f"malformed {str(path)!r}: annotations lack fields {absent} (have {list(names)})"
        )
    try:
        return {f: [np.asarray(v).item() for v in ann[f]] for f in fields}
    except (ValueError, TypeError) as exc:  # a field holding arrays instead of one value each
        raise ValueError(
            f"malformed {str(path)!r}: annotations fields {list(fields)} must hold one value per "
            f"image ({exc})"
        ) from exc


def cars196(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """Stanford Cars (Cars196), class-disjoint: train = classes 1-98 (8054 images), test = 99-196
    (8131), over all 16185 images regardless of the release's own train/test flag."""
    check_split(split, ("train", "test"), "cars196")
    root = require_root(root, "cars196", "cars_annos.mat and car_ims/")
    nested = root / "stanford_cars"  # torchvision's StanfordCars keeps the devkit release here
    if not any((d / f).is_file() for d in (root, root / "devkit")
               for f in ("cars_annos.mat", "cars_train_annos.mat")) and nested.is_dir():
        root = nested
    if (root / "cars_annos.mat").is_file():
        ann = _mat_annotations(root / "cars_annos.mat", ("relative_im_path", "class"))
        paths = [str(root / p) for p in ann["relative_im_path"]]
        raw = np.array(ann["class"], dtype=np.int64)
        _check_class_ids(raw, 1, 196, repr(str(root / "cars_annos.mat")), "Cars196", _CARS_HINT)
    elif (root / "devkit" / "cars_train_annos.mat").is_file():
        test_mat = find_first(
            [root / "cars_test_annos_withlabels.mat",
             root / "devkit" / "cars_test_annos_withlabels.mat"],
            f"the test labels cars_test_annos_withlabels.mat under {str(root)!r}", _CARS_HINT)
        paths, raw_list = [], []
        for mat, folder_name in ((root / "devkit" / "cars_train_annos.mat", "cars_train"),
                                 (test_mat, "cars_test")):
            ann = _mat_annotations(mat, ("fname", "class"))
            paths += [str(root / folder_name / f) for f in ann["fname"]]
            _check_class_ids(np.array(ann["class"], dtype=np.int64), 1, 196, repr(str(mat)),
                             "Cars196", _CARS_HINT)
            raw_list += ann["class"]
        raw = np.array(raw_list, dtype=np.int64)
    else:
        raise FileNotFoundError(
            f"expected cars_annos.mat (or devkit/cars_train_annos.mat, or torchvision's "
            f"stanford_cars/devkit/cars_train_annos.mat) under {str(root)!r}. "
            f"{_CARS_HINT}"
        )
    return _labelled_images(paths, raw, "cars196", split, _CARS_HINT, transform, 98)


# -- Stanford Online Products -------------------------------------------------------------------

_SOP_HINT = (
    "Download Stanford_Online_Products.zip, extract it and pass its parent folder as root "
    "(--data-dir)"
)


def sop(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """Stanford Online Products by ``Ebay_train.txt`` (11318 classes, 59551 images) and
    ``Ebay_test.txt`` (11316 classes, 60502 images); ``.super_labels`` holds the 12 super-class
    ids (remapped to 0..11)."""
    check_split(split, ("train", "test"), "sop")
    root = require_root(root, "sop", "Stanford_Online_Products/Ebay_train.txt")
    fname = f"Ebay_{split}.txt"
    index = find_first([root / "Stanford_Online_Products" / fname, root / fname],
                       f"Stanford_Online_Products/{fname} under {str(root)!r}", _SOP_HINT)
    rows = _read_rows(index, 4, f"SOP {fname}", maxsplit=3)
    if rows and not rows[0][0].isdigit():
        rows = rows[1:]  # header: image_id class_id super_class_id path
    try:
        raw = np.array([int(r[1]) for r in rows], dtype=np.int64)
        raw_super = np.array([int(r[2]) for r in rows], dtype=np.int64)
    except ValueError as exc:
        raise ValueError(f"malformed {str(index)!r}: class ids must be integers ({exc})") from exc
    paths = [str(index.parent / r[3]) for r in rows]
    ds = _labelled_images(paths, raw, "sop", split, _SOP_HINT, transform)
    ds.super_labels = remap_labels(raw_super)[0]
    return ds


# -- In-Shop Clothes Retrieval ------------------------------------------------------------------

_INSHOP_HINT = (
    "Get the DeepFashion In-shop Clothes Retrieval Benchmark (Eval/list_eval_partition.txt and "
    "Img/img/...) and pass its folder as root (--data-dir)"
)
_INSHOP_SPLITS = ("train", "query", "gallery")
#: In-Shop has no 'test' list: what its test is and how to read it
INSHOP_TEST = (
    "'inshop' has no 'test' split: its test is the 'query' split searched against the "
    "'gallery' split (class-disjoint from 'train'); read both (split='query' and "
    "split='gallery'), as the trainer and `contrastive eval --split test` do"
)


def _inshop_rows(path: Path) -> list[list[str]]:
    """Rows ``(image_name, item_id, evaluation_status)``; the count line and the header are
    skipped, and the count, when present, must match."""
    rows = _read_rows(path, 1, "In-Shop list_eval_partition.txt")
    expected = None
    if rows and len(rows[0]) == 1 and rows[0][0].isdigit():
        expected = int(rows[0][0])
        rows = rows[1:]
    if rows and rows[0][0] == "image_name":
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 3]
    if bad:
        raise ValueError(
            f"malformed {str(path)!r}: rows need 'image_name item_id evaluation_status', got "
            f"{bad[0]}"
        )
    if expected is not None and expected != len(rows):
        raise ValueError(
            f"malformed {str(path)!r}: its first line says {expected} images but it lists "
            f"{len(rows)}; is the file truncated?"
        )
    statuses = {r[2] for r in rows} - set(_INSHOP_SPLITS)
    if statuses:
        raise ValueError(f"malformed {str(path)!r}: unknown evaluation_status {sorted(statuses)}")
    return rows


def inshop(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """In-Shop Clothes Retrieval by ``list_eval_partition.txt``: train (3997 items, 25882
    images), query (14218 images) and gallery (12612 images) of the 3985 test items. Query and
    gallery labels come from one mapping (the sorted item ids of both) so they match."""
    if split == "test":
        raise ValueError(INSHOP_TEST)
    check_split(split, _INSHOP_SPLITS, "inshop")
    root = require_root(root, "inshop", "list_eval_partition.txt")
    index = find_first(
        [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"],
        f"list_eval_partition.txt under {str(root)!r}", _INSHOP_HINT)
    rows = _inshop_rows(index)
    chosen = [r for r in rows if r[2] == split]
    if not chosen:
        raise ValueError(f"{str(index)!r} lists no {split!r} images")
    first = chosen[0][0]
    bases = [index.parent, index.parent / "Img", index.parent.parent / "Img", index.parent.parent]
    image_base = next((d for d in bases if (d / first).is_file()), None)
    if image_base is None:
        tried = ", ".join(repr(str(d)) for d in bases)
        raise FileNotFoundError(
            f"expected the image {first!r} (listed in list_eval_partition.txt) under one of "
            f"{tried}. {_INSHOP_HINT}"
        )
    scope = ("train",) if split == "train" else ("query", "gallery")
    shared = sorted({r[1] for r in rows if r[2] in scope})
    y, classes = remap_labels([r[1] for r in chosen], shared)
    paths = [str(image_base / r[0]) for r in chosen]
    return ImageFileDataset(paths, y, classes, transform, f"inshop[{split}]")
