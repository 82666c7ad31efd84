"""A pytorch-metric-learning (PML) user's review of ``losses.drop_in``, ``losses.memory`` and
``losses.self_supervised``: things a PML script does besides calling the loss.

* Checkpoints: a state dict saved from PML's loss (PML keeps its hyper-parameters as Python
  numbers, so its state dict holds only learnable tensors) loads strictly into the drop-in class
  of the same name, which then gives PML's values; a state dict of PML's ``CrossBatchMemory``
  loads into ours as into PML's (its write pointer is not in PML's state dict: a loaded memory
  starts empty in both).
* ``losses.to_pml(loss)`` survives pickling (``torch.save(loss)``, spawned DDP workers), and
  refuses our ``CrossBatchMemory`` with a message that says what to do.
* Module casts (``loss.half()``, ``loss.to(torch.float32)``) do not change a PML loss's
  numbers, which are Python floats there.
"""

from __future__ import annotations

import io
import pickle
import warnings

import pytest
import torch

from losses import drop_in as D

pml = pytest.importorskip("pytorch_metric_learning.losses")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _batch(seed=0, b=12, d=6, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randint(0, classes, (b,), generator=g))


def _value_and_grad(fn, emb, labels, *args):
    x = emb.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(x, labels, *args)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# the constructor arguments of each drop-in class (not PML's defaults, so that a loaded state
# dict that reset a hyper-parameter would show)
_CTOR = {
    "NTXentLoss": ((), dict(temperature=0.2)),
    "SupConLoss": ((), dict(temperature=0.3)),
    "TripletMarginLoss": ((), dict(margin=0.1)),
    "ContrastiveLoss": ((), dict(pos_margin=0.1, neg_margin=0.8)),
    "NPairsLoss": ((), {}),
    "MultiSimilarityLoss": ((), dict(alpha=3, beta=40, base=0.4)),
    "CircleLoss": ((), dict(m=0.3, gamma=60)),
    "GeneralizedLiftedStructureLoss": ((), dict(neg_margin=0.9, pos_margin=0.1)),
    "MarginLoss": ((), dict(margin=0.3, beta=1.0, num_classes=3)),
    "MarginLoss-learn_beta": ((), dict(margin=0.3, beta=1.0, learn_beta=True)),
    "NCALoss": ((), dict(softmax_scale=2)),
    "ProxyNCALoss": ((3, 6), dict(softmax_scale=2)),
    "ProxyAnchorLoss": ((3, 6), dict(margin=0.2, alpha=16)),
    "NormalizedSoftmaxLoss": ((3, 6), dict(temperature=0.1)),
    "CosFaceLoss": ((3, 6), dict(margin=0.3, scale=32)),
    "ArcFaceLoss": ((3, 6), dict(margin=20.0, scale=32)),
}


@pytest.mark.parametrize("case", list(_CTOR))
def test_drop_in_losses_load_a_pml_state_dict(case):
    """``ours.load_state_dict(pml_loss.state_dict())`` (strict) works for every drop-in class,
    keeps the hyper-parameters ours was built with (PML's are constructor arguments, not in its
    state dict) and takes PML's learnable tensors: the two then give the same value and
    gradient."""
    name = case.split("-")[0]
    args, kwargs = _CTOR[case]
    torch.manual_seed(0)
    theirs = getattr(pml, name)(*args, **kwargs).double()
    ours = getattr(D, name)(*args, **kwargs)
    state = theirs.state_dict()
    result = ours.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    emb, labels = _batch()
    v, g = _value_and_grad(ours, emb, labels)
    vr, gr = _value_and_grad(theirs, emb, labels)
    torch.testing.assert_close(v, vr, **TOL[torch.float64])
    torch.testing.assert_close(g, gr, **TOL[torch.float64])


