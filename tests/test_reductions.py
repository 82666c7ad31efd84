"""``reduction=`` of the functional core and the modules: the per-element terms of
``reduction="none"`` against brute-force loops written from each docstring's definition of a
term, ``"sum"`` and ``"mean"`` as the documented functions of those terms, the default equal to
``"mean"`` (or the triplet/contrastive ``"nonzero"``), and ``check=True`` (index path) equal to
``check=False`` (mask path) for every reduction."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import losses
from contrastive.pairs import diagonal_masks, label_masks
from losses import functional as LF
from losses import kernels as K


def batch(seed=0, n=10, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    s = torch.randn(n, n, generator=g, dtype=dtype)
    pos, neg = label_masks(y)
    return s, pos, neg


def both(fn, *args, **kw):
    """``fn`` with check=True and check=False; asserts they agree and returns the value."""
    a = fn(*args, check=True, **kw)
    b = fn(*args, check=False, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    return a


# ------------------------------------------------------------------ brute-force terms


def lse(v):
    v = np.asarray(v, dtype=np.float64)
    return float(v.max() + np.log(np.exp(v - v.max()).sum())) if v.size else -math.inf


def brute_supcon_rows(s, pos, neg):
    rows = np.zeros(s.shape[0])
    for i in range(s.shape[0]):
        ps = np.flatnonzero(pos[i])
        den = s[i][pos[i] | neg[i]]
        if ps.size and den.size > 1:
            rows[i] = -np.mean(s[i, ps] - lse(den))
    return rows


def brute_ntxent_pairs(s, pos, neg):
    t = np.zeros_like(s)
    for i, j in zip(*np.nonzero(pos)):
        negs = s[i][neg[i]]
        if negs.size:
            t[i, j] = -(s[i, j] - lse(np.append(negs, s[i, j])))
    return t


def brute_triplets(s, pos, neg, margin, soft):
    n, m = s.shape
    t = np.zeros((n, m, m))
    for a in range(n):
        for p in range(m):
            for q in range(m):
                if pos[a, p] and neg[a, q]:
                    d = margin - s[a, p] + s[a, q]
                    t[a, p, q] = math.log1p(math.exp(d)) if soft else max(d, 0.0)
    return t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_supcon_terms_are_anchor_rows(seed):
    s, pos, neg = batch(seed)
    rows = both(LF.supcon, s, pos, neg, reduction="none")
    ref = brute_supcon_rows(s.numpy(), pos.numpy(), neg.numpy())
    np.testing.assert_allclose(rows.numpy(), ref, rtol=1e-12, atol=1e-12)
    used = (pos.any(1) & ((pos | neg).sum(1) > 1)).sum()
    assert float(both(LF.supcon, s, pos, neg, reduction="sum")) == pytest.approx(ref.sum())
    mean = both(LF.supcon, s, pos, neg)
    assert float(mean) == pytest.approx(ref.sum() / int(used), rel=1e-12)
    assert float(LF.infonce(s, pos, neg, reduction="mean")) == float(mean)
    # sample weights without a copy of the loss
    w = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(seed), dtype=s.dtype)
    weighted = (w * LF.supcon(s, pos, neg, reduction="none")).sum()
    assert float(weighted) == pytest.approx(float((w.numpy() * ref).sum()), rel=1e-12)


def test_mean_of_none_equals_mean_when_every_anchor_has_a_term():
    s = torch.randn(8, 8, dtype=torch.float64)
    pos, neg = diagonal_masks(8)
    for fn in (LF.supcon, LF.ntxent, LF.multiclass_npair, LF.infonce_bound, LF.nwj, LF.js,
               LF.dv, LF.nwj_bound, LF.dv_bound, LF.js_bound):
        terms = both(fn, s, pos, neg, reduction="none")
        mean = both(fn, s, pos, neg, reduction="mean")
        if fn is LF.ntxent:  # per pair: [N, M], 0 off the diagonal
            terms = terms[pos]
        assert terms.shape == (8,)
        assert float(terms.mean()) == pytest.approx(float(mean), rel=1e-12, abs=1e-12), fn
        assert float(both(fn, s, pos, neg, reduction="sum")) == pytest.approx(
            float(terms.sum()), rel=1e-12, abs=1e-12)
        assert float(fn(s, pos, neg)) == float(mean)  # the default is "mean"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ntxent_terms_are_positive_pairs(seed):
    s, pos, neg = batch(seed)
    neg = neg.clone()
    neg[0] = False  # an anchor without a negative: its pairs are 0 and still count
    t = both(LF.ntxent, s, pos, neg, reduction="none")
    ref = brute_ntxent_pairs(s.numpy(), pos.numpy(), neg.numpy())
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert float(both(LF.ntxent, s, pos, neg)) == pytest.approx(ref[pos.numpy()].mean())
    assert float(both(LF.ntxent, s, pos, neg, reduction="sum")) == pytest.approx(ref.sum())


def test_ntxent_count_masks_weigh_the_mean_and_the_sum():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 7, generator=g, dtype=torch.float64)
    pc = torch.randint(0, 3, (6, 7), generator=g) * (torch.rand(6, 7, generator=g) < 0.4)
    qc = torch.randint(0, 3, (6, 7), generator=g) * (pc == 0)
    pc, qc = pc.int(), qc.int()
    terms = both(LF.ntxent, s, pc, qc, reduction="none")  # one per distinct pair
    w = pc.double()
    assert float(both(LF.ntxent, s, pc, qc, reduction="sum")) == pytest.approx(
        float((w * terms).sum()), rel=1e-12)
    assert float(both(LF.ntxent, s, pc, qc)) == pytest.approx(
        float((w * terms).sum() / w.sum()), rel=1e-12)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_all_terms_are_triplets(seed, soft):
    s, pos, neg = batch(seed, n=8)
    t = both(LF.triplet, s, pos, neg, margin=0.4, soft=soft, reduction="none")
    ref = brute_triplets(s.numpy(), pos.numpy(), neg.numpy(), 0.4, soft)
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12, atol=1e-12)
    valid = (pos[:, :, None] & neg[:, None, :]).numpy()
    kw = dict(margin=0.4, soft=soft)
    assert float(both(LF.triplet, s, pos, neg, reduction="sum", **kw)) == pytest.approx(
        ref.sum(), rel=1e-12)
    assert float(both(LF.triplet, s, pos, neg, reduction="mean", **kw)) == pytest.approx(
        ref.sum() / valid.sum(), rel=1e-12)
    nonzero = ref.sum() / max((ref > 0).sum(), 1) if not soft else ref.sum() / valid.sum()
    assert float(both(LF.triplet, s, pos, neg, **kw)) == pytest.approx(nonzero, rel=1e-12)
    assert float(both(LF.triplet, s, pos, neg, reduction="nonzero", **kw)) == pytest.approx(
        nonzero, rel=1e-12)


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_mined_terms(mining, soft):
    s, pos, neg = batch(4, n=12)
    kw = dict(margin=0.3, mining=mining, soft=soft)
    t = both(LF.triplet, s, pos, neg, reduction="none", **kw)
    sn, pn, qn = s.numpy(), pos.numpy(), neg.numpy()
    if mining == "hard":
        assert t.shape == (12,)
        ref = np.zeros(12)
        for a in range(12):
            if pn[a].any() and qn[a].any():
                d = 0.3 - sn[a][pn[a]].min() + sn[a][qn[a]].max()
                ref[a] = math.log1p(math.exp(d)) if soft else max(d, 0.0)
        n_terms = (pn.any(1) & qn.any(1)).sum()
    else:
        assert t.shape == (12, 12)
        ref = np.zeros((12, 12))
        for a, p in zip(*np.nonzero(pn)):
            if not qn[a].any():
                continue
            negs = sn[a][qn[a]]
            below = negs[negs < sn[a, p]]
            d = 0.3 - sn[a, p] + (below.max() if below.size else negs.min())
            ref[a, p] = math.log1p(math.exp(d)) if soft else max(d, 0.0)
        n_terms = (pn & qn.any(1)[:, None]).sum()
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert float(both(LF.triplet, s, pos, neg, **kw)) == pytest.approx(ref.sum() / n_terms)
    assert float(both(LF.triplet, s, pos, neg, reduction="nonzero", **kw)) == pytest.approx(
        ref.sum() / max((ref > 0).sum(), 1))


def test_contrastive_terms_and_reductions():
    s, pos, neg = batch(5)
    tp, tn = 0.5, -0.3
    t = both(LF.contrastive, s, pos, neg, tp, tn, reduction="none")
    sn, pn, qn = s.numpy(), pos.numpy(), neg.numpy()
    hp = np.where(pn, np.maximum(tp - sn, 0), 0)
    hn = np.where(qn, np.maximum(sn - tn, 0), 0)
    np.testing.assert_allclose(t.numpy(), hp + hn, rtol=1e-12, atol=1e-12)
    nz = hp.sum() / max((hp > 0).sum(), 1) + hn.sum() / max((hn > 0).sum(), 1)
    assert float(both(LF.contrastive, s, pos, neg, tp, tn)) == pytest.approx(nz, rel=1e-12)
    assert float(both(LF.contrastive, s, pos, neg, tp, tn, reduction="mean")) == pytest.approx(
        hp.sum() / pn.sum() + hn.sum() / qn.sum(), rel=1e-12)
    assert float(both(LF.contrastive, s, pos, neg, tp, tn, reduction="sum")) == pytest.approx(
        hp.sum() + hn.sum(), rel=1e-12)


def test_bound_terms_are_defined_so_that_their_mean_is_the_bound():
    """NWJ, JS, DV on label masks (unequal counts per anchor): the per-anchor terms of the
    docstrings, and their mean is the value."""
    s, pos, neg = batch(6, n=9)
    n = s.shape[0]
    sn, pn, qn = s.numpy(), pos.numpy(), neg.numpy()
    n_p, n_q = pn.sum(), qn.sum()
    sp = lambda v: np.logaddexp(0, v)  # noqa: E731
    lme = lse(sn[qn]) - math.log(n_q)
    refs = {
        LF.nwj_bound: [n / n_p * sn[i][pn[i]].sum() - n / n_q * np.exp(sn[i][qn[i]] - 1).sum()
                       for i in range(n)],
        LF.js: [n / n_p * sp(-sn[i][pn[i]]).sum() + n / n_q * sp(sn[i][qn[i]]).sum()
                for i in range(n)],
        LF.dv_bound: [n / n_p * sn[i][pn[i]].sum() - lme for i in range(n)],
    }
    for fn, ref in refs.items():
        t = both(fn, s, pos, neg, reduction="none")
        np.testing.assert_allclose(t.numpy(), ref, rtol=1e-10, atol=1e-12)
        assert float(both(fn, s, pos, neg)) == pytest.approx(float(np.mean(ref)), rel=1e-10)
    torch.testing.assert_close(LF.nwj(s, pos, neg, reduction="none"),
                               -LF.nwj_bound(s, pos, neg, reduction="none"))
    torch.testing.assert_close(LF.dv(s, pos, neg, reduction="none"),
                               -LF.dv_bound(s, pos, neg, reduction="none"))


def test_bad_reduction_names_the_choices():
    s, pos, neg = batch()
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
        LF.supcon(s, pos, neg, reduction="median")
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.InfoNCE(reduction="avg")
    with pytest.raises(ValueError, match="reduction must be 'nonzero'"):
        LF.triplet(s, pos, neg, reduction="avg")


# ------------------------------------------------------------------ modules


MODULES = {
    "infonce": (lambda r: losses.InfoNCE(reduction=r), "mean", (16,)),
    "ntxent": (lambda r: losses.NTXentLoss(reduction=r), "mean", (16, 16)),
    "nwj": (lambda r: losses.NWJ(reduction=r), "mean", (16,)),
    "npair": (lambda r: losses.MultiClassNPair(reduction=r), "mean", (4,)),
    "triplet": (lambda r: losses.Triplet(reduction=r), "nonzero", (16, 16, 16)),
    "triplet_hard": (lambda r: losses.Triplet(mining="hard", reduction=r), "mean", (16,)),
    "contrastive": (lambda r: losses.ContrastiveLoss(reduction=r), "nonzero", (16, 16)),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_reduction_none_gives_the_terms(name):
    make, default, shape = MODULES[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.arange(16) % 4
    terms = make("none")(x, y)
    assert terms.shape == shape
    torch.testing.assert_close(make("sum")(x, y), terms.sum())
    _, pos, neg = make("none").scores(x, y)
    if name == "contrastive":  # a sum of two non-zero means, one per mask
        ref = sum(K.reduce_terms(terms[m], "nonzero") for m in (pos, neg))
    else:
        count = None if default == "nonzero" else _term_count(name, pos, neg)
        ref = K.reduce_terms(terms, default, count)
    assert float(make(default)(x, y)) == pytest.approx(float(ref), rel=1e-12)
    if name == "triplet":
        assert float(make(None)(x, y)) == float(make("nonzero")(x, y))
    # a batch without a positive pair: zero terms of the same shape, in the graph
    leaf = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", losses.NoPairsWarning)
        zero = make("none")(leaf, torch.arange(16))
    if name != "contrastive":
        assert float(zero.detach().abs().sum()) == 0.0 and zero.requires_grad
        if name != "npair":  # no pair at all: the N-pair loss has no row
            assert zero.shape == shape


def _term_count(name, pos, neg):
    if name in ("ntxent",):
        return int(pos.sum())
    if name == "triplet_hard":
        return int((pos.any(1) & neg.any(1)).sum())
    return pos.shape[0]


def test_drop_in_classes_keep_pml_reducers_by_default():
    assert losses.NTXentLoss().reduction == "mean"
    assert losses.SupConLoss().reduction == "mean"
    assert losses.NPairsLoss().reduction == "mean"
    assert losses.TripletMarginLoss().reduction == "nonzero"
    assert losses.ContrastiveLoss().reduction == "nonzero"
    assert losses.Triplet().reduction is None  # the mining's default


FUNCTIONS = {
    "supcon": LF.supcon, "ntxent": LF.ntxent, "nwj": LF.nwj, "js": LF.js, "dv": LF.dv,
    "npair": LF.multiclass_npair, "infonce_bound": LF.infonce_bound,
    "triplet": LF.triplet, "triplet_hard": lambda *a, **k: LF.triplet(*a, mining="hard", **k),
    "triplet_semihard": lambda *a, **k: LF.triplet(*a, mining="semihard", **k),
    "triplet_soft": lambda *a, **k: LF.triplet(*a, soft=True, **k),
}


@pytest.mark.parametrize("case", ["no_positive", "no_negative"])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_check_false_gives_the_zero_of_a_batch_without_a_term(name, case):
    """check=False: no NoPairsError, but the modules' zero (masks, clamped counts), with a zero
    gradient, for every reduction; check=True raises."""
    s, pos, neg = batch(8)
    if case == "no_positive":
        pos = torch.zeros_like(pos)
    else:
        neg = torch.zeros_like(neg)
    fn = FUNCTIONS[name]
    if name == "npair" and case == "no_negative":
        pos = torch.eye(s.shape[0], dtype=torch.bool)  # one pair per row still is a term (0)
    elif name not in ("infonce_bound",) or case == "no_positive":
        with pytest.raises(ValueError):
            fn(s, pos, neg)
    for reduction in ("mean", "sum", "none"):
        x = s.clone().requires_grad_(True)
        v = fn(x, pos, neg, reduction=reduction, check=False)
        (g,) = torch.autograd.grad(v.sum(), x)
        if name == "infonce_bound" and case == "no_negative":
            continue  # the bound keeps its terms (log 1 - l_i over the positives alone)
        assert float(v.detach().abs().sum()) == 0.0, reduction
        assert float(g.abs().sum()) == 0.0 and bool(torch.isfinite(g).all())


def test_triplet_mean_counts_more_triplets_than_int32_holds():
    """One anchor with 50,000 positives and 50,000 negatives has 2.5e9 triplets, past int32:
    the mean's count must not wrap around (every term is the margin here, so the mean is it;
    the wrapped count was clamped to 1 and gave the sum, 1.25e8)."""
    m = 100_000
    p = torch.zeros(1, m, dtype=torch.bool)
    p[0, : m // 2] = True
    s = torch.zeros(1, m, requires_grad=True)
    loss = LF.triplet(s, p, ~p, margin=0.05, mining="all", reduction="mean")
    assert float(loss.detach()) == pytest.approx(0.05, rel=1e-6)
    loss.backward()
    # d mean / d S_ap = -|Q| / T, d / d S_an = |P| / T with T = |P| |Q|
    assert float(s.grad[0, 0]) == pytest.approx(-1 / (m // 2), rel=1e-5)
    # (the soft margin divides by the same count; its per-slot loop is too slow to run here)
