"""Loss values and gradients against independent references.

References: pytorch-metric-learning 2.9 (SupConLoss, NTXentLoss, NPairsLoss, TripletMarginLoss,
BatchHardMiner, ContrastiveLoss), numpy brute-force loops written from the papers' definitions,
and closed forms (correlated Gaussians with the analytic optimal critic).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.reducers import MeanReducer

from contrastive.critics import Cosine, Dot, NegativeL2
from contrastive.pairs import diagonal_masks, label_masks
from losses import functional as LF
from losses import kernels as K
from losses.modules import DV, JS, NWJ, Contrastive, InfoNCE, MultiClassNPair, Triplet

DTYPES = [torch.float32, torch.float64]
# one positive per anchor / P x m classes / uneven classes with singletons
COMPOSITIONS = ["views2", "class4", "uneven"]


def tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}


def make_labels(kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "views2":  # 2 views of 20 instances
        lab = torch.arange(20).repeat(2)
    elif kind == "views2_singletons":  # 2 views of 12 instances + 6 unpaired items
        lab = torch.cat([torch.arange(12).repeat(2), torch.arange(100, 106)])
    elif kind == "class4":  # 8 classes x 4
        lab = torch.arange(8).repeat_interleave(4)
    elif kind == "uneven":  # class sizes 1..6, shuffled
        lab = torch.cat([torch.full((k,), 10 * k) for k in (1, 2, 3, 1, 4, 5, 6, 2)])
    else:  # pragma: no cover
        raise KeyError(kind)
    return lab[torch.randperm(lab.numel(), generator=gen)]


def make_batch(kind: str, dtype, seed: int = 0, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    labels = make_labels(kind, gen)
    x = torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64).to(dtype)
    return x, labels


def ref_batch(seed: int, n: int, n_ref: int, dim: int, classes: int, dtype):
    """(x, y, ref, ref_y): a query batch and a separate reference set with random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    ref = torch.randn(n_ref, dim, generator=gen, dtype=dtype)
    ref_y = torch.randint(0, classes, (n_ref,), generator=gen)
    return x, y, ref, ref_y


def value_and_grad(fn, x, *extra):
    """Loss value and the gradient with respect to x (and every tensor in extra)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *extra)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves)
    return out.detach(), [g.detach() for g in grads]


def assert_same(fn_ours, fn_ref, dtype, *tensors):
    v1, g1 = value_and_grad(fn_ours, *tensors)
    v2, g2 = value_and_grad(fn_ref, *tensors)
    assert v1.dtype == dtype
    torch.testing.assert_close(v1, v2.to(dtype), **tol(dtype))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol(dtype))
    return float(v1)


# ------------------------------------------------------------------ InfoNCE vs SupCon / NT-Xent


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_infonce_equals_supcon(kind, dtype, t):
    x, y = make_batch(kind, dtype, seed=1)
    v = assert_same(
        lambda e: InfoNCE(temperature=t)(e, y),
        lambda e: pml.SupConLoss(temperature=t)(e, y),
        dtype,
        x,
    )
    assert v > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["views2", "views2_singletons"])
def test_infonce_equals_ntxent_one_positive(kind, dtype):
    x, y = make_batch(kind, dtype, seed=2)
    assert_same(
        lambda e: InfoNCE(temperature=0.07)(e, y),
        lambda e: pml.NTXentLoss(temperature=0.07)(e, y),
        dtype,
        x,
    )


def test_infonce_differs_from_ntxent_with_many_positives():
    """Where the definitions do not coincide (several positives: NT-Xent leaves the other
    positives out of each denominator) the two must differ, or the tests above prove nothing."""
    x, y = make_batch("class4", torch.float64, seed=3)
    ours = InfoNCE(temperature=0.5)(x, y)
    ntx = pml.NTXentLoss(temperature=0.5)(x, y)
    assert abs(float(ours) - float(ntx)) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_ref_emb_equals_supcon_ref_emb(dtype):
    x, y, ref, ref_y = ref_batch(4, 24, 30, 8, 5, dtype)
    assert_same(
        lambda e, r: InfoNCE(temperature=0.2)(e, y, None, r, ref_y),
        lambda e, r: pml.SupConLoss(temperature=0.2)(e, y, ref_emb=r, ref_labels=ref_y),
        dtype,
        x,
        ref,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_views_equal_ntxent_ref_emb(dtype):
    """loss(x, ref_emb=y, paired=True): positives on the diagonal, everything else negative;
    that is NT-Xent against a reference set whose labels are the row indices (a distinct tensor,
    so PML keeps the diagonal)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=gen, dtype=dtype)
    ref = torch.randn(20, 8, generator=gen, dtype=dtype)
    idx = torch.arange(20)
    assert_same(
        lambda e, r: InfoNCE(temperature=0.1)(e, ref_emb=r, paired=True),
        lambda e, r: pml.NTXentLoss(temperature=0.1)(e, idx, ref_emb=r, ref_labels=idx.clone()),
        dtype,
        x,
        ref,
    )
    # the same call with labels and a one-positive reference set
    perm = torch.randperm(20, generator=gen)
    assert_same(
        lambda e, r: InfoNCE(temperature=0.1)(e, idx, None, r, idx[perm]),
        lambda e, r: pml.NTXentLoss(temperature=0.1)(e, idx, ref_emb=r, ref_labels=idx[perm]),
        dtype,
        x,
        ref,
    )


