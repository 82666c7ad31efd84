"""``latent_classes``: the generated class-disjoint benchmark with a known answer (the default of
``contrastive compare --tune``). Checked against the generative model written out here with
numpy, and for the numbers its docstring states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive.datasets import DATASETS, get_dataset
from contrastive.datasets.latent import generate_latent_classes
from evaluation import retrieval_metrics


def _reference(n_classes=200, per_class=16, s=8, n=8, d=64, w=0.35, a=2.0, seed=0):
    """The module docstring's model, draw by draw."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, s))
    y = np.repeat(np.arange(n_classes), per_class)
    u = centres[y] + w * rng.standard_normal((y.size, s))
    v = a * rng.standard_normal((y.size, n))
    mixing = rng.standard_normal((s + n, d)) / np.sqrt(s + n)
    r = np.sqrt((s * (1 + w * w) + n * a * a) / (s + n))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = np.tanh(np.hstack([u, v]) @ mixing / r) @ q
    return x, y, u


def test_generator_follows_the_documented_model_and_is_seeded():
    x, y, u = generate_latent_classes()
    rx, ry, ru = _reference()
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_allclose(x, rx, atol=1e-6)
    np.testing.assert_allclose(u, ru, atol=1e-6)
    assert x.dtype == np.float32 and u.shape == (3200, 8) and x.shape == (3200, 64)
    x2, _, _ = generate_latent_classes(seed=1)
    assert not np.allclose(x, x2)
    # the mixing keeps every pre-activation at unit variance: no coordinate saturates tanh
    assert 0.4 < float(np.abs(x).mean()) < 1.0


def test_class_disjoint_split_and_latent_view_line_up():
    tr = get_dataset("latent_classes", split="train_classes")
    te = get_dataset("latent_classes", split="test_classes")
    lat = get_dataset("latent_classes", split="test_classes", view="latent")
    assert (len(tr), tr.num_classes, len(te), te.num_classes) == (1600, 100, 1600, 100)
    assert {int(c) for c in tr.classes} == set(range(100))
    assert {int(c) for c in te.classes} == set(range(100, 200))
    np.testing.assert_array_equal(te.labels, lat.labels)
    _, y, u = generate_latent_classes()
    np.testing.assert_allclose(lat.data.numpy(), u[y >= 100])
    fold_tr = get_dataset("latent_classes", split="fold0of2-train")
    fold_va = get_dataset("latent_classes", split="fold0of2-val")
    assert not {str(c) for c in fold_tr.classes} & {str(c) for c in fold_va.classes}
    assert {int(c) for c in fold_tr.classes} | {int(c) for c in fold_va.classes} == set(range(100))
    iid_tr, iid_te = (get_dataset("latent_classes", split=s) for s in ("train", "test"))
    assert (len(iid_tr), len(iid_te)) == (2240, 960) and iid_te.num_classes == 200
    assert DATASETS.get("latent_classes").meta["known_answer"] == {"view": "latent"}


def test_raw_input_is_a_poor_embedding_and_the_true_signal_a_good_one():
    """The docstring's numbers: MAP@R of the raw input 3.2, of the true signal 72.2 on the
    test classes."""
    def map_at_r(view):
        ds = get_dataset("latent_classes", split="test_classes", view=view)
        return retrieval_metrics(ds.data, torch.as_tensor(ds.labels))["map_at_r"]

    assert map_at_r("observed") == pytest.approx(0.032, abs=0.001)
    assert map_at_r("latent") == pytest.approx(0.722, abs=0.001)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset("latent_classes", split="val")
    with pytest.raises(ValueError, match="view must be one of"):
        get_dataset("latent_classes", view="signal")
    with pytest.raises(ValueError, match="n_classes must be a positive int"):
        generate_latent_classes(n_classes=0)
    with pytest.raises(ValueError, match="per_class >= 2"):
        generate_latent_classes(per_class=1)
    with pytest.raises(ValueError, match="spreads"):
        generate_latent_classes(nuisance=-1.0)


def test_training_on_the_training_classes_beats_the_raw_input_on_unseen_classes(tmp_path):
    """What makes it a benchmark: 200 InfoNCE steps on classes 0-99 retrieve far better among
    classes 100-199 than the raw input does (3.2), and stay below the known answer (72.2)."""
    from contrastive.app.train import fit

    res = fit({"dataset": "latent_classes", "train_split": "train_classes",
               "eval_split": "test_classes", "loss": "infonce", "steps": 200,
               "batch_size": 64, "m_per_class": 4, "final_probe": False, "eval_every": 0,
               "checkpoint_every": 0, "progress": False, "output": str(tmp_path / "run")})
    assert 0.25 < res["metrics"]["map_at_r"] < 0.722
