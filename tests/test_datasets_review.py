"""Review of the data-set readers against the official layouts of CUB-200-2011, Cars196, SOP,
In-Shop, MNIST and CIFAR-10 (tiny fake copies in tmp_path; nothing is downloaded): index files
as the official releases or common re-exports write them (a byte-order mark, a header line,
paths with spaces), class ids outside the benchmark's range (a 0-based re-export would shift
the class-disjoint split silently), torchvision's Stanford Cars layout, and a re-packed
CIFAR-10 from the command line (``--no-verify-md5``)."""

from __future__ import annotations

import os
import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from test_datasets import (
    make_cifar,
    make_cub,
    make_inshop,
    make_mnist,
    make_sop,
    struct_array,
    write_image,
)

from contrastive.datasets import get_dataset

ROOT = Path(__file__).resolve().parents[1]


# -- index files: byte-order marks, headers, spaces --------------------------------------------


def test_cub_index_files_with_a_byte_order_mark_are_read(tmp_path):
    """Files saved by Windows editors start with U+FEFF; the first image id was read as
    '\\ufeff1' and did not match image_class_labels.txt."""
    base = make_cub(tmp_path)
    for name in ("images.txt", "image_class_labels.txt"):
        path = base / name
        path.write_text("\ufeff" + path.read_text(), encoding="utf-8")
    train = get_dataset("cub200", root=tmp_path, split="train")
    assert train.classes == [1, 2, 100] and train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.paths[0].endswith("001.Bird_1/img_1.jpg")


def test_cub_paths_with_spaces_are_read_whole(tmp_path):
    """images.txt is '<image_id> <path>': a path with a space was cut at the space."""
    base = make_cub(tmp_path)
    (base / "images" / "002.Bird_2").rename(base / "images" / "002.Bird 2")
    index = base / "images.txt"
    index.write_text(index.read_text().replace("002.Bird_2", "002.Bird 2"))
    train = get_dataset("cub200", root=tmp_path, split="train")
    assert train.paths[1].endswith("002.Bird 2/img_2.jpg")
    img, y = train[1]
    assert img.size == (6, 5) and y == 1 and train.classes[y] == 2


def test_sop_paths_with_spaces_are_read_whole(tmp_path):
    """Ebay_*.txt is 'image_id class_id super_class_id path': a path with a space was cut at
    the space and, not being the split's first image, not noticed until training read it."""
    base = make_sop(tmp_path)
    index = base / "Ebay_train.txt"
    index.write_text(index.read_text().replace("chair_final/222_0.JPG", "chair final/222 0.JPG"))
    write_image(base / "chair final" / "222 0.JPG", (3, 0, 0), fmt="JPEG")
    train = get_dataset("sop", root=tmp_path, split="train")
    assert train.paths[2] == str(base / "chair final" / "222 0.JPG")
    assert train.labels.tolist() == [0, 0, 1, 1] and train.super_labels.tolist() == [0, 0, 1, 1]
    img, _ = train[2]
    assert abs(img.getpixel((0, 0))[0] - 3) <= 3


def test_cub_header_line_is_skipped(tmp_path):
    """A re-exported index with a header line ('image_id class_id') was reported as
    'different image ids' (['image_id'])."""
    base = make_cub(tmp_path)
    for name, header in (("images.txt", "image_id path"),
                         ("image_class_labels.txt", "image_id class_id")):
        path = base / name
        path.write_text(header + "\n" + path.read_text())
    test = get_dataset("cub200", root=tmp_path, split="test")
    assert test.classes == [101, 150, 200] and len(test) == 6


def test_cub_non_integer_class_id_names_the_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    path = base / "image_class_labels.txt"
    lines = path.read_text().splitlines()
    lines[3] = "4 Bird_100"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt.*line 4.*Bird_100"):
        get_dataset("cub200", root=tmp_path)


# -- class ids outside the benchmark's range ---------------------------------------------------


