"""Edge cases of the data layer, each on a tiny fake copy of a standard layout:

* malformed copies give one clear error naming the file (a truncated, empty or non-MAT
  ``cars_annos.mat``, also through the CLI: one ``error:`` line, exit status 2; a corrupt CIFAR-10
  ``batches.meta``; the MD5 failure says what to do from Python and from the command line);
* the ``folder`` data set's class-level split names on the README's ``train/<class>``,
  ``test/<class>`` layout (shared classes, disjoint classes, a half layout, no class folder) and
  ``compare --tune --dataset folder`` getting past its preflight on that layout;
* the class-level split names (``train_classes``, ``test_classes``, folds) on every standard
  reader, In-Shop's query / gallery mapping, CIFAR-10 without ``batches.meta``;
* the M-per-class sampler over several epochs and the multi-view (instance-id) batches the
  trainer builds.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from test_datasets import make_cifar, make_inshop, make_sop, struct_array, write_image

from contrastive.app.protocol import class_disjoint
from contrastive.datasets import class_split_sources, get_dataset
from contrastive.samplers import MPerClassSampler
from contrastive.views import MultiView, collate_views

# -- error messages of malformed copies ------------------------------------------------------


def _truncated_mat(path):
    from scipy.io import savemat

    savemat(path, {"annotations": struct_array(relative_im_path=["car_ims/1.jpg"] * 50,
                                               **{"class": [1] * 50})})
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("content", [b"", b"not a MATLAB file, an HTML error page\n" * 4,
                                     "truncated"])
def test_cars196_corrupt_annotation_file_is_a_clear_error(tmp_path, content):
    """scipy raises MatReadError (empty / truncated header), IndexError (not a MAT file) or
    OSError (truncated data): each is the reader's 'malformed <file>' ValueError."""
    path = tmp_path / "cars_annos.mat"
    if content == "truncated":
        _truncated_mat(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"malformed .*cars_annos\.mat.*not a readable MATLAB"):
        get_dataset("cars196", root=tmp_path, split="train")
    # the devkit release's files the same way
    path.unlink()
    (tmp_path / "devkit").mkdir()
    (tmp_path / "devkit" / "cars_train_annos.mat").write_bytes(b"")
    (tmp_path / "cars_test_annos_withlabels.mat").write_bytes(b"")
    with pytest.raises(ValueError, match=r"malformed .*cars_train_annos\.mat"):
        get_dataset("cars196", root=tmp_path, split="test_classes")


def test_cars196_mat_without_annotations_names_what_it_holds(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "cars_annos.mat", {"class_names": np.array(["a", "b"], dtype=object)})
    with pytest.raises(ValueError, match=r"cars_annos\.mat.*no 'annotations'.*class_names"):
        get_dataset("cars196", root=tmp_path)


def test_cars196_corrupt_annotation_file_is_one_cli_error_line(tmp_path, main, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cars_annos.mat").write_bytes(b"")
    rc, _, err = main("train", "--dataset", "cars196", "--data-dir", "d", "--steps", "1",
                      "--output", "o")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error:") and "cars_annos.mat" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("meta", [b"truncated", pickle.dumps(["airplane", "automobile"]),
                                  pickle.dumps({"label_names": ["airplane", "automobile"]}),
                                  pickle.dumps({"label_names": "airplane"})])
def test_cifar10_corrupt_meta_is_a_clear_error(tmp_path, meta):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(meta)
    with pytest.raises(ValueError, match=r"malformed CIFAR-10 meta file .*batches\.meta"):
        get_dataset("cifar10", root=tmp_path, split="train", verify_md5=False)


def test_cifar10_md5_failure_says_what_to_do_on_the_command_line(tmp_path, main):
    make_cifar(tmp_path)  # fake files: they fail torchvision's MD5 check
    with pytest.raises(ValueError, match="verify_md5=False") as info:
        get_dataset("cifar10", root=tmp_path)
    msg = str(info.value)
    # both ways to read a re-packed copy: the command line's flag (and its variable), Python's
    # keyword
    assert "--no-verify-md5" in msg and "CONTRASTIVE_VERIFY_MD5=0" in msg
    rc, _, err = main("train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps",
                      "1", "--output", str(tmp_path / "o"))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "fail torchvision's MD5 check" in lines[0]
    assert "add --no-verify-md5 to the command" in lines[0]


# -- folder: the class-level split names on the README's layout ------------------------------


def _folder(root, splits=("train", "test"), classes=("cat", "dog", "eel", "fox"), n=2):
    for split in splits:
        for c in classes:
            for i in range(n):
                write_image(root / split / c / f"{i}.png", (i, 0, 0))


