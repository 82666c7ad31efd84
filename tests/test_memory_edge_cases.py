"""Edge cases of losses/memory.py (and losses/self_supervised.py) against the references
(pytorch-metric-learning's ``CrossBatchMemory``, lightly's ``NTXentLoss`` / ``DCLLoss`` /
``DCLWLoss``) and brute-force loops: changing batch sizes and int32 labels, a one-row batch,
resuming from a checkpoint; the ring's dtype (a float32 batch after a float64 batch,
``.double()`` or a float64 checkpoint, bit-exact round trips); a batch the checks reject
(NaN rows, also another rank's, wrong labels) leaving the memory as it was; a fill-only
``enqueue_mask``; the queue with critics that keep it for the gradient, ``strict=True`` on an
empty queue, errors that name ``query`` / ``key``; the buffers following the batch's device.
The test marked ``xfail(strict=True)`` pins down a known bug left to losses/modules.py."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from contrastive import distributed as D
from contrastive.critics import Dot, NegativeL2
from contrastive.pairs import NoPairsError
from losses import modules as M
from losses.memory import CrossBatchMemory, Memory, NegativeQueue
from losses.self_supervised import DCL, DCLW, SimCLR

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

TOL64 = dict(rtol=1e-10, atol=1e-12)


def _step(fn, emb, labels, **kw):
    x = emb.clone().requires_grad_()
    out = fn(x, labels, **kw)
    out.backward()
    return out.detach(), x.grad


def _batch(g, b, d=6, classes=4, dtype=torch.float64, label_dtype=torch.long):
    emb = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    return emb, torch.randint(0, classes, (b,), generator=g).to(label_dtype)


def _same_state(module, state):
    now = module.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def _two_ranks(monkeypatch, other):
    """This process as rank 0 of 2; ``other(x)`` is rank 1's tensor for this rank's ``x``."""
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(D, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(D, "all_gather_nograd", lambda x, group=None: torch.cat([x, other(x)]))


def _nan_rows(x):
    if not x.is_floating_point():
        return x  # the sizes, the labels
    y = x.clone()
    y[1, 3] = float("nan")
    return y


# ---------------------------------------------------------------------------- XBM vs PML


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("case", ["supcon", "ntxent", "triplet", "contrastive"])
def test_xbm_changing_batch_sizes_equal_pml(case, label_dtype):
    """Batch sizes that change every call, including a batch as large as the memory written
    from a pointer in the middle of the ring, and int32 labels (values and gradients)."""
    ours_fn, pml_fn = {
        "supcon": (lambda: M.InfoNCE(0.1), lambda: pml_losses.SupConLoss(0.1)),
        "ntxent": (lambda: M.InfoNCE(0.1, positives="pair"), lambda: pml_losses.NTXentLoss(0.1)),
        "triplet": (lambda: M.Triplet(0.1), lambda: pml_losses.TripletMarginLoss(0.1)),
        "contrastive": (M.Contrastive, pml_losses.ContrastiveLoss),
    }[case]
    ours = CrossBatchMemory(ours_fn(), 6, 10)
    ref = pml_losses.CrossBatchMemory(pml_fn(), 6, 10)
    g = torch.Generator().manual_seed(11)
    for b in [7, 10, 3, 10, 9, 4, 10, 2, 6]:
        emb, labels = _batch(g, b, label_dtype=label_dtype)
        v, gr = _step(ours, emb, labels)
        vr, grr = _step(ref, emb, labels)
        torch.testing.assert_close(v, vr, **TOL64)
        torch.testing.assert_close(gr, grr, **TOL64)
    assert torch.equal(ours.memory.labels, ref.label_memory)
    torch.testing.assert_close(ours.memory.embeddings, ref.embedding_memory, rtol=0, atol=0)


def test_xbm_one_row_batch_excludes_its_own_copy():
    """A one-row batch: its own just-written copy is not a positive (PML 2.9 keeps it there,
    its ``not_self_comparisons`` reads start == end as a wrap-around, so PML is not the
    reference here): the loss equals the plain loss against the memory without that row."""
    g = torch.Generator().manual_seed(11)
    xbm = CrossBatchMemory(M.InfoNCE(0.1), 6, 10)
    for b in [7, 6]:
        xbm(*_batch(g, b))
    emb, labels = _batch(g, 1)
    after = copy.deepcopy(xbm.memory)
    (slot,) = after.enqueue(emb, labels).tolist()
    mem, mem_labels = after.read()
    keep = torch.arange(mem.shape[0]) != slot
    want = M.InfoNCE(0.1)(emb, labels, None, mem[keep], mem_labels[keep])
    torch.testing.assert_close(xbm(emb, labels), want, **TOL64)


def test_xbm_state_dict_resume_with_changing_batch_sizes():
    g = torch.Generator().manual_seed(3)
    batches = [_batch(g, b) for b in [7, 10, 3, 10, 9, 4]]
    straight = CrossBatchMemory(M.InfoNCE(0.1), 6, 10)
    expected = [straight(e, lab) for e, lab in batches]
    first = CrossBatchMemory(M.InfoNCE(0.1), 6, 10)
    for e, lab in batches[:3]:
        first(e, lab)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    resumed = CrossBatchMemory(M.InfoNCE(0.1), memory_size=10)  # float32 until loaded
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for (e, lab), want in zip(batches[3:], expected[3:]):
        torch.testing.assert_close(resumed(e, lab), want, rtol=0, atol=0)


@pytest.mark.parametrize("reset", [False, True])
def test_xbm_float64_then_float32_equals_pml(reset):
    ours = CrossBatchMemory(M.InfoNCE(0.1), 6, 20)
    ref = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(0.1), 6, 20)
    g = torch.Generator().manual_seed(1)
    e64, l64 = _batch(g, 7)
    _step(ours, e64, l64), _step(ref, e64, l64)
    if reset:
        ours.reset_queue(), ref.reset_queue()
    for _ in range(2):
        emb, labels = _batch(g, 7, dtype=torch.float32)
        vr, grr = _step(ref, emb, labels)
        v, gr = _step(ours, emb, labels)
        torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gr, grr, rtol=1e-5, atol=1e-5)


def test_xbm_rejected_nan_batch_does_not_poison_the_memory():
    g = torch.Generator().manual_seed(0)
    emb, labels = _batch(g, 6)
    bad = emb.clone()
    bad[2, 1] = float("nan")
    ours = CrossBatchMemory(M.InfoNCE(0.1), 6, 16)
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        ours(bad, labels)
    clean, clean_labels = _batch(g, 6)
    ref = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(0.1), 6, 16)  # never saw `bad`
    torch.testing.assert_close(ours(clean, clean_labels), ref(clean, clean_labels), **TOL64)


def test_xbm_enqueue_mask_all_rows_is_a_fill_step():
    g = torch.Generator().manual_seed(0)
    ours = CrossBatchMemory(M.InfoNCE(0.1, positives="pair"), 6, 10)
    ref = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(0.1), 6, 10)
    emb, labels = _batch(g, 8)
    mask = torch.ones(8, dtype=torch.bool)
    assert float(ref(emb, labels, enqueue_mask=mask)) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert float(ours(emb, labels, enqueue_mask=mask)) == 0.0


def test_xbm_triplet_with_user_pairs_equals_pml():
    """With a user indices_tuple XBM adds the tuple to all pairs (PML), so pairs repeat; PML's
    triplet loss makes every repeated pair more triplets, and so does Triplet (count masks)."""
    g = torch.Generator().manual_seed(2)
    ours = CrossBatchMemory(M.Triplet(0.1), 6, 29)
    ref = pml_losses.CrossBatchMemory(pml_losses.TripletMarginLoss(0.1), 6, 29)
    for b in [9, 12, 7]:
        emb, labels = _batch(g, b)
        after = copy.deepcopy(ours.memory)
        slots = after.enqueue(emb, labels)
        _, mem_labels = after.read()
        same = labels[:, None] == mem_labels[None, :]
        a2, n = (~same).nonzero(as_tuple=True)
        same[torch.arange(b), slots] = False
        a1, p = same.nonzero(as_tuple=True)
        tup = (a1[::2], p[::2], a2[::3], n[::3])  # valid pairs of the memory
        vr, grr = _step(ref, emb, labels, indices_tuple=tup)
        v, gr = _step(ours, emb, labels, indices_tuple=tup)
        torch.testing.assert_close(v, vr, **TOL64)
        torch.testing.assert_close(gr, grr, **TOL64)


@pytest.mark.parametrize("how", ["double", "checkpoint"])
def test_xbm_float64_ring_scores_float32_batches_and_round_trips(how):
    """A float64 ring from ``.double()`` or from a float64 checkpoint scores float32 batches in
    float32 with PML's values, keeps its float64 rows, and round-trips bit-exactly."""
    g = torch.Generator().manual_seed(5)
    ref = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(0.1), 6, 20)
    if how == "double":
        ours = CrossBatchMemory(M.InfoNCE(0.1), 6, 20).double()
        ref.double()
    else:
        src = CrossBatchMemory(M.InfoNCE(0.1), 6, 20)
        for b in [7, 9]:
            e, lab = _batch(g, b)
            src(e, lab), ref(e, lab)
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        ours = CrossBatchMemory(M.InfoNCE(0.1), memory_size=20)  # float32, unsized
        ours.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        _same_state(ours, src.state_dict())
    for b in [7, 10]:
        emb, labels = _batch(g, b, dtype=torch.float32)
        vr, grr = _step(ref, emb, labels)
        v, gr = _step(ours, emb, labels)
        assert v.dtype == gr.dtype == torch.float32
        torch.testing.assert_close(v, vr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gr, grr, rtol=1e-5, atol=1e-5)
    assert ours.memory.embeddings.dtype == torch.float64  # float32 rows written exactly
    resumed = CrossBatchMemory(M.InfoNCE(0.1), memory_size=20)
    resumed.load_state_dict(copy.deepcopy(ours.state_dict()))
    _same_state(resumed, ours.state_dict())


