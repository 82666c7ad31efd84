"""A plain pytorch-metric-learning (PML) training loop with our losses swapped in.

The loop is PML's own idiom, unchanged: a PML miner, the loss called with three positional
arguments ``loss_func(embeddings, labels, miner(embeddings, labels))``, one batch without a
positive pair on the way, and the same loop again inside PML's ``CrossBatchMemory``. At every
step our loss's value and the gradients of every model parameter must equal PML's, in float32
and float64. The model follows PML's gradients, so both losses always see the same embeddings.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch import nn

import losses
from losses import NoPairsWarning

DTYPES = [torch.float32, torch.float64]
DIM_IN, DIM_OUT, BATCH = 12, 8, 24


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10,
                                                                        "atol": 1e-12}


def batches(n_steps: int, gen: torch.Generator):
    """Batches of 24 items: 6 classes x 4, uneven classes, and at step 2 every label once (no
    positive pair: PML returns a zero loss there and ours must too)."""
    for step in range(n_steps):
        if step == 2:
            labels = torch.arange(BATCH)
        elif step % 2:
            labels = torch.arange(6).repeat_interleave(4)
        else:
            labels = torch.randint(0, 5, (BATCH,), generator=gen)
        yield labels


def pairs_of_losses():
    """(ours, PML's) with the same hyper-parameters and PML's default distances."""
    return {
        "ntxent": (losses.NTXentLoss(temperature=0.2), pml.NTXentLoss(temperature=0.2)),
        "supcon": (losses.SupConLoss(temperature=0.2), pml.SupConLoss(temperature=0.2)),
        "triplet": (losses.TripletMarginLoss(margin=0.1), pml.TripletMarginLoss(margin=0.1)),
        "triplet_smooth": (losses.TripletMarginLoss(margin=0.1, smooth_loss=True),
                           pml.TripletMarginLoss(margin=0.1, smooth_loss=True)),
        "contrastive": (losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8),
                        pml.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8)),
        "npairs": (losses.NPairsLoss(), pml.NPairsLoss()),
    }


MINERS = {
    "pairs": lambda: miners.MultiSimilarityMiner(epsilon=0.2),
    "triplets": lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
    "none": lambda: None,
}


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM_IN, 16), nn.Tanh(), nn.Linear(16, DIM_OUT)).to(dtype)


def grads(value, model, retain=False):
    return torch.autograd.grad(value, list(model.parameters()), retain_graph=retain)


def scaled_tol(dtype):
    """For losses with large scales inside an exponential (multi-similarity's beta, Circle's
    gamma): float32 rounding is amplified by them (tests/test_pair_based.py uses the same)."""
    return {"rtol": 3e-5, "atol": 3e-5} if dtype == torch.float32 else {"rtol": 1e-9,
                                                                        "atol": 1e-10}


def run_loop(ours, theirs, miner, dtype, steps=5, seed=0, tol=tol):
    """PML's loop; asserts value and parameter-gradient equality at every step and returns
    the per-step values."""
    model = make_model(dtype, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for labels in batches(steps, gen):
        x = torch.randn(BATCH, DIM_IN, generator=gen, dtype=torch.float64).to(dtype)
        emb = model(x)
        mined = miner(emb, labels) if miner is not None else None
        v_theirs = theirs(emb, labels, mined)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoPairsWarning)
            v_ours = ours(emb, labels, mined)  # three positional arguments, as PML
        assert v_ours.dtype == dtype and v_ours.requires_grad
        if torch.isnan(v_theirs):  # PML's NCALoss on a batch without a positive pair: NaN;
            # ours is the zero (with its warning) of every other PML loss on such a batch
            assert float(v_ours) == 0.0
            assert all(float(g.abs().max()) == 0.0 for g in grads(v_ours, model))
            values.append(math.nan)
            continue
        torch.testing.assert_close(v_ours.detach(), v_theirs.detach(), **tol(dtype))
        g_theirs = grads(v_theirs, model, retain=True)
        g_ours = grads(v_ours, model)
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, **tol(dtype))
        values.append(float(v_theirs.detach()))
        opt.zero_grad()
        for p, g in zip(model.parameters(), g_theirs):
            p.grad = g
        opt.step()
    return values


# every loss without a miner and with the miner kind it is used with; the triplet miner on the
# pair-based losses (NT-Xent, contrastive) repeats pairs, which PML counts with multiplicity
LOOPS = [
    ("ntxent", "none"), ("ntxent", "pairs"), ("ntxent", "triplets"),
    ("supcon", "none"), ("supcon", "pairs"),
    ("triplet", "none"), ("triplet", "pairs"), ("triplet", "triplets"),
    ("triplet_smooth", "triplets"),
    ("contrastive", "none"), ("contrastive", "triplets"),
    ("npairs", "none"), ("npairs", "pairs"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "miner"), LOOPS)
def test_pml_training_loop_with_our_losses(name, miner, dtype):
    ours, theirs = pairs_of_losses()[name]
    values = run_loop(ours, theirs, MINERS[miner](), dtype)
    if name == "contrastive" and miner == "none":  # no positive: the negative part stays
        assert values[2] > 0.0
    else:
        assert values[2] == 0.0  # the batch without a positive pair
    assert sum(v > 0 for v in values) >= 3  # and the others trained on something


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "with_miner"), [("ntxent", True), ("supcon", False),
                                                  ("triplet", True), ("contrastive", False)])
def test_cross_batch_memory_accepts_our_losses(name, with_miner, dtype):
    """PML's CrossBatchMemory checks the loss's class name and calls it with five positional
    arguments (embeddings, labels, indices_tuple, memory embeddings, memory labels)."""
    ours, theirs = pairs_of_losses()[name]
    miner = (lambda: miners.MultiSimilarityMiner(epsilon=0.2)) if with_miner else (lambda: None)
    wrapped_ours = pml.CrossBatchMemory(ours, DIM_OUT, memory_size=60, miner=miner())
    wrapped_theirs = pml.CrossBatchMemory(theirs, DIM_OUT, memory_size=60, miner=miner())
    for m in (wrapped_ours, wrapped_theirs):
        m.embedding_memory = m.embedding_memory.to(dtype)
    values = run_loop(lambda e, y, _: wrapped_ours(e, y), lambda e, y, _: wrapped_theirs(e, y),
                      None, dtype, steps=5)
    assert sum(v > 0 for v in values) >= 3  # the memory wraps around (5 x 24 > 60)


def test_cross_batch_memory_refuses_a_class_name_it_does_not_know():
    """What the wrapper checks: PML's class names. Our generic modules carry our names, so the
    PML-named classes in losses.drop_in are the ones to wrap."""
    with pytest.raises(Exception, match="CrossBatchMemory not supported for InfoNCE"):
        pml.CrossBatchMemory(losses.InfoNCE(), DIM_OUT)
    pml.CrossBatchMemory(losses.NTXentLoss(), DIM_OUT)


@pytest.mark.parametrize("dtype", DTYPES)
def test_distributed_loss_wrapper_with_to_pml(dtype):
    """DistributedLossWrapper needs a PML BaseMetricLossFunction; to_pml gives one around our
    loss (here outside a process group, where the wrapper calls the loss as it is)."""
    with pytest.raises(TypeError, match="BaseMetricLossFunction"):
        DistributedLossWrapper(losses.NTXentLoss())
    wrapped = DistributedLossWrapper(losses.to_pml(losses.NTXentLoss(temperature=0.2)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-distributed setting.*")
        values = run_loop(lambda e, y, m: wrapped(e, y, m), pml.NTXentLoss(temperature=0.2),
                          miners.MultiSimilarityMiner(epsilon=0.2), dtype, steps=4)
    assert values[2] == 0.0
    # the adapter keeps the class name, so CrossBatchMemory accepts it as well
    pml.CrossBatchMemory(losses.to_pml(losses.SupConLoss()), DIM_OUT)


def test_the_no_positive_batch_warns_once_per_instance():
    ours, _ = pairs_of_losses()["ntxent"]
    emb = torch.randn(6, 4, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            v = ours(emb, torch.arange(6))
        losses.NTXentLoss()(emb, torch.arange(6))  # a new instance warns again
    ours_warnings = [w for w in caught if issubclass(w.category, NoPairsWarning)]
    assert len(ours_warnings) == 2
    assert "no positive pair" in str(ours_warnings[0].message)
    assert "strict=True" in str(ours_warnings[0].message)
    v.backward()
    assert float(v.detach()) == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))


# ---------------------------------------------------------------- the pair-based and proxy losses


def more_pairs_of_losses():
    """The pair-based losses of issue 14 by PML's names, with hyper-parameters off the defaults
    and passed positionally where PML's signature allows it (its order is ours)."""
    return {
        "multi_similarity": (losses.MultiSimilarityLoss(1.5, 40, 0.6),
                             pml.MultiSimilarityLoss(1.5, 40, 0.6)),
        "circle": (losses.CircleLoss(0.3, 64), pml.CircleLoss(0.3, 64)),
        "lifted": (losses.GeneralizedLiftedStructureLoss(0.9, 0.1),
                   pml.GeneralizedLiftedStructureLoss(0.9, 0.1)),
        "margin": (losses.MarginLoss(0.15, 0, 1.1, "all"), pml.MarginLoss(0.15, 0, 1.1, "all")),
        "nca": (losses.NCALoss(2.0), pml.NCALoss(2.0)),
    }


MORE_LOOPS = [
    ("multi_similarity", "none"), ("multi_similarity", "pairs"),
    ("circle", "none"), ("circle", "pairs"),
    ("lifted", "none"), ("lifted", "pairs"),
    ("margin", "none"), ("margin", "triplets"),
    ("nca", "none"), ("nca", "pairs"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "miner"), MORE_LOOPS)
def test_pml_training_loop_with_the_pair_based_losses(name, miner, dtype):
    """``from losses import drop_in as losses`` for MultiSimilarityLoss, CircleLoss,
    GeneralizedLiftedStructureLoss, MarginLoss and NCALoss: PML's loop, PML's values and
    gradients at every step (the batch without a positive pair included)."""
    ours, theirs = more_pairs_of_losses()[name]
    values = run_loop(ours, theirs, MINERS[miner](), dtype, tol=scaled_tol)
    assert sum(v > 0 for v in values) >= 3


PROXY_CLASSES = 6


def loss_pairs_with_parameters():
    """(ours, PML's) built from the same seed: PML's constructor draws the proxies (or the
    margin loss's boundaries), and ours must draw the same ones."""
    specs = {
        "proxy_nca": lambda m: m.ProxyNCALoss(PROXY_CLASSES, DIM_OUT, softmax_scale=3),
        "proxy_anchor": lambda m: m.ProxyAnchorLoss(PROXY_CLASSES, DIM_OUT, 0.2, 16),
        "norm_softmax": lambda m: m.NormalizedSoftmaxLoss(PROXY_CLASSES, DIM_OUT, 0.1),
        "cosface": lambda m: m.CosFaceLoss(PROXY_CLASSES, DIM_OUT, margin=0.2, scale=16),
        "arcface": lambda m: m.ArcFaceLoss(PROXY_CLASSES, DIM_OUT, 20.0, 16),
        "margin_learned": lambda m: m.MarginLoss(0.1, 0.01, 1.0, "all", True, PROXY_CLASSES),
    }
    out = {}
    for name, make in specs.items():
        torch.manual_seed(7)
        theirs = make(pml)
        after_theirs = torch.rand(())
        torch.manual_seed(7)
        ours = make(losses)
        assert torch.equal(torch.rand(()), after_theirs), name  # the same draws, no more
        out[name] = (ours, theirs)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["proxy_nca", "proxy_anchor", "norm_softmax", "cosface",
                                  "arcface", "margin_learned"])