def test_folder_class_splits_on_the_readme_layout(tmp_path):
    """root/train/<class>, root/test/<class> sharing classes: as mnist / cifar10, the train
    images of the first half of the classes / the test images of the second half; folds of the
    training side."""
    _folder(tmp_path)
    # the README's own splits read fine
    assert get_dataset("folder", root=tmp_path, split="train").classes == ["cat", "dog", "eel",
                                                                           "fox"]
    tr = get_dataset("folder", root=tmp_path, split="train_classes")
    te = get_dataset("folder", root=tmp_path, split="test_classes")
    assert tr.classes == ["cat", "dog"] and te.classes == ["eel", "fox"]
    assert all("/train/" in p for p in tr.paths) and len(tr) == 4  # never a test image
    assert all("/test/" in p for p in te.paths) and len(te) == 4
    assert tr.labels.tolist() == [0, 0, 1, 1] and class_disjoint(tr, te)
    for k in range(2):
        ftr = get_dataset("folder", root=tmp_path, split=f"fold{k}of2-train")
        fva = get_dataset("folder", root=tmp_path, split=f"fold{k}of2-val")
        assert class_disjoint(ftr, fva) and set(ftr.paths) | set(fva.paths) == set(tr.paths)
    assert class_split_sources("folder", tmp_path)["test_classes"] == ["eel", "fox"]


def test_folder_class_splits_partition_the_union_of_both_sides(tmp_path):
    """train/ and test/ with partly different classes: one partition of all the class names, so
    the two sides never share a class."""
    _folder(tmp_path, ("train",), ("a", "b", "c", "d", "e", "f"))
    _folder(tmp_path, ("test",), ("b", "e", "f", "g"))
    tr = get_dataset("folder", root=tmp_path, split="train_classes")
    te = get_dataset("folder", root=tmp_path, split="test_classes")
    assert tr.classes == ["a", "b", "c", "d"] and te.classes == ["e", "f", "g"]
    assert class_disjoint(tr, te)


def test_folder_class_disjoint_train_test_folders_are_used_as_they_are(tmp_path):
    """train/ and test/ sharing no class (CUB or Cars saved as folders): already class-disjoint,
    read as they are whatever the names' sorted order."""
    _folder(tmp_path, ("train",), ("owl", "wren"))
    _folder(tmp_path, ("test",), ("ant", "bee", "cod"))
    tr = get_dataset("folder", root=tmp_path, split="train_classes")
    te = get_dataset("folder", root=tmp_path, split="test_classes")
    assert tr.classes == ["owl", "wren"] and len(tr) == 4
    assert te.classes == ["ant", "bee", "cod"] and len(te) == 6


@pytest.mark.parametrize("layout", ["train_only", "test_only", "empty", "files_only",
                                    "train_without_classes"])
def test_folder_class_splits_on_other_layouts_name_both_layouts(tmp_path, layout):
    if layout == "train_only":
        _folder(tmp_path, ("train",))
    elif layout == "test_only":
        _folder(tmp_path, ("test",))
    elif layout == "files_only":
        write_image(tmp_path / "a.png", (0, 0, 0))
    elif layout == "train_without_classes":
        write_image(tmp_path / "train" / "a.png", (0, 0, 0))
        _folder(tmp_path, ("test",))
    for split in ("train_classes", "test_classes", "fold0of2-val"):
        with pytest.raises(FileNotFoundError) as info:
            get_dataset("folder", root=tmp_path, split=split)
        msg = str(info.value)
        assert str(tmp_path) in msg
        assert "root/train/<class>/<image>" in msg and "root/<class>/<image>" in msg


def _tune_to_its_preflight(main, monkeypatch, dataset, root, tmp_path):
    """``compare --tune`` on ``dataset`` stopped right after its preflight (the training itself
    is tested elsewhere): ``(exit status, stderr)``, with "preflight passed" when it got there."""
    import contrastive.app.tuning as tuning
    from contrastive.errors import UserError

    real = tuning._preflight

    def preflight_then_stop(cfg):
        real(cfg)
        raise UserError("preflight passed")

    monkeypatch.setattr(tuning, "_preflight", preflight_then_stop)
    rc, _, err = main("compare", "--tune", "--dataset", dataset, "--data-dir", str(root),
                      "--losses", "infonce", "--trials", "1", "--steps", "1", "--seeds", "0",
                      "--batch-size", "8", "--output", str(tmp_path / "o"), "--no-progress")
    return rc, err