def test_xbm_rejected_batches_leave_the_memory_as_it_was():
    """A non-finite row that would only go into the memory (``enqueue_mask``) and labels of the
    wrong length are rejected before anything is written."""
    g = torch.Generator().manual_seed(1)
    ours = CrossBatchMemory(M.InfoNCE(0.1), 6, 16)
    ours(*_batch(g, 6))
    before = copy.deepcopy(ours.state_dict())
    emb, labels = _batch(g, 6)
    bad = emb.clone()
    bad[4, 0] = float("inf")
    mask = torch.tensor([False, False, False, False, True, True])
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf in 1 row"):
        ours(bad, labels, enqueue_mask=mask)
    with pytest.raises(ValueError, match="labels has 5 entries"):
        ours(emb, labels[:5])
    _same_state(ours, before)
    ref = pml_losses.CrossBatchMemory(pml_losses.SupConLoss(0.1), 6, 16)
    ref(*_batch(torch.Generator().manual_seed(1), 6))
    torch.testing.assert_close(ours(emb, labels), ref(emb, labels), **TOL64)


def test_xbm_another_ranks_nan_rows_are_not_enqueued(monkeypatch):
    """DDP (two ranks, simulated): a clean batch here and a NaN row in the other rank's batch;
    every rank checks the gathered batch, raises, and enqueues nothing."""
    g = torch.Generator().manual_seed(2)
    ours = CrossBatchMemory(M.InfoNCE(0.1), 6, 16)
    emb, labels = _batch(g, 4)
    _two_ranks(monkeypatch, _nan_rows)
    with pytest.raises(ValueError, match="gathered embeddings .* contains NaN or Inf"):
        ours(emb, labels)
    assert len(ours.memory) == 0
    _two_ranks(monkeypatch, lambda x: x)  # a clean other rank: both batches are enqueued
    ours(emb, labels)
    assert len(ours.memory) == 8


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("make", [lambda r: M.InfoNCE(0.1, strict=True, reduction=r),
                                  lambda r: M.Triplet(0.1, reduction=r),
                                  lambda r: M.Contrastive(reduction=r)],
                         ids=["infonce-strict", "triplet", "contrastive"])
