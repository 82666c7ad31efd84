"""Review of the loss core (losses/functional.py, kernels.py, pair_based.py, proxies.py,
contrastive/pairs.py) as a pytorch-metric-learning user and a paper-reproducing researcher:
low-precision inputs to the functional core, and error messages for bad input that name the
argument and the fix."""

from __future__ import annotations

import pytest
import torch

from contrastive.pairs import label_masks
from losses import drop_in as D
from losses import functional as LF
from losses import proxies as PX


def _scores(seed=0, n=10, classes=3, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    s = torch.randn(n, n, generator=g, dtype=torch.float64) * scale
    return s, *label_masks(y)


# ------------------------------------------------------- the core computes in float32


def test_js_bound_of_bf16_scores_computes_in_float32():
    """The module docstring: every function computes in float32 whatever the input dtype.
    ``js_bound`` shifted the scores by 1 before that cast, so bf16 scores were rounded to bf16
    after the shift (-17.448 instead of -17.4555 here)."""
    s, pos, neg = _scores()
    s = s.to(torch.bfloat16)
    got = LF.js_bound(s, pos, neg)
    want = LF.js_bound(s.double(), pos, neg)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # the same as the float32 scores' readout, bit for bit
    assert float(got) == float(LF.js_bound(s.float(), pos, neg))


def test_logmeanexp_of_bf16_scores_computes_in_float32():
    s, pos, _ = _scores(1)
    s = s.to(torch.bfloat16)
    got = LF.logmeanexp(s, pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), LF.logmeanexp(s.double(), pos), rtol=1e-6,
                               atol=1e-6)
    assert float(got) == float(LF.logmeanexp(s.float(), pos, check=False))


# ------------------------------------------------------------------ error messages


@pytest.mark.parametrize("cls", [D.ProxyNCALoss, D.ProxyAnchorLoss, D.NormalizedSoftmaxLoss,
                                 D.CosFaceLoss, D.ArcFaceLoss, PX.ProxyNCA, PX.ProxyAnchor])
def test_proxy_loss_names_embedding_size_on_a_wrong_width(cls):
    """Embeddings of width 5 against a loss built with embedding_size=4 raised torch's
    "mat1 and mat2 shapes cannot be multiplied"; the error now names both sizes and the fix."""
    loss = cls(3, 4)
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"embedding_size=4.*5|5.*embedding_size=4"):
        loss(x, y)


@pytest.mark.parametrize("tup", [
    (torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3])),            # triplets
    (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2])),  # a1 / p
    (torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 1, 2]), torch.tensor([2])),  # a2 / n
])
@pytest.mark.parametrize("cls", [D.TripletMarginLoss, D.ContrastiveLoss, D.MultiSimilarityLoss,
                                 D.NTXentLoss, D.SupConLoss, D.MarginLoss, D.NPairsLoss])
def test_indices_tuple_of_unequal_lengths_names_the_argument(cls, tup):
    """A miner's tuple whose tensors differ in length raised an IndexError from mask
    indexing, or was silently broadcast (a1 of length 2 with p of length 1 mined two pairs);
    it now raises a ValueError that names indices_tuple and the lengths."""
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="indices_tuple.*length"):
        cls()(x, y, tup)


@pytest.mark.parametrize("bad", [-1, 3])
def test_margin_per_class_boundary_refuses_labels_outside_its_classes(bad):
    """MarginLoss(num_classes=3) gathers beta by the anchors' labels: a label -1 silently took
    the last class's boundary (Python's negative index), a label 3 raised torch's bare
    IndexError. Both now raise a ValueError naming the labels' range and the fix."""
    x = torch.randn(6, 5)
    y = torch.tensor([0, 0, 1, 1, bad, bad])
    loss = D.MarginLoss(learn_beta=True, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 3\)"):
        loss(x, y)
    # labels inside the range keep working, and equal the loss with those labels remapped
    ok = loss(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.isfinite(ok)


def _value_and_grad(fn, x):
    e = x.detach().clone().requires_grad_(True)
    v = fn(e)
    (g,) = torch.autograd.grad(v, e)
    return v.detach(), g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("base,epsilon", [(0.5, None), (1.0, None), (0.8, 0.1)])
def test_multi_similarity_distance_critic_equals_pml_lp_distance(dtype, squared, base, epsilon):
    """``base`` of the multi-similarity loss is in the critic's units, as the margins of the
    contrastive, lifted structure and margin losses: PML's ``MultiSimilarityLoss(distance=
    LpDistance())`` has terms ``exp(alpha (d - base))`` and ``exp(beta (base - d))``. Ours
    took ``base`` as a similarity of S = -d, i.e. ``exp(alpha (d + base))`` (3.08 against
    PML's 2.10 at base 0.5)."""
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import miners as pml_miners
    from pytorch_metric_learning.distances import LpDistance

    from contrastive.critics import NegativeL2
    from losses import pair_based as PB

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 4, (16,), generator=g)
    dist = LpDistance(power=2 if squared else 1)
    ours = PB.MultiSimilarity(base=base, epsilon=epsilon,
                              critic=NegativeL2(squared=squared, normalize=True))
    ref = pml.MultiSimilarityLoss(base=base, distance=dist)
    miner = None if epsilon is None else pml_miners.MultiSimilarityMiner(epsilon, distance=dist)
    v1, g1 = _value_and_grad(lambda e: ours(e, y), x)
    v2, g2 = _value_and_grad(
        lambda e: ref(e, y, None if miner is None else miner(e.detach(), y)), x.double())
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9,
                                                                         "atol": 1e-10}
    torch.testing.assert_close(v1, v2.to(dtype), **tol)
    torch.testing.assert_close(g1, g2.to(dtype), **tol)
