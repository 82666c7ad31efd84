"""Property-based tests (hypothesis) of the functional core and the modules: brute-force
O(B^3) loops written from the definitions, invariances, symmetric masks and the log K ceiling of
I_NCE; plus gradcheck of the fused autograd functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.critics import Cosine, NegativeL2
from contrastive.pairs import diagonal_masks, label_masks
from losses import functional as LF
from losses import kernels as K
from losses.modules import DV, JS, NWJ, Contrastive, InfoNCE, MultiClassNPair, Triplet

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def labelled_scores(draw, min_n=2, max_n=9, max_classes=4, ref=False):
    """A random score matrix with label masks (self-reference or a separate reference set)."""
    n = draw(st.integers(min_n, max_n))
    m = draw(st.integers(min_n, max_n)) if ref else n
    c = draw(st.integers(1, max_classes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=gen)
    s = torch.randn(n, m, generator=gen, dtype=torch.float64) * scale
    if draw(st.booleans()):  # ties
        s = (s * 2).round() / 2
    if ref:
        pos, neg = label_masks(y, torch.randint(0, c, (m,), generator=gen))
    else:
        pos, neg = label_masks(y)
    return s, pos, neg


# ------------------------------------------------------------------ brute-force references


def brute_triplet(s, pos, neg, margin, mining, soft):
    s, pos, neg = s.numpy(), pos.numpy(), neg.numpy()
    terms = []
    for a in range(s.shape[0]):
        ps = [p for p in range(s.shape[1]) if pos[a, p]]
        ns = [n for n in range(s.shape[1]) if neg[a, n]]
        if not ps or not ns:
            continue
        if mining == "all":
            pairs = [(p, n) for p in ps for n in ns]
        elif mining == "hard":
            key = s[a].__getitem__
            pairs = [(min(ps, key=key), max(ns, key=key))]
        else:
            pairs = []
            for p in ps:
                below = [n for n in ns if s[a, n] < s[a, p]]
                key = s[a].__getitem__
                pick = max(below, key=key) if below else min(ns, key=key)
                pairs.append((p, pick))
        for p, n in pairs:
            d = s[a, n] - s[a, p]
            terms.append(math.log1p(math.exp(margin + d)) if soft else max(0.0, margin + d))
    if not terms:
        return None
    if mining == "all" and not soft:
        nz = [t for t in terms if t > 0]
        return float(np.mean(nz)) if nz else 0.0
    return float(np.mean(terms))


def brute_infonce(s, pos, neg):
    s, pos, neg = s.numpy(), pos.numpy(), neg.numpy()
    rows = []
    for i in range(s.shape[0]):
        ps = np.flatnonzero(pos[i])
        if ps.size == 0 or (pos[i] | neg[i]).sum() < 2:  # no term (PML: a zero, left out)
            continue
        den = np.log(np.sum(np.exp(s[i][pos[i] | neg[i]])))
        rows.append(-np.mean(s[i, ps] - den))
    return float(np.mean(rows))


@SETTINGS
@given(data=labelled_scores(), margin=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
       mining=st.sampled_from(["all", "hard", "semihard"]), soft=st.booleans())
def test_triplet_equals_brute_force(data, margin, mining, soft):
    s, pos, neg = data
    ref = brute_triplet(s, pos, neg, margin, mining, soft)
    if not pos.any() or not neg.any() or ref is None:
        with pytest.raises(ValueError):
            LF.triplet(s, pos, neg, margin=margin, mining=mining, soft=soft)
        return
    got = LF.triplet(s, pos, neg, margin=margin, mining=mining, soft=soft)
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@SETTINGS
@given(data=labelled_scores(max_n=12, ref=True), margin=st.sampled_from([0.0, 0.3, 1.0]))
def test_triplet_all_dense_and_sorted_agree_with_brute_force(data, margin):
    """Both exact algorithms of mining="all" (dense [N, k, M] comparisons and per-anchor sorted
    negatives with prefix sums), values and gradients."""
    s, pos, neg = data
    ref = brute_triplet(s, pos, neg, margin, "all", False)
    if ref is None:
        return
    out = {}
    for method in ("dense", "sorted"):
        x = s.clone().requires_grad_(True)
        total, count = LF._triplet_all(x, pos, neg, margin, method=method)
        value = total / count.clamp_min(1)
        (g,) = torch.autograd.grad(value, x)
        value = value.detach()
        out[method] = (float(value), g)
        assert float(value) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(out["dense"][1], out["sorted"][1])


def brute_triplet_grad(s, pos, neg, margin):
    """d/dS of the mean over non-zero hinge terms (the active set held fixed)."""
    g = np.zeros_like(s)
    act = [(a, p, n) for a in range(s.shape[0]) for p in range(s.shape[1])
           for n in range(s.shape[1]) if pos[a, p] and neg[a, n] and margin - s[a, p] + s[a, n] > 0]
    for a, p, n in act:
        g[a, p] -= 1.0 / len(act)
        g[a, n] += 1.0 / len(act)
    return g


@SETTINGS
@given(data=labelled_scores(max_n=8))
def test_triplet_all_gradient_equals_brute_force(data):
    s, pos, neg = data
    if not pos.any() or not neg.any():
        return
    s = s + 1e-3 * torch.arange(s.numel(), dtype=s.dtype).reshape(s.shape)  # no exact ties
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(LF.triplet(x, pos, neg, margin=0.3), x)
    ref = brute_triplet_grad(s.numpy(), pos.numpy(), neg.numpy(), 0.3)
    np.testing.assert_allclose(g.numpy(), ref, atol=1e-12)


@SETTINGS
@given(n=st.integers(1, 9), m=st.integers(1, 9), k=st.integers(0, 9), seed=st.integers(0, 99),
       ragged=st.booleans())
def test_padded_positives_list_each_rows_positive_columns(n, m, k, seed, ragged):
    """``idx[i, :|P_i|]`` are row i's positive columns in order, the padding points at column
    0 and is marked invalid; with the same count in every row (an M-per-class batch) the index
    is ``nonzero``'s columns as they stand, nothing padded."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, m)
    mask = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):  # k positives per row, or a random number with ``ragged``
        c = int(torch.randint(0, m + 1, (1,), generator=g)) if ragged else k
        mask[i, torch.randperm(m, generator=g)[:c]] = True
    if not mask.any():
        return
    idx, valid = K.padded_positives(K.positive_index(mask, "test"))
    counts = mask.sum(1)
    assert idx.shape == valid.shape == (n, int(counts.max()))
    for i in range(n):
        assert idx[i][valid[i]].tolist() == mask[i].nonzero().flatten().tolist()
        assert int(valid[i].sum()) == int(counts[i])
    assert not idx[~valid].any()