def test_xbm_fill_step_is_a_zero_in_the_graph(make, reduction):
    """A fill-only step: no warning, no error (also with ``strict=True``), a zero of the loss's
    reduction (no term under ``"none"``) whose gradient is zero, and the rows in the memory."""
    g = torch.Generator().manual_seed(3)
    ours = CrossBatchMemory(make(reduction), 6, 10)
    emb, labels = _batch(g, 8)
    x = emb.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ours(x, labels, enqueue_mask=torch.ones(8, dtype=torch.bool))
    assert out.shape == () if reduction == "mean" else out.numel() == 0
    assert not bool(out.any()) and out.requires_grad
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    mem, mem_labels = ours.memory.read()
    assert torch.equal(mem, emb) and torch.equal(mem_labels, labels)


def test_memory_follows_the_batch_device():
    """The buffers move to the batch's device on use (a ring sized by its first batch too: the
    labels with the embeddings); the meta device stands in for an accelerator."""
    emb = torch.zeros(2, 3, device="meta")
    labels = torch.zeros(2, dtype=torch.long, device="meta")
    for mem in (Memory(4), Memory(4, 3), Memory(4, init="random")):
        mem.enqueue(emb, labels)
        assert {b.device.type for b in mem.buffers()} == {"meta"}
        assert len(mem) == (4 if mem.init == "random" else 2)