def test_compare_tune_on_the_readme_folder_layout_gets_past_its_preflight(tmp_path, main,
                                                                          monkeypatch):
    """Before the fix the preflight stopped with 'n_folds=2 is more than the 1 classes'; the
    run stops here right after the preflight (the training itself is tested elsewhere)."""
    _folder(tmp_path / "root", classes=[f"c{i}" for i in range(8)], n=4)
    rc, err = _tune_to_its_preflight(main, monkeypatch, "folder", tmp_path / "root", tmp_path)
    assert rc == 2 and "preflight passed" in err, err
    # too few classes: the preflight names the real cause (the classes of the split)
    _folder(tmp_path / "small", classes=["a", "b"])
    rc, _, err = main("compare", "--tune", "--dataset", "folder", "--data-dir",
                      str(tmp_path / "small"), "--losses", "infonce", "--trials", "1",
                      "--steps", "1", "--seeds", "0", "--batch-size", "8", "--output",
                      str(tmp_path / "o2"), "--no-progress")
    assert rc == 2 and "n_folds=2 is more than the 1 classes" in err, err


# -- the class-level split names on every standard reader ------------------------------------


def _make_cars(root):
    from scipy.io import savemat

    classes = [1, 1, 2, 2, 50, 50, 98, 98, 99, 99, 196, 196]
    paths = [f"car_ims/{i:06d}.jpg" for i in range(1, len(classes) + 1)]
    for p, c in zip(paths, classes):
        write_image(root / p, (c, 0, 0))
    savemat(root / "cars_annos.mat", {"annotations": struct_array(
        relative_im_path=paths, **{"class": classes}, test=[0] * len(classes))})
    return dict(zip(paths, classes))


def _original_class(ds):
    return [ds.classes[y] for y in ds.labels]


@pytest.mark.parametrize("name", ["cars196", "sop", "inshop", "cifar10"])
def test_split_names_on_every_standard_reader(tmp_path, name):
    kw = {}
    if name == "cars196":
        truth = _make_cars(tmp_path)
    elif name == "sop":
        make_sop(tmp_path)
    elif name == "inshop":
        make_inshop(tmp_path)
    else:
        make_cifar(tmp_path)
        kw = {"verify_md5": False}
    train = get_dataset(name, root=tmp_path, split="train_classes", **kw)
    # labels contiguous 0..C-1 (the trainer sizes proxies by max + 1) and .classes the original ids
    assert sorted(set(train.labels.tolist())) == list(range(train.num_classes))
    if name == "cars196":
        assert train.classes == [1, 2, 50, 98]
        for p, c in zip(train.paths, _original_class(train)):
            assert truth["car_ims/" + p.rsplit("/", 1)[1]] == c  # file -> class kept
    if name == "inshop":
        with pytest.raises(ValueError, match="no test_classes split"):
            get_dataset(name, root=tmp_path, split="test_classes")
    else:
        test = get_dataset(name, root=tmp_path, split="test_classes", **kw)
        assert class_disjoint(train, test) and len(test) > 0
        if name == "cars196":
            assert test.classes == [99, 196] and len(test) == 4
        if name == "cifar10":  # training items of classes 0-4, test items of classes 5-9
            assert set(train.classes) <= {"airplane", "automobile", "bird", "cat", "deer"}
            assert set(test.classes) <= {"dog", "frog", "horse", "ship", "truck"}
    val_seen = []
    for k in range(2):
        ftr = get_dataset(name, root=tmp_path, split=f"fold{k}of2-train", **kw)
        fva = get_dataset(name, root=tmp_path, split=f"fold{k}of2-val", **kw)
        assert class_disjoint(ftr, fva) and len(ftr) + len(fva) == len(train)
        assert set(ftr.classes) | set(fva.classes) == set(train.classes)
        assert sorted(set(fva.labels.tolist())) == list(range(fva.num_classes))
        val_seen += [str(c) for c in fva.classes]
        # the same seed gives the same fold
        again = get_dataset(name, root=tmp_path, split=f"fold{k}of2-val", **kw)
        assert again.classes == fva.classes and np.array_equal(again.labels, fva.labels)
    assert sorted(val_seen) == sorted(str(c) for c in train.classes)  # each class validated once


# -- the sampler over several epochs -----------------------------------------------------------


