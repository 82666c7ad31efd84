"""The cross-batch memory and the negative queue (losses/memory.py).

* XBM against pytorch-metric-learning's ``CrossBatchMemory`` over a sequence of batches that
  wraps around the memory: values and gradients, with and without a miner, ``enqueue_mask``.
* The queue against a brute-force MoCo loop (negatives = the queue read before the batch is
  queued) and, where lightly is installed, against ``NTXentLoss(memory_bank_size=...)``.
* Checkpointing: ``state_dict`` round trips continue with the same values.
* DDP: two ``gloo`` processes (this file run as a script, as tests/test_distributed.py does);
  each rank passes its half of the global batch, the memory enqueues the gathered batch, and
  every rank's memory, loss and gradients equal the single-process run on the global batch.
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from two_ranks import launch_ranks  # noqa: E402 - tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(ROOT))

from losses import modules as M  # noqa: E402
from losses.memory import CrossBatchMemory, Memory, NegativeQueue  # noqa: E402
from losses.self_supervised import DCL, SimCLR  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _batches(steps=5, b=12, d=8, classes=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, classes, (b,), generator=g)) for _ in range(steps)]


def _step(loss_fn, emb, labels, **kw):
    x = emb.clone().requires_grad_()
    out = loss_fn(x, labels, **kw)
    out.backward()
    return out.detach(), x.grad


# ---------------------------------------------------------------------------- XBM vs PML


def _cases():
    from pytorch_metric_learning import losses as PL
    from pytorch_metric_learning import miners as PM

    return {
        "ntxent": (lambda: M.InfoNCE(0.1, positives="pair"), lambda: PL.NTXentLoss(0.1), None),
        "supcon": (lambda: M.InfoNCE(0.1), lambda: PL.SupConLoss(0.1), None),
        "triplet": (lambda: M.Triplet(0.1), lambda: PL.TripletMarginLoss(0.1), None),
        "contrastive": (M.Contrastive, PL.ContrastiveLoss, None),
        "ntxent+ms_miner": (lambda: M.InfoNCE(0.1, positives="pair"),
                            lambda: PL.NTXentLoss(0.1), lambda: PM.MultiSimilarityMiner(0.1)),
        "contrastive+pair_miner": (M.Contrastive, PL.ContrastiveLoss,
                                   lambda: PM.PairMarginMiner(0.2, 0.8)),
        "triplet+triplet_miner": (lambda: M.Triplet(0.1), lambda: PL.TripletMarginLoss(0.1),
                                  lambda: PM.TripletMarginMiner(0.2, type_of_triplets="all")),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_cases()))
def test_xbm_equals_pml_over_batches(case, dtype):
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLMemory

    ours_fn, pml_fn, miner_fn = _cases()[case]
    d, size = 8, 40  # 12-row batches: the ring wraps around mid-batch
    ours = CrossBatchMemory(ours_fn(), d, size, miner=miner_fn() if miner_fn else None)
    ref = PMLMemory(pml_fn(), d, size, miner=miner_fn() if miner_fn else None)
    for emb, labels in _batches(dtype=dtype):
        v, g = _step(ours, emb, labels)
        vr, gr = _step(ref, emb, labels)
        torch.testing.assert_close(v, vr, **TOL[dtype])
        torch.testing.assert_close(g, gr, **TOL[dtype])
    n = len(ours.memory)
    torch.testing.assert_close(ours.memory.embeddings[:n], ref.embedding_memory[:n].to(dtype))
    assert torch.equal(ours.memory.labels, ref.label_memory)


def test_xbm_enqueue_mask_and_user_tuple_equal_pml():
    from pytorch_metric_learning.losses import CrossBatchMemory as PMLMemory
    from pytorch_metric_learning.losses import NTXentLoss

    ours = CrossBatchMemory(M.InfoNCE(0.1, positives="pair"), 8, 40)
    ref = PMLMemory(NTXentLoss(0.1), 8, 40)
    mask = torch.arange(12) % 2 == 0  # even rows only go into the memory (PML's MoCo use)
    for emb, labels in _batches():
        v, g = _step(ours, emb, labels, enqueue_mask=mask)
        vr, gr = _step(ref, emb, labels, enqueue_mask=mask)
        torch.testing.assert_close(v, vr, **TOL[torch.float32])
        torch.testing.assert_close(g, gr, **TOL[torch.float32])
    ours.reset_queue(), ref.reset_queue()
    for emb, labels in _batches(seed=3):  # a tuple without a miner is added to all pairs
        after = copy.deepcopy(ours.memory)
        slots = after.enqueue(emb, labels)
        _, mem_labels = after.read()
        same = labels[:, None] == mem_labels[None, :]
        a2, n = (~same).nonzero(as_tuple=True)
        same[torch.arange(12), slots] = False
        a1, p = same.nonzero(as_tuple=True)
        tup = (a1[::3], p[::3], a2[::5], n[::5])  # valid pairs, which then count twice
        v, _ = _step(ours, emb, labels, indices_tuple=tup)
        vr, _ = _step(ref, emb, labels, indices_tuple=tup)
        torch.testing.assert_close(v, vr, **TOL[torch.float32])


def test_xbm_excludes_only_the_own_copy():
    # one batch, memory = the batch: XBM equals the plain loss on the batch (diagonal excluded)
    emb, labels = _batches(steps=1)[0]
    loss = M.InfoNCE(0.1)
    xbm = CrossBatchMemory(loss, memory_size=64)  # sized by the first batch
    torch.testing.assert_close(xbm(emb, labels), loss(emb, labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="PairLoss"):
        CrossBatchMemory(torch.nn.MSELoss())
    with pytest.raises(ValueError, match="picks its own pairs"):
        CrossBatchMemory(M.MultiClassNPair())
    with pytest.raises(ValueError, match="at least as large"):
        CrossBatchMemory(loss, 8, 4)(emb, labels)


# ---------------------------------------------------------------------------- the queue


def queue_loop(batches, bank0, t, k_size):
    """MoCo / lightly with a memory bank, brute force: anchor q_i, positive k_i, negatives the
    bank as it was before this batch; then the batch's keys replace the oldest rows."""
    bank = [r for r in F.normalize(bank0, dim=1)]
    ptr, out = 0, []
    for q, k in batches:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        terms = []
        for i in range(q.shape[0]):
            logits = torch.stack([q[i] @ k[i]] + [q[i] @ m for m in bank]) / t
            terms.append(torch.logsumexp(logits, 0) - logits[0])
        out.append(torch.stack(terms).mean())
        for row in k.detach():
            bank[ptr] = row
            ptr = (ptr + 1) % k_size
    return out


