"""The trainer on an image data set in its standard local layout (a tiny fake CUB-200-2011) with
a timm backbone: class-disjoint splits get their probe on halves of the test classes; In-Shop
is evaluated query against gallery."""

from __future__ import annotations

import pytest
from test_datasets import make_cub, make_inshop

from contrastive.app.config import TrainConfig
from contrastive.app.protocol import class_disjoint, eval_sets
from contrastive.app.train import fit


def test_fit_on_fake_cub_with_timm_backbone(tmp_path):
    make_cub(tmp_path / "data", classes=(1, 2, 3, 4, 101, 102, 103, 104) * 2)  # 4 per class
    cfg = TrainConfig.from_dict(dict(
        dataset="cub200", data_dir=str(tmp_path / "data"), backbone="test_resnet",
        backbone_kwargs={"input_size": 32}, dim=16, batch_size=8, m_per_class=2, steps=3,
        output=str(tmp_path / "run"), progress=False, final_probe=True, augment=True,
    ))
    res = fit(cfg)
    m = res["metrics"]
    assert m["num_queries"] == 16 and m["num_lone_queries"] == 0
    assert m["probe_on_test_halves"] == 1.0  # classes 1-100 vs 101-200 share nothing
    for key in ("recall_at_1", "map_at_r", "linear_probe", "knn_top1", "nmi"):
        assert 0.0 <= m[key] <= 1.0, key


def test_inshop_is_query_against_gallery(tmp_path):
    make_inshop(tmp_path)
    query, gallery = eval_sets("inshop", tmp_path, "test")
    assert gallery is not None and len(query) > 0 and len(gallery) > 0
    train, _ = eval_sets("inshop", tmp_path, "train")
    assert class_disjoint(train, query)
    digits_train, none = eval_sets("digits", None, "train")
    digits_test, _ = eval_sets("digits", None, "test")
    assert none is None and not class_disjoint(digits_train, digits_test)


@pytest.mark.parametrize("bad", [{"eval_split": "nosuch"}])
def test_bad_split_is_a_clear_error(tmp_path, bad):
    make_cub(tmp_path / "data")
    cfg = TrainConfig.from_dict(dict(dataset="cub200", data_dir=str(tmp_path / "data"),
                                     backbone="test_resnet", output=str(tmp_path / "r"),
                                     progress=False, batch_size=4, m_per_class=2, **bad))
    with pytest.raises(ValueError, match="split"):
        fit(cfg)


def test_fit_on_grayscale_pil_images_and_image_tensors(tmp_path):
    """MNIST comes as PIL "L" images (converted to RGB for timm's transforms); digits_image as
    1 x 8 x 8 tensors (fed as they are, with a 1-channel stem)."""
    import numpy as np
    from test_datasets import write_idx

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("t10k", 2)):
        labels = np.repeat(np.arange(4, dtype=np.uint8), per_class)
        images = rng.integers(0, 256, (labels.size, 28, 28), dtype=np.uint8)
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        write_idx(tmp_path / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    common = dict(backbone="test_resnet", backbone_kwargs={"input_size": 32}, dim=8,
                  batch_size=8, m_per_class=2, steps=2, progress=False, final_probe=True,
                  augment=True)
    res = fit(TrainConfig.from_dict(dict(common, dataset="mnist", data_dir=str(tmp_path),
                                         output=str(tmp_path / "m"))))
    assert res["metrics"]["num_queries"] == 8
    res = fit(TrainConfig.from_dict(dict(common, dataset="digits_image", steps=3,
                                         output=str(tmp_path / "d"))))
    assert 0.0 <= res["metrics"]["linear_probe"] <= 1.0
    assert res["metrics"]["num_queries"] == 540