def test_drop_last_leftovers_are_used_in_later_epochs_and_epochs_differ():
    labels = np.repeat(np.arange(5), [7, 5, 6, 9, 3])  # odd sizes leave n mod m items over
    s = MPerClassSampler(labels, m=2, batch_size=4, seed=11)
    seen = set()
    firsts = []
    for epoch in range(12):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # no repeat inside an epoch
        seen |= set(flat)
        firsts.append(tuple(batches[0]))
    # the leftover items of one epoch are used in later ones: every item sooner or later
    assert seen == set(range(labels.size))
    assert len(set(firsts)) > 1
    s.set_epoch(3)
    a = list(s)
    s.set_epoch(3)
    assert list(s) == a  # (seed, epoch) decides


def test_multiview_instance_batches_as_the_trainer_builds_them():
    """train.py: MultiView + MPerClassSampler(arange(N), m=1): distinct instances per batch, the
    ranks' shares disjoint and equal, the ids the loss sees are the instance ids, view-major."""

    class Vectors:
        def __init__(self, n):
            self.labels = np.arange(n) % 3

        def __len__(self):
            return self.labels.size

        def __getitem__(self, i):
            return np.full(4, float(i), dtype=np.float32), int(self.labels[i])

    mv = MultiView(Vectors(22), lambda x: x + 0.0, n_views=2)
    shares = [MPerClassSampler(mv.labels, m=1, batch_size=8, seed=2, num_replicas=2, rank=r)
              for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 22 // 8
    used = []
    for b0, b1 in zip(*shares):
        assert len(b0) == len(b1) == 4 and not set(b0) & set(b1)
        used += b0 + b1
        x, ids = collate_views([mv[i] for i in b0])
        assert ids.tolist() == b0 + b0
        assert torch.equal(x[:4, 0], torch.tensor(b0, dtype=torch.float32))
        assert torch.equal(x[4:, 0], torch.tensor(b0, dtype=torch.float32))
    assert len(used) == len(set(used)) == 16
    assert mv.class_labels.tolist() == (np.arange(22) % 3).tolist()


def test_inshop_query_gallery_share_one_mapping_and_files(tmp_path):
    make_inshop(tmp_path)
    query = get_dataset("inshop", root=tmp_path, split="query")
    gallery = get_dataset("inshop", root=tmp_path, split="gallery")
    train = get_dataset("inshop", root=tmp_path, split="train")
    # every file keeps its own item id, and no item is on both the train and the test side
    for ds in (query, gallery, train):
        for p, c in zip(ds.paths, _original_class(ds)):
            assert f"/{c}/" in p
    assert not {p for p in train.paths} & {p for p in query.paths + gallery.paths}
    assert not set(query.paths) & set(gallery.paths)
    assert query.paths[0].endswith("id_00000050/01_1_front.jpg")


def test_cifar_meta_file_round_trip(tmp_path):
    """A re-packed CIFAR copy without batches.meta keeps integer class ids 0-9."""
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    ds = get_dataset("cifar10", root=tmp_path, split="test", verify_md5=False)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        labels = pickle.load(f)["labels"]
    assert ds.classes == list(range(10)) and ds.labels.tolist() == labels
    te = get_dataset("cifar10", root=tmp_path, split="test_classes", verify_md5=False)
    assert all(c >= 5 for c in te.classes)


def _inshop(root, train_classes=8, test_classes=4, per_class=4):
    """An In-Shop layout with enough training classes for two tuning folds."""
    lines, rows = [], []
    for c in range(train_classes + test_classes):
        item = f"id_{c:08d}"
        for k in range(per_class):
            path = f"img/MEN/Tees/{item}/{k:02d}_1_front.jpg"
            status = "train" if c < train_classes else ("query" if k % 2 else "gallery")
            rows.append((path, item, status))
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    lines += ["  ".join(r) for r in rows]
    (root / "list_eval_partition.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for i, r in enumerate(rows):
        write_image(root / r[0], (i % 256, 0, 0))


def test_compare_tune_on_inshop_evaluates_query_against_gallery(tmp_path, main, monkeypatch):
    """In-Shop has no "test_classes" (its test side is query against gallery), so the tuned
    comparison's final evaluation, fixed to "test_classes", could never run on it; it now
    evaluates In-Shop on its "test" and gets past its preflight."""
    import contrastive.app.tuning as tuning

    assert tuning.final_splits("inshop") == {"train_split": "train_classes", "eval_split": "test"}
    assert tuning.final_splits("in_shop")["eval_split"] == "test"
    assert tuning.final_splits("cub200") == tuning.FINAL_SPLITS
    _inshop(tmp_path / "root")
    rc, err = _tune_to_its_preflight(main, monkeypatch, "inshop", tmp_path / "root", tmp_path)
    assert rc == 2 and "preflight passed" in err, err
