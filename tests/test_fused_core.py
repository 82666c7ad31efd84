"""The small-batch fused paths of the functional core's losses (InfoNCE in both forms, NWJ, JS,
DV, triplet with each mining, contrastive: ``kernels.FusedLoss`` below ``FUSED_MAX_ENTRIES``)
and of the normalising critics (``critics.unit_rows``, ``critics.unit_gram``), against the
autograd forms they replace and against independent closed forms: the same values and
gradients in float32 and float64, double backward, masks that overlap or leave anchors out,
and the checks that must still raise."""

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.critics import Cosine, NegativeL2, _unit_gram_plain, unit_gram, unit_rows
from contrastive.pairs import NoPairsError, label_masks
from losses import functional as LF
from losses import kernels as K
from losses import modules as M
from losses import native as N


def _batch(dtype, n=24, classes=5, seed=0, spread=3.0):
    """Label masks with an anchor that has no positive, scores spread over ``[-spread,
    spread]``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[-1] = classes + 3
    s = (torch.rand(n, n, generator=g, dtype=dtype) * 2 - 1) * spread
    return s, *label_masks(y)


CASES = {
    "supcon": lambda s, p, q, r, c: LF.supcon(s, p, q, r, c),
    "ntxent": lambda s, p, q, r, c: LF.ntxent(s, p, q, r, c),
    "nwj": lambda s, p, q, r, c: LF.nwj(s, p, q, r, c),
    "js": lambda s, p, q, r, c: LF.js(s, p, q, r, c),
    "dv": lambda s, p, q, r, c: LF.dv(s, p, q, r, c),
}


def _triplet_case(mining: str, reduction: str):
    return lambda s, p, q, _r, c: LF.triplet(s, p, q, 0.3, mining, False, reduction, c)


def _contrastive_case(reduction: str):
    return lambda s, p, q, _r, c: LF.contrastive(s, p, q, 0.5, -0.5, reduction, c)


MARGIN_CASES = {  # the hinge losses, with each reduction they take
    **{f"triplet_{mining}_{r}": _triplet_case(mining, r)
       for mining in ("all", "hard", "semihard") for r in ("nonzero", "mean", "sum")},
    **{f"contrastive_{r}": _contrastive_case(r) for r in ("nonzero", "mean", "sum")},
}


def _run(fn, s, p, q, reduction, check, monkeypatch=None, threshold=None):
    if threshold is not None:
        monkeypatch.setattr(K, "FUSED_MAX_ENTRIES", threshold)
    t = s.clone().requires_grad_(True)
    v = fn(t, p, q, reduction, check)
    v.backward()
    if threshold is not None:
        monkeypatch.undo()
    return v.detach(), t.grad, type(v.grad_fn).__name__


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(float(b.abs().max()), 1.0))


def _fused_matches_autograd(fn, s, p, q, reduction, dtype, monkeypatch):
    """Fused (check=True, small) against the masked autograd form (check=False) and the indexed
    one (check=True with the fused path switched off): equal values and gradients."""
    fast, g_fast, node = _run(fn, s, p, q, reduction, True)
    assert node == "FusedLossBackward"
    for check, thr in ((False, None), (True, 0)):
        v, g, other = _run(fn, s, p, q, reduction, check, monkeypatch, thr)
        assert other != "FusedLossBackward"
        _close(fast, v, dtype)
        _close(g_fast, g, dtype)
    assert float(fast) != 0.0 and float(g_fast.abs().sum()) > 0


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_both_autograd_forms(name, reduction, dtype, monkeypatch):
    _fused_matches_autograd(CASES[name], *_batch(dtype), reduction, dtype, monkeypatch)


@pytest.mark.parametrize("name", list(MARGIN_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_hinge_losses_equal_both_autograd_forms(name, dtype, monkeypatch):
    _fused_matches_autograd(MARGIN_CASES[name], *_batch(dtype, spread=1.0), None, dtype,
                            monkeypatch)


def _hinge_closed_forms(s, p, q, m=0.3):
    """Every triplet of the batch as an [N, M, M] tensor; every pair for the contrastive loss."""
    d = s[:, None, :] - s[:, :, None] + m  # (anchor, positive, negative)
    keep = p[:, :, None] & q[:, None, :]
    t = torch.relu(d)[keep]
    all_nz = t.sum() / (t > 0).sum()
    sd = s.detach()
    hp = sd.masked_fill(~p, math.inf).argmin(1)
    hn = sd.masked_fill(~q, -math.inf).argmax(1)
    ok = p.any(1) & q.any(1)
    rows = torch.arange(s.shape[0])
    hard = torch.relu(s[rows, hn] - s[rows, hp] + m)[ok]
    semi = []  # FaceNet: per (a, p), the largest S_an below S_ap, else the smallest S_an
    for a, j in p.nonzero().tolist():
        if not q[a].any():
            continue
        below = [k for k in range(s.shape[1]) if q[a, k] and sd[a, k] < sd[a, j]]
        pool = below or [k for k in range(s.shape[1]) if q[a, k]]
        k = max(pool, key=lambda k: sd[a, k]) if below else min(pool, key=lambda k: sd[a, k])
        semi.append(torch.relu(s[a, k] - s[a, j] + m))
    semi = torch.stack(semi)
    pos, neg = torch.relu(0.5 - s[p]), torch.relu(s[q] + 0.5)
    return {"triplet_semihard_mean": semi.mean(), "triplet_semihard_sum": semi.sum(),
            "triplet_semihard_nonzero": semi.sum() / (semi > 0).sum(),
            "triplet_all_nonzero": all_nz, "triplet_all_mean": t.mean(),
            "triplet_all_sum": t.sum(), "triplet_hard_mean": hard.mean(),
            "triplet_hard_nonzero": hard.sum() / (hard > 0).sum(),
            "triplet_hard_sum": hard.sum(),
            "contrastive_nonzero": pos.sum() / (pos > 0).sum() + neg.sum() / (neg > 0).sum(),
            "contrastive_mean": pos.mean() + neg.mean(), "contrastive_sum": pos.sum() + neg.sum()}


@pytest.mark.parametrize("reduction", ["nonzero", "mean", "sum"])
@pytest.mark.parametrize("classes", [5, 2])  # few positives per anchor (dense) and many (sorted)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_semihard_is_the_autograd_form_bit_for_bit(reduction, classes, dtype, monkeypatch):
    """The fused semi-hard torch kernel picks the same negatives and scatters its gradient as
    autograd's two gather backward passes do: values and gradients identical, not just close
    (published tables trained with the autograd form stay valid). Its C form (losses.native,
    sums in double) equals it to rounding: tests/test_native.py."""
    n = 24 if classes == 5 else 200  # 200 rows of 2 classes: ~100 positives, sorted search
    s, p, q = _batch(dtype, n=n, classes=classes, spread=1.0)
    q[3] = False  # an anchor without negatives
    fn = _triplet_case("semihard", reduction)
    with N.disabled():
        fast, g_fast, node = _run(fn, s, p, q, None, True)
    assert node == "FusedLossBackward"
    slow, g_slow, other = _run(fn, s, p, q, None, True, monkeypatch, 0)
    assert other != "FusedLossBackward"
    assert torch.equal(fast, slow) and torch.equal(g_fast, g_slow)
    assert float(fast) > 0


@pytest.mark.parametrize("mining", ["all", "semihard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_passes_float_and_boolean_agree(mining, dtype, monkeypatch):
    """The triplet counts and the semi-hard search take every positive slot in one float pass
    on small matrices, several slots per pass on larger ones and one boolean pass per slot on
    large ones (``functional.SLOT_PASS_ENTRIES``): on the autograd path all three give the
    brute force's value and the same gradient, bit for bit."""
    s, p, q = _batch(dtype, n=40, classes=6, spread=1.0)
    q[3] = False
    monkeypatch.setattr(K, "FUSED_MAX_ENTRIES", 0)
    out = []
    # every slot in one pass; two slots per pass (40 x 40 entries each, k > 2 slots); one
    # boolean pass per slot (every matrix "large")
    for entries in (1 << 20, 2 * 40 * 40, 1):
        monkeypatch.setattr(LF, "SLOT_PASS_ENTRIES", entries)
        t = s.clone().requires_grad_(True)
        v = LF.triplet(t, p, q, 0.3, mining, reduction="sum")
        (g,) = torch.autograd.grad(v, t)
        out.append((v.detach(), g))
    for v, g in out[1:]:
        assert torch.equal(out[0][0], v) and torch.equal(out[0][1], g)
    ref = _hinge_closed_forms(s, p, q)[f"triplet_{mining}_sum"]
    torch.testing.assert_close(out[0][0], ref, rtol=1e-5, atol=1e-5)


