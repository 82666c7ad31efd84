"""Edge cases of the critics and of the MI estimators of :mod:`losses.bounds`, each against an
independent reference (torch.cdist on F.normalize'd rows, numpy brute force, Poole et al.'s /
Song & Ermon's reference code transcribed to numpy):

- ``NegativeL2(normalize=True)`` on rows below ``F.normalize``'s eps (zero rows, a row of norm
  1e-13 or 0.9e-12, which F.normalize leaves at ``x / eps``, not at norm 1): values, gradients,
  gradcheck and double backward against cdist; a batch without such rows keeps the unit formula
  ``2 - 2G`` bit for bit, and the correction's machinery adds nothing to its gradient;
- the fused critics (``unit_gram``, ``unit_rows``, ``NegativeL2``) under autocast: plain
  operations there, so the backward pass runs; the losses, which score with autocast off, give
  the same bits with or without it;
- the bounds on rectangular and partial masks, the papers' reference code, and their input
  checks: non-finite scores raise the functional core's ``ValueError`` (``check=True``, one host
  read with the no-term check) and ``check=False`` reads nothing more on the host.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastive.critics as C
from contrastive.critics import Cosine, Dot, NegativeL2, unit_gram
from contrastive.pairs import diagonal_masks
from losses import bounds as LB
from losses import estimator_modules as EM
from losses import functional as LF
from losses import modules as M

ROOT = Path(__file__).resolve().parents[1]


def _lme(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return float(m + math.log(np.mean(np.exp(v - m))))


def _normalized_l2(x: torch.Tensor, y: torch.Tensor, squared: bool) -> torch.Tensor:
    """-||x_i/|x_i| - y_j/|y_j|||, the documented NegativeL2(normalize=True), without the
    matrix-product expansion."""
    d = torch.cdist(F.normalize(x, dim=1), F.normalize(y, dim=1),
                    compute_mode="donot_use_mm_for_euclid_dist")
    return -(d * d) if squared else -d


# --------------------------------------------------------------------------- critics


@pytest.mark.parametrize("kind", ["cosine", "l2", "l2sq"])
def test_critics_on_a_separate_reference_set_noncontiguous_duplicates(kind):
    """A batch against a separate reference set: non-contiguous float64 anchors, a candidate
    equal to an anchor (distance 0), another a positive multiple of one (the same unit row up to
    rounding; not for the plain distance, whose derivative there is any unit vector): values and
    both inputs' gradients against F.normalize + cdist / matmul."""
    g = torch.Generator().manual_seed(11)
    a0 = torch.randn(5, 9, generator=g, dtype=torch.float64).T  # [9, 5], non-contiguous
    b0 = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b0[2] = a0[4]
    if kind != "l2":
        b0[5] = 3.0 * a0[1]
    assert not a0.is_contiguous()
    w = torch.randn(9, 7, generator=g, dtype=torch.float64)
    a, b = a0.clone().T.T, b0.clone()
    a.requires_grad_(True)
    b.requires_grad_(True)
    crit = Cosine(0.3) if kind == "cosine" else NegativeL2(squared=kind == "l2sq",
                                                         normalize=True)
    s = crit(a, b)
    (s * w).sum().backward()
    ra, rb = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    if kind == "cosine":
        ref = F.normalize(ra, dim=1) @ F.normalize(rb, dim=1).T / 0.3
    else:
        ref = _normalized_l2(ra, rb, kind == "l2sq")
    (ref * w).sum().backward()
    torch.testing.assert_close(s.detach(), ref.detach(), rtol=1e-12, atol=1e-7)
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-6, atol=1e-6)