def test_cub_zero_based_class_ids_are_refused(tmp_path):
    """Official CUB ids are 1-200 and the split is 1-100 / 101-200; a 0-based re-export (0-199)
    silently put 101 classes in train and 99 in test."""
    make_cub(tmp_path, classes=(0, 1, 99, 100, 150, 199))
    with pytest.raises(ValueError, match=r"image_class_labels\.txt.*1-200.*0"):
        get_dataset("cub200", root=tmp_path, split="train")
    make_cub(tmp_path / "b", classes=(1, 2, 201))
    with pytest.raises(ValueError, match=r"1-200.*201"):
        get_dataset("cub200", root=tmp_path / "b", split="test")


def _cars_annos(root, classes, dtype=np.uint8):
    from scipy.io import savemat

    paths = [f"car_ims/{i:06d}.jpg" for i in range(1, len(classes) + 1)]
    for p in paths:
        write_image(root / p, (1, 0, 0), fmt="JPEG")
    savemat(root / "cars_annos.mat", {"annotations": struct_array(
        relative_im_path=paths, **{"class": [dtype(c) for c in classes]},
        test=[0] * len(classes))})


def test_cars_class_ids_outside_1_to_196_are_refused(tmp_path):
    """Cars ids are 1-196 (train 1-98): a 0-based copy (0-195) silently moved class 98 to
    train."""
    _cars_annos(tmp_path, [0, 97, 98, 195])
    with pytest.raises(ValueError, match=r"cars_annos\.mat.*1-196.*0"):
        get_dataset("cars196", root=tmp_path, split="train")
    _cars_annos(tmp_path / "b", [1, 98, 99, 300], dtype=np.uint16)
    with pytest.raises(ValueError, match=r"1-196.*300"):
        get_dataset("cars196", root=tmp_path / "b", split="test")
    # the official uint8 ids read as they are
    _cars_annos(tmp_path / "c", [1, 98, 99, 196])
    test = get_dataset("cars196", root=tmp_path / "c", split="test")
    assert test.classes == [99, 196] and test.labels.dtype == np.int64


def test_cars_torchvision_layout_is_found(tmp_path):
    """torchvision's StanfordCars keeps the devkit release under root/stanford_cars/; pointing
    --data-dir at its root said 'expected cars_annos.mat'."""
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)

    def annos(fnames, classes):
        return {"annotations": struct_array(fname=fnames, **{"class": classes})}

    savemat(base / "devkit" / "cars_train_annos.mat", annos(["00001.jpg", "00002.jpg"], [3, 150]))
    savemat(base / "cars_test_annos_withlabels.mat", annos(["00001.jpg"], [98]))
    for folder, name in (("cars_train", "00001.jpg"), ("cars_train", "00002.jpg"),
                         ("cars_test", "00001.jpg")):
        write_image(base / folder / name, (1, 2, 3), fmt="JPEG")
    train = get_dataset("cars196", root=tmp_path, split="train")
    assert train.classes == [3, 98]
    assert train.paths == [str(base / "cars_train" / "00001.jpg"),
                           str(base / "cars_test" / "00001.jpg")]
    assert get_dataset("cars196", root=tmp_path, split="test").classes == [150]


# -- MNIST, In-Shop, SOP super-classes ----------------------------------------------------------


def test_mnist_root_given_as_the_raw_folder(tmp_path):
    """--data-dir .../MNIST/raw looked for .../MNIST/raw/MNIST/raw."""
    data = make_mnist(tmp_path)
    ds = get_dataset("mnist", root=tmp_path / "MNIST" / "raw", split="test")
    assert ds.labels.tolist() == data["t10k"][1].tolist() and ds.labels.dtype == np.int64


def test_inshop_test_split_names_query_and_gallery(tmp_path):
    """In-Shop has no 'test' list: its test is the query set against the gallery. Both errors
    said only part of it (one sent the user to a 'test' split the reader refuses)."""
    make_inshop(tmp_path)
    with pytest.raises(ValueError, match=r"'query'.*'gallery'"):
        get_dataset("inshop", root=tmp_path, split="test")
    with pytest.raises(ValueError, match=r"no test_classes split.*'query'.*'gallery'"):
        get_dataset("inshop", root=tmp_path, split="test_classes")