def _fused_matches_closed_form(fused, closed, s, reduction, grad_rtol=1e-12):
    """``fused(t, reduction)`` takes the fused path and equals ``closed(r)`` (the loss written
    from its definition) in value and gradient, in float64."""
    t = s.clone().requires_grad_(True)
    fast = fused(t, reduction)
    assert type(fast.grad_fn).__name__ == "FusedLossBackward"
    (g_fast,) = torch.autograd.grad(fast, t)
    r = s.clone().requires_grad_(True)
    ref = closed(r)
    (g_ref,) = torch.autograd.grad(ref, r)
    torch.testing.assert_close(fast, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_fast, g_ref, rtol=grad_rtol, atol=1e-12)


@pytest.mark.parametrize("name", list(MARGIN_CASES))
def test_fused_hinge_losses_equal_the_brute_force(name):
    s, p, q = _batch(torch.float64, spread=1.0)
    _fused_matches_closed_form(lambda t, r: MARGIN_CASES[name](t, p, q, r, True),
                               lambda r: _hinge_closed_forms(r, p, q)[name], s, None)


def _closed_forms(s, p, q):
    """The losses written out from their definitions with plain torch operations."""
    v = p | q
    lse_v = torch.logsumexp(s.masked_fill(~v, -math.inf), 1)
    cnt = p.sum(1)
    has = cnt > 0
    used = has & (v.sum(1) > 1)
    supcon = (lse_v - (s * p).sum(1) / cnt.clamp_min(1))[used].sum() / used.sum()
    lse_q = torch.logsumexp(s.masked_fill(~q, -math.inf), 1)
    rows, cols = p.nonzero(as_tuple=True)
    e_pos = torch.exp(s[rows, cols])
    pair = -torch.log(e_pos / (e_pos + torch.exp(lse_q[rows])))
    ntxent = pair.mean()
    nwj = -(s[p].mean() - torch.exp(s[q] - 1.0).mean())
    js = F.softplus(-s[p]).mean() + F.softplus(s[q]).mean()
    dv = -(s[p].mean() - (torch.logsumexp(s[q], 0) - math.log(int(q.sum()))))
    return {"supcon": supcon, "ntxent": ntxent, "nwj": nwj, "js": js, "dv": dv}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_the_closed_form(name):
    s, p, q = _batch(torch.float64)
    _fused_matches_closed_form(lambda t, r: CASES[name](t, p, q, r, True),
                               lambda r: _closed_forms(r, p, q)[name], s, "mean",
                               grad_rtol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_with_overlapping_and_partial_masks(name, monkeypatch):
    """User masks need not come from labels: a pair in both P and Q, pairs in neither, an
    anchor without negatives. The fused path gives the autograd forms' numbers there too."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(10, 14, generator=g, dtype=torch.float64) * 2
    p = torch.rand(10, 14, generator=g) < 0.25
    q = torch.rand(10, 14, generator=g) < 0.6
    p[0, 0] = q[0, 0] = True  # in both masks
    q[1] = False  # anchor 1 has no negative
    p[1, 3] = True
    fast, g_fast, node = _run(CASES[name], s, p, q, "mean", True)
    assert node == "FusedLossBackward"
    slow, g_slow, _ = _run(CASES[name], s, p, q, "mean", False)
    _close(fast, slow, torch.float64)
    _close(g_fast, g_slow, torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_double_backward(name):
    s, p, q = _batch(torch.float64, n=8, classes=3)
    s = (s / 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: CASES[name](t, p, q, "mean", True), (s,))
    assert torch.autograd.gradgradcheck(lambda t: CASES[name](t, p, q, "mean", True), (s,))


@pytest.mark.parametrize("name", list(CASES))
def test_fused_keeps_the_checks(name):
    s, p, q = _batch(torch.float32)
    bad = s.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        CASES[name](bad.requires_grad_(True), p, q, "mean", True)
    none = torch.zeros_like(p)
    with pytest.raises(NoPairsError):
        CASES[name](s.clone().requires_grad_(True), none, q, "mean", True)
    with pytest.raises(NoPairsError):
        CASES[name](s.clone().requires_grad_(True), p, none, "mean", True)


def test_fused_nwj_does_not_overflow_where_its_mean_does_not():
    """exp(S - 1) of one score overflows float32 at S > 89.7, but the mean over the negatives
    is taken in log space first, as in the autograd form."""
    s, p, q = _batch(torch.float32)
    s = s * 30 + 5  # scores up to 95
    fast, g_fast, _ = _run(CASES["nwj"], s, p, q, "mean", True)
    slow, _, _ = _run(CASES["nwj"], s, p, q, "mean", False)
    assert math.isfinite(float(fast)) == math.isfinite(float(slow))


# ------------------------------------------------------------------ the critics


@pytest.mark.parametrize("kind", ["cosine", "l2", "l2sq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_gram_equals_the_plain_critic(kind, dtype):
    """The one-node self-scores against plain F.normalize + product (+ distance): equal values
    (the same forward operations), equal gradients, with a duplicate row (distance 0) and a
    zero row (norm below eps)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 7, generator=g, dtype=dtype)
    x[3] = x[5]
    x[7] = 0.0
    scale = torch.tensor(3.0, dtype=dtype) if kind == "cosine" else None
    up = torch.randn(20, 20, generator=g, dtype=dtype)
    a = x.clone().requires_grad_(True)
    fused = unit_gram(a, kind, scale)
    assert type(fused.grad_fn).__name__ == "_UnitGramBackward"
    fused.backward(up)
    b = x.clone().requires_grad_(True)
    plain = _unit_gram_plain(b, scale, kind)
    plain.backward(up)
    assert torch.equal(fused.detach(), plain.detach())
    _close(a.grad, b.grad, dtype)


