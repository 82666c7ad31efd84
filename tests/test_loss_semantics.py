"""pytorch-metric-learning (PML) semantics, case by case, against PML 2.x itself and brute-force
loops: batches without positives or negatives (zero loss in the graph, or an error with
``strict=True``), NT-Xent's pair form next to SupCon's, ``ref_emb`` without ``ref_labels``,
the registry's PML names and the PML-named classes. float32 and float64 throughout.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners

import losses
from contrastive.critics import Cosine
from contrastive.pairs import NoPairsError, label_masks
from losses import functional as LF

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-9,
                                                                        "atol": 1e-10}


def batch(dtype, n=16, d=6, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def assert_same(ours, theirs, dtype, *tensors):
    v1, g1 = value_and_grads(ours, *tensors)
    v2, g2 = value_and_grads(theirs, *tensors)
    assert v1.dtype == dtype
    torch.testing.assert_close(v1, v2, **tol(dtype))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol(dtype))
    return float(v1)


# every registered loss plus the PML-named classes, with the PML loss where one exists
OURS = {
    "infonce": lambda: losses.get("infonce"),
    "ntxent": lambda: losses.get("ntxent"),
    "supcon": lambda: losses.get("supcon"),
    "nwj": lambda: losses.get("nwj"),
    "js": lambda: losses.get("js"),
    "dv": lambda: losses.get("dv"),
    "npair": lambda: losses.get("npair"),
    "triplet": lambda: losses.get("triplet"),
    "triplet_hard": lambda: losses.Triplet(mining="hard"),
    "triplet_semihard": lambda: losses.Triplet(mining="semihard", soft=True),
    "contrastive": lambda: losses.get("contrastive"),
    "NTXentLoss": lambda: losses.NTXentLoss(),
    "SupConLoss": lambda: losses.SupConLoss(),
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(),
    "ContrastiveLoss": lambda: losses.ContrastiveLoss(),
    "NPairsLoss": lambda: losses.NPairsLoss(),
}
PML = {
    "ntxent": lambda: pml.NTXentLoss(),
    "supcon": lambda: pml.SupConLoss(),
    "triplet": lambda: pml.TripletMarginLoss(),
    "contrastive": lambda: pml.ContrastiveLoss(),
    "NTXentLoss": lambda: pml.NTXentLoss(),
    "SupConLoss": lambda: pml.SupConLoss(),
    "TripletMarginLoss": lambda: pml.TripletMarginLoss(),
    "ContrastiveLoss": lambda: pml.ContrastiveLoss(),
    "NPairsLoss": lambda: pml.NPairsLoss(),
}
# a batch without negatives is no batch at all for these: they keep a term, as PML's do
KEEPS_TERM_WITHOUT_NEGATIVES = {"npair", "NPairsLoss", "contrastive", "ContrastiveLoss"}
KEEPS_TERM_WITHOUT_POSITIVES = {"contrastive", "ContrastiveLoss"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["no_positive", "no_negative"])
@pytest.mark.parametrize("name", list(OURS))
def test_batch_without_positives_or_negatives(name, case, dtype):
    """Default: a zero loss that is part of the graph (zero gradients), a NoPairsWarning, and
    PML's value where PML has the loss; strict=True raises the explanatory ValueError."""
    x, _ = batch(dtype, n=8)
    y = torch.arange(8) if case == "no_positive" else torch.zeros(8, dtype=torch.long)
    keeps = KEEPS_TERM_WITHOUT_POSITIVES if case == "no_positive" else \
        KEEPS_TERM_WITHOUT_NEGATIVES
    leaf = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = OURS[name]()(leaf, y)
    warned = [w for w in caught if issubclass(w.category, losses.NoPairsWarning)]
    assert value.dtype == dtype and value.requires_grad
    (g,) = torch.autograd.grad(value, leaf)
    if name in PML:
        torch.testing.assert_close(value.detach(), PML[name]()(x, y).to(dtype), **tol(dtype))
    if name in keeps:
        assert not warned
        return
    assert float(value.detach()) == 0.0 and torch.equal(g, torch.zeros_like(g))
    assert len(warned) == 1 and "strict=True" in str(warned[0].message)
    loss = OURS[name]()
    loss.strict = True
    cause = "no positive pair" if case == "no_positive" else "no negative pair"
    with pytest.raises(ValueError, match=cause):
        loss(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("positives", ["all", "pair"])
def test_infonce_without_negatives_is_zero_as_pml(positives, dtype):
    """Two items of one class: InfoNCE used to give log 2 here; PML's NTXent and SupCon give
    0, and so do both our forms (and the functional core raises NoPairsError)."""
    x, _ = batch(dtype, n=2)
    y = torch.zeros(2, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", losses.NoPairsWarning)
        v = losses.InfoNCE(positives=positives)(x, y)
    assert float(v) == 0.0
    assert float(pml.NTXentLoss()(x, y)) == 0.0 and float(pml.SupConLoss()(x, y)) == 0.0
    pos, neg = label_masks(y)
    with pytest.raises(NoPairsError, match="no negative pair"):
        LF.infonce(Cosine(0.1)(x, x), pos, neg, form=positives)


# ------------------------------------------------------------------ NT-Xent and SupCon


def brute_ntxent(s, pos_count, neg_count):
    """PML's NT-Xent from its definition: per positive-pair occurrence, the positive against
    every negative occurrence of its anchor."""
    terms = []
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            for _ in range(int(pos_count[i, j])):
                den = math.exp(s[i, j]) + sum(
                    neg_count[i, k] * math.exp(s[i, k]) for k in range(s.shape[1]))
                terms.append(-math.log(math.exp(s[i, j]) / den))
    return float(np.mean(terms))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_functional_ntxent_equals_brute_force_with_counts(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(7, 9, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randint(0, 3, (7, 9), generator=g) * (torch.rand(7, 9, generator=g) < 0.3)
    neg = torch.randint(0, 3, (7, 9), generator=g) * (pos == 0)
    ref = brute_ntxent(s.double().numpy(), pos.numpy(), neg.numpy())
    assert float(LF.ntxent(s, pos.int(), neg.int())) == pytest.approx(
        ref, rel=1e-5 if dtype == torch.float32 else 1e-12)
    ref_bool = brute_ntxent(s.double().numpy(), (pos > 0).numpy(), (neg > 0).numpy())
    assert float(LF.ntxent(s, pos > 0, neg > 0)) == pytest.approx(
        ref_bool, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert abs(ref - ref_bool) > 1e-3  # the counts matter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [3, 6, 40])
def test_pair_form_equals_ntxent_all_form_equals_supcon(classes, dtype):
    x, y = batch(dtype, n=40, classes=classes, seed=classes)
    for t in (0.07, 0.5):
        assert_same(lambda e, t=t: losses.InfoNCE(temperature=t, positives="pair")(e, y),
                    lambda e, t=t: pml.NTXentLoss(temperature=t)(e, y), dtype, x)
        assert_same(lambda e, t=t: losses.InfoNCE(temperature=t, positives="all")(e, y),
                    lambda e, t=t: pml.SupConLoss(temperature=t)(e, y), dtype, x)
    if classes < 40:  # several positives per anchor: the two forms are different losses
        a = float(losses.InfoNCE(positives="pair")(x, y))
        b = float(losses.InfoNCE(positives="all")(x, y))
        assert abs(a - b) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_anchors_with_positives_but_no_mined_negative(dtype):
    """Mined pairs where one anchor keeps a positive and no negative: PML's NT-Xent counts that
    pair as a zero term, SupCon leaves a one-positive anchor out; ours does the same."""
    x, y = batch(dtype, n=10, classes=3, seed=3)
    pos, neg = label_masks(y)
    a1, p = pos.nonzero(as_tuple=True)
    a2, n = neg.nonzero(as_tuple=True)
    first = int(a1[0])
    keep_neg = a2 != first
    mined = (a1, p, a2[keep_neg], n[keep_neg])
    assert_same(lambda e: losses.NTXentLoss(0.2)(e, y, mined),
                lambda e: pml.NTXentLoss(0.2)(e, y, mined), dtype, x)
    one_pos = (pos[first].nonzero()[0], )
    mined1 = (torch.cat([a1[a1 != first], torch.tensor([first])]),
              torch.cat([p[a1 != first], one_pos[0]]), a2[keep_neg], n[keep_neg])
    assert_same(lambda e: losses.SupConLoss(0.2)(e, y, mined1),
                lambda e: pml.SupConLoss(0.2)(e, y, mined1), dtype, x)


def test_registry_names_are_pml_defaults():
    x, y = batch(torch.float64, n=24, classes=3)
    assert losses.get("ntxent").positives == "pair"
    assert losses.get("nt-xent").positives == "pair"
    assert losses.get("supcon").positives == "all"
    assert losses.get("infonce").positives == "all"  # our default, see InfoNCE's docstring
    assert float(losses.get("ntxent")(x, y)) == pytest.approx(float(pml.NTXentLoss()(x, y)))
    assert float(losses.get("supcon")(x, y)) == pytest.approx(float(pml.SupConLoss()(x, y)))
    assert float(losses.get("ntxent", temperature=0.3)(x, y)) == pytest.approx(
        float(pml.NTXentLoss(temperature=0.3)(x, y)))
    from contrastive.critics import Dot

    assert isinstance(losses.get("ntxent", critic=Dot()).critic, Dot)
    with pytest.raises(ValueError, match="positives must be 'all'.*or 'pair'"):
        losses.InfoNCE(positives="every")


# ------------------------------------------------------------------ ref_emb semantics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss", "TripletMarginLoss",
                                  "ContrastiveLoss"])
def test_ref_emb_without_ref_labels_as_pml(name, dtype):
    """PML: reference row j takes labels[j] and (i, i) is left out; the same when ref_labels is
    the very labels tensor. A distinct tensor of equal values keeps (i, i)."""
    x, y = batch(dtype, n=16, classes=4, seed=5)
    r = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(9),
                    dtype=torch.float64).to(dtype)
    ours, theirs = OURS[name](), PML[name]()
    assert_same(lambda e, f: ours(e, y, None, f), lambda e, f: theirs(e, y, None, f), dtype, x, r)
    assert_same(lambda e, f: ours(e, y, None, f, y), lambda e, f: theirs(e, y, None, f, y),
                dtype, x, r)
    y2 = y.clone()
    assert_same(lambda e, f: ours(e, y, None, f, y2), lambda e, f: theirs(e, y, None, f, y2),
                dtype, x, r)


def test_ref_emb_without_labels_needs_paired():
    x, _ = batch(torch.float64, n=6)
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        pml.NTXentLoss()(x, ref_emb=x)
    with pytest.raises(ValueError, match=r"ref_emb was given without labels.*paired=True"):
        losses.NTXentLoss()(x, ref_emb=x)
    v = losses.NTXentLoss(0.1)(x, ref_emb=x.flip(0), paired=True)
    idx = torch.arange(6)
    ref = pml.NTXentLoss(0.1)(x, idx, ref_emb=x.flip(0), ref_labels=idx.clone())
    assert float(v) == pytest.approx(float(ref), rel=1e-12)


# ------------------------------------------------------------------ the PML-named classes


@pytest.mark.parametrize("dtype", DTYPES)
def test_npairs_drop_in_equals_pml_default_with_and_without_a_miner(dtype):
    """NPairsLoss() is PML's default, a normalised dot product (not our MultiClassNPair's plain
    dot); with a miner both take the first mined positive pair of every anchor label."""
    x, y = batch(dtype, n=24, classes=5, seed=7)
    assert_same(lambda e: losses.NPairsLoss()(e, y), lambda e: pml.NPairsLoss()(e, y), dtype, x)
    mined = miners.MultiSimilarityMiner(epsilon=0.3)(x, y)
    assert_same(lambda e: losses.NPairsLoss()(e, y, mined),
                lambda e: pml.NPairsLoss()(e, y, mined), dtype, x)
    plain = float(losses.MultiClassNPair()(x, y))
    assert abs(plain - float(pml.NPairsLoss()(x, y))) > 1e-3


def test_drop_in_constructors_refuse_what_they_cannot_do():
    from pytorch_metric_learning.distances import LpDistance

    with pytest.raises(TypeError, match=r"NTXentLoss does not take distance.*InfoNCE\(critic="):
        losses.NTXentLoss(distance=LpDistance())
    with pytest.raises(TypeError, match="TripletMarginLoss does not take reducer"):
        losses.TripletMarginLoss(reducer=None)
    with pytest.raises(ValueError, match="swap=True"):
        losses.TripletMarginLoss(swap=True)
    with pytest.raises(ValueError, match="triplets_per_anchor=10"):
        losses.TripletMarginLoss(triplets_per_anchor=10)
    with pytest.raises(ValueError, match="reduction must be 'nonzero'"):
        losses.Triplet(reduction="median")  # "sum" is a reduction since issue 12
    assert type(losses.NTXentLoss()).__name__ == "NTXentLoss"
    assert losses.NTXentLoss().critic.temperature == pytest.approx(0.07)
