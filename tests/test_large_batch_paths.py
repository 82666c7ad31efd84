"""The forms the critics and losses take for speed, against the plain operations they stand
for: the symmetric product of the unit-gram backward pass above its size switch, the L2
critic's inner gradient without a boolean fill, the batch-hard search without arg-reductions,
and a row's exact zero distance to itself."""

import pytest
import torch

from contrastive import critics as C
from contrastive.pairs import label_masks
from losses import functional as LF
from losses import kernels as K
from losses import modules as M
from losses import pair_based as PB


@pytest.mark.parametrize("n", [C.SYMMETRIC_SUM_MAX_ROWS, C.SYMMETRIC_SUM_MAX_ROWS + 1, 700])
def test_symmetric_product_on_both_sides_of_its_switch(n):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, n, generator=g, dtype=torch.float64)
    y = torch.randn(n, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(C.symmetric_product(h, y), (h + h.T) @ y, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["cosine", "l2", "l2sq"])
def test_unit_gram_gradient_above_the_switch_equals_autograd(kind):
    """B = 600 takes the two-product form; the gradient equals autograd through the plain
    normalisation, product and distance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(600, 600, generator=g, dtype=torch.float64)
    # no weight on the diagonal, as in every loss (an item is neither its own positive nor
    # negative): there the unit rows' distance is a rounding residue, whose "l2" gradient
    # g / S is rounding noise in both forms
    w.fill_diagonal_(0.0)
    scale = torch.tensor(2.5, dtype=torch.float64) if kind == "cosine" else None
    (C.unit_gram(x, kind, scale) * w).sum().backward()
    fused = x.grad.clone()
    x.grad = None
    (C._unit_gram_plain(x, scale, kind) * w).sum().backward()
    assert torch.allclose(fused, x.grad, rtol=1e-9, atol=1e-9)


def test_l2_inverse_distance_is_the_masked_division_and_keeps_nan():
    """``dS/dG = -1/S`` of the unit L2 critic, 0 at zero distances: ``rsqrt`` of the squared
    distance with its infinities zeroed equals ``-1 / S`` masked at ``S == 0`` to float
    rounding; a NaN distance stays NaN, and the gradient ``g * inv`` keeps a non-finite ``g``
    non-finite, also at a zero distance."""
    g = torch.Generator().manual_seed(2)
    sq = torch.rand(64, 64, generator=g) * 4
    sq.fill_diagonal_(0.0)
    sq[3, 9] = 0.0
    sq[4, 4] = float("nan")
    s = -sq.sqrt()
    inv = C._inverse_distance(sq)
    want = (-1.0 / s).masked_fill_(s == 0, 0.0)
    finite = ~torch.isnan(sq)
    torch.testing.assert_close(inv[finite], want[finite], rtol=2e-7, atol=0.0)
    assert bool(torch.isnan(inv[4, 4])) and float(inv[3, 9]) == 0.0 and float(inv[0, 0]) == 0.0
    grad = torch.randn(64, 64, generator=g)
    grad[7, 8], grad[9, 9] = float("nan"), float("inf")  # (9, 9): a zero distance
    h = grad * inv
    assert bool(torch.isnan(h[7, 8])) and not bool(torch.isfinite(h[9, 9]))
    assert float(h[3, 9]) == 0.0


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_hardest_columns_equal_masked_arg_reductions(scale):
    """First smallest positive and first largest negative per row, ties included (integer
    scores), against ``masked_fill`` + ``argmin`` / ``argmax``; rows without one are free."""
    g = torch.Generator().manual_seed(int(scale * 10))
    for trial in range(60):
        n = int(torch.randint(2, 40, (), generator=g))
        y = torch.randint(0, max(1, n // 3), (n,), generator=g)
        s = torch.randn(n, n, generator=g) * scale
        if trial % 2:
            s = s.round()
        p, q = label_masks(y)
        pc, nc = LF._hardest_columns(s, p, q)
        has_p, has_q = p.any(1), q.any(1)
        assert torch.equal(pc[has_p, 0], s.masked_fill(~p, float("inf")).argmin(1)[has_p])
        assert torch.equal(nc[has_q, 0], s.masked_fill(~q, float("-inf")).argmax(1)[has_q])


@pytest.mark.parametrize("b", [64, 520])
def test_batch_hard_triplet_value_and_gradient_against_a_loop(b):
    """Batch-hard triplets, fused (B = 64) and autograd (B = 520) paths, against a per-anchor
    loop over the distance matrix."""
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, b // 4, (b,), generator=g)
    loss = M.Triplet(margin=0.3, mining="hard", reduction="mean")(x, y)
    (gx,) = torch.autograd.grad(loss, x)
    z = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(z, z)
    p, q = label_masks(y)
    terms = []
    for i in range(b):
        if p[i].any() and q[i].any():
            terms.append(torch.relu(d[i][p[i]].max() - d[i][q[i]].min() + 0.3))
    want = torch.stack(terms).mean()
    (gw,) = torch.autograd.grad(want, x)
    assert torch.allclose(loss, want, rtol=1e-10)
    assert torch.allclose(gx, gw, rtol=1e-6, atol=1e-9)


def test_margin_loss_unchanged_by_the_product_form_of_its_coefficients():
    """The margin loss over all triplets against its brute-force sum, at a size that takes the
    autograd path (the coefficients come from 0/1 products, not ``torch.where``)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 60, (300,), generator=g)
    crit = PB.Margin(margin=0.2, beta=1.2, learn_beta=False, reduction="sum")
    got = crit(x, y)
    z = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(z, z)
    p, q = label_masks(y)
    n_pos, n_neg = p.sum(1, keepdim=True), q.sum(1, keepdim=True)
    want = (torch.relu(0.2 + d - 1.2) * p * n_neg).sum() + (torch.relu(0.2 + 1.2 - d) * q
                                                           * n_pos).sum()
    assert torch.allclose(got, want, rtol=1e-7)  # cdist against the unit expansion