def test_sop_super_labels_survive_class_splits(tmp_path):
    """.super_labels (the 12 super-classes) were dropped by train_classes and the folds."""
    make_sop(tmp_path)
    own = get_dataset("sop", root=tmp_path, split="train")
    tr = get_dataset("sop", root=tmp_path, split="train_classes")
    assert tr.super_labels.tolist() == own.super_labels.tolist()
    te = get_dataset("sop", root=tmp_path, split="test_classes")
    assert te.super_labels.tolist() == [0, 1, 0]
    va = get_dataset("sop", root=tmp_path, split="fold0of2-val")
    assert len(va.super_labels) == len(va) == 2
    assert va.super_labels.dtype == np.int64


# -- a re-packed CIFAR-10 from the command line --------------------------------------------------


def _repacked_cifar(root, per_class=2):
    """A CIFAR-10 copy in the official format whose files are not the official ones (so they
    fail torchvision's MD5 check): every batch holds ``per_class`` images of each class."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = [c for c in range(10) for _ in range(per_class)]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_md5_check_follows_the_environment(tmp_path, monkeypatch):
    """verify_md5=None (the default) reads CONTRASTIVE_VERIFY_MD5: '0' switches it off."""
    make_cifar(tmp_path)
    monkeypatch.setenv("CONTRASTIVE_VERIFY_MD5", "0")
    ds = get_dataset("cifar10", root=tmp_path, split="test")
    assert len(ds) == 3 and ds.classes[0] == "airplane"
    with pytest.raises(ValueError, match="MD5"):  # an explicit argument wins
        get_dataset("cifar10", root=tmp_path, split="test", verify_md5=True)
    monkeypatch.setenv("CONTRASTIVE_VERIFY_MD5", "1")
    with pytest.raises(ValueError, match="--no-verify-md5"):
        get_dataset("cifar10", root=tmp_path, split="test")
    monkeypatch.setenv("CONTRASTIVE_VERIFY_MD5", "maybe")
    with pytest.raises(ValueError, match="CONTRASTIVE_VERIFY_MD5.*'maybe'"):
        get_dataset("cifar10", root=tmp_path, split="test")


def test_cifar10_repacked_copy_trains_from_the_command_line(tmp_path, main, monkeypatch):
    """The known issue: a re-packed CIFAR-10 failed the MD5 check and the command line had no
    way to switch it off. --no-verify-md5 (before or after the command) does, for that command
    only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONTRASTIVE_VERIFY_MD5", raising=False)
    _repacked_cifar(tmp_path / "d")
    base = ["--dataset", "cifar10", "--data-dir", "d", "--backbone", "mlp", "--steps", "1",
            "--batch-size", "8", "--no-progress", "--set", "final_probe=false", "--set",
            "m_per_class=2"]
    rc, _, err = main("train", *base, "--output", "o0")
    assert rc == 2 and "MD5" in err and "--no-verify-md5" in err
    rc, _, err = main("train", *base, "--output", "o1", "--no-verify-md5")
    assert rc == 0, err
    assert (tmp_path / "o1" / "checkpoints" / "last.pt").is_file()
    assert "CONTRASTIVE_VERIFY_MD5" not in os.environ  # restored after the command
    rc, _, err = main("--no-verify-md5", "train", *base, "--output", "o2")
    assert rc == 0, err
    assert "CONTRASTIVE_VERIFY_MD5" not in os.environ


def test_readme_documents_the_md5_option_and_its_command_runs(tmp_path, monkeypatch, capsys):
    """The README's data section names the flag and the reader argument, and its command runs
    as tests/test_readme_commands.py runs every README command (against an empty --data-dir:
    one error line naming the folder)."""
    import test_readme_commands as trc

    text = (ROOT / "README.md").read_text()
    section = text.split("## Standard retrieval benchmarks from a local path", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert "--no-verify-md5" in section and "verify_md5=False" in section
    commands = [w for w in trc._commands(section) if "--no-verify-md5" in w]
    assert commands and all("cifar10" in w for w in commands)
    monkeypatch.chdir(tmp_path)
    for words in commands:
        trc._check(words, tmp_path, capsys)
    assert re.search(r"CONTRASTIVE_VERIFY_MD5", section)
    assert shlex.join(commands[0]).startswith("contrastive ")