def test_negative_l2_normalized_zero_row_is_the_documented_distance():
    """``normalize=True`` takes every normalised row to have norm 1 (``2 - 2 a.b``): a zero row
    (F.normalize keeps it at 0) is at sqrt(2) from every row, itself included, where PML's
    cdist on the normalised rows gives 1 from unit rows and 0 from zero rows. That is the
    documented trade (NegativeL2's docstring: exact handling costs every call several passes);
    rows of ordinary norm are exact (the next tests)."""
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1] = 0.0
    x[3] = 0.0
    y = torch.randn(5, 3, dtype=torch.float64)
    crit = NegativeL2(normalize=True)
    root2 = torch.full((5,), -math.sqrt(2.0), dtype=torch.float64)
    torch.testing.assert_close(crit(x, y)[1], root2)
    torch.testing.assert_close(crit(x, x)[1], root2[:4])
    ref = _normalized_l2(x, y, False)
    keep = [0, 2]  # the unit rows: PML's distances
    torch.testing.assert_close(crit(x, y)[keep], ref[keep])
    assert "zero row" in NegativeL2.__doc__ and "sqrt(2)" in NegativeL2.__doc__


def _small_rows_batch(dtype, squared: bool):
    """x [9, 5] with two zero rows, rows of norm 1e-13 and 0.9e-12 (F.normalize leaves them at
    x / eps, norms 0.1 and 0.9), an exact duplicate and (squared only: the plain distance's
    derivative at 0 is any unit vector) a positive multiple; y [6, 5] with a zero row, a row of
    norm 5e-14 and a duplicate of a row of x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=dtype)
    x[1] = 0.0
    x[4] = 0.0
    x[2] = x[2] / x[2].norm() * 1e-13
    x[6] = x[6] / x[6].norm() * 0.9e-12
    x[7] = x[3]
    if squared:
        x[8] = 2.5 * x[5]
    y = torch.randn(6, 5, generator=g, dtype=dtype)
    y[0] = 0.0
    y[3] = 0.5 * x[2]
    y[4] = x[3]
    return x, y, g


def _tiny_rows_input(zero: bool, seed: int = 4):
    """``x(t) = [1e-14 t ; z]``: two rows below eps (0.01 t after F.normalize; with ``zero``
    the first is 0) ahead of unit-scale rows, so a finite difference of ``t`` stays below
    eps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, 4, generator=g, dtype=torch.float64)
    if zero:
        t[0] = 0.0
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    return t.requires_grad_(True), z.requires_grad_(True)


# F.normalize's own double backward is NaN at an exactly zero row (the norm's second
# derivative at 0), so gradgradcheck takes rows that are below eps but not zero


@pytest.mark.parametrize("kind", ["l2", "l2sq"])
def test_unit_gram_gradcheck_and_double_backward_with_rows_below_eps(kind):
    """gradcheck and gradgradcheck (float64) of the fused self-scores with a zero row and a row
    of norm ~1e-14, off the diagonal (distance 0 there); the correction is linear in the small
    rows, so finite differences of t see it."""

    def f(t, z):
        return unit_gram(torch.cat([1e-14 * t, z]), kind).triu(1)

    t, z = _tiny_rows_input(zero=True)
    assert type(unit_gram(torch.cat([1e-14 * t, z]), kind).grad_fn).__name__ == "_UnitGramBackward"
    assert torch.autograd.gradcheck(f, (t, z))
    t, z = _tiny_rows_input(zero=False)
    assert torch.autograd.gradcheck(f, (t, z))
    assert torch.autograd.gradgradcheck(f, (t, z))


