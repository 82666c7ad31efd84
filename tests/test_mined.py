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


def _repeated_pairs(x, y, seed):
    """A miner's pairs with some pairs repeated (a user's tuple added to all pairs, as PML's
    CrossBatchMemory does): (a1, p, a2, n) with duplicates."""
    g = torch.Generator().manual_seed(seed)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.2)(x.detach(), y)
    rp = torch.randint(0, a1.numel(), (a1.numel() // 2,), generator=g)
    rn = torch.randint(0, a2.numel(), (a2.numel() // 3,), generator=g)
    return (torch.cat([a1, a1[rp]]), torch.cat([p, p[rp]]), torch.cat([a2, a2[rn]]),
            torch.cat([n, n[rn]]))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_with_repeated_pairs_equals_pml(seed, soft):
    """PML turns every positive pair of an anchor and every negative pair of it into a
    triplet, a repeated pair repeatedly: value and gradient equal."""
    x, y = _batch(seed)
    mined = _repeated_pairs(x, y, seed)
    ours = losses.Triplet(margin=0.1, soft=soft)(x, y, indices_tuple=mined)
    ref = pml_losses.TripletMarginLoss(margin=0.1, smooth_loss=soft)(x, y, mined)
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(
        pml_losses.TripletMarginLoss(margin=0.1, smooth_loss=soft)(x, y, mined), x)
    assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "nonzero"])
@pytest.mark.parametrize("check", [True, False])
def test_triplet_count_masks_equal_the_expanded_triplets(reduction, check):
    """Count masks P, Q (``mined_masks(counts=True)``) in the functional core: triplet
    ``(a, p, n)`` weighs ``P_ap Q_an``, the same as the explicit list with the repeats."""
    from losses import functional as LF

    g = torch.Generator().manual_seed(4)
    n = 10
    s = torch.randn(n, n, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])
    same = y[:, None] == y[None, :]
    same.fill_diagonal_(False)
    pc = same.to(torch.int32) * torch.randint(0, 3, (n, n), generator=g, dtype=torch.int32)
    qc = (~(y[:, None] == y[None, :])).to(torch.int32) * torch.randint(
        0, 3, (n, n), generator=g, dtype=torch.int32)
    out = LF.triplet(s, pc, qc, margin=0.3, reduction=reduction, check=check)
    # the explicit list: each (a, p, n) P_ap Q_an times
    a, p, q = [], [], []
    for i in range(n):
        for j in range(n):
            for k in range(n):
                for _ in range(int(pc[i, j]) * int(qc[i, k])):
                    a.append(i), p.append(j), q.append(k)
    a, p, q = torch.tensor(a), torch.tensor(p), torch.tensor(q)
    h = torch.relu(s[a, q] - s[a, p] + 0.3)
    if reduction == "none":
        want = torch.zeros(n, n, n, dtype=s.dtype).index_put((a, p, q), h, accumulate=True)
    elif reduction == "sum":
        want = h.sum()
    elif reduction == "mean":
        want = h.sum() / h.numel()
    else:
        want = h.sum() / (h > 0).sum()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g1, = torch.autograd.grad(out.sum(), s)
    g2, = torch.autograd.grad(want.sum(), s)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


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