@pytest.mark.parametrize("kind", ["cosine", "l2", "l2sq"])
def test_unit_gram_double_backward(kind):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64) if kind == "cosine" else None

    def f(t):  # off the diagonal: the distance to oneself is 0, with no derivative there
        return unit_gram(t, kind, scale).triu(1)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_unit_rows_equals_normalize():
    x = torch.randn(9, 5, dtype=torch.float64)
    x[2] = 0.0
    up = torch.randn(9, 5, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = unit_rows(a), F.normalize(b, dim=1)
    assert torch.equal(ya.detach(), yb.detach())
    ya.backward(up)
    yb.backward(up)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-13)
    t = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(unit_rows, (t,))


def test_critics_take_the_one_node_path_only_on_self_scores():
    x = torch.randn(8, 4, requires_grad=True)
    y = torch.randn(6, 4, requires_grad=True)
    assert type(Cosine(0.1)(x, x).grad_fn).__name__ == "_UnitGramBackward"
    assert type(NegativeL2(normalize=True)(x, x).grad_fn).__name__ == "_UnitGramBackward"
    assert type(Cosine(0.1)(x, y).grad_fn).__name__ != "_UnitGramBackward"
    learnable = Cosine(0.1, learnable=True)  # the scale needs its gradient: plain operations
    s = learnable(x, x)
    assert type(s.grad_fn).__name__ != "_UnitGramBackward"
    s.sum().backward()
    assert learnable.log_inv_t.grad is not None