def _views(steps=4, b=8, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g), torch.randn(b, d, generator=g))
            for _ in range(steps)]


@pytest.mark.parametrize("pooled", [True, False])
def test_queue_equals_the_loop(pooled, monkeypatch):
    if not pooled:  # the general path: the whole [B, 1 + K] score matrix through the core
        monkeypatch.setattr(NegativeQueue, "pooled", property(lambda self: False))
    batches = _views()
    q = NegativeQueue(size=20, embedding_size=6, temperature=0.2)  # 8-row batches wrap at 20
    bank0 = q.memory.embeddings.clone()
    ref = queue_loop(batches, bank0, 0.2, 20)
    for (a, b), r in zip(batches, ref):
        torch.testing.assert_close(q(a.requires_grad_(), b), r, rtol=1e-6, atol=1e-6)


def test_queue_gradients_and_dcl():
    batches = _views(steps=2)
    q = NegativeQueue(size=16, embedding_size=6, temperature=0.2)
    bank0 = q.memory.embeddings.clone()
    for a, b in batches:
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        bank = q.memory.embeddings.clone()
        q(a1, b1).backward()
        queue_loop([(a2, b2)], bank, 0.2, 16)[0].backward()
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-6)
    # DCL through the same queue: -S_pos + logsumexp over the queue only
    dq = NegativeQueue(DCL(0.2), size=16, embedding_size=6)
    dq.memory.embeddings.copy_(bank0)
    a, b = batches[0]
    qa, kb, m = F.normalize(a, dim=1), F.normalize(b, dim=1), F.normalize(bank0, dim=1)
    ref = (torch.logsumexp(qa @ m.T / 0.2, 1) - (qa * kb).sum(1) / 0.2).mean()
    torch.testing.assert_close(dq(a.requires_grad_(), b), ref, rtol=1e-6, atol=1e-6)