# ---------------------------------------------------------------------------- the queue


def _queue_reference(q, k, bank, t, critic="cosine"):
    if critic == "cosine":
        q, k, bank = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(bank, dim=1)
        scale = 1.0 / t
    else:
        scale = 1.0
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], 1) * scale
    return (torch.logsumexp(logits, 1) - logits[:, 0]).mean()


@pytest.mark.parametrize("init", ["random", "empty"])
def test_queue_changing_batch_sizes_float64_equals_fifo_loop(init):
    """A FIFO whose batch sizes change every call (wrapping mid-batch, a batch as large as the
    queue), float64, values and gradients of query and key."""
    size, t = 11, 0.3
    q = NegativeQueue(size=size, embedding_size=5, temperature=t, init=init)
    bank = list(q.memory.embeddings.double()) if init == "random" else []
    g = torch.Generator().manual_seed(4)
    for b in [3, 5, 11, 2, 7, 9, 4]:
        a = torch.randn(b, 5, generator=g, dtype=torch.float64)
        k = torch.randn(b, 5, generator=g, dtype=torch.float64)
        a1, k1 = a.clone().requires_grad_(), k.clone().requires_grad_()
        a2, k2 = a.clone().requires_grad_(), k.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the empty queue's first batch
            v = q(a1, k1)
        if bank:
            v.backward()
            ref = _queue_reference(a2, k2, torch.stack(bank), t)
            ref.backward()
            torch.testing.assert_close(v, ref, **TOL64)
            torch.testing.assert_close(a1.grad, a2.grad, **TOL64)
            torch.testing.assert_close(k1.grad, k2.grad, **TOL64)
        else:
            assert float(v) == 0.0
        bank = (bank + list(k))[-size:]
    assert len(q.memory) == size


def test_queue_with_dot_critic_backward():
    """The keys are queued in place before backward; Dot keeps the queue for its gradient."""
    g = torch.Generator().manual_seed(0)
    q = NegativeQueue(SimCLR(critic=Dot()), size=12, embedding_size=4)
    for _ in range(2):
        bank = q.memory.embeddings.clone()
        a = torch.randn(5, 4, generator=g)
        k = torch.randn(5, 4, generator=g)
        a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        v = q(a1, k)
        v.backward()
        ref = _queue_reference(a2, k, bank, 1.0, critic="dot")
        ref.backward()
        torch.testing.assert_close(v, ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("critic", [NegativeL2(), NegativeL2(squared=True), Dot()],
                         ids=["l2", "l2-squared", "dot"])
@pytest.mark.parametrize("pooled", [True, False])
def test_queue_critics_that_keep_the_queue(critic, pooled, monkeypatch):
    """Any critic that keeps the queue for its gradient: values and gradients equal those of
    a copy of the queue that queues nothing, over calls that wrap around."""
    if not pooled:
        monkeypatch.setattr(NegativeQueue, "pooled", property(lambda self: False))
    g = torch.Generator().manual_seed(1)
    q = NegativeQueue(SimCLR(critic=critic), size=10, embedding_size=4)
    for _ in range(4):
        frozen = copy.deepcopy(q)
        a = torch.randn(4, 4, generator=g, dtype=torch.float64)
        k = torch.randn(4, 4, generator=g, dtype=torch.float64)
        got, want = [], []
        for fn, update, out in ((q, None, got), (frozen, False, want)):
            a1, k1 = a.clone().requires_grad_(), k.clone().requires_grad_()
            v = fn(a1, k1, update=update)
            v.backward()
            out += [v.detach(), a1.grad, k1.grad]
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL64)
        assert not torch.equal(q.memory.embeddings, frozen.memory.embeddings)  # queued


