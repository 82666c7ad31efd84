"""The small-batch fast paths of the pair and proxy losses (``losses.K.FusedLoss``:
value and ``dL/dS`` in one pass without autograd, below ``FUSED_MAX_ENTRIES`` score entries;
the proxy softmax losses' plain cross-entropy) against the autograd forms they replace: the
same values, the same gradients, double backward, and every check of the module boundary still
raising or warning."""

import math
import warnings

import pytest
import torch

from contrastive.pairs import NoPairsError, NoPairsWarning, any_triplet, label_masks
from losses import kernels as K
from losses import pair_based as PB
from losses import proxies as PX


def _pair_batch(dtype, n=24, classes=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[-1] = classes + 3  # an anchor without a positive
    s = (torch.rand(n, n, generator=g, dtype=dtype) * 2 - 1) * spread
    return s, *label_masks(y)


def _proxy_batch(dtype, n=24, classes=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:classes - 2] = torch.arange(classes - 2)  # leaves class C-1 without a member at times
    s = torch.rand(n, classes, generator=g, dtype=dtype) * 2 - 1
    pos = torch.nn.functional.one_hot(y, classes).bool()
    return s, pos, ~pos


PAIR_CASES = {
    "multi_similarity": lambda s, p, q, r: PB.multi_similarity(s, p, q, reduction=r, check=c_),
    "multi_similarity_eps": lambda s, p, q, r: PB.multi_similarity(s, p, q, epsilon=0.1,
                                                                   reduction=r, check=c_),
    "circle": lambda s, p, q, r: PB.circle(s, p, q, reduction=r, check=c_),
    "lifted": lambda s, p, q, r: PB.lifted_structure(s, p, q, 0.2, -0.5, reduction=r,
                                                     check=c_),
    "nca": lambda s, p, q, r: PB.nca(s, p, q, scale=3.0, reduction=r, check=c_),
    "margin": lambda s, p, q, r: PB.margin(s, p, q, reduction=r, check=c_),
    "margin_distance_nu": lambda s, p, q, r: PB.margin(-1.0 - s, p, q, nu=0.1, distance=True,
                                                       reduction=r, check=c_),
    "margin_per_anchor": lambda s, p, q, r: PB.margin(
        s, p, q, beta=torch.linspace(0.1, 0.9, s.shape[0], dtype=s.dtype), nu=0.2,
        reduction=r, check=c_),
}
PROXY_CASES = {
    "proxy_anchor": lambda s, p, q, r: PX.proxy_anchor(s, p, q, reduction=r, check=c_),
    "proxy_nca": lambda s, p, q, r: PX.proxy_nca(s * 4, p, None, reduction=r, check=c_),
    "normalized_softmax": lambda s, p, q, r: PX.normalized_softmax(s * 20, p, None,
                                                                   reduction=r, check=c_),
    "cosface": lambda s, p, q, r: PX.cosface(s, p, None, reduction=r, check=c_),
    "arcface": lambda s, p, q, r: PX.arcface(s, p, None, reduction=r, check=c_),
}
REDUCTIONS = {"circle": ("nonzero", "mean", "sum"), "margin": ("nonzero", "mean", "sum"),
              "margin_distance_nu": ("nonzero", "mean", "sum"),
              "margin_per_anchor": ("nonzero", "mean", "sum")}
c_ = True  # the check flag the cases pass (switched by _run)


def _run(fn, s, p, q, reduction, check, threshold=None, monkeypatch=None):
    global c_
    c_ = check
    if threshold is not None:
        monkeypatch.setattr(K, "FUSED_MAX_ENTRIES", threshold)
    t = s.clone().requires_grad_(True)
    v = fn(t, p, q, reduction)
    v.backward()
    c_ = True
    return v.detach(), t.grad


def _cases():
    for name in PAIR_CASES:
        for r in REDUCTIONS.get(name, ("mean", "sum")):
            yield "pair", name, r
    for name in PROXY_CASES:
        for r in ("mean", "sum"):
            yield "proxy", name, r


@pytest.mark.parametrize("kind,name,reduction", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_autograd_paths(kind, name, reduction, dtype, monkeypatch):
    """The fast path (check=True, small) against the autograd form (check=False) and the
    large-batch check=True form (the fast path switched off): equal values, equal gradients."""
    fn = (PAIR_CASES if kind == "pair" else PROXY_CASES)[name]
    s, p, q = _pair_batch(dtype) if kind == "pair" else _proxy_batch(dtype)
    fast, g_fast = _run(fn, s, p, q, reduction, True)
    masked, g_masked = _run(fn, s, p, q, reduction, False)
    indexed, g_indexed = _run(fn, s, p, q, reduction, True, 0, monkeypatch)
    # float32: the paths round in different orders (Circle's gamma = 80 makes terms ~1e2)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for v, g in ((masked, g_masked), (indexed, g_indexed)):
        torch.testing.assert_close(fast, v, rtol=rtol, atol=rtol * float(v.abs()))
        torch.testing.assert_close(g_fast, g, rtol=rtol, atol=rtol * float(g.abs().max()))
    assert float(fast) != 0.0 and float(g_fast.abs().sum()) > 0


@pytest.mark.parametrize("name", ["multi_similarity", "multi_similarity_eps", "lifted", "nca",
                                  "margin", "proxy_anchor"])
def test_fast_path_double_backward(name):
    fn = {**PAIR_CASES, **PROXY_CASES}[name]
    s, p, q = (_proxy_batch if name == "proxy_anchor" else _pair_batch)(torch.float64, n=9)
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, p, q, "mean"), (s,))
    assert torch.autograd.gradgradcheck(lambda t: fn(t, p, q, "mean"), (s,))