@pytest.mark.parametrize("squared", [False, True])
def test_negative_l2_normalized_two_sets_gradcheck_and_double_backward(squared):
    """The same for a batch against a separate set with rows below eps on both sides."""
    crit = NegativeL2(squared, normalize=True)

    def f(t, z, u, v):
        return crit(torch.cat([1e-14 * t, z]), torch.cat([v, 3e-14 * u]))

    for zero in (True, False):
        t, z = _tiny_rows_input(zero)
        u, v = _tiny_rows_input(zero, seed=5)
        assert type(f(t, z, u, v).grad_fn).__name__ == "_NegativeL2ScoresBackward"
        assert torch.autograd.gradcheck(f, (t, z, u, v))
        if not zero:
            assert torch.autograd.gradgradcheck(f, (t, z, u, v))


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("against", ["itself", "other"])
def test_rows_of_norm_at_least_eps_keep_the_unit_formula_bit_for_bit(dtype, squared, against):
    """A batch whose rows all have norm >= eps (a row of norm exactly eps included, and
    duplicates): the values are 2 - 2G (clamped, square-rooted) bit for bit, with finite
    gradients (0, not NaN, at the zero distances)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 16, generator=g, dtype=dtype)
    x[0] = 0.0
    x[0, 3] = C.NORM_EPS  # norm exactly eps: not clamped, unit row
    x[5] = x[6]
    y = torch.randn(24, 16, generator=g, dtype=dtype)
    y[2] = x[9]
    w = torch.randn(40, 40 if against == "itself" else 24, generator=g, dtype=dtype)
    w[7] = 0.0

    def run():
        a = x.clone().requires_grad_(True)
        b = a if against == "itself" else y.clone().requires_grad_(True)
        s = NegativeL2(squared, normalize=True)(a, b)
        (s * w).sum().backward()
        return s.detach(), a.grad, (None if b is a else b.grad)

    s, ga, gb = run()
    ya = F.normalize(x, dim=1)
    yb = ya if against == "itself" else F.normalize(y, dim=1)
    sq = (ya @ yb.T).mul_(-2.0).add_(2.0).clamp_(min=0.0)
    assert torch.equal(_bits(s), _bits(-(sq if squared else sq.sqrt())))

    assert torch.isfinite(ga).all() and (gb is None or torch.isfinite(gb).all())


@pytest.mark.parametrize("make", [M.InfoNCE, M.Triplet, M.Contrastive,
                                  lambda: M.Triplet(critic=NegativeL2(squared=True,
                                                                      normalize=True))])
@pytest.mark.parametrize("reference", [False, True])
def test_losses_score_without_autocast_so_their_bits_do_not_change(make, reference):
    """The losses turn autocast off around the critic: the fused path, the same bits with or
    without an enclosing autocast, value and gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g)
    labels = torch.arange(16) % 4
    ref = torch.randn(12, 8, generator=g) if reference else None
    ref_labels = torch.arange(12) % 4 if reference else None
    out = []
    for enabled in (False, True):
        a = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = make()(a, labels, None, ref, ref_labels)
        loss.backward()
        out.append((loss.detach(), a.grad))
    assert torch.equal(_bits(out[0][0]), _bits(out[1][0]))
    assert torch.equal(_bits(out[0][1]), _bits(out[1][1]))


def _autocast_grad(crit, x, y_same: bool):
    a = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = crit(a, a) if y_same else crit(a, a[:4] * 1.0)
    s.float().sum().backward()
    return s.detach().float(), a.grad


@pytest.mark.parametrize("make,y_same", [(lambda: Cosine(0.5), True),
                                         (lambda: NegativeL2(normalize=True), True),
                                         (lambda: NegativeL2(), False),
                                         (lambda: Cosine(0.5), False),
                                         (lambda: NegativeL2(True, normalize=True), True),
                                         (lambda: NegativeL2(normalize=True), False)])
def test_fused_critics_backpropagate_under_autocast(make, y_same):
    """Under autocast the fused Functions (bf16 gradient times float32 saved rows) crashed in
    backward; the critics take the plain operations there, whose dtypes autocast picks."""
    x = torch.randn(8, 6)
    s, grad = _autocast_grad(make(), x, y_same)
    # reference: the same scores from plain operations in float32 (bf16 tolerance)
    r = x.clone().requires_grad_(True)
    other = r if y_same else r[:4]
    crit = make()
    if isinstance(crit, Cosine):
        ref = F.normalize(r, dim=1) @ F.normalize(other, dim=1).T / 0.5
    elif crit.normalize:
        ref = _normalized_l2(r, other, crit.squared)
    else:
        ref = -torch.cdist(r, other, compute_mode="donot_use_mm_for_euclid_dist")
    ref.sum().backward()
    off = ~torch.eye(*s.shape, dtype=torch.bool)
    torch.testing.assert_close(s[off], ref.detach()[off], rtol=0.05, atol=0.05)
    assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------- bounds: brute force


