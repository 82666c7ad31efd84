"""The sparse lane: a loss whose ``dL/dS`` has a few entries per row (batch-hard triplets:
each anchor's hardest positive and negative) goes from them to ``dL/dX`` without an
``[N, N]`` gradient or product (``critics.unit_gram_sparse_backward``), at any batch size,
with the general path's value and its gradient to rounding."""

import pytest
import torch

from contrastive import critics as C
from contrastive.critics import Cosine, NegativeL2, SparseRows
from contrastive.pairs import label_masks
from losses import functional as LF
from losses import kernels as K
from losses import lane as L
from losses import modules as M
from losses import native as N


def _dense(g: SparseRows, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=g.vals.dtype)
    return out.scatter_add_(1, g.cols, g.vals)


@pytest.mark.parametrize("kind,scale,alpha", [("cosine", None, None), ("cosine", 2.5, 2.5),
                                              ("cosine", 2.5, None), ("l2", None, None),
                                              ("l2sq", None, None)])
def test_sparse_backward_equals_the_dense_one(kind, scale, alpha):
    """On random entries off the diagonal (which no loss lists: an item is neither its own
    positive nor negative; there the distance is a rounding residue whose inverse is noise in
    both forms), a column repeated in a row included, the same ``dL/dX`` as the dense
    backward of the densified gradient."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    sc = None if scale is None else torch.tensor(scale, dtype=torch.float64)
    s, state = C.unit_gram_forward(x, sc, kind, alpha, dense=False)
    _, dense_state = C.unit_gram_forward(x, sc, kind, alpha)
    cols = torch.randint(0, 39, (40, 3), generator=g)
    cols += (cols >= torch.arange(40)[:, None]).long()  # skip the diagonal
    cols[7, 1] = cols[7, 0]  # a repeated column
    vals = torch.randn(40, 3, generator=g, dtype=torch.float64)
    sparse = SparseRows(cols, vals)
    got = C.unit_gram_sparse_backward(sparse, s, state)
    want = C.unit_gram_backward(_dense(sparse, s.shape), dense_state)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _ties_batch(n, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (n, n), generator=g).to(torch.float64)  # many ties
    y = torch.randint(0, classes, (n,), generator=g)
    p, q = label_masks(y)
    return s, p, q


def test_hardest_by_index_finds_the_same_columns_with_ties():
    """For the label masks of a batch against itself, the positives by index and the negatives
    in place give the stacked search's columns (the first smallest positive, the first
    largest negative), ties included; a row without positives gets a column outside ``P``;
    the scores are left as they were."""
    s, p, q = _ties_batch(200, 50)
    y = torch.randint(0, 50, (200,), generator=torch.Generator().manual_seed(1))
    y[0] = 99  # no positive
    p, q = label_masks(y)
    rows, cols = p.nonzero(as_tuple=True)
    idx, valid = K.padded_positives(K.PosIndex(rows, cols, torch.bincount(rows, minlength=200)))
    before = s.clone()
    by_index = LF._hardest_by_index(s, idx, valid)
    assert torch.equal(s, before)
    stacked = LF._hardest_columns(s, p, q)
    ok_p = p.any(1)
    assert torch.equal(by_index[0][ok_p], stacked[0][ok_p])
    assert torch.equal(by_index[1], stacked[1])
    assert not bool(p[0, by_index[0][0, 0]])


def _lane_and_general(module, x, y):
    t = x.clone().requires_grad_(True)
    v = module(t, y)
    node = type(v.grad_fn).__name__
    v.backward()
    general = M.Triplet(margin=module.margin, mining=module.mining, critic=module.critic,
                        reduction=module.reduction)
    general.__dict__["compute"] = general.compute  # an instance override: the general path
    t0 = x.clone().requires_grad_(True)
    v0 = general(t0, y)
    assert type(v0.grad_fn).__name__ != "LaneBackward"
    v0.backward()
    return v.detach(), t.grad, node, v0.detach(), t0.grad


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("critic", ["l2", "l2sq", "cosine"])
@pytest.mark.parametrize("reduction", ["nonzero", "mean", "sum"])
@pytest.mark.parametrize("n,classes", [(160, 40), (300, 70), (300, 2)])
def test_triplet_sparse_lanes_equal_the_general_path(mining, critic, reduction, n, classes):
    """B = 160 (batch-hard: the sparse lane with the stacked search; semi-hard: still the
    dense lane, ``SPARSE_LANE_MIN_ROWS``), 300 with a few positives per anchor (past
    ``FUSED_MAX_ENTRIES``: batch-hard searches by index) and 300 in two classes: the lane's
    value equals the general path's (to the order of the reduction's sum above the fused
    size), its gradient to rounding; an anchor without a positive included."""
    crit = {"l2": NegativeL2(normalize=True), "l2sq": NegativeL2(squared=True, normalize=True),
            "cosine": Cosine(0.1)}[critic]
    g = torch.Generator().manual_seed(n + classes)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    y[-1] = classes + 7  # no positive
    module = M.Triplet(margin=0.1, mining=mining, critic=crit, reduction=reduction)
    v, gl, node, v0, g0 = _lane_and_general(module, x, y)
    assert node == "LaneBackward"
    torch.testing.assert_close(v, v0, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, g0, rtol=1e-10, atol=1e-13 * float(g0.abs().max()))
    assert float(g0.abs().max()) > 0


def test_batch_hard_sparse_lane_equals_pml():
    """``Triplet(mining="hard", reduction="nonzero")`` at B = 300 (the sparse lane with the
    search by index) against PML's ``BatchHardMiner`` + ``TripletMarginLoss``, float64."""
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import miners

    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(300) // 4
    ours = M.Triplet(mining="hard", reduction="nonzero")(x, y)
    assert type(ours.grad_fn).__name__ == "LaneBackward"
    (g1,) = torch.autograd.grad(ours, x)
    loss, miner = pml.TripletMarginLoss(margin=0.05), miners.BatchHardMiner()
    theirs = loss(x, y, miner(x, y))
    (g2,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-13)