def test_fast_path_is_taken_below_the_threshold_only():
    s, p, q = _pair_batch(torch.float32)
    t = s.clone().requires_grad_(True)
    assert type(PB.circle(t, p, q).grad_fn).__name__ == "FusedLossBackward"
    big = torch.rand(300, 300).requires_grad_(True)  # 90,000 entries > FUSED_MAX_ENTRIES
    bp, bq = label_masks(torch.arange(300) // 4)
    assert big.numel() > K.FUSED_MAX_ENTRIES
    assert type(PB.circle(big, bp, bq).grad_fn).__name__ != "FusedLossBackward"


def test_fast_path_without_grad_gives_the_same_value():
    s, p, q = _pair_batch(torch.float64)
    with torch.no_grad():
        v = PB.multi_similarity(s.clone().requires_grad_(True), p, q)
    assert v.grad_fn is None
    # the same value up to the order of the float64 sums (the kernel adds the 2N weighted
    # softplus terms in one sum, the autograd form per row, then their mean)
    assert float(v) == pytest.approx(float(PB.multi_similarity(s, p, q, check=False)),
                                     rel=1e-14, abs=0)


def test_exponent_floor_changes_no_value():
    """Scores that put most exponents below exp(-87) (beta = 50 over a spread of 4: the
    denormal range the fast path clamps away): the value equals the exact masked form and the
    gradient differs by less than the smallest normal float."""
    s, p, q = _pair_batch(torch.float32, spread=2.0)
    fast, g_fast = _run(PAIR_CASES["multi_similarity"], s, p, q, "mean", True)
    exact, g_exact = _run(PAIR_CASES["multi_similarity"], s, p, q, "mean", False)
    # within two units in the last place (the two forms add their 2N terms in other orders)
    assert float(fast) == pytest.approx(float(exact), rel=2.5e-7, abs=0)
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-6, atol=1e-6 * float(g_exact.abs().max()))
    # off the masks (the diagonal) the floor's exp(-87) leaves a gradient below the smallest
    # normal float, where the exact form has 0
    assert float(g_fast[~(p | q)].abs().max()) < torch.finfo(torch.float32).tiny
    x = (s - 0.5) * 50
    assert float((x - x.max()).min()) < -87.0  # the floor was in play