@pytest.mark.parametrize("squared", [False, True])
def test_a_rows_distance_to_itself_is_exactly_zero_without_normalising(squared):
    """``NegativeL2(normalize=False)`` against itself: the expansion leaves a residue on the
    diagonal that grows with the norm (about 0.03 at norm 100 in float32 after the square
    root); the diagonal is 0, fused and plain, with a zero gradient there."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(50, 32, generator=g) * 30).requires_grad_()
    critic = C.NegativeL2(squared=squared)
    s = critic(x, x)
    assert torch.equal(s.diagonal().detach(), torch.zeros(50))
    with torch.no_grad():  # the plain operations
        assert torch.equal(critic(x, x).diagonal(), torch.zeros(50))
    s.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    off = ~torch.eye(50, dtype=torch.bool)
    want = -torch.cdist(x.double(), x.double())
    want = want if not squared else -want.pow(2)
    assert torch.allclose(s.detach().double()[off], want[off], rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("normalize", [False, True])
def test_l2_against_a_reference_set_zero_distance_gradient(normalize):
    """``NegativeL2`` against a separate reference set (the cross-batch memory's call): where a
    reference row equals an anchor the distance is 0 and its gradient 0 (not NaN); elsewhere
    the gradient is autograd's through ``cdist``."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (6, 4), generator=g).double().requires_grad_()
    b = torch.cat([a.detach()[:2], torch.randn(7, 4, generator=g, dtype=torch.float64)])
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    (C.NegativeL2(normalize=normalize)(a, b) * w).sum().backward()
    got = a.grad.clone()
    a.grad = None
    an = torch.nn.functional.normalize(a, dim=1) if normalize else a
    bn = torch.nn.functional.normalize(b, dim=1) if normalize else b
    d = torch.cdist(an, bn)
    keep = d.detach() > 0  # cdist's gradient at 0 is 0 too, but not through normalize's path
    (-(d * w * keep)).sum().backward()
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, a.grad, rtol=1e-7, atol=1e-9)