@SETTINGS
@given(data=labelled_scores(max_n=12, ref=True))
def test_semihard_dense_and_sorted_pick_the_same_negative(data):
    s, pos, neg = data
    if not pos.any() or not neg.any():
        return
    pi = K.positive_index(pos, "test")
    idx, valid = K.padded_positives(pi)
    has_neg = neg.any(1)
    a = LF._semihard_negative(s, neg, idx, valid, has_neg, method="dense")
    b = LF._semihard_negative(s, neg, idx, valid, has_neg, method="sorted")
    ok = valid & has_neg[:, None]
    # ties may pick different columns with the same score
    torch.testing.assert_close(s.gather(1, a)[ok], s.gather(1, b)[ok])


@SETTINGS
@given(data=labelled_scores(ref=True))
def test_infonce_equals_brute_force_and_row_shift_invariant(data):
    s, pos, neg = data
    if not pos.any() or not neg.any():
        with pytest.raises(ValueError, match="no (positive|negative) pair"):
            LF.infonce(s, pos, neg)
        return
    v = float(LF.infonce(s, pos, neg))
    assert v == pytest.approx(brute_infonce(s, pos, neg), rel=1e-10, abs=1e-12)
    shift = torch.randn(s.shape[0], 1, dtype=s.dtype) * 50
    assert float(LF.infonce(s + shift, pos, neg)) == pytest.approx(v, rel=1e-9, abs=1e-9)
    assert v >= 0