def _numpy_bounds(S, P, Q, b_col, u):
    """Every estimator of the docs' table as explicit numpy over the masks (N x M)."""
    n, m = S.shape
    pos, neg = S[P], S[Q]
    out = {
        "tuba": 1 + np.mean((S - b_col)[P]) - np.mean(np.exp((S - b_col)[Q])),
        "nwj": np.mean(pos) - math.exp(-1) * np.mean(np.exp(neg)),
        "js_bound": np.mean(pos + 1) - math.exp(-1) * np.mean(np.exp(neg + 1)),
        "dv": np.mean(pos) - _lme(neg),
        "smile": np.mean(pos) - _lme(np.clip(neg, -1.5, 1.5)),
        "club": np.mean(pos) - np.mean(neg),
    }
    l1, flo, nce = [], [], []
    for i in range(n):
        for p in range(m):
            if P[i, p] and Q[:, p].any():
                l1.append(S[i, p] - _lme(S[Q[:, p], p]))
            if P[i, p] and Q[i].any():
                flo.append(1 - u[i, p] - math.exp(-u[i, p]) * np.mean(np.exp(S[i, Q[i]] - S[i, p])))
        if P[i].any():
            v = P[i] | Q[i]
            lse = _lme(S[i, v]) + math.log(v.sum())
            nce.append(math.log(v.sum()) - (lse - S[i, P[i]].mean()))
    out.update(l1out=np.mean(l1), flo=np.mean(flo), infonce=np.mean(nce))
    return out


def _library_bounds(s, p, q, b_col, u, reduction):
    return {
        "tuba": LB.tuba_bound(s, p, q, b_col, reduction=reduction),
        "nwj": LF.nwj_bound(s, p, q, reduction=reduction),
        "js_bound": LF.js_bound(s, p, q, reduction=reduction),
        "dv": LB.mine_bound(s, p, q, reduction=reduction),
        "smile": LB.smile_bound(s, p, q, 1.5, reduction=reduction),
        "club": LB.club_bound(s, p, q, reduction=reduction),
        "l1out": LB.l1out_bound(s, p, q, reduction=reduction),
        "flo": LB.flo_bound(s, p, q, u, reduction=reduction),
        "infonce": LF.infonce_bound(s, p, q, reduction=reduction),
    }


@pytest.mark.parametrize("partial", [False, True])
def test_bounds_on_a_rectangular_batch_against_numpy(partial):
    """N anchors against M != N candidates, label masks (some anchors without positives), with
    or without a random subset of the negatives; per-candidate TUBA baseline; "mean" and the
    mean of the "none" terms."""
    rng = np.random.default_rng(7 + partial)
    la, lb = rng.integers(0, 3, 7), rng.integers(0, 4, 10)
    P = la[:, None] == lb[None, :]
    Q = ~P
    if partial:
        Q &= rng.random(Q.shape) < 0.6
    S = rng.normal(size=P.shape) * 2.5
    b_col = rng.normal(size=(1, 10))
    u = rng.normal(size=P.shape)
    ref = _numpy_bounds(S, P, Q, b_col, u)
    args = (torch.tensor(S), torch.tensor(P), torch.tensor(Q), torch.tensor(b_col),
            torch.tensor(u))
    mean = _library_bounds(*args, "mean")
    terms = _library_bounds(*args, "none")
    has = torch.tensor(P).any(1)
    for name, value in ref.items():
        assert float(mean[name]) == pytest.approx(value, rel=1e-10, abs=1e-10), name
        t = terms[name][has] if name == "infonce" else terms[name]
        assert float(t.mean()) == pytest.approx(value, rel=1e-10, abs=1e-10), name


