"""MultiView, collate_views and the augmentation presets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrastive.pairs import label_masks
from contrastive.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiView,
    collate_views,
    simclr_augmentation,
    small_image_augmentation,
    vector_augmentation,
)


class ListDataset:
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], self.ys[i]


class Tagging:
    """Deterministic 'augmentation': [x, call number]."""

    def __init__(self):
        self.counter = itertools.count()

    def __call__(self, x):
        return torch.tensor([float(x), float(next(self.counter))])


def test_item_views_and_instance_ids():
    ds = ListDataset([10, 20, 30], [2, 0, 2])
    mv = MultiView(ds, Tagging(), n_views=3)
    views, i = mv[1]
    assert i == 1
    assert torch.equal(views, torch.tensor([[20.0, 0.0], [20.0, 1.0], [20.0, 2.0]]))
    assert mv.labels.tolist() == [0, 1, 2]
    assert mv.class_labels.tolist() == [2, 0, 2]  # read item by item (no .labels on ds)
    assert mv.labels.dtype == np.int64 and mv.class_labels.dtype == np.int64
    assert len(mv) == 3 and mv.num_classes == 3


def test_class_labels_from_dataset_attribute_and_numpy_vectors():
    from contrastive.datasets import get_dataset

    ds = get_dataset("digits", split="test")
    mv = MultiView(ds, vector_augmentation(0.05, 0.1))
    assert np.array_equal(mv.class_labels, ds.labels)
    assert mv.kind == "vector"
    views, i = mv[7]
    assert views.shape == (2, 64) and i == 7
    assert not torch.equal(views[0], views[1])  # two random views
    raw = ListDataset([np.arange(4.0)], [0])
    v, _ = MultiView(raw, lambda x: x * 2)[0]
    assert v.dtype == torch.float32 and torch.equal(v, torch.tensor([[0.0, 2, 4, 6]] * 2))


def test_collate_views_is_view_major():
    ds = ListDataset([10, 20, 30, 40], [0, 0, 1, 1])
    mv = MultiView(ds, Tagging(), n_views=2)
    batch = [mv[i] for i in (2, 0, 3)]
    x, ids = collate_views(batch)
    assert x.shape == (6, 2)
    assert ids.tolist() == [2, 0, 3, 2, 0, 3]
    assert x[:, 0].tolist() == [30.0, 10.0, 40.0, 30.0, 10.0, 40.0]
    # item 2 got calls 0 and 1, item 0 calls 2 and 3, item 3 calls 4 and 5: rows 0-2 first views
    assert x[:, 1].tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
    first, second = x.chunk(2)
    assert torch.equal(first[:, 0], second[:, 0])
    pos, neg = label_masks(ids)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for r in range(3):
        expected[r, r + 3] = expected[r + 3, r] = True
    assert torch.equal(pos, expected)
    with pytest.raises(ValueError, match="batch"):
        collate_views([])


def test_dataloader_with_simclr_views():
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 24, 3), np.uint8))
            for i in range(6)]
    mv = MultiView(ListDataset(imgs, [0, 1, 2, 0, 1, 2]), simclr_augmentation(16))
    loader = DataLoader(mv, batch_size=4, shuffle=False, collate_fn=collate_views)
    x, ids = next(iter(loader))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_multiview_errors():
    ds = ListDataset([Image.new("RGB", (8, 8))], [0])
    with pytest.raises(TypeError, match="transform"):
        MultiView(ds, None)
    with pytest.raises(ValueError, match="n_views"):
        MultiView(ds, lambda x: x, n_views=1)
    with pytest.raises(TypeError, match="ToImage"):
        MultiView(ds, lambda x: x)[0]  # a PIL image is not a tensor


@pytest.mark.parametrize("gray", [64, 128, 200])
def test_simclr_normalisation_closed_form(gray):
    """A constant gray image is unchanged by crop, flip, blur, grayscale and zero-strength jitter,
    so every pixel must equal (g / 255 - mean) / std (up to the grayscale weights summing to
    0.9999 rather than 1)."""
    t = simclr_augmentation(12, strength=0.0)
    img = Image.new("RGB", (30, 20), (gray, gray, gray))
    torch.manual_seed(0)
    for _ in range(5):
        out = t(img)
        assert out.shape == (3, 12, 12)
        for c in range(3):
            expected = (gray / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert torch.allclose(out[c], torch.full((12, 12), expected), atol=1e-3)


def test_simclr_inputs_and_randomness():
    t = simclr_augmentation((16, 20), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    assert t(Image.new("L", (32, 32), 9)).shape == (3, 16, 20)  # grayscale becomes RGB
    assert t(torch.zeros(3, 32, 32, dtype=torch.uint8)).shape == (3, 16, 20)
    torch.manual_seed(1)
    a = t(rgb)
    torch.manual_seed(1)
    b = t(rgb)
    c = t(rgb)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="size"):
        simclr_augmentation(0)
    with pytest.raises(ValueError, match="strength"):
        simclr_augmentation(32, strength=-1)
    with pytest.raises(ValueError, match="mean"):
        simclr_augmentation(32, mean=(0.5,), std=(0.5,))


def test_small_image_augmentation():
    t = small_image_augmentation(16)
    x = torch.rand(1, 8, 8)
    out = t(x)
    assert out.shape == (1, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert t(Image.new("L", (28, 28), 255)).shape == (1, 16, 16)
    norm = small_image_augmentation(8, scale=(1.0, 1.0), degrees=0, translate=0.0, mean=[0.5],
                                    std=[0.25])
    # a constant image is invariant to the crop and the affine (fill only enters with a shift)
    const = torch.full((1, 8, 8), 0.75)
    assert torch.allclose(norm(const), torch.full((1, 8, 8), 1.0), atol=1e-6)
    with pytest.raises(ValueError, match="mean"):
        small_image_augmentation(8, mean=[0.5])


def test_vector_augmentation_statistics():
    x = torch.ones(200_000)
    torch.manual_seed(0)
    assert torch.equal(vector_augmentation(0.0, 0.0)(x), x)
    dropped = vector_augmentation(0.0, 0.3)(x)
    assert set(dropped.unique().tolist()) == {0.0, 1.0}
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.01
    noisy = vector_augmentation(0.2, 0.0)(x)
    assert abs((noisy - 1).std().item() - 0.2) < 0.005 and abs((noisy - 1).mean().item()) < 0.005
    out = vector_augmentation()(np.zeros(64))
    assert out.dtype == torch.float32 and out.shape == (64,)
    with pytest.raises(ValueError, match="noise_std"):
        vector_augmentation(-1.0)
    with pytest.raises(ValueError, match="drop_prob"):
        vector_augmentation(0.1, 1.0)
