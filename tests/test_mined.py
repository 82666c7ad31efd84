"""Our losses with pytorch-metric-learning miners (``indices_tuple=``) equal PML's losses with
the same mined pairs / triplets."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners

import losses
from contrastive.pairs import mined_masks


def _batch(seed=0, n=48, d=16, classes=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_with_pair_miner_equals_supcon(seed):
    x, y = _batch(seed)
    mined = miners.MultiSimilarityMiner(epsilon=0.1)(x.detach(), y)
    ours = losses.InfoNCE(temperature=0.1)(x, y, indices_tuple=mined)
    ref = pml_losses.SupConLoss(temperature=0.1)(x, y, mined)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(pml_losses.SupConLoss(temperature=0.1)(x, y, mined), x)
    assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_with_pair_miner_equals_pml(seed):
    x, y = _batch(seed)
    mined = miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8)(x.detach(), y)
    ours = losses.Contrastive()(x, y, indices_tuple=mined)
    ref = pml_losses.ContrastiveLoss()(x, y, mined)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard"])
def test_triplet_with_triplet_miner_equals_pml(seed, kind):
    x, y = _batch(seed)
    mined = miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind)(x.detach(), y)
    ours = losses.Triplet(margin=0.2)(x, y, indices_tuple=mined)
    ref = pml_losses.TripletMarginLoss(margin=0.2)(x, y, mined)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)


def test_triplet_with_pairs_matches_pml_conversion():
    x, y = _batch(3)
    mined = miners.MultiSimilarityMiner(epsilon=0.1)(x.detach(), y)
    ours = losses.Triplet(margin=0.1)(x, y, indices_tuple=mined)
    ref = pml_losses.TripletMarginLoss(margin=0.1)(x, y, mined)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)


def test_mined_masks_validation_and_restriction():
    pos = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    neg = ~pos & ~torch.eye(3, dtype=torch.bool)
    p2, n2 = mined_masks((torch.tensor([0]), torch.tensor([1]), torch.tensor([1]),
                          torch.tensor([2])), pos, neg)
    assert p2.sum() == 1 and p2[0, 1] and n2.sum() == 1 and n2[1, 2]
    with pytest.raises(ValueError, match="indices_tuple"):
        mined_masks((torch.tensor([0]),), pos, neg)
    with pytest.raises(ValueError, match="outside"):
        mined_masks((torch.tensor([5]), torch.tensor([1]), torch.tensor([2])), pos, neg)
    x, y = _batch()
    with pytest.raises(ValueError, match="indices_tuple"):
        losses.MultiClassNPair()(x, y, indices_tuple=(y,))