def numpy_infonce_bound(s: np.ndarray) -> float:
    """I_NCE of K paired samples from its definition (van den Oord et al. 2018, eq. 4 in
    Poole et al. 2019): mean_i log( exp(S_ii) / ((1/K) sum_j exp(S_ij)) ), in numpy/scipy."""
    from scipy.special import logsumexp

    k = s.shape[0]
    return float(np.mean(np.diag(s) - (logsumexp(s, axis=1) - math.log(k))))


@SETTINGS
@given(n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.01, 1.0, 100.0, 1e4]))
def test_infonce_bound_equals_its_definition(n, seed, scale):
    """The bound against an independent numpy computation, for critics of every scale (the
    log K ceiling then follows from the definition, and is checked on the reference)."""
    s = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = s * scale
    s.diagonal().add_(scale)  # a critic that tries hard
    pos, neg = diagonal_masks(n)
    ref = numpy_infonce_bound(s.numpy())
    b = float(LF.infonce_bound(s, pos, neg))
    assert b == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert ref <= math.log(n) + 1e-12


@pytest.mark.parametrize("n", [2, 7, 64])
@pytest.mark.parametrize("margin", [0.0, 1.0, 5.0, 40.0])
def test_infonce_bound_closed_form_for_a_margin_critic(n, margin):
    """S = margin * I (each positive ``margin`` above every negative): every row has the same
    value, I_NCE = log K - log(1 + (K - 1) exp(-margin)); 0 at margin 0, -> log K as it grows."""
    s = torch.eye(n, dtype=torch.float64) * margin
    pos, neg = diagonal_masks(n)
    closed = math.log(n) - math.log1p((n - 1) * math.exp(-margin))
    assert float(LF.infonce_bound(s, pos, neg)) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    assert float(LF.infonce(s, pos, neg)) == pytest.approx(math.log(n) - closed, rel=1e-12,
                                                           abs=1e-12)


@SETTINGS
@given(labels=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       ref=st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_masks_symmetric_disjoint_and_complete(labels, ref):
    y = torch.tensor(labels)
    pos, neg = label_masks(y)
    n = len(labels)
    eye = torch.eye(n, dtype=torch.bool)
    assert torch.equal(pos, pos.T) and torch.equal(neg, neg.T)
    assert not (pos & neg).any()
    assert torch.equal(pos | neg, ~eye)  # the diagonal is neither
    yn = np.array(labels)
    assert torch.equal(pos, torch.from_numpy((yn[:, None] == yn[None, :]) & ~np.eye(n, dtype=bool)))
    r = torch.tensor(ref)
    pos2, neg2 = label_masks(y, r)
    assert torch.equal(pos2, torch.from_numpy(yn[:, None] == np.array(ref)[None, :]))
    assert torch.equal(neg2, ~pos2)


LOSSES = {
    "infonce": lambda: InfoNCE(temperature=0.2),
    "nwj": lambda: NWJ(),
    "js": lambda: JS(),
    "dv": lambda: DV(),
    "triplet": lambda: Triplet(margin=0.2),
    "triplet_hard": lambda: Triplet(margin=0.2, mining="hard"),
    "triplet_semihard": lambda: Triplet(margin=0.2, mining="semihard"),
    "triplet_soft": lambda: Triplet(soft=True),
    "contrastive": lambda: Contrastive(pos_margin=0.1, neg_margin=0.9),
}


@SETTINGS
@given(loss=st.sampled_from(sorted(LOSSES)), seed=st.integers(0, 2**31 - 1),
       sizes=st.lists(st.integers(1, 4), min_size=2, max_size=5))
def test_label_and_batch_permutation_invariance(loss, seed, sizes):
    """Renaming the classes or shuffling the batch rows leaves every loss unchanged."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((k,), c) for c, k in enumerate(sizes)])
    if y.unique(return_counts=True)[1].max() < 2:
        y = torch.cat([y, y[:1]])
    x = torch.randn(len(y), 5, generator=gen, dtype=torch.float64)
    fn = LOSSES[loss]()
    v = float(fn(x, y))
    renamed = torch.randperm(50, generator=gen)[y] * 7 - 100
    assert float(fn(x, renamed)) == pytest.approx(v, rel=1e-10, abs=1e-12)
    perm = torch.randperm(len(y), generator=gen)
    assert float(fn(x[perm], y[perm])) == pytest.approx(v, rel=1e-10, abs=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 10))
def test_npair_invariant_to_permuting_the_pairs(seed, n):
    """One pair per class: permuting the classes (both items together) changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, 4, generator=gen, dtype=torch.float64)
    y = torch.arange(n).repeat(2)
    v = float(MultiClassNPair()(x, y))
    perm = torch.randperm(n, generator=gen)
    idx = torch.cat([perm, perm + n])
    assert float(MultiClassNPair()(x[idx], y[idx])) == pytest.approx(v, rel=1e-10)