def test_queue_strict_empty_message_says_the_queue_is_empty():
    g = torch.Generator().manual_seed(0)
    q = NegativeQueue(SimCLR(0.5, strict=True), size=16, embedding_size=4, init="empty")
    a, k = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    with pytest.raises(NoPairsError, match="queue is still empty .*queues no key"):
        q(a, k)  # no gradient: nothing is queued
    assert len(q.memory) == 0
    with pytest.raises(NoPairsError, match="queue is still empty .*4 keys have been queued"):
        q(a.requires_grad_(), k)
    assert len(q.memory) == 4
    torch.testing.assert_close(q.memory.read()[0], k)


def test_queue_strict_empty_start_fills():
    g = torch.Generator().manual_seed(0)
    q = NegativeQueue(SimCLR(0.5, strict=True), size=16, embedding_size=4, init="empty")
    a0, k0 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    try:
        q(a0.requires_grad_(), k0)
    except NoPairsError:
        pass  # raising on the empty queue is fine, as long as the keys are queued
    assert len(q.memory) == 4
    a1, k1 = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    torch.testing.assert_close(q(a1.requires_grad_(), k1).detach(),
                               _queue_reference(a1.detach(), k1, k0, 0.5),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["random", "empty"])
@pytest.mark.parametrize("which", ["query", "key"])
def test_queue_nan_error_names_the_argument(which, init):
    """Also on an empty queue, where the loss alone returns a zero without reading the scores:
    nothing is queued."""
    g = torch.Generator().manual_seed(0)
    a, k = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    (a if which == "query" else k)[1, 2] = float("nan")
    q = NegativeQueue(size=8, embedding_size=4, init=init)
    before = copy.deepcopy(q.state_dict())
    with pytest.raises(ValueError, match=f"^{which} contains NaN or Inf in 1 row"):
        q(a.requires_grad_(), k)
    _same_state(q, before)


def test_queue_another_ranks_nan_keys_are_not_queued(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a, k = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    q = NegativeQueue(size=16, embedding_size=4, init="empty")
    _two_ranks(monkeypatch, _nan_rows)
    with pytest.raises(ValueError, match="gathered keys .* contains NaN or Inf"):
        q(a.requires_grad_(), k)
    assert len(q.memory) == 0
    _two_ranks(monkeypatch, lambda x: x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty queue's zero loss
        q(a, k)
    assert len(q.memory) == 8


# ---------------------------------------------------------------------------- lightly


def test_self_supervised_equal_lightly_random_shapes():
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        b = int(torch.randint(2, 30, (1,), generator=g))
        d = int(torch.randint(1, 10, (1,), generator=g))
        t = float(torch.empty(1).uniform_(0.05, 1.0, generator=g))
        sigma = float(torch.empty(1).uniform_(0.1, 2.0, generator=g))
        x0 = torch.randn(b, d, generator=g, dtype=torch.float64)
        x1 = x0 + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
        x1[0] = x0[0]  # one pair of identical views
        for ours, ref in ((SimCLR(t), lightly_loss.NTXentLoss(t)),
                          (DCL(t), lightly_loss.DCLLoss(t)),
                          (DCLW(t, sigma=sigma), lightly_loss.DCLWLoss(t, sigma=sigma))):
            out = []
            for fn in (ours, ref):
                a, c = x0.clone().requires_grad_(), x1.clone().requires_grad_()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # lightly's DCLW: torch.tensor(tensor)
                    v = fn(a, c)
                v.backward()
                out.append((v.detach(), a.grad, c.grad))
            for x, y in zip(*out):
                torch.testing.assert_close(x, y, **TOL64)
