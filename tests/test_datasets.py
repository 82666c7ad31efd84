"""Data set readers, each on a tiny fake copy of its standard layout built in tmp_path."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive.datasets import available_datasets, get_dataset, register_dataset


def write_image(path, color, size=(6, 5), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def pixel(ds, i):
    img, _ = ds[i]
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return img.getpixel((0, 0))


# -- registry ----------------------------------------------------------------------------------


def test_registry_lists_and_rejects():
    names = available_datasets()
    for n in ("digits", "digits_image", "folder", "cub200", "cars196", "sop", "inshop", "mnist",
              "cifar10"):
        assert n in names
    with pytest.raises(ValueError, match="available: .*cub200"):
        get_dataset("imagenet")
    with pytest.raises(ValueError, match="root is required"):
        get_dataset("cub200")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_dataset("sop", root="/nonexistent/dir")
    with pytest.raises(ValueError, match="split"):
        get_dataset("cub200", root="/tmp", split="val")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits", lambda *a, **k: None)


# -- digits ------------------------------------------------------------------------------------


def test_digits_vectors_match_sklearn_and_stratified_split():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test, full = (get_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (1257, 540, 1797)
    assert train.kind == "vector" and train.num_classes == 10
    assert train.labels.dtype == np.int64
    x, y = full[5]
    assert x.dtype == torch.float32 and x.shape == (64,) and y == bunch.target[5]
    assert np.allclose(x.numpy(), bunch.data[5] / 16.0)
    assert 0.0 <= float(full.data.min()) and float(full.data.max()) <= 1.0
    # train and test partition the set, both hold every class in a ~70/30 ratio
    assert np.bincount(train.labels, minlength=10).sum() + np.bincount(test.labels).sum() == 1797
    ratio = np.bincount(test.labels, minlength=10) / np.bincount(full.labels, minlength=10)
    assert np.all(np.abs(ratio - 0.3) < 0.02)
    from contrastive.datasets.digits import digits_split_indices

    tr, te = digits_split_indices("train"), digits_split_indices("test")
    assert not set(tr) & set(te) and len(set(tr) | set(te)) == 1797
    assert np.array_equal(train.labels, bunch.target[tr])
    assert np.allclose(test.data.numpy(), bunch.data[te] / 16.0)


def test_digits_images():
    vec = get_dataset("digits", split="test")
    img = get_dataset("digits_image", split="test")
    assert img.kind == "image"
    x, y = img[3]
    assert x.shape == (1, 8, 8) and y == vec[3][1]
    assert torch.equal(x.reshape(64), vec[3][0])
    big = get_dataset("digits_image", split="test", size=32)
    xb = big[3][0]
    assert xb.shape == (1, 32, 32)
    ref = torch.nn.functional.interpolate(x[None], size=(32, 32), mode="bilinear")[0]
    assert torch.allclose(xb, ref.clamp(0, 1))
    pil = get_dataset("digits_image", split="test", as_pil=True)
    p, _ = pil[3]
    assert isinstance(p, Image.Image) and p.mode == "L" and p.size == (8, 8)
    assert np.array_equal(np.asarray(p), (x[0].numpy() * 255).round().astype(np.uint8))
    t = get_dataset("digits_image", split="test", transform=lambda z: z * 2)
    assert torch.equal(t[3][0], 2 * x)
    with pytest.raises(ValueError, match="size"):
        get_dataset("digits_image", size=0)


# -- ImageFolder -------------------------------------------------------------------------------


def test_folder(tmp_path):
    write_image(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    write_image(tmp_path / "train" / "cat" / "b.jpg", (250, 0, 0), fmt="JPEG")
    write_image(tmp_path / "train" / "dog" / "c.png", 77, mode="L")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    ds = get_dataset("folder", root=tmp_path, split="train")
    assert len(ds) == 3 and ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]
    assert pixel(ds, 2) == (77, 77, 77)  # grayscale converted to RGB
    assert ds[0][0].size == (6, 5)
    with pytest.raises(FileNotFoundError, match="split='all'"):
        get_dataset("folder", root=tmp_path, split="test")
    flat = get_dataset("folder", root=tmp_path / "train", split="all")
    assert flat.labels.tolist() == [0, 0, 1]
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="sub-folder per class"):
        get_dataset("folder", root=tmp_path, split="empty")


# -- CUB-200-2011 ------------------------------------------------------------------------------


def make_cub(root, classes=(1, 2, 100, 101, 150, 200)):
    base = root / "CUB_200_2011"
    images, labels = [], []
    for i, c in enumerate(classes * 2, start=1):
        rel = f"{c:03d}.Bird_{c}/img_{i}.jpg"
        write_image(base / "images" / rel, (c, i, 0), fmt="JPEG")
        images.append(f"{i} {rel}")
        labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return base


def test_cub200(tmp_path):
    base = make_cub(tmp_path)
    train = get_dataset("cub200", root=tmp_path, split="train")
    test = get_dataset("cub", root=base, split="test")  # alias, and root = CUB_200_2011 itself
    assert train.classes == [1, 2, 100] and test.classes == [101, 150, 200]
    assert train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert test.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert train.paths[1].endswith("002.Bird_2/img_2.jpg")
    r, g, _ = pixel(test, 4)  # image 11 of class 150 (JPEG: approximately)
    assert abs(r - 150) <= 3 and abs(g - 11) <= 3
    assert train.num_classes == 3 and train.kind == "image"


def test_cub200_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB_200_2011/images.txt"):
        get_dataset("cub200", root=tmp_path)
    base = make_cub(tmp_path)
    (base / "image_class_labels.txt").write_text("1 1\n2 2\n")
    with pytest.raises(ValueError, match="different image ids"):
        get_dataset("cub200", root=tmp_path)
    (base / "image_class_labels.txt").write_text("1\n")
    with pytest.raises(ValueError, match="malformed"):
        get_dataset("cub200", root=tmp_path)
    make_cub(tmp_path)
    (base / "images" / "001.Bird_1" / "img_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img_1.jpg"):
        get_dataset("cub200", root=tmp_path)


# -- Cars196 -----------------------------------------------------------------------------------


def struct_array(**fields):
    n = len(next(iter(fields.values())))
    arr = np.zeros((1, n), dtype=[(k, "O") for k in fields])
    for k, values in fields.items():
        for i, v in enumerate(values):
            arr[0, i][k] = v
    return arr


def test_cars196_all_images_layout(tmp_path):
    from scipy.io import savemat

    classes = [1, 98, 99, 196, 1, 99]
    paths = [f"car_ims/{i:06d}.jpg" for i in range(1, 7)]
    for i, p in enumerate(paths):
        write_image(tmp_path / p, (classes[i], 0, 0), fmt="JPEG")
    fields = {"relative_im_path": paths, "bbox_x1": [1.0] * 6, "class": classes,
              "test": [0, 1, 0, 1, 0, 1]}
    savemat(tmp_path / "cars_annos.mat", {
        "annotations": struct_array(**fields),
        "class_names": np.array(["a"] * 196, dtype=object),
    })
    train = get_dataset("cars196", root=tmp_path, split="train")
    test = get_dataset("cars196", root=tmp_path, split="test")
    assert train.classes == [1, 98] and train.labels.tolist() == [0, 1, 0]
    assert test.classes == [99, 196] and test.labels.tolist() == [0, 1, 0]
    assert [p[-10:] for p in test.paths] == ["000003.jpg", "000004.jpg", "000006.jpg"]
    assert abs(pixel(test, 1)[0] - 196) <= 3


def test_cars196_devkit_layout_and_errors(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        get_dataset("cars196", root=tmp_path)

    def annos(fnames, classes):
        return {"annotations": struct_array(**{"fname": fnames, "class": classes})}

    (tmp_path / "devkit").mkdir()
    savemat(tmp_path / "devkit" / "cars_train_annos.mat", annos(["00001.jpg", "00002.jpg"],
                                                                [5, 120]))
    for f in ("00001.jpg", "00002.jpg"):
        write_image(tmp_path / "cars_train" / f, (1, 2, 3), fmt="JPEG")
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        get_dataset("cars196", root=tmp_path)
    savemat(tmp_path / "cars_test_annos_withlabels.mat", annos(["00001.jpg"], [7]))
    write_image(tmp_path / "cars_test" / "00001.jpg", (1, 2, 3), fmt="JPEG")
    train = get_dataset("cars196", root=tmp_path, split="train")
    assert train.classes == [5, 7]
    assert [p.split("/")[-2] for p in train.paths] == ["cars_train", "cars_test"]
    test = get_dataset("cars196", root=tmp_path, split="test")
    assert test.classes == [120] and len(test) == 1
    savemat(tmp_path / "devkit" / "cars_train_annos.mat",
            {"annotations": struct_array(fname=["00001.jpg"])})
    with pytest.raises(ValueError, match="lack fields"):
        get_dataset("cars196", root=tmp_path)


# -- Stanford Online Products ------------------------------------------------------------------


def make_sop(root):
    base = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    train = [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
             (3, 7, 2, "chair_final/222_0.JPG"), (4, 7, 2, "chair_final/222_1.JPG")]
    test = [(5, 11319, 1, "bicycle_final/333_0.JPG"), (6, 11320, 12, "toaster_final/4_0.JPG"),
            (7, 11319, 1, "bicycle_final/333_1.JPG")]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = [header] + [" ".join(map(str, r)) for r in rows]
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("\n".join(lines) + "\n")
        for r in rows:
            write_image(base / r[3], (r[0], 0, 0), fmt="JPEG")
    return base


def test_sop(tmp_path):
    base = make_sop(tmp_path)
    train = get_dataset("sop", root=tmp_path, split="train")
    test = get_dataset("sop", root=base, split="test")
    assert train.labels.tolist() == [0, 0, 1, 1] and train.classes == [1, 7]
    assert train.super_labels.tolist() == [0, 0, 1, 1]
    assert test.labels.tolist() == [0, 1, 0] and test.classes == [11319, 11320]
    assert test.super_labels.tolist() == [0, 1, 0]
    assert test.paths[1].endswith("toaster_final/4_0.JPG")
    assert abs(pixel(test, 1)[0] - 6) <= 3
    (base / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x 1 a.JPG\n")
    with pytest.raises(ValueError, match="malformed"):
        get_dataset("sop", root=tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        get_dataset("sop", root=tmp_path / "Stanford_Online_Products" / "bicycle_final")


# -- In-Shop -----------------------------------------------------------------------------------


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Shirts/id_00000010/01_1_front.jpg", "id_00000010", "train"),
    ("img/MEN/Pants/id_00000050/01_1_front.jpg", "id_00000050", "query"),
    ("img/MEN/Pants/id_00000050/01_2_side.jpg", "id_00000050", "gallery"),
    ("img/WOMEN/Tees/id_00000070/01_1_front.jpg", "id_00000070", "gallery"),
    ("img/WOMEN/Tees/id_00000070/01_2_side.jpg", "id_00000070", "query"),
    ("img/WOMEN/Tees/id_00000060/01_4_full.jpg", "id_00000060", "gallery"),
]


def make_inshop(root, nested=False, count=None):
    eval_dir = root / "Eval" if nested else root
    img_dir = root / "Img" if nested else root
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(len(INSHOP_ROWS) if count is None else count),
             "image_name item_id evaluation_status"]
    lines += ["  ".join(r) for r in INSHOP_ROWS]
    (eval_dir / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for i, r in enumerate(INSHOP_ROWS):
        write_image(img_dir / r[0], (10 * i, 0, 0))


@pytest.mark.parametrize("nested", [False, True])
def test_inshop(tmp_path, nested):
    make_inshop(tmp_path, nested)
    train = get_dataset("inshop", root=tmp_path, split="train")
    query = get_dataset("inshop", root=tmp_path, split="query")
    gallery = get_dataset("inshop", root=tmp_path, split="gallery")
    assert train.labels.tolist() == [0, 0, 1] and train.classes == ["id_00000002", "id_00000010"]
    assert query.classes == gallery.classes == ["id_00000050", "id_00000060", "id_00000070"]
    assert query.labels.tolist() == [0, 2]
    assert gallery.labels.tolist() == [0, 2, 1]
    assert pixel(gallery, 2) == (70, 0, 0)
    assert pixel(query, 1) == (60, 0, 0)


def test_inshop_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        get_dataset("inshop", root=tmp_path)
    make_inshop(tmp_path, count=99)
    with pytest.raises(ValueError, match="says 99 images"):
        get_dataset("inshop", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        get_dataset("inshop", root=tmp_path, split="test")
    make_inshop(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "img")
    with pytest.raises(FileNotFoundError, match="02_1_front.jpg"):
        get_dataset("inshop", root=tmp_path)


# -- MNIST -------------------------------------------------------------------------------------


def write_idx(path, array):
    """The idx format: magic 0x0000 0x08 (ubyte) ndim, big-endian uint32 dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 7), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
        data[split] = (images, labels)
    return data


