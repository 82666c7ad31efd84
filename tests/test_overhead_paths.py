"""The small-batch fast paths of the pair and proxy losses (``losses.K.FusedLoss``:
value and ``dL/dS`` in one pass without autograd, below ``FUSED_MAX_ENTRIES`` score entries;
the proxy softmax losses' plain cross-entropy) against the autograd forms they replace: the
same values, the same gradients, double backward, and every check of the module boundary still
raising or warning."""

import math
import warnings

import pytest
import torch

from contrastive.pairs import NoPairsWarning, label_masks
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
    assert float(v) == float(PB.multi_similarity(s, p, q, check=False))


def test_exponent_floor_changes_no_value():
    """Scores that put most exponents below exp(-87) (beta = 50 over a spread of 4: the
    denormal range the fast path clamps away): the value equals the exact masked form and the
    gradient differs by less than the smallest normal float."""
    s, p, q = _pair_batch(torch.float32, spread=2.0)
    fast, g_fast = _run(PAIR_CASES["multi_similarity"], s, p, q, "mean", True)
    exact, g_exact = _run(PAIR_CASES["multi_similarity"], s, p, q, "mean", False)
    assert float(fast) == float(exact)
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-6, atol=1e-6 * float(g_exact.abs().max()))
    # off the masks (the diagonal) the floor's exp(-87) leaves a gradient below the smallest
    # normal float, where the exact form has 0
    assert float(g_fast[~(p | q)].abs().max()) < torch.finfo(torch.float32).tiny
    x = (s - 0.5) * 50
    assert float((x - x.max()).min()) < -87.0  # the floor was in play


def test_stacked_lse_matches_logsumexp():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64) * 40
    keep = torch.rand(2, 6, 8, generator=g) < 0.5
    keep[0, 1] = False  # an empty row
    lse, e, m, z = K.stacked_lse(x.clone(), keep)
    ref = torch.logsumexp(x.masked_fill(~keep, -math.inf), -1)
    ok = keep.any(-1)
    torch.testing.assert_close(lse[ok], ref[ok], rtol=1e-13, atol=1e-13)
    assert bool(((z.squeeze(-1) >= 1) == ok).all())
    assert float(torch.nn.functional.softplus(lse[0, 1])) == 0.0


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