def _every_kind_of_row(dtype, n=12, m=10, seed=4):
    """Scores and disjoint masks with every kind of row: both parts, no negative, no
    positive, neither (and columns without a positive or without a negative)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, m, generator=g, dtype=dtype) * 2 - 1
    pos = torch.rand(n, m, generator=g) < 0.3
    neg = ~pos & (torch.rand(n, m, generator=g) < 0.8)
    pos[0], neg[0] = False, True  # no positive
    pos[1, :3], neg[1] = True, False  # no negative
    pos[2], neg[2] = False, False  # nothing
    pos[:, 0], neg[:, 0] = True, False  # a column without a negative
    pos[:, 1] = False  # a column without a positive
    pos[0, 0] = pos[2, 0] = False
    return s, pos, neg


@pytest.mark.parametrize("name", [*PAIR_CASES, "proxy_anchor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_rows_without_a_part(name, dtype):
    """The fused kernels' empty rows (a masked log-sum-exp without a kept entry: a hugely
    negative, finite value, exactly 0 in every term and gradient) against the autograd form,
    for every reduction."""
    fn = PAIR_CASES[name] if name in PAIR_CASES else PROXY_CASES[name]
    s, p, q = _every_kind_of_row(dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for reduction in REDUCTIONS.get(name, ("mean", "sum")):
        fast, g_fast = _run(fn, s, p, q, reduction, True)
        masked, g_masked = _run(fn, s, p, q, reduction, False)
        torch.testing.assert_close(fast, masked, rtol=rtol, atol=rtol * float(masked.abs()))
        torch.testing.assert_close(g_fast, g_masked, rtol=rtol,
                                   atol=rtol * float(g_masked.abs().max()))
        assert bool(torch.isfinite(g_fast).all())
        assert float(g_fast[~(p | q)].abs().max()) == 0.0  # exactly 0 off the masks


@pytest.mark.parametrize("dim", [-1, -2])
def test_stacked_lse_matches_logsumexp(dim):
    """``kernels.stacked_lse`` on 0/1 masks against torch's logsumexp of the masked entries:
    exact on rows with a kept entry, ``e`` exactly 0 off the mask, ``z >= 1`` exactly on the
    rows with a kept entry, empty rows finite with a softplus and a sigmoid of 0; ``x`` is
    left alone unless ``overwrite=True``, and may broadcast against the mask."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64) * 40
    keep = torch.rand(2, 6, 8, generator=g) < 0.5
    keep[0, 1], keep[1, :, 2] = False, False  # an empty row and an empty column
    kf = K.as_float(keep, x.dtype)
    before = x.clone()
    lse, e, m, z = K.stacked_lse(x, kf, dim)
    assert torch.equal(x, before)  # not overwritten by default
    ref = torch.logsumexp(x.masked_fill(~keep, -math.inf), dim, keepdim=True)
    ok = keep.any(dim, keepdim=True)
    torch.testing.assert_close(lse[ok], ref[ok], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(e[keep], torch.exp(x - m)[keep], rtol=1e-13, atol=0)
    assert float(e[~keep].abs().max()) == 0.0
    assert bool(((z >= 1) == ok).all()) and bool((z > 0).all())
    assert bool(torch.isfinite(lse).all())
    assert float(K.softplus(lse[~ok]).max()) == 0.0
    assert float(torch.sigmoid(lse[~ok]).max()) == 0.0
    same = K.stacked_lse(x.clone(), kf, dim, overwrite=True)
    assert all(torch.equal(u, v) for u, v in zip(same, (lse, e, m, z)))
    # x broadcast against the mask
    lse_b = K.stacked_lse(x[0], kf, dim)[0]
    ref_b = K.stacked_lse(x[0].expand(2, 6, 8).clone(), kf, dim)[0]
    assert torch.equal(lse_b, ref_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mined_keep_is_multi_similarity_pairs(dtype):
    """The mining as 0/1 values equals the boolean one, ties included (scores on a grid of
    1/8, epsilon 1/4: S - eps equals the hardest negative exactly)."""
    s, p, q = _every_kind_of_row(dtype)
    s = (s * 8).round() / 8
    for row in (3, 4):  # S - eps == max_Q S at a positive, S + eps == min_P S at a negative
        j, k = int(p[row].nonzero()[0]), int(q[row].nonzero()[0])
        s[row, j] = s[row][q[row]].max() + 0.25
        s[row, k] = s[row][p[row]].min() - 0.25
    hardest_neg = torch.where(q, s, -math.inf).amax(1, keepdim=True)
    easiest_pos = torch.where(p, s, math.inf).amin(1, keepdim=True)
    assert bool(((s - 0.25 == hardest_neg) & p).any())
    assert bool(((s + 0.25 == easiest_pos) & q).any())
    pos, neg = PB.multi_similarity_pairs(s, p, q, 0.25)
    keep, extrema = PB._mined_keep(s, p, q, 0.25)
    assert torch.equal(keep[0] > 0, pos) and torch.equal(keep[1] > 0, neg)
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    lo = torch.finfo(dtype).min / 2
    assert torch.equal(extrema[0][p.any(1)], -easiest_pos[p.any(1)])  # -min_P S
    assert torch.equal(extrema[1][q.any(1)], hardest_neg[q.any(1)])
    assert bool((extrema[0][~p.any(1)] < lo).all()) and bool((extrema[1][~q.any(1)] < lo).all())


def test_any_triplet():
    s, p, q = _every_kind_of_row(torch.float32)
    for a, b in ((p, q), (p, torch.zeros_like(q)), (p[:3], q[:3]), (p[1:3], q[1:3]),
                 (p[:, :0], q[:, :0]), (p.int(), q.int() * 2)):
        ref = bool((a.bool().any(1) & b.bool().any(1)).any()) if a.numel() else False
        assert any_triplet(a, b) == ref


@pytest.mark.parametrize("name", ["circle", "margin"])
def test_fast_path_raises_without_a_triplet(name, monkeypatch):
    """Circle and the margin loss check for a triplet inside their fused kernels: the same
    errors as the autograd form, with and without a gradient."""
    fn = PAIR_CASES[name]
    s = torch.rand(6, 6, dtype=torch.float64)
    p = torch.zeros(6, 6, dtype=torch.bool)
    q = torch.zeros(6, 6, dtype=torch.bool)
    p[:2, :3], q[2:, 3:] = True, True  # positives and negatives, never in one row
    for masks, match in (((p, q), "no anchor has both"), ((q & p, q), "no positive pair"),
                         ((p, p & q), "no negative pair")):
        for threshold in (None, 0):  # fused, then the autograd form
            if threshold is not None:
                monkeypatch.setattr(K, "FUSED_MAX_ENTRIES", threshold)
            with pytest.raises(NoPairsError, match=match):
                fn(s.clone().requires_grad_(True), *masks, "mean")
            with torch.no_grad(), pytest.raises(NoPairsError, match=match):
                fn(s.clone().requires_grad_(True), *masks, "mean")
        monkeypatch.undo()


# ------------------------------------------------------------------ the module boundary


MODULES = {
    "multi_similarity": lambda: PB.MultiSimilarity(epsilon=0.1),
    "circle": lambda: PB.Circle(),
    "lifted": lambda: PB.LiftedStructure(),
    "margin": lambda: PB.Margin(),
    "nca": lambda: PB.NCA(),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_keep_their_checks_on_the_fast_path(name):
    x = torch.randn(12, 8)
    y = torch.arange(12) // 3
    bad = x.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf in 1 row"):
        MODULES[name]()(bad, y)
    with pytest.raises(ValueError, match="ref_emb contains NaN or Inf"):
        MODULES[name]()(x, y, ref_emb=bad, ref_labels=y)
    # no term: no positive pair (a triplet or a positive is needed), or no pair at all
    # (multi-similarity and lifted structure also learn from negatives alone, as PML)
    rows = 1 if name in ("multi_similarity", "lifted") else 12
    leaf, lonely = x[:rows].clone().requires_grad_(True), torch.arange(rows)
    loss = MODULES[name]()
    with pytest.warns(NoPairsWarning):
        out = loss(leaf, lonely)
    assert float(out) == 0.0
    out.backward()  # still in the graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per instance
        loss(leaf, lonely)


@pytest.mark.parametrize("cls", [PX.ProxyNCA, PX.ProxyAnchor, PX.NormalizedSoftmax,
                                 PX.CosFace, PX.ArcFace])
def test_proxy_modules_keep_their_checks_on_the_fast_path(cls):
    loss = cls(5, 8)
    x = torch.randn(10, 8)
    y = torch.arange(10) % 5
    bad = x.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"embeddings contains NaN or Inf in 1 row"):
        loss(bad, y)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        loss(x, y + 1)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        loss(x, y - 1)
    with torch.no_grad():
        loss.proxies[2, 0] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        loss(x, y)


def test_normalized_softmax_rejects_a_temperature_of_zero():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        PX.NormalizedSoftmax(5, 8, temperature=0.0)


def test_arcface_fast_path_at_the_clamp_bounds():
    """Cosines at and beyond +-1 (the clamp's bounds, where acos' is infinite): the fast path's
    analytic target derivative gives autograd's gradient (0 there), not inf or NaN."""
    s = torch.tensor([[1.0, 0.2, -0.3], [-1.0, 0.5, 0.1], [1.2, 0.0, 0.3],
                      [-0.999, 0.4, 0.2], [0.3, -0.2, 0.9]], dtype=torch.float64)
    pos = torch.zeros(5, 3, dtype=torch.bool)
    pos[:, 0] = True
    fast, g_fast = _run(PROXY_CASES["arcface"], s, pos, ~pos, "mean", True)
    ref, g_ref = _run(PROXY_CASES["arcface"], s, pos, ~pos, "mean", False)
    assert float(fast) == float(ref)
    assert bool(torch.isfinite(g_fast).all())
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epsilon", [None, 0.1])
def test_multi_similarity_fast_path_is_finite_for_anchors_without_mined_pairs(epsilon):
    """float32 scores up to 3 (a non-cosine critic): beta (S - base) passes 103, where
    exp(-m) underflows; an anchor without a positive (so without mined pairs) must still get a
    zero gradient, not 0 / 0."""
    s, p, q = _pair_batch(torch.float32, seed=1, spread=3.0)
    fn = lambda t, p, q, r: PB.multi_similarity(t, p, q, epsilon=epsilon, reduction=r,  # noqa: E731
                                                check=c_)
    fast, g_fast = _run(fn, s, p, q, "mean", True)
    slow, g_slow = _run(fn, s, p, q, "mean", False)
    assert bool(torch.isfinite(g_fast).all())
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5 * float(g_slow.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arcface_target_both_is_target_and_derivative_bit_for_bit(dtype):
    """``target.both`` (the fused lane's one pass) gives exactly ``target`` and ``derivative``:
    cosines at, inside and beyond +-1, and around the switch at ``theta = pi - margin``."""
    margin = math.radians(28.6)
    fn = PX._arcface_target(margin)
    switch = math.cos(math.pi - margin)
    c = torch.cat([torch.tensor([-1.5, -1.0, -0.9999999, 0.0, 0.9999999, 1.0, 1.5,
                                 switch, math.nextafter(switch, 1.0),
                                 math.nextafter(switch, -1.0)]),
                   torch.linspace(-1.0, 1.0, 2001)]).to(dtype)[:, None]
    value, slope = fn.both(c)
    assert torch.equal(value, fn(c))
    assert torch.equal(slope, fn.derivative(c))