def _alpha_numpy(S, P, Q, alpha, b):
    n, m = S.shape
    joint, num, cnt = [], 0.0, 0
    for i in range(n):
        neg = [k for k in range(m) if Q[i, k]]
        if not neg:
            continue
        dq = alpha * np.mean(np.exp(S[i, neg])) + (1 - alpha) * math.exp(b[i])
        num += float(np.sum(np.exp(S[i, neg]) / dq))
        cnt += len(neg)
        for pp in (k for k in range(m) if P[i, k]):
            sets = [[pp] + [k for k in neg if k != j] for j in neg]
            eb = (1 - alpha) * math.exp(b[i])
            t = [S[i, pp] - math.log(alpha * np.mean(np.exp(S[i, c])) + eb) for c in sets]
            joint.append(np.mean(t))
    return 1 + np.mean(joint) - num / cnt


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_alpha_infonce_rectangular_partial_masks(alpha):
    """The existing brute force assumes N == M; here N = 6 anchors, M = 8 candidates, an anchor
    with one negative, one without any, per-anchor baselines."""
    rng = np.random.default_rng(3)
    P = rng.random((6, 8)) < 0.25
    Q = ~P & (rng.random((6, 8)) < 0.5)
    Q[0] = False
    Q[0, np.flatnonzero(~P[0])[0]] = True
    Q[1] = False
    P[2, 0], Q[2, 0] = True, False
    S = rng.normal(size=(6, 8)) * 2
    b = rng.normal(size=6)
    args = (torch.tensor(S), torch.tensor(P), torch.tensor(Q), alpha, torch.tensor(b))
    ref = _alpha_numpy(S, P, Q, alpha, b)
    assert float(LB.interpolated_bound(*args)) == pytest.approx(ref, rel=1e-10)
    assert float(LB.interpolated_bound(*args, reduction="none").mean()) == pytest.approx(
        ref, rel=1e-10)


def test_paired_bounds_against_the_papers_reference_code():
    """Poole et al.'s `interpolated_lower_bound` / `tuba_lower_bound` / `infonce_lower_bound`
    and Song & Ermon's `smile_lower_bound` (value), transcribed to numpy, on paired samples."""
    rng = np.random.default_rng(5)
    k = 9
    S = rng.normal(size=(k, k)) * 2
    base = rng.normal(size=k)
    off = ~np.eye(k, dtype=bool)

    def logmeanexp_nodiag(f):
        return _lme(f[off])

    def log_loomean(f):  # compute_log_loomean: log mean_{k != j} exp f_ik
        out = np.empty_like(f)
        for i in range(k):
            for j in range(k):
                out[i, j] = _lme(np.delete(f[i], j))
        return out

    def interpolated(f, baseline, alpha):
        nce = log_loomean(f)
        interp = np.log(alpha * np.exp(nce) + (1 - alpha) * np.exp(baseline[:, None]))
        marg = math.exp(logmeanexp_nodiag(f - np.diag(interp)[:, None]))
        cj = np.diag(f)[:, None] - interp
        joint = (cj.sum() - np.trace(cj)) / (k * (k - 1.0))
        return 1 + joint - marg

    t = torch.tensor(S)
    p, q = diagonal_masks(k)
    tuba = 1 + np.mean(np.diag(S) - base) - math.exp(logmeanexp_nodiag(S - base[:, None]))
    assert float(LB.tuba_bound(t, p, q, torch.tensor(base))) == pytest.approx(tuba, rel=1e-11)
    nce = math.log(k) + np.mean(np.diag(S) - np.log(np.exp(S).sum(1)))
    assert float(LF.infonce_bound(t, p, q)) == pytest.approx(nce, rel=1e-11)
    smile = np.mean(np.diag(S)) - logmeanexp_nodiag(np.clip(S, -1.0, 1.0))
    assert float(LB.smile_bound(t, p, q, 1.0)) == pytest.approx(smile, rel=1e-11)
    for alpha in (0.3, 0.8):
        assert float(LB.interpolated_bound(t, p, q, alpha, torch.tensor(base))) == pytest.approx(
            interpolated(S, base, alpha), rel=1e-10)


