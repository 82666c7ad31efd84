"""A plain pytorch-metric-learning (PML) training loop with our losses swapped in.

The loop is PML's own idiom, unchanged: a PML miner, the loss called with three positional
arguments ``loss_func(embeddings, labels, miner(embeddings, labels))``, one batch without a
positive pair on the way, and the same loop again inside PML's ``CrossBatchMemory``. At every
step our loss's value and the gradients of every model parameter must equal PML's, in float32
and float64. The model follows PML's gradients, so both losses always see the same embeddings.
"""

from __future__ import annotations

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


def run_loop(ours, theirs, miner, dtype, steps=5, seed=0):
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