def test_pml_training_loop_with_losses_that_learn_parameters(name, dtype):
    """PML's loop for a loss with parameters: the loss's own optimizer (PML's idiom,
    ``torch.optim.SGD(loss_func.parameters(), lr=...)``) steps the proxies / boundaries. The
    same seed gives the same parameters (in PML's layout: ``W [d, C]`` for the softmax losses),
    and at every step the value, the model's gradients and the loss's own gradients equal
    PML's, with a miner's tuple (PML weighs the embeddings by it) on every other step."""
    ours, theirs = loss_pairs_with_parameters()[name]
    layout = (lambda p: p.T) if hasattr(theirs, "W") else (lambda p: p)
    mine, ref = list(ours.parameters()), list(theirs.parameters())
    assert len(mine) == len(ref) == 1
    torch.testing.assert_close(layout(mine[0].detach()), ref[0].detach(), rtol=0, atol=0)
    model = make_model(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=2.0)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=2.0)
    gen = torch.Generator().manual_seed(1)
    miner = miners.MultiSimilarityMiner(epsilon=0.2)
    for step in range(5):
        labels = torch.randint(0, PROXY_CLASSES, (BATCH,), generator=gen)
        emb = model(torch.randn(BATCH, DIM_IN, generator=gen, dtype=torch.float64).to(dtype))
        mined = miner(emb, labels) if step % 2 else None
        v_theirs, v_ours = theirs(emb, labels, mined), ours(emb, labels, mined)
        # the precision of the lower of the embeddings' and the parameter's float types: PML
        # leaves the margin loss's boundaries in float32 and sums their gradient there, ours in
        # the scores' type, so after a step the boundaries differ at float32 rounding
        t = scaled_tol(dtype if ref[0].dtype == dtype else torch.float32)
        torch.testing.assert_close(v_ours.detach(), v_theirs.detach(), **t)
        g_theirs = torch.autograd.grad(v_theirs, [*model.parameters(), *ref], retain_graph=True)
        g_ours = torch.autograd.grad(v_ours, [*model.parameters(), *mine])
        for a, b in zip(g_ours[:-1], g_theirs[:-1]):
            torch.testing.assert_close(a, b, **t)
        torch.testing.assert_close(layout(g_ours[-1]), g_theirs[-1], **t)
        for p, g in zip(model.parameters(), g_theirs):
            p.grad = g
        mine[0].grad, ref[0].grad = g_ours[-1], g_theirs[-1]
        opt.step()
        opt_ours.step()
        opt_theirs.step()
    assert mine[0].dtype == ref[0].dtype  # float64 embeddings: PML's float64 proxies, ours too
    torch.testing.assert_close(layout(mine[0].detach()), ref[0].detach(), **t)