def test_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        get_dataset("mnist", root=tmp_path)
    data = make_mnist(tmp_path)
    for split, key in (("train", "train"), ("test", "t10k")):
        ds = get_dataset("mnist", root=tmp_path, split=split)
        images, labels = data[key]
        assert len(ds) == len(labels) and ds.labels.tolist() == labels.tolist()
        img, y = ds[2]
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), images[2]) and y == labels[2]
    same = get_dataset("mnist", root=tmp_path / "MNIST", split="test")  # root given as .../MNIST
    assert len(same) == 4 and same.num_classes == 10


# -- CIFAR-10 ----------------------------------------------------------------------------------


def make_cifar(root):
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": ["x.png"] * 3}, f)
        batches[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_vis": 3072}, f)
    return batches


def test_cifar10_own_reader_and_md5(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        get_dataset("cifar10", root=tmp_path)
    batches = make_cifar(tmp_path)
    with pytest.raises(ValueError, match="verify_md5=False"):
        get_dataset("cifar10", root=tmp_path)  # fake files fail torchvision's MD5 check
    ds = get_dataset("cifar10", root=tmp_path, split="train", verify_md5=False)
    assert len(ds) == 15 and ds.classes[0] == "airplane"
    data, labels = batches["data_batch_2"]
    img, y = ds[4]  # second item of data_batch_2
    assert img.mode == "RGB" and img.size == (32, 32) and y == labels[1]
    arr = np.asarray(img)
    # channel-major rows: the first 1024 bytes are red, row by row
    assert np.array_equal(arr[:, :, 0], data[1, :1024].reshape(32, 32))
    assert np.array_equal(arr[:, :, 2], data[1, 2048:].reshape(32, 32))
    test = get_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="test",
                       verify_md5=False)
    assert test.labels.tolist() == batches["test_batch"][1]
    # torchvision's reader on the same files (its checksum switched off) agrees with ours
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = get_dataset("cifar10", root=tmp_path, split="train")
    assert np.array_equal(tv.images, ds.images) and np.array_equal(tv.labels, ds.labels)
    assert tv.classes == ds.classes


def test_cifar10_malformed(tmp_path):
    make_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="3072"):
        get_dataset("cifar10", root=tmp_path, split="test", verify_md5=False)