def test_a_checkpoint_of_ours_with_a_missing_tensor_still_fails():
    """The PML fallback does not make our own checkpoints lenient: a state dict that holds one
    of our tensors but lacks another is still refused by a strict load."""
    ours = D.ProxyAnchorLoss(3, 6)
    state = ours.state_dict()
    del state["proxies"]
    with pytest.raises(RuntimeError, match="Missing key.*proxies"):
        D.ProxyAnchorLoss(3, 6).load_state_dict(state)
    state = D.MarginLoss(learn_beta=True).state_dict()
    state["unexpected"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key.*unexpected"):
        D.MarginLoss(learn_beta=True).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_batch_memory_loads_a_pml_checkpoint(dtype):
    """A state dict of PML's ``CrossBatchMemory(NTXentLoss(0.2), 6, 20)`` loads strictly into
    ours; PML's state dict has the memory rows but not the write pointer, so after the load both
    memories continue from slot 0 with nothing read yet, and give the same values and gradients
    over the next batches (the ring wraps around)."""
    theirs = pml.CrossBatchMemory(pml.NTXentLoss(0.2), 6, memory_size=20)
    for step in range(3):
        theirs(*_batch(step, dtype=dtype))
    state = theirs.state_dict()
    ours = D.CrossBatchMemory(D.NTXentLoss(0.2), 6, memory_size=20)
    fresh = pml.CrossBatchMemory(pml.NTXentLoss(0.2), 6, memory_size=20)
    result = ours.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.load_state_dict(state)
    assert torch.equal(ours.memory.labels, state["label_memory"])
    assert torch.equal(ours.memory.embeddings, state["embedding_memory"])
    assert len(ours.memory) == 0  # PML's fresh module reads nothing before it writes
    for step in range(3, 8):
        emb, labels = _batch(step, dtype=dtype)
        v, g = _value_and_grad(ours, emb, labels)
        vr, gr = _value_and_grad(fresh, emb, labels)
        torch.testing.assert_close(v, vr, **TOL[dtype])
        torch.testing.assert_close(g, gr, **TOL[dtype])
    # our own checkpoint still round-trips with its pointer
    again = D.CrossBatchMemory(D.NTXentLoss(0.2), 6, memory_size=20)
    again.load_state_dict(ours.state_dict())
    assert len(again.memory) == len(ours.memory) == 20 and again.memory._ptr == ours.memory._ptr


def test_to_pml_pickles_and_keeps_its_class_name():
    """``to_pml(loss)`` is pickled by ``torch.save(loss)`` and by spawned DDP workers that
    receive it as an argument (PML's losses pickle); the copy is the same PML-typed class name
    and gives the same value."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    emb, labels = _batch()
    wrapped = D.to_pml(D.NTXentLoss(0.2))
    for copy in (pickle.loads(pickle.dumps(wrapped)), _torch_round_trip(wrapped),
                 pickle.loads(pickle.dumps(DistributedLossWrapper(wrapped))).loss):
        assert isinstance(copy, BaseMetricLossFunction)
        assert type(copy).__name__ == "NTXentLoss"
        assert type(copy) is type(wrapped)
        torch.testing.assert_close(copy(emb, labels), wrapped(emb, labels), rtol=0, atol=0)
        torch.testing.assert_close(copy(emb, labels), pml.NTXentLoss(0.2)(emb, labels),
                                   **TOL[torch.float64])


def _torch_round_trip(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_to_pml_refuses_our_cross_batch_memory_with_a_message():
    """PML's ``DistributedLossWrapper`` calls a wrapped loss with five positional arguments;
    our ``CrossBatchMemory`` takes ``(embeddings, labels, indices_tuple, enqueue_mask)`` and
    gathers the batch under DDP itself, so ``to_pml`` refuses it and says so (instead of a
    ``TypeError`` about positional arguments on the first call)."""
    with pytest.raises(TypeError, match="gathers.*itself"):
        D.to_pml(D.CrossBatchMemory(D.NTXentLoss(), 6, 20))


@pytest.mark.parametrize("cast", ["half", "float"])
def test_a_module_cast_does_not_change_the_temperature(cast):
    emb, labels = _batch()
    ours = getattr(D.NTXentLoss(0.07), cast)()
    for dtype in (torch.float32, torch.float64):
        e = emb.to(dtype)
        torch.testing.assert_close(ours(e, labels), pml.NTXentLoss(0.07)(e, labels),
                                   **TOL[dtype])


@pytest.mark.parametrize("critic", ["dot", "bilinear"])
def test_cross_batch_memory_two_calls_before_backward(critic):
    """Gradient accumulation (two calls, one backward) with a critic that keeps the memory for
    its gradient (a dot product, a bilinear form): the second call's enqueue must not overwrite
    the rows the first call's backward pass reads (``Memory.read``: a reader that keeps them
    takes a copy); the gradients equal those of one backward pass per call."""
    from contrastive.critics import Bilinear, Dot
    from losses.memory import CrossBatchMemory
    from losses.modules import InfoNCE

    torch.manual_seed(0)
    make = {"dot": Dot, "bilinear": lambda: Bilinear(6)}[critic]
    loss = InfoNCE(critic=make().double())
    batches = [_batch(s, b=8) for s in range(3)]
    one = CrossBatchMemory(loss, 6, memory_size=12)
    together = CrossBatchMemory(loss, 6, memory_size=12)
    xs = [e.clone().requires_grad_() for e, _ in batches]
    sum(together(x, y) for x, (_, y) in zip(xs, batches)).backward()
    for x, (e, y) in zip(xs, batches):
        _, g = _value_and_grad(one, e, y)
        torch.testing.assert_close(x.grad, g, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss", "MultiSimilarityLoss"])
def test_cross_batch_memory_uses_a_user_tuple_as_given(name):
    """PML's ``CrossBatchMemory(loss)(emb, labels, indices_tuple)`` without a miner adds the
    user's tuple (indices into the memory) to all pairs less each embedding's pair with its own
    copy, and takes the user's tuple as given: a pair of an anchor with its own copy that the
    user mined stays (PML removes self-comparisons from the pairs it makes, not from the user's).
    Ours did the same with a miner but dropped such pairs without one."""
    from pytorch_metric_learning.miners import TripletMarginMiner

    user_miner = TripletMarginMiner(0.5, type_of_triplets="all")
    ours = D.CrossBatchMemory(getattr(D, name)(), 5, memory_size=22)
    theirs = pml.CrossBatchMemory(getattr(pml, name)(), 5, memory_size=22)
    g = torch.Generator().manual_seed(3)
    selves = 0
    for _ in range(5):
        emb = torch.randn(8, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (8,), generator=g)
        after = __import__("copy").deepcopy(ours.memory)  # the memory this call will read
        slots = after.enqueue(emb, labels)
        a, p, n = user_miner(emb, labels, *[t.clone() for t in after.read()])
        selves += int((p == slots[a]).sum())
        v, gr = _value_and_grad(ours, emb, labels, (a, p, n))
        vr, grr = _value_and_grad(theirs, emb, labels, (a, p, n))
        torch.testing.assert_close(v, vr, **TOL[torch.float64])
        torch.testing.assert_close(gr, grr, **TOL[torch.float64])
    assert selves > 0  # the user's tuples did pair anchors with their own copies


def test_cross_batch_memory_refuses_nca_with_the_reason():
    """PML's ``CrossBatchMemory(NCALoss())`` runs with each embedding's own copy in the
    softmax (its NCA ignores the pair list it is given); ours refuses NCA, and the message says
    why for NCA too (it used to speak of one pair per class only, the N-pair loss's reason)."""
    with pytest.raises(ValueError, match=r"NCALoss picks its own pairs.*NCA reads a miner"):
        D.CrossBatchMemory(D.NCALoss(), 6, 20)