# ------------------------------------------------------------------ multi-class N-pair


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
def test_npair_equals_npairsloss(kind, dtype):
    x, y = make_batch(kind, dtype, seed=6)
    x = x * 0.5  # keep dot products moderate
    assert_same(
        lambda e: MultiClassNPair()(e, y),
        lambda e: pml.NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False))(e, y),
        dtype,
        x,
    )
    # PML's default distance normalises: that is our Cosine(1.0) critic
    assert_same(
        lambda e: MultiClassNPair(critic=Cosine(1.0))(e, y),
        lambda e: pml.NPairsLoss()(e, y),
        dtype,
        x,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_dot_is_npair_on_one_pair_per_class(dtype):
    """Tschannen et al. 2020, sec. 4: I_NCE with a separable (dot) critic is the multi-class
    N-pair loss. Anchors = first items, positives = second items of each class."""
    gen = torch.Generator().manual_seed(7)
    n = 16
    anchors = torch.randn(n, 12, generator=gen, dtype=dtype)
    positives = anchors + 0.5 * torch.randn(n, 12, generator=gen, dtype=dtype)
    emb = torch.cat([anchors, positives])
    labels = torch.arange(n).repeat(2)
    a = InfoNCE(critic=Dot())(anchors, ref_emb=positives, paired=True)
    b = MultiClassNPair()(emb, labels)
    torch.testing.assert_close(a, b, **tol(dtype))
    # and the functional forms agree on the score matrix
    s = anchors @ positives.T
    pos, neg = diagonal_masks(n)
    torch.testing.assert_close(LF.infonce(s, pos, neg), LF.multiclass_npair(s, pos, neg))


# ------------------------------------------------------------------ triplet


TRIPLET_CRITICS = {
    # ours, PML distance
    "l2_normalized": (lambda: None, lambda: LpDistance()),
    "l2": (lambda: NegativeL2(), lambda: LpDistance(normalize_embeddings=False)),
    "l2_squared": (
        lambda: NegativeL2(squared=True),
        lambda: LpDistance(normalize_embeddings=False, power=2),
    ),
    "cosine": (lambda: Cosine(1.0), lambda: CosineSimilarity()),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("margin", [0.0, 0.05, 1.0])
def test_triplet_all_equals_tripletmarginloss(kind, dtype, margin):
    x, y = make_batch(kind, dtype, seed=8)
    assert_same(
        lambda e: Triplet(margin=margin)(e, y),
        lambda e: pml.TripletMarginLoss(margin=margin)(e, y),
        dtype,
        x,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("critic", sorted(TRIPLET_CRITICS))
def test_triplet_all_critics_equal_pml_distances(critic, dtype):
    ours, ref = TRIPLET_CRITICS[critic]
    x, y = make_batch("uneven", dtype, seed=9, dim=4)
    margin = 0.4 if critic != "l2_squared" else 2.0
    assert_same(
        lambda e: Triplet(margin=margin, critic=ours())(e, y),
        lambda e: pml.TripletMarginLoss(margin=margin, distance=ref())(e, y),
        dtype,
        x,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_all_ref_emb_equals_pml(dtype):
    x, y, ref, ref_y = ref_batch(10, 20, 25, 6, 4, dtype)
    assert_same(
        lambda e, r: Triplet(margin=0.2)(e, y, None, r, ref_y),
        lambda e, r: pml.TripletMarginLoss(margin=0.2)(e, y, ref_emb=r, ref_labels=ref_y),
        dtype,
        x,
        ref,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("margin", [0.0, 0.05, 0.3])
def test_triplet_soft_all_equals_pml_smooth(kind, dtype, margin):
    """The soft form uses the margin, softplus(m + d_ap - d_an), as PML's smooth_loss=True
    (default 0.05 in both)."""
    x, y = make_batch(kind, dtype, seed=11)
    make = (lambda: Triplet(soft=True)) if margin == 0.05 else (
        lambda: Triplet(margin=margin, soft=True))
    assert_same(
        lambda e: make()(e, y),
        lambda e: pml.TripletMarginLoss(margin=margin, smooth_loss=True)(e, y),
        dtype,
        x,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_hard_equals_batch_hard_miner_mean_reducer(kind, dtype, soft):
    """PML's BatchHardMiner picks, per anchor with a positive and a negative, the farthest
    positive and the nearest negative, which is our batch-hard. PML's TripletMarginLoss then
    averages over the *non-zero* triplets (AvgNonZeroReducer); Hermans et al. and we average
    over all anchors, so the reference uses MeanReducer (the test below shows the difference)."""
    x, y = make_batch(kind, dtype, seed=12)
    margin = 0.1 if soft else 0.2

    def ref(e):
        idx = pml_miners.BatchHardMiner()(e, y)
        loss = pml.TripletMarginLoss(margin=margin, smooth_loss=soft, reducer=MeanReducer())
        return loss(e, y, idx)

    assert_same(lambda e: Triplet(margin=margin, mining="hard", soft=soft)(e, y), ref, dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
def test_triplet_hard_nonzero_equals_pml_batch_hard_default(kind, dtype):
    """PML's batch-hard (BatchHardMiner + TripletMarginLoss with its default AvgNonZeroReducer)
    is one argument away: reduction="nonzero"."""
    x, y = make_batch(kind, dtype, seed=15, dim=4)
    margin = 0.1

    def ref(e):
        return pml.TripletMarginLoss(margin=margin)(e, y, pml_miners.BatchHardMiner()(e, y))

    assert_same(
        lambda e: Triplet(margin=margin, mining="hard", reduction="nonzero")(e, y), ref, dtype, x
    )


def test_triplet_hard_mean_over_all_anchors_not_nonzero():
    x, y = make_batch("class4", torch.float64, seed=13, dim=4)
    gen = torch.Generator().manual_seed(13)
    x = x * 0.3 + torch.randn(int(y.max()) + 1, 4, generator=gen, dtype=torch.float64)[y]
    s = NegativeL2(normalize=True)(x, x)
    pos, neg = label_masks(y)
    rows = []
    for i in range(len(y)):
        ap = s[i][pos[i]].min()
        an = s[i][neg[i]].max()
        rows.append(max(0.0, float(an - ap) + 0.05))
    assert 0 < sum(r == 0 for r in rows) < len(rows)  # some anchors are already satisfied
    ours = float(Triplet(mining="hard")(x, y))
    assert ours == pytest.approx(np.mean(rows), rel=1e-12)
    idx = pml_miners.BatchHardMiner()(x, y)
    nonzero = float(pml.TripletMarginLoss()(x, y, idx))
    assert nonzero == pytest.approx(np.mean([r for r in rows if r > 0]), rel=1e-12)
    ours_nonzero = float(Triplet(mining="hard", reduction="nonzero")(x, y))
    assert ours_nonzero == pytest.approx(nonzero, rel=1e-12) and ours_nonzero > ours


def brute_semihard(s: np.ndarray, pos: np.ndarray, neg: np.ndarray, margin, soft):
    """FaceNet semi-hard mining, loops: for each positive pair (a, p) the most similar negative
    that is still less similar than p, else the least similar negative."""
    out = []
    for a in range(s.shape[0]):
        negs = [s[a, n] for n in range(s.shape[1]) if neg[a, n]]
        if not negs:
            continue
        for p in range(s.shape[1]):
            if not pos[a, p]:
                continue
            below = [v for v in negs if v < s[a, p]]
            s_an = max(below) if below else min(negs)
            d = s_an - s[a, p]
            out.append(math.log1p(math.exp(d + margin)) if soft else max(0.0, d + margin))
    return float(np.mean(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_semihard_equals_brute_force(kind, dtype, soft):
    x, y = make_batch(kind, dtype, seed=14)
    x.requires_grad_(True)
    ours = Triplet(margin=0.3, mining="semihard", soft=soft)(x, y)
    (g,) = torch.autograd.grad(ours, x)
    ours = ours.detach()
    s = NegativeL2(normalize=True)(x, x).detach().double().numpy()
    pos, neg = (m.numpy() for m in label_masks(y))
    ref = brute_semihard(s, pos, neg, 0.3, soft)
    assert float(ours) == pytest.approx(ref, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_triplet_semihard_picks_the_facenet_negative():
    """A hand-made anchor row: positive at 0.5; negatives at 0.9, 0.4, 0.1 (scores).
    The semi-hard negative is 0.4 (most similar among those below 0.5)."""
    s = torch.tensor([[0.0, 0.5, 0.9, 0.4, 0.1]], dtype=torch.float64)
    pos = torch.tensor([[False, True, False, False, False]])
    neg = torch.tensor([[False, False, True, True, True]])
    v = LF.triplet(s, pos, neg, margin=0.2, mining="semihard")
    assert float(v) == pytest.approx(0.2 - 0.5 + 0.4)
    # no negative below the positive: the least similar one (0.6)
    s2 = torch.tensor([[0.0, 0.5, 0.9, 0.7, 0.6]], dtype=torch.float64)
    v2 = LF.triplet(s2, pos, neg, margin=0.2, mining="semihard")
    assert float(v2) == pytest.approx(0.2 - 0.5 + 0.6)


# ------------------------------------------------------------------ contrastive


CONTRASTIVE_CASES = {
    "default": (lambda: Contrastive(), lambda: pml.ContrastiveLoss()),
    "margins": (
        lambda: Contrastive(pos_margin=0.3, neg_margin=1.1),
        lambda: pml.ContrastiveLoss(pos_margin=0.3, neg_margin=1.1),
    ),
    "l2_raw": (
        lambda: Contrastive(pos_margin=1.0, neg_margin=5.0, critic=NegativeL2()),
        lambda: pml.ContrastiveLoss(1.0, 5.0, distance=LpDistance(normalize_embeddings=False)),
    ),
    "cosine_default": (
        lambda: Contrastive(critic=Cosine(1.0)),
        lambda: pml.ContrastiveLoss(pos_margin=1, neg_margin=0, distance=CosineSimilarity()),
    ),
    "cosine_margins": (
        lambda: Contrastive(pos_margin=0.8, neg_margin=0.2, critic=Cosine(1.0)),
        lambda: pml.ContrastiveLoss(pos_margin=0.8, neg_margin=0.2, distance=CosineSimilarity()),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", COMPOSITIONS)
@pytest.mark.parametrize("case", sorted(CONTRASTIVE_CASES))
def test_contrastive_equals_contrastiveloss(case, kind, dtype):
    ours, ref = CONTRASTIVE_CASES[case]
    x, y = make_batch(kind, dtype, seed=15, dim=6)
    assert_same(lambda e: ours()(e, y), lambda e: ref()(e, y), dtype, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_ref_emb_equals_pml(dtype):
    x, y, ref, ref_y = ref_batch(16, 20, 25, 6, 4, dtype)
    assert_same(
        lambda e, r: Contrastive(pos_margin=0.2, neg_margin=1.2)(e, y, None, r, ref_y),
        lambda e, r: pml.ContrastiveLoss(0.2, 1.2)(e, y, ref_emb=r, ref_labels=ref_y),
        dtype,
        x,
        ref,
    )


# ------------------------------------------------------------------ NWJ / JS / DV by brute force


def _np_terms(kind, seed):
    x, y = make_batch(kind, torch.float64, seed=seed)
    s = Cosine(0.1)(x, x)
    pos, neg = label_masks(y)
    sn, pn, qn = s.numpy(), pos.numpy(), neg.numpy()
    return x, y, sn[pn], sn[qn]


@pytest.mark.parametrize("kind", COMPOSITIONS)
def test_nwj_js_dv_equal_numpy_formulas(kind):
    x, y, sp, sq = _np_terms(kind, 17)

    def softplus(v):
        return np.logaddexp(0.0, v)

    i_nwj = sp.mean() - np.exp(sq).mean() / math.e
    i_dv = sp.mean() - math.log(np.exp(sq).mean())
    js_loss = -((-softplus(-sp)).mean() - softplus(sq).mean())
    i_js = (sp + 1).mean() - np.exp(sq + 1).mean() / math.e
    assert float(NWJ()(x, y)) == pytest.approx(-i_nwj, rel=1e-10)
    assert float(DV()(x, y)) == pytest.approx(-i_dv, rel=1e-10)
    assert float(JS()(x, y)) == pytest.approx(js_loss, rel=1e-10)
    s = Cosine(0.1)(x, x)
    pos, neg = label_masks(y)
    assert float(LF.js_bound(s, pos, neg)) == pytest.approx(i_js, rel=1e-10)
    assert float(LF.nwj_bound(s, pos, neg)) == pytest.approx(i_nwj, rel=1e-10)
    assert float(LF.dv_bound(s, pos, neg)) == pytest.approx(i_dv, rel=1e-10)
    out = NWJ().readout(x, y)
    assert out["nwj"] == pytest.approx(i_nwj, rel=1e-10)


def test_infonce_bound_equals_numpy_formula():
    gen = torch.Generator().manual_seed(18)
    s = torch.randn(30, 30, generator=gen, dtype=torch.float64) * 3
    pos, neg = diagonal_masks(30)
    sn = s.numpy()
    lse = np.log(np.exp(sn).sum(1))
    ref = math.log(30) + np.mean(np.diag(sn) - lse)
    assert float(LF.infonce_bound(s, pos, neg)) == pytest.approx(ref, rel=1e-12)
    x = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    out = InfoNCE(critic=Dot()).readout(x, ref_emb=x.flip(0), paired=True)
    sn = (x @ x.flip(0).T).numpy()
    lse = np.log(np.exp(sn).sum(1))
    assert out["infonce"] == pytest.approx(math.log(30) + np.mean(np.diag(sn) - lse), rel=1e-10)


# ------------------------------------------------------------------ bounds on correlated Gaussians


def gaussian_pairs(n, d, rho, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, y


def optimal_critic(x, y, rho):
    """f*(x_i, y_j) = log p(y_j | x_i) - log p(y_j) for y = rho x + sqrt(1 - rho^2) e."""
    d = x.shape[1]
    v = 1 - rho**2
    # ||y_j - rho x_i||^2 expanded, so the [n, n] matrix costs one product
    cond = (y * y).sum(1)[None, :] - 2 * rho * (x @ y.T) + rho**2 * (x * x).sum(1)[:, None]
    return -0.5 * d * math.log(v) - cond / (2 * v) + 0.5 * (y * y).sum(1)[None, :]


def true_mi(d, rho):
    return -0.5 * d * math.log(1 - rho**2)


def test_bounds_with_optimal_critic_land_on_true_mi():
    n, d, rho = 1500, 4, 0.5
    x, y = gaussian_pairs(n, d, rho, seed=19)
    f = optimal_critic(x, y, rho)
    pos, neg = diagonal_masks(n)
    mi = true_mi(d, rho)  # 0.575 nats
    se = float(f.diagonal().std()) / math.sqrt(n)  # the mean_P term dominates the error
    nwj = float(LF.nwj_bound(f + 1.0, pos, neg))
    assert abs(nwj - mi) < 4 * se + 0.02, (nwj, mi, se)
    # JS's optimum is the log ratio itself; its readout shifts by one
    assert float(LF.js_bound(f, pos, neg)) == pytest.approx(nwj, rel=1e-12)
    dv = float(LF.dv_bound(f, pos, neg))
    assert abs(dv - mi) < 4 * se + 0.02
    nce = float(LF.infonce_bound(f, pos, neg))
    assert nce <= math.log(n)
    assert mi - 0.1 < nce < mi + 4 * se, (nce, mi)
    # the shifted critic f* (not 1 + f*) loses exactly 1/e * E[exp f*] - ... : below NWJ's optimum
    assert float(LF.nwj_bound(f, pos, neg)) < nwj


def test_infonce_bound_saturates_at_log_k():
    """MI = 11.6 nats >> log K = log 128: I_NCE with f* sits just under log K."""
    n, d, rho = 128, 10, 0.95
    x, y = gaussian_pairs(n, d, rho, seed=20)
    f = optimal_critic(x, y, rho)
    pos, neg = diagonal_masks(n)
    nce = float(LF.infonce_bound(f, pos, neg))
    assert true_mi(d, rho) > math.log(n) + 5
    assert math.log(n) - 0.2 < nce <= math.log(n)
    # a useless critic (constant) gives 0 nats
    assert float(LF.infonce_bound(torch.zeros(n, n), pos, neg)) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    "make",
    [
        lambda: InfoNCE(temperature=0.05),
        lambda: NWJ(),
        lambda: JS(),
        lambda: DV(),
        lambda: MultiClassNPair(),
        lambda: Triplet(),
        lambda: Triplet(critic=NegativeL2()),
        lambda: Triplet(mining="hard", critic=NegativeL2()),
        lambda: Triplet(mining="semihard", critic=NegativeL2()),
        lambda: Triplet(soft=True, critic=NegativeL2(squared=True)),
        lambda: Contrastive(),
        lambda: Contrastive(critic=NegativeL2()),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite_with_duplicates(make, dtype):
    """Duplicated rows give zero distances (NegativeL2's sqrt at 0) and tied scores."""
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(6, 8, generator=gen, dtype=dtype)
    x = torch.cat([base, base, base[:3]]).requires_grad_(True)  # exact duplicates
    y = torch.cat([torch.arange(6), torch.arange(6), torch.arange(3)])
    loss = make()(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_negative_l2_gradient_zero_at_zero_distance():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], requires_grad=True)
    s = NegativeL2()(x, x)
    assert float(s[0, 1].detach()) == 0.0
    (g,) = torch.autograd.grad(s[0, 1], x, retain_graph=True)
    assert torch.equal(g, torch.zeros_like(g))
    (g2,) = torch.autograd.grad(s[0, 2], x)
    torch.testing.assert_close(g2[0], -(x[0] - x[2]).detach() / math.sqrt(2))


def test_first_argmax_is_torchs_argmax_first_maximum_included():
    g = torch.Generator().manual_seed(3)
    for shape in [(5, 7), (4, 3, 9), (2, 1)]:
        x = torch.randint(-3, 4, shape, generator=g).to(torch.float32)  # many ties
        assert torch.equal(LF._first_argmax(x.clone()), x.argmax(-1))
        y = torch.randn(shape, generator=g, dtype=torch.float64)
        assert torch.equal(LF._first_argmax(y.clone()), y.argmax(-1))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_semihard_one_pass_picks_the_facenet_column(scale, dtype):
    """The one-pass search (every slot and the easiest-negative fallback in one arg-maximum)
    against a loop over each (anchor, positive slot): the first column of the most similar
    negative below the positive, else the first column of the least similar negative; with
    tied scores (duplicates), rows with no semi-hard negative, rows without negatives, and
    score ranges from 1e-3 to 1e4 (negative and positive scores)."""
    g = torch.Generator().manual_seed(11)
    n, m = 24, 20
    s = (torch.randint(-6, 7, (n, m), generator=g).to(dtype) * scale / 3)  # ties everywhere
    s[::5] = torch.randn(m, generator=g, dtype=dtype) * scale  # some rows without ties
    pos = torch.rand(n, m, generator=g) < 0.2
    neg = ~pos & (torch.rand(n, m, generator=g) < 0.7)
    neg[3] = False  # no negative
    pos[:, 0] = True
    neg[:, 0] = False
    s[7, neg[7]] = s[7, 0] + scale  # every negative above the positive at column 0
    pi = K.positive_index(pos, "t")
    idx, valid = K.padded_positives(pi)
    s_ap = s.gather(1, idx)
    got = LF._semihard_one_pass(s, neg, s_ap)
    for a in range(n):
        cols = [c for c in range(m) if neg[a, c]]
        if not cols:
            continue
        for j in range(idx.shape[1]):
            if not valid[a, j]:
                continue
            p = float(s_ap[a, j])
            below = [c for c in cols if float(s[a, c]) < p]
            if below:
                best = max(float(s[a, c]) for c in below)
                want = min(c for c in below if float(s[a, c]) == best)
            else:
                least = min(float(s[a, c]) for c in cols)
                want = min(c for c in cols if float(s[a, c]) == least)
            assert int(got[a, j]) == want, (a, j)
    # row 7's slot 0 takes the fallback: no negative is below its positive
    assert not any(float(s[7, c]) < float(s[7, 0]) for c in range(m) if neg[7, c])