# -- class-disjoint split names (contrastive.splits) --------------------------------------------


def test_class_split_names_on_benchmarks_and_sets_without_one(tmp_path):
    from contrastive.app.protocol import class_disjoint

    make_cub(tmp_path / "cub")
    own_tr = get_dataset("cub200", root=tmp_path / "cub", split="train")
    tr = get_dataset("cub200", root=tmp_path / "cub", split="train_classes")
    te = get_dataset("cub200", root=tmp_path / "cub", split="test_classes")
    assert tr.paths == own_tr.paths and tr.classes == [1, 2, 100]  # the benchmark's own split
    assert te.classes == [101, 150, 200] and class_disjoint(tr, te)
    fold = get_dataset("cub200", root=tmp_path / "cub", split="fold0of3-val")
    assert len(fold.classes) == 1 and set(fold.classes) <= set(tr.classes)

    data = make_mnist(tmp_path / "m")
    mtr = get_dataset("mnist", root=tmp_path / "m", split="train_classes")
    mte = get_dataset("mnist", root=tmp_path / "m", split="test_classes")
    train_labels, test_labels = data["train"][1], data["t10k"][1]
    assert sorted(np.asarray(mtr.classes)[mtr.labels]) == sorted(v for v in train_labels
                                                                 if v < 5)
    assert sorted(np.asarray(mte.classes)[mte.labels]) == sorted(v for v in test_labels if v >= 5)
    assert class_disjoint(mtr, mte)

    for c, n in (("a", 2), ("b", 1), ("c", 2), ("d", 1)):
        for i in range(n):
            write_image(tmp_path / "f" / c / f"{i}.png", (i, 0, 0))
    ftr = get_dataset("folder", root=tmp_path / "f", split="train_classes")
    fte = get_dataset("folder", root=tmp_path / "f", split="test_classes")
    assert ftr.classes == ["a", "b"] and fte.classes == ["c", "d"]
    assert ftr.labels.tolist() == [0, 0, 1] and len(fte) == 3

    with pytest.raises(ValueError, match="no test_classes split"):
        get_dataset("inshop", root=tmp_path, split="test_classes")