def test_batch_hard_sparse_lane_double_backward_and_its_limits():
    """Double backward recomputes through the general path; a kernel with a dense gradient
    keeps the size limit, a sparse one has none."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(140, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.arange(140) // 3
    module = M.Triplet(margin=0.2, mining="hard", reduction="sum")
    (gx,) = torch.autograd.grad(module(x, y), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    general = M.Triplet(margin=0.2, mining="hard", reduction="sum")
    general.__dict__["compute"] = general.compute
    (gx0,) = torch.autograd.grad(general(x, y), x, create_graph=True)
    (hx0,) = torch.autograd.grad(gx0.pow(2).sum(), x)
    torch.testing.assert_close(gx, gx0, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hx, hx0, rtol=1e-9, atol=1e-12)
    assert L.is_sparse(LF._triplet_hard_sparse_kernel)
    assert not L.is_sparse(LF._triplet_kernel)
    # below SPARSE_LANE_MIN_ROWS the dense lane, where it is the faster (with the C kernels
    # up to the dense lane's end, SPARSE_LANE_MIN_ROWS_NATIVE)
    with N.disabled():
        assert M.Triplet(mining="hard").lane_kernel(128)[0] is LF._triplet_kernel
        assert M.Triplet(mining="hard").lane_kernel(129)[0] is LF._triplet_hard_sparse_kernel
        assert M.Triplet(mining="semihard").lane_kernel(256)[0] is LF._triplet_kernel
    if N.enabled():
        assert M.Triplet(mining="hard").lane_kernel(256)[0] is LF._triplet_kernel
        assert M.Triplet(mining="hard").lane_kernel(257)[0] is LF._triplet_hard_sparse_kernel
    big = torch.randn(400, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(400) // 4
    assert type(M.Triplet(mining="hard")(big, labels).grad_fn).__name__ == "LaneBackward"
    assert type(M.Triplet(mining="semihard")(big, labels).grad_fn).__name__ == "LaneBackward"
    assert type(M.Triplet(mining="all")(big, labels).grad_fn).__name__ != "LaneBackward"