BOUNDS = [LB.tuba_bound, LB.mine_bound, LB.smile_bound, LB.interpolated_bound, LB.flo_bound,
          LB.club_bound, LB.l1out_bound, LB.tuba, LB.smile, LB.interpolated, LB.flo,
          LB.conditional_nll, lambda s, p, q, **kw: LB.mine(s, p, q, **kw)[0]]


@pytest.mark.parametrize("fn", BOUNDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_bounds_reject_non_finite_scores_like_the_functional_core(fn, bad):
    """They returned NaN silently where losses.functional raises: now the same ValueError
    (check=True, the default); check=False skips the check and gives the non-finite value."""
    p, q = diagonal_masks(4)
    s = torch.randn(4, 4, dtype=torch.float64)
    s[0, 1] = bad
    with pytest.raises(ValueError) as core:
        LF.dv_bound(s, p, q)  # the functional core's behaviour
    with pytest.raises(ValueError, match="scores contain NaN or Inf") as got:
        fn(s, p, q)
    assert str(got.value) == str(core.value)
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        fn(s, p, q, check=True)
    s[0, 1] = 0.0
    s[1, 1] = math.nan  # a positive pair: every estimator reads it
    assert math.isnan(float(fn(s, p, q, check=False)))



def _host_reads():
    """``benchmarks/losses.py``'s ``HostReads``, the counter tests/test_host_reads.py uses."""
    name = "bench_losses_reads_bounds"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks/losses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module.HostReads


HOST_READS = _host_reads()


def _reads(fn) -> int:
    with HOST_READS() as counter:
        fn()
    return counter.reads


@pytest.mark.parametrize("fn", BOUNDS)
def test_bounds_check_in_one_host_read_and_check_false_adds_none(fn):
    """check=True: the finiteness and the no-term checks in one host read (kernels.prepare),
    on top of what the estimator reads anyway (its pairs' index, counts); check=False: none
    of it, the same value. Before: two reads for the no-term check and no finiteness check."""
    p, q = diagonal_masks(5)
    s = torch.randn(5, 5, dtype=torch.float64)
    fn(s, p, q)  # warm-up out of the count
    checked, unchecked = _reads(lambda: fn(s, p, q)), _reads(lambda: fn(s, p, q, check=False))
    # SMILE's loss also checks through functional.js, whose JS gradient it takes
    assert checked == unchecked + (2 if fn is LB.smile else 1)
    assert torch.equal(fn(s, p, q), fn(s, p, q, check=False))
    if fn in (LB.club_bound, LB.conditional_nll):  # means over masks: nothing else to read
        assert unchecked == 0


def test_bounds_keep_their_values_and_no_term_errors():
    """Finite scores give the same values as before the check (the numpy brute force above
    pins them); a batch without a positive or a negative pair is the functional core's
    NoPairsError (a ValueError naming the bound)."""
    p, q = diagonal_masks(4)
    s = torch.randn(4, 4, dtype=torch.float64)
    none = torch.zeros_like(p)
    with pytest.raises(ValueError, match="no positive pair, which the TUBA bound needs"):
        LB.tuba_bound(s, none, q)
    with pytest.raises(ValueError, match="no negative pair, which the CLUB bound needs"):
        LB.club_bound(s, p, none)
    big = torch.full((4, 4), 3e38)  # an overflowing sum of finite scores is no error
    LB.club_bound(big, p, q)


@pytest.mark.parametrize("make", [EM.MINE, EM.SMILE, EM.AlphaInfoNCE, EM.TUBA])
def test_estimator_modules_refuse_non_finite_scores_unless_check_false(make):
    """The estimator modules hand their check to the bound: finite embeddings whose dot
    products overflow float32 raise the core's ValueError with check=True (they returned a
    non-finite loss silently), and still give it with check=False."""
    x = torch.full((6, 4), 1e20)
    x[::2] *= -1.0
    y = torch.arange(6) % 3
    with pytest.raises(ValueError, match="scores contain NaN or Inf"):
        make(critic=Dot())(x, y)
    assert not math.isfinite(float(make(critic=Dot(), check=False)(x, y)))