def _ms_value_and_grad(scores, p, q, **kw):
    s = scores.clone().requires_grad_(True)
    v = PB.multi_similarity(s, p, q, **kw)
    name = type(v.grad_fn).__name__
    v.backward()
    return v.detach(), s.grad, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("labels", ["m_per_class", "uneven"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_similarity_mining_sparse_path_equals_the_masked_form(dtype, labels, reduction):
    """Past the fused kernel's size (B = 300: 90,000 scores), a checked call with the pair
    mining takes the sparse form (positives by index, one ``[N, M]`` buffer for the
    negatives): value and gradient equal the masked autograd form (``check=False``), with every
    anchor having 3 positives or between 0 and 7."""
    g = torch.Generator().manual_seed(3)
    n = 300
    s = torch.rand(n, n, generator=g, dtype=dtype) * 2 - 1
    y = (torch.arange(n) // 4 if labels == "m_per_class"
         else torch.randint(0, 80, (n,), generator=g))
    p, q = label_masks(y)
    assert s.numel() > K.FUSED_MAX_ENTRIES
    v, gs, name = _ms_value_and_grad(s, p, q, epsilon=0.1, reduction=reduction)
    assert name == "FusedLossBackward"
    w, gw, other = _ms_value_and_grad(s, p, q, epsilon=0.1, reduction=reduction, check=False)
    assert other != "FusedLossBackward"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, w, **tol)
    torch.testing.assert_close(gs, gw, **tol)
    assert float(gs.abs().max()) > 0


def test_multi_similarity_sparse_path_rows_of_every_kind():
    """Rows without a positive, without a negative, with nothing, and with nothing mined (a
    positive far above every negative: nothing within epsilon), in the sparse form: the
    masked form's value and gradient, all finite."""
    g = torch.Generator().manual_seed(5)
    n = 280
    s = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    p = torch.rand(n, n, generator=g) < 0.02
    q = ~p & (torch.rand(n, n, generator=g) < 0.9)
    p[0], q[0] = False, True  # no positive
    p[1, :3], q[1] = True, False  # no negative
    p[2], q[2] = False, False  # nothing
    p[3], q[3] = False, True
    p[3, 5] = True
    q[3, 5] = False
    s[3] = -0.9
    s[3, 5] = 0.99  # its positive is far more similar than every negative: nothing mined
    v, gs, name = _ms_value_and_grad(s, p, q, epsilon=0.1)
    assert name == "FusedLossBackward"
    w, gw, _ = _ms_value_and_grad(s, p, q, epsilon=0.1, check=False)
    torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, gw, rtol=1e-12, atol=1e-14)
    assert bool(torch.isfinite(gs).all())
    assert float(gs[2].abs().max()) == 0.0 and float(gs[3].abs().max()) == 0.0


def test_multi_similarity_sparse_path_gives_way_to_the_masked_form():
    """Many positives per anchor (two classes: half the columns) or none in the batch: the
    masked form (its checked variant, which takes the positives by index), with its values."""
    g = torch.Generator().manual_seed(8)
    n = 300
    s = torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1
    for y in (torch.arange(n) % 2, torch.arange(n)):
        p, q = label_masks(y)
        v, gs, name = _ms_value_and_grad(s, p, q, epsilon=0.1)
        assert name != "FusedLossBackward"
        w, gw, _ = _ms_value_and_grad(s, p, q, epsilon=0.1, check=False)
        torch.testing.assert_close(v, w, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gs, gw, rtol=1e-12, atol=1e-14)


def test_multi_similarity_sparse_path_equals_pml_with_its_miner():
    """The module at B = 300 (the sparse form) against PML's ``MultiSimilarityLoss`` with
    ``MultiSimilarityMiner(0.1)``, value and gradient, float64."""
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import miners as pml_miners

    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 60, (300,), generator=g)
    ours = PB.MultiSimilarity(epsilon=0.1)(x, y)
    assert type(ours.grad_fn).__name__ == "FusedLossBackward"
    (g1,) = torch.autograd.grad(ours, x)
    miner, ref = pml_miners.MultiSimilarityMiner(0.1), pml.MultiSimilarityLoss()
    theirs = ref(x, y, miner(x.detach(), y))
    (g2,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-12)