def test_queue_takes_stacked_views_with_ids():
    from losses.self_supervised import views_batch

    a, b = _views(steps=1)[0]
    q = NegativeQueue(size=16, embedding_size=6)
    q2 = copy.deepcopy(q)
    emb, ids = views_batch(a, b)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(q(emb, ids, update=True), q2(a, b, update=True))
    torch.testing.assert_close(q.memory.embeddings, q2.memory.embeddings)
    with pytest.raises(ValueError, match="exactly twice"):
        q(emb[:15], ids[:15])
    with pytest.raises(ValueError, match="exactly twice"):
        q(emb, torch.zeros(16, dtype=torch.long))
    # shuffled rows: each id's first row (in batch order) is its query
    e2, i2 = emb[perm], ids[perm]
    first = [int((i2 == j).nonzero()[0]) for j in range(8)]
    second = [int((i2 == j).nonzero()[1]) for j in range(8)]
    torch.testing.assert_close(q(e2, i2), q(e2[first], e2[second]))


def test_queue_update_rule_and_empty_start():
    a, b = _views(steps=1)[0]
    q = NegativeQueue(size=16, embedding_size=6)
    before = q.memory.embeddings.clone()
    q(a, b)  # no gradient: an evaluation pass leaves the queue as it is (lightly's rule)
    assert torch.equal(q.memory.embeddings, before)
    q(a, b, update=True)
    torch.testing.assert_close(q.memory.embeddings[:8], b)
    empty = NegativeQueue(size=16, init="empty")
    with pytest.warns(UserWarning, match="zero loss"):  # no negative yet
        assert empty(a.requires_grad_(), b).item() == 0.0
    assert len(empty.memory) == 8
    torch.testing.assert_close(empty(a, b), queue_loop([(a, b)], b, 0.5, 8)[0])


@pytest.mark.parametrize("k", [48, 40])
def test_queue_equals_lightly_over_batches(k):
    lightly_loss = pytest.importorskip("lightly.loss")
    b_size, d = 16, 8  # 48: wraps around twice in 6 steps; 40 is not a multiple of 16
    ref = lightly_loss.NTXentLoss(0.2, memory_bank_size=(k, d))
    ours = NegativeQueue(size=k, embedding_size=d, temperature=0.2)
    ours.memory.embeddings.copy_(ref.memory_bank.bank)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        a, b = torch.randn(b_size, d, generator=g), torch.randn(b_size, d, generator=g)
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        v, vr = ours(a1, b1), ref(a2, b2)
        v.backward(), vr.backward()
        torch.testing.assert_close(v, vr, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-5, atol=1e-6)
        if k % b_size and step == 1:  # at the wrap lightly drops the rows past the end of its
            break  # bank, where a FIFO wraps them around: equal up to there
    torch.testing.assert_close(F.normalize(ours.memory.embeddings, dim=1),
                               ref.memory_bank.bank)


# ---------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip():
    batches = _batches(steps=6)
    xbm = CrossBatchMemory(M.InfoNCE(0.1), 8, 40)
    for emb, labels in batches[:3]:
        xbm(emb, labels)
    buf = io.BytesIO()
    torch.save(xbm.state_dict(), buf)
    assert {"memory.embeddings", "memory.labels", "memory.ptr", "memory.filled"} <= set(
        xbm.state_dict())
    resumed = CrossBatchMemory(M.InfoNCE(0.1), memory_size=40)  # sized by the checkpoint
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert len(resumed.memory) == len(xbm.memory) == 36
    for emb, labels in batches[3:]:
        torch.testing.assert_close(resumed(emb, labels), xbm(emb, labels), rtol=0, atol=0)
    views = _views()
    q = NegativeQueue(size=20, embedding_size=6)
    q(*views[0], update=True)
    q2 = NegativeQueue(size=20)
    q2.load_state_dict(copy.deepcopy(q.state_dict()))
    for a, b in views[1:]:
        torch.testing.assert_close(q2(a, b, update=True), q(a, b, update=True), rtol=0, atol=0)


