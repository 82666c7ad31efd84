"""Review of ``contrastive compare`` as a researcher who quotes its numbers: every setting the
report shows is the one the cells ran with, and a cell is reused only when the data and settings
that decide it are the same."""

from __future__ import annotations

import pytest

from contrastive.app.compare import CompareConfig, cell_key, preflight, train_config_for
from contrastive.app.config import ConfigError
from contrastive.errors import UserError

BASE = {"losses": "infonce", "seeds": "0", "steps": 2, "output": "unused", "progress": False}
#: a folder data set of 4 classes, every image both trained on and searched
FOLDER = {"dataset": "folder", "batch_size": 16,
          "train": {"eval_split": "all", "train_split": "all", "m_per_class": 4}}


def test_critic_kwargs_without_a_critic_are_refused():
    """``critic_kwargs`` apply only with ``critic``; without one they were silently dropped, so
    the report's config showed a temperature that no cell used."""
    with pytest.raises(ConfigError, match="critic_kwargs"):
        CompareConfig.from_dict({**BASE, "critic_kwargs": {"temperature": 0.5}})
    cfg = CompareConfig.from_dict({**BASE, "critic": "cosine",
                                   "critic_kwargs": {"temperature": 0.5}})
    assert train_config_for(cfg, "infonce", 0).critic_kwargs == {"temperature": 0.5}


@pytest.mark.parametrize("key,value", [("steps", 5), ("dataset", "latent_classes"),
                                       ("batch_size", 32), ("backbone", "resnet18"),
                                       ("critic", "dot"), ("data_dir", "somewhere"),
                                       ("loss_kwargs", {"temperature": 0.5}),
                                       ("critic_kwargs", {"temperature": 0.5})])
def test_train_cannot_silently_replace_a_top_level_setting(key, value):
    """``train.steps`` used to replace the top-level ``steps`` in every cell while the report
    (title, config, periodic evaluation) followed the top-level value: compare on digits
    trained on another data set, and ``train.loss_kwargs`` wiped every loss's defaults."""
    with pytest.raises(ConfigError, match=rf"train\.{key}"):
        CompareConfig.from_dict({**BASE, "train": {key: value}})


@pytest.mark.parametrize("field,value", [("seeds", "0,1,0"), ("losses", "infonce,triplet,infonce")])
def test_repeated_seeds_or_losses_are_refused(field, value):
    """``seeds: 0,1,0`` ran two cells and reported statistics over two seeds while the config
    shown asked for three."""
    with pytest.raises(ConfigError, match=field):
        CompareConfig.from_dict({**BASE, field: value})


def _digits_dir(root, n_per_class=20, shift=0.0):
    """A folder data set (root/<class>/<image>) of tiny PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            px = (rng.random((8, 8, 3)) * 60 + c * 40 + shift).clip(0, 255).astype("uint8")
            Image.fromarray(px).save(d / f"{i:03d}.png")


def test_a_relative_data_dir_is_keyed_by_the_folder_it_names(tmp_path, monkeypatch):
    """The same relative ``data_dir`` from two working folders names two data sets: two keys;
    the same folder written relative or absolute is one."""
    for sub in ("a", "b"):
        _digits_dir(tmp_path / sub / "data", shift=0 if sub == "a" else 100)
    cfg = CompareConfig.from_dict({**BASE, **FOLDER, "data_dir": "data"})
    monkeypatch.chdir(tmp_path / "a")
    key_a = cell_key(train_config_for(cfg, "infonce", 0))
    absolute = CompareConfig.from_dict({**BASE, **FOLDER,
                                        "data_dir": str(tmp_path / "a" / "data")})
    assert cell_key(train_config_for(absolute, "infonce", 0)) == key_a
    monkeypatch.chdir(tmp_path / "b")
    assert cell_key(train_config_for(cfg, "infonce", 0)) != key_a


def test_other_data_at_the_same_path_is_another_cell(tmp_path):
    """A new version of a data set at the same path (more images, other classes) must not
    reuse the cells of the old one; the same data again must."""
    root = tmp_path / "data"
    _digits_dir(root)
    cfg = CompareConfig.from_dict({**BASE, **FOLDER, "data_dir": str(root)})
    preflight(cfg)
    key = cell_key(train_config_for(cfg, "infonce", 0))
    preflight(cfg)
    assert cell_key(train_config_for(cfg, "infonce", 0)) == key  # unchanged: reused
    _digits_dir(root, n_per_class=24)  # four more images per class
    preflight(cfg)
    assert cell_key(train_config_for(cfg, "infonce", 0)) != key


def test_embedded_data_keys_do_not_depend_on_a_data_fingerprint():
    """Cells of the embedded data sets (no ``data_dir``) keep their keys: finished caches of
    the default comparison stay valid."""
    from contrastive.app.compare import resolved_cell_config

    tcfg = train_config_for(CompareConfig.from_dict(BASE), "infonce", 0)
    assert "data_fingerprint" not in resolved_cell_config(tcfg)


def test_a_missing_data_dir_is_still_one_user_error(tmp_path):
    cfg = CompareConfig.from_dict({**BASE, "dataset": "cub200",
                                   "data_dir": str(tmp_path / "nonexistent")})
    with pytest.raises(UserError, match="cub200"):
        preflight(cfg)


def test_plain_class_disjoint_compare_on_inshop_gets_past_its_preflight(tmp_path, main,
                                                                        monkeypatch):
    import sys

    from test_datasets_edge_cases import _inshop

    compare_mod = sys.modules["contrastive.app.compare"]

    real = compare_mod.preflight

    def preflight_then_stop(cfg):
        real(cfg)
        raise UserError("preflight passed")

    monkeypatch.setattr(compare_mod, "preflight", preflight_then_stop)
    _inshop(tmp_path / "root")
    rc, _, err = main("compare", "--protocol", "class-disjoint", "--dataset", "inshop",
                      "--data-dir", str(tmp_path / "root"), "--losses", "infonce", "--steps",
                      "1", "--seeds", "0", "--batch-size", "16", "--output",
                      str(tmp_path / "o"), "--no-progress")
    assert rc == 2 and "preflight passed" in err, err


def test_a_tie_for_best_is_broken_by_table_order_and_both_are_indistinguishable():
    from contrastive.app.statistics import indistinguishable_from_best

    per_seed = {"a": {0: 0.5, 1: 0.7, 2: 0.6}, "b": {0: 0.6, 1: 0.5, 2: 0.7},
                "c": {0: 0.1, 1: 0.12, 2: 0.11}}
    res = indistinguishable_from_best(per_seed)
    assert res["best"] == "a" and res["indistinguishable"] == ["a", "b"]
    assert res["p_values"]["b"] == pytest.approx(1.0)  # t = 0
    swapped = indistinguishable_from_best({"b": per_seed["b"], "a": per_seed["a"]})
    assert swapped["best"] == "b"


def test_one_seed_has_a_mean_and_no_interval():
    import math

    from contrastive.app.statistics import t_interval

    iv = t_interval([0.42])
    assert iv.mean == 0.42 and iv.n == 1
    assert all(math.isnan(v) for v in (iv.low, iv.high, iv.half_width))