@pytest.mark.parametrize("make", [lambda: M.InfoNCE(), lambda: M.InfoNCE(positives="pair"),
                                  M.NWJ, M.JS, M.DV, M.Triplet, M.Contrastive,
                                  lambda: M.Triplet(mining="hard", reduction="nonzero"),
                                  lambda: M.Triplet(mining="semihard")])
def test_modules_on_the_fused_paths_equal_the_plain_pipeline(make, monkeypatch):
    """The whole module (critic + loss) with every fused path against the same module with
    them switched off (plain autograd critic, autograd loss): same value, same gradient."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 16, generator=g, dtype=torch.float64)
    y = torch.arange(32) // 4
    a = x.clone().requires_grad_(True)
    fused = make()(a, y)
    fused.backward()
    monkeypatch.setattr(K, "FUSED_MAX_ENTRIES", 0)
    monkeypatch.setattr("contrastive.critics._compiling", lambda: True)
    b = x.clone().requires_grad_(True)
    plain = make()(b, y)
    plain.backward()
    torch.testing.assert_close(fused.detach(), plain.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_smile_trains_by_exactly_the_js_gradient(reduction):
    """SMILE's JS-gradient training is functional.js's own gradient, bit for bit (fused path
    included), so the mi-bench JS and SMILE rows train the same critic."""
    from losses import bounds as LB

    s, p, q = _batch(torch.float32)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    sm = LB.smile(a, p, q, tau=1.0, reduction=reduction)
    js = LF.js(b, p, q, reduction)
    up = torch.ones_like(sm)
    sm.backward(up)
    js.backward(up)
    assert torch.equal(a.grad, b.grad)
    assert not torch.equal(sm.detach(), js.detach())  # valued as -I_SMILE, not as JS