def test_memory_ring():
    m = Memory(5, 2)
    slots = m.enqueue(torch.ones(3, 2), torch.tensor([1, 2, 3]))
    assert slots.tolist() == [0, 1, 2] and len(m) == 3
    slots = m.enqueue(2 * torch.ones(4, 2), torch.tensor([4, 5, 6, 7]))
    assert slots.tolist() == [3, 4, 0, 1] and len(m) == 5 and int(m.ptr) == 2
    assert m.labels.tolist() == [6, 7, 3, 4, 5]
    m.enqueue(torch.ones(1, 2, dtype=torch.float64))
    assert m.embeddings.dtype == torch.float64
    with pytest.raises(ValueError, match="4-d"):
        m.enqueue(torch.ones(1, 4))


# ---------------------------------------------------------------------------- DDP

WORLD, N_GLOBAL, DIM, STEPS = 2, 16, 6, 3


def _global_batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        labels = torch.arange(4).repeat(N_GLOBAL // 4)[torch.randperm(N_GLOBAL, generator=g)]
        out.append((torch.randn(N_GLOBAL, DIM, generator=g), labels,
                    torch.randn(N_GLOBAL, DIM, generator=g)))
    return out


def _ddp_modules(reduction="mean"):
    torch.manual_seed(0)  # the same random starting queue on every rank
    xbm = CrossBatchMemory(M.InfoNCE(0.1, reduction=reduction), DIM, 40)
    queue = NegativeQueue(SimCLR(0.2, reduction=reduction), size=24, embedding_size=DIM)
    return xbm, queue


def _worker(out_dir: Path) -> None:
    from contrastive import distributed as D

    torch.set_num_threads(1)
    rank, world, _, _ = D.setup()
    xbm, queue = _ddp_modules()
    n = N_GLOBAL // world
    res = []
    for emb, labels, key in _global_batches():
        rows = slice(rank * n, rank * n + n)
        v, g = _step(xbm, emb[rows], labels[rows])
        a, k = emb[rows].clone().requires_grad_(), key[rows].clone().requires_grad_()
        qv = queue(a, k)
        qv.backward()
        res.append({"xbm": (v, g), "queue": (qv.detach(), a.grad, k.grad)})
    torch.save({"steps": res, "xbm": xbm.state_dict(), "queue": queue.state_dict()},
               out_dir / f"rank{rank}.pt")
    D.cleanup()


def test_ddp_enqueues_the_gathered_batch(tmp_path):
    launch_ranks(__file__, tmp_path, WORLD, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # the reference: one process, the global batch, per-anchor terms
    xbm, queue = _ddp_modules(reduction="none")
    n = N_GLOBAL // WORLD
    for t, (emb, labels, key) in enumerate(_global_batches()):
        x = emb.clone().requires_grad_()
        terms = xbm(x, labels)
        a, k = emb.clone().requires_grad_(), key.clone().requires_grad_()
        q_terms = queue(a, k).sum(1)  # pooled [B, 2]: the pair terms in column 0
        for r in range(WORLD):
            rows = slice(r * n, r * n + n)
            got = ranks[r]["steps"][t]
            (gx,) = torch.autograd.grad(terms[rows].mean(), x, retain_graph=True)
            torch.testing.assert_close(got["xbm"][0], terms[rows].mean().detach())
            torch.testing.assert_close(got["xbm"][1], gx[rows])
            ga, gk = torch.autograd.grad(q_terms[rows].mean(), (a, k), retain_graph=True)
            torch.testing.assert_close(got["queue"][0], q_terms[rows].mean().detach())
            torch.testing.assert_close(got["queue"][1], ga[rows])
            torch.testing.assert_close(got["queue"][2], gk[rows])
    for r in range(WORLD):  # every rank holds the memory of the global batches
        for name, module in (("xbm", xbm), ("queue", queue)):
            for key_, value in module.state_dict().items():
                if key_.startswith("memory."):
                    torch.testing.assert_close(ranks[r][name][key_], value, rtol=0, atol=0)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