def test_softmax_losses_read_pml_state_dicts_and_show_pml_layout():
    """A checkpoint of PML's NormalizedSoftmaxLoss / CosFaceLoss / ArcFaceLoss (key ``W``,
    ``[d, C]``) loads into ours, which then gives PML's values; ``W`` reads the proxies in
    PML's layout."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(BATCH, DIM_OUT, generator=gen)
    labels = torch.randint(0, PROXY_CLASSES, (BATCH,), generator=gen)
    for name in ("NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss"):
        theirs = getattr(pml, name)(PROXY_CLASSES, DIM_OUT)
        ours = getattr(losses, name)(PROXY_CLASSES, DIM_OUT)
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.W, theirs.W.detach())
        torch.testing.assert_close(ours(emb, labels), theirs(emb, labels), rtol=1e-5,
                                   atol=1e-6)


def test_drop_in_names_cover_pml_and_refuse_its_objects_by_name():
    """Every PML loss the library has (issue 14's included) is in ``losses.drop_in`` under
    PML's name; PML-only constructor objects and random triplet sampling are refused with a
    message naming our equivalent."""
    from losses import drop_in

    for name in ("NTXentLoss", "SupConLoss", "TripletMarginLoss", "ContrastiveLoss",
                 "NPairsLoss", "MultiSimilarityLoss", "CircleLoss",
                 "GeneralizedLiftedStructureLoss", "MarginLoss", "NCALoss", "ProxyNCALoss",
                 "ProxyAnchorLoss", "NormalizedSoftmaxLoss", "CosFaceLoss", "ArcFaceLoss",
                 "CrossBatchMemory"):
        assert hasattr(drop_in, name) and hasattr(pml, name), name
        assert getattr(losses, name) is getattr(drop_in, name)
    with pytest.raises(TypeError, match=r"CircleLoss does not take distance.*losses\.Circle"):
        drop_in.CircleLoss(distance=object())
    with pytest.raises(TypeError, match=r"ProxyAnchorLoss does not take weight_init_func"):
        drop_in.ProxyAnchorLoss(3, 4, weight_init_func=None)
    with pytest.raises(ValueError, match=r"MarginLoss\(triplets_per_anchor=5\)"):
        drop_in.MarginLoss(triplets_per_anchor=5)
