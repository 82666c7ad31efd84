"""Pair-based losses (losses/pair_based.py) against pytorch-metric-learning 2.9: value and
gradient of MultiSimilarityLoss (+ MultiSimilarityMiner), CircleLoss,
GeneralizedLiftedStructureLoss, MarginLoss (fixed and learnable, one or per-class beta) and
NCALoss, in float32 and float64, on the batch itself and against a separate reference set, over
the hyper-parameter ranges users set, and with PML miners' ``indices_tuple``."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from contrastive.critics import Cosine, NegativeL2
from contrastive.pairs import label_masks
from losses import pair_based as PB

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return {"rtol": 3e-5, "atol": 3e-5} if dtype == torch.float32 else {"rtol": 1e-9,
                                                                         "atol": 1e-10}


def batch(dtype, seed=0, n=32, dim=12, classes=6):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def ref_batch(dtype, seed=0, n=20, n_ref=28, dim=12, classes=5):
    x, y = batch(dtype, seed, n, dim, classes)
    r, ry = batch(dtype, seed + 100, n_ref, dim, classes)
    return x, y, r, ry


def check_same(ours, ref, dtype, *tensors, params=()):
    """Equal value and gradients (w.r.t. the tensors and the given parameter pairs)."""
    outs = []
    for fn, side in ((ours, 0), (ref, 1)):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        ps = [pair[side] for pair in params]
        v = fn(*leaves)
        grads = torch.autograd.grad(v, leaves + ps)
        outs.append((v.detach(), grads))
    (v1, g1), (v2, g2) = outs
    assert v1.dtype == dtype
    torch.testing.assert_close(v1, v2.to(dtype), **tol(dtype))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.to(a.dtype), **tol(dtype))
    return float(v1)


# ----------------------------------------------------------------------- multi-similarity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,beta,base", [(2, 50, 0.5), (1, 10, 0.0), (10, 80, 0.7)])
def test_multi_similarity_equals_pml(dtype, alpha, beta, base):
    x, y = batch(dtype, 1)
    v = check_same(lambda e: PB.MultiSimilarity(alpha, beta, base)(e, y),
                   lambda e: pml.MultiSimilarityLoss(alpha, beta, base)(e, y), dtype, x)
    assert v > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [0.1, 0.5])
def test_multi_similarity_mining_equals_pml_miner(dtype, epsilon):
    x, y = batch(dtype, 2)
    miner = pml_miners.MultiSimilarityMiner(epsilon)
    loss = pml.MultiSimilarityLoss()
    check_same(lambda e: PB.MultiSimilarity(epsilon=epsilon)(e, y),
               lambda e: loss(e, y, miner(e, y)), dtype, x)
    # the miner's tuple given to our loss (no mining of its own) is the same loss
    check_same(lambda e: PB.MultiSimilarity()(e, y, miner(e.detach(), y)),
               lambda e: loss(e, y, miner(e, y)), dtype, x)


def test_multi_similarity_mining_equals_pml_miner_pairs():
    x, y = batch(torch.float64, 3)
    a1, p, a2, n = pml_miners.MultiSimilarityMiner(0.1)(x, y)
    s = Cosine(1.0)(x, x)
    pos, neg = PB.multi_similarity_pairs(s, *label_masks(y), 0.1)
    assert set(zip(a1.tolist(), p.tolist())) == set(map(tuple, pos.nonzero().tolist()))
    assert set(zip(a2.tolist(), n.tolist())) == set(map(tuple, neg.nonzero().tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_similarity_ref_emb_equals_pml(dtype):
    x, y, r, ry = ref_batch(dtype, 4)
    check_same(lambda e, f: PB.MultiSimilarity()(e, y, None, f, ry),
               lambda e, f: pml.MultiSimilarityLoss()(e, y, None, f, ry), dtype, x, r)
    miner = pml_miners.MultiSimilarityMiner(0.2)
    check_same(lambda e, f: PB.MultiSimilarity(epsilon=0.2)(e, y, None, f, ry),
               lambda e, f: pml.MultiSimilarityLoss()(e, y, miner(e, y, f, ry), f, ry),
               dtype, x, r)


# ----------------------------------------------------------------------- Circle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,gamma", [(0.4, 80), (0.25, 256), (0.25, 32)])
def test_circle_equals_pml(dtype, m, gamma):
    x, y = batch(dtype, 5)
    check_same(lambda e: PB.Circle(m, gamma)(e, y),
               lambda e: pml.CircleLoss(m=m, gamma=gamma)(e, y), dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_circle_ref_emb_and_miner_equal_pml(dtype):
    x, y, r, ry = ref_batch(dtype, 6)
    check_same(lambda e, f: PB.Circle()(e, y, None, f, ry),
               lambda e, f: pml.CircleLoss()(e, y, None, f, ry), dtype, x, r)
    x, y = batch(dtype, 7)
    miner = pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.3,
                                       distance=CosineSimilarity())
    check_same(lambda e: PB.Circle()(e, y, miner(e.detach(), y)),
               lambda e: pml.CircleLoss()(e, y, miner(e, y)), dtype, x)


# ----------------------------------------------------------------------- lifted structure


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neg_margin,pos_margin", [(1.0, 0.0), (0.5, 0.2), (1.5, 0.0)])
def test_lifted_structure_equals_pml(dtype, neg_margin, pos_margin):
    x, y = batch(dtype, 8)
    check_same(lambda e: PB.LiftedStructure(neg_margin, pos_margin)(e, y),
               lambda e: pml.GeneralizedLiftedStructureLoss(neg_margin, pos_margin)(e, y),
               dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lifted_structure_cosine_ref_emb_and_miner_equal_pml(dtype):
    x, y, r, ry = ref_batch(dtype, 9)
    check_same(
        lambda e, f: PB.LiftedStructure(0.3, 0.8, critic=Cosine(1.0))(e, y, None, f, ry),
        lambda e, f: pml.GeneralizedLiftedStructureLoss(0.3, 0.8, distance=CosineSimilarity())(
            e, y, None, f, ry), dtype, x, r)
    x, y = batch(dtype, 10)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    check_same(lambda e: PB.LiftedStructure()(e, y, miner(e.detach(), y)),
               lambda e: pml.GeneralizedLiftedStructureLoss()(e, y, miner(e, y)), dtype, x)


# ----------------------------------------------------------------------- margin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin,beta", [(0.2, 1.2), (0.05, 0.8), (0.4, 1.0)])
def test_margin_equals_pml(dtype, margin, beta):
    x, y = batch(dtype, 11)
    check_same(lambda e: PB.Margin(margin, beta=beta)(e, y),
               lambda e: pml.MarginLoss(margin, beta=beta, triplets_per_anchor="all")(e, y),
               dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", [None, 6])
def test_margin_learnable_beta_equals_pml(dtype, num_classes):
    x, y = batch(dtype, 12)
    ours = PB.Margin(nu=0.1, learn_beta=True, num_classes=num_classes).to(dtype)
    ref = pml.MarginLoss(nu=0.1, learn_beta=True, num_classes=num_classes,
                         triplets_per_anchor="all").to(dtype)
    with torch.no_grad():  # distinct boundaries per class, the same on both sides
        ours.beta.copy_(ref.beta.data + torch.linspace(0, 0.3, ref.beta.numel(), dtype=dtype))
        ref.beta.data.copy_(ours.beta.data)
    check_same(lambda e: ours(e, y), lambda e: ref(e, y), dtype, x,
               params=[(ours.beta, ref.beta)])
    assert ours.proxy_parameters() == [ours.beta]


@pytest.mark.parametrize("dtype", DTYPES)
def test_margin_cosine_ref_emb_and_miners_equal_pml(dtype):
    x, y, r, ry = ref_batch(dtype, 13)
    check_same(lambda e, f: PB.Margin(0.1, beta=0.3, critic=Cosine(1.0))(e, y, None, f, ry),
               lambda e, f: pml.MarginLoss(0.1, beta=0.3, triplets_per_anchor="all",
                                           distance=CosineSimilarity())(e, y, None, f, ry),
               dtype, x, r)
    x, y = batch(dtype, 14)
    for miner in (pml_miners.TripletMarginMiner(margin=0.3),
                  pml_miners.MultiSimilarityMiner(0.1, distance=LpDistance())):
        check_same(lambda e, mi=miner: PB.Margin()(e, y, mi(e.detach(), y)),
                   lambda e, mi=miner: pml.MarginLoss()(e, y, mi(e, y)), dtype, x)


def test_margin_all_triplets_brute_force():
    """The pair-weighted sum equals the loop over every triplet."""
    x, y = batch(torch.float64, 15, n=16)
    s = NegativeL2(normalize=True)(x, x)
    pos, neg = label_masks(y)
    total, active, count = 0.0, 0, 0
    for a in range(16):
        for p in pos[a].nonzero().flatten():
            for n in neg[a].nonzero().flatten():
                hp = max(0.0, 0.2 - 1.2 - float(s[a, p]))
                hn = max(0.0, 0.2 + 1.2 + float(s[a, n]))
                total += hp + hn
                active += (hp > 0) + (hn > 0)
                count += 1
    got = PB.margin(s, pos, neg, 1.2, 0.2, distance=True)
    assert abs(float(got) - total / active) < 1e-12
    mean = PB.margin(s, pos, neg, 1.2, 0.2, distance=True, reduction="mean")
    assert abs(float(mean) - total / count) < 1e-12


# ----------------------------------------------------------------------- NCA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 4.0, 32.0])
def test_nca_equals_pml(dtype, scale):
    x, y = batch(dtype, 16)
    check_same(lambda e: PB.NCA(scale)(e, y), lambda e: pml.NCALoss(scale)(e, y), dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nca_ref_emb_and_miner_equal_pml(dtype):
    x, y, r, ry = ref_batch(dtype, 17)
    check_same(lambda e, f: PB.NCA(2.0)(e, y, None, f, ry),
               lambda e, f: pml.NCALoss(2.0)(e, y, None, f, ry), dtype, x, r)
    x, y = batch(dtype, 18)
    miner = pml_miners.TripletMarginMiner(margin=0.2)
    check_same(lambda e: PB.NCA()(e, y, miner(e.detach(), y)),
               lambda e: pml.NCALoss()(e, y, miner(e, y)), dtype, x)


# ----------------------------------------------------------------------- the interface


@pytest.mark.parametrize("fn", [PB.multi_similarity, PB.circle, PB.lifted_structure,
                                PB.margin, PB.nca])
def test_reductions_and_check_false(fn):
    x, y = batch(torch.float64, 19)
    s = Cosine(1.0)(x, x)
    pos, neg = label_masks(y)
    mean = fn(s, pos, neg)
    assert torch.allclose(fn(s, pos, neg, check=False), mean)
    total = fn(s, pos, neg, reduction="sum")
    terms = fn(s, pos, neg, reduction="none")
    assert torch.allclose(terms.sum(), total)


def test_no_pairs_zero_and_strict():
    x = torch.randn(6, 4)
    y = torch.arange(6)  # no positive
    for cls in (PB.Circle, PB.Margin, PB.NCA):
        with pytest.warns(UserWarning):
            assert float(cls()(x, y)) == 0.0
        with pytest.raises(ValueError):
            cls(strict=True)(x, y)


def test_ref_emb_without_ref_labels_is_pml_rule():
    """ref_emb without ref_labels: row j of ref_emb carries labels[j], (i, i) excluded."""
    x, y = batch(torch.float64, 20)
    r = x + 0.1 * torch.randn_like(x)
    check_same(lambda e, f: PB.MultiSimilarity()(e, y, None, f),
               lambda e, f: pml.MultiSimilarityLoss()(e, y, None, f), torch.float64, x, r)