@SETTINGS
@given(data=labelled_scores(ref=True))
def test_nwj_dv_js_equal_brute_force(data):
    s, pos, neg = data
    if not pos.any() or not neg.any():
        for fn in (LF.nwj_bound, LF.dv_bound, LF.js):
            with pytest.raises(ValueError):
                fn(s, pos, neg)
        return
    sp, sq = s[pos].numpy(), s[neg].numpy()
    assert float(LF.nwj_bound(s, pos, neg)) == pytest.approx(
        sp.mean() - np.exp(sq).mean() / math.e, rel=1e-10, abs=1e-12)
    assert float(LF.dv_bound(s, pos, neg)) == pytest.approx(
        sp.mean() - math.log(np.exp(sq).mean()), rel=1e-10, abs=1e-12)
    js = np.logaddexp(0, -sp).mean() + np.logaddexp(0, sq).mean()
    assert float(LF.js(s, pos, neg)) == pytest.approx(js, rel=1e-10, abs=1e-12)


@SETTINGS
@given(n=st.integers(1, 8), m=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_logmeanexp_equals_numpy(n, m, seed, scale):
    """log(mean_{mask} exp(x)) against numpy on the masked entries (any mask with an entry)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(n, m, generator=gen) < 0.5
    mask[0, 0] = True
    v = x.numpy()[mask.numpy()]
    ref = float(np.max(v) + np.log(np.mean(np.exp(v - np.max(v)))))
    assert float(LF.logmeanexp(x, mask)) == pytest.approx(ref, rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------ gradcheck of fused autograd


def test_gradcheck_fused_functions():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,), generator=gen)
    pos, neg = label_masks(y, torch.randint(0, 3, (7,), generator=gen))
    pos[0, 0], neg[0, 0] = True, False  # at least one positive
    neg[1] = False  # an anchor without negatives
    for fn in (LF.infonce, LF.supcon, LF.ntxent, LF.infonce_bound, LF.nwj, LF.dv, LF.js):
        assert torch.autograd.gradcheck(lambda t, fn=fn: fn(t, pos, neg), (s,))
        assert torch.autograd.gradgradcheck(lambda t, fn=fn: fn(t, pos, neg), (s,))
    a = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    for critic in (NegativeL2(), NegativeL2(squared=True), NegativeL2(normalize=True),
                   NegativeL2(squared=True, normalize=True), Cosine(0.5)):
        assert torch.autograd.gradcheck(critic, (a, b))
        assert torch.autograd.gradgradcheck(critic, (a, b))
    # the same tensor on both sides (self-reference): gradients of both uses add up
    assert torch.autograd.gradcheck(lambda t: NegativeL2()(t, t).sum(), (b,))
