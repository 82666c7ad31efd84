"""SimCLR's two-view call, DCL and DCLW (losses/self_supervised.py) against brute-force loops of
the published formulas and, where lightly is installed, against lightly's own losses."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from contrastive.critics import Cosine
from contrastive.pairs import NoPairsError, label_masks
from losses import functional as LF
from losses.self_supervised import DCL, DCLW, SimCLR, dcl, dclw, simclr, views_batch, vmf_weights

TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _views(b=12, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    x1 = (x0 + 0.7 * torch.randn(b, d, generator=g, dtype=torch.float64)).to(dtype)
    return x0.requires_grad_(), x1.requires_grad_()


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    loss = fn(*xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


# ---------------------------------------------------------------------------- brute force


def simclr_loop(views, t):
    """lightly's documented SimCLR loss: 2B anchors, each against the 2B - 1 others, the other
    view of the same image the target of a cross-entropy (Chen et al. 2020, eq. 1)."""
    z = F.normalize(torch.cat(views), dim=1)
    n, b = z.shape[0], views[0].shape[0]
    total = 0.0
    count = 0
    for i in range(n):
        for p in range(n):
            if p == i or p % b != i % b:
                continue
            den = sum(torch.exp(z[i] @ z[k] / t) for k in range(n) if k != i and
                      (k % b != i % b or k == p))
            total = total - torch.log(torch.exp(z[i] @ z[p] / t) / den)
            count += 1
    return total / count


def dcl_loop(s, pos, neg, w=None):
    """Yeh et al. eq. 6, one term per positive pair: -w S_ij + log sum_{k in Q_i} exp(S_ik)."""
    terms = []
    for i in range(s.shape[0]):
        negs = [s[i, k] for k in range(s.shape[1]) if neg[i, k]]
        for j in range(s.shape[1]):
            if pos[i, j]:
                wt = 1.0 if w is None else w[i, j]
                lse = torch.logsumexp(torch.stack(negs), 0) if negs else None
                terms.append(-wt * s[i, j] + lse if negs else s[i, j] * 0)
    return torch.stack(terms).mean()


def vmf_loop(cos, pos, sigma):
    """DCLW's weight, 2 - |P| exp(cos_ij / sigma) / sum_P exp(cos / sigma)."""
    vals = [cos[i, j] for i in range(cos.shape[0]) for j in range(cos.shape[1]) if pos[i, j]]
    den = sum(torch.exp(v / sigma) for v in vals)
    w = torch.zeros_like(cos)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            if pos[i, j]:
                w[i, j] = 2 - len(vals) * torch.exp(cos[i, j] / sigma) / den
    return w


# ---------------------------------------------------------------------------- SimCLR


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_simclr_equals_the_formula(dtype, t):
    x0, x1 = _views(dtype=dtype)
    v, g = _grads(lambda a, b: simclr(a, b, t), x0, x1)
    vr, gr = _grads(lambda a, b: simclr_loop([a, b], t), x0, x1)
    torch.testing.assert_close(v, vr, **TOL[dtype])
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_simclr_forms_agree():
    x0, x1 = _views()
    ref = simclr(x0, x1, 0.2)
    emb, ids = views_batch(x0, x1)
    torch.testing.assert_close(SimCLR(0.2)(x0, x1), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(SimCLR(0.2)(emb, ids), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(simclr(views=[x0, x1], temperature=0.2), ref, rtol=0, atol=0)
    # the library's InfoNCE on the stacked views, NT-Xent form
    from losses.modules import InfoNCE

    torch.testing.assert_close(InfoNCE(0.2, positives="pair")(emb, ids), ref, rtol=0,
                               atol=1e-6)
    # the natural paired call is a different loss (B candidates, not 2B - 1)
    paired = InfoNCE(0.2)(x0, ref_emb=x1, paired=True).item()
    assert abs(paired - ref.item()) > 1e-2


def test_simclr_three_views_and_none():
    x0, x1 = _views()
    x2 = (x0 + 0.3 * torch.randn_like(x0)).detach()
    torch.testing.assert_close(simclr(views=[x0, x1, x2], temperature=0.3),
                               simclr_loop([x0, x1, x2], 0.3), rtol=2e-6, atol=2e-6)
    per_pair = simclr(x0, x1, 0.3, reduction="none")
    assert per_pair.shape == (24, 24)
    torch.testing.assert_close(per_pair.sum() / 24, simclr(x0, x1, 0.3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(simclr(x0, x1, 0.3, check=False), simclr(x0, x1, 0.3),
                               rtol=1e-6, atol=1e-6)


def test_simclr_errors():
    x0, x1 = _views()
    with pytest.raises(ValueError, match="same shape"):
        simclr(x0, x1[:5])
    with pytest.raises(ValueError, match="not both"):
        simclr(x0, x1, views=[x0, x1])
    with pytest.raises(ValueError, match="two views and nothing else"):
        SimCLR()(x0, x1, ref_emb=x1)


# ---------------------------------------------------------------------------- DCL / DCLW


def _spq(n=10, m=10, dtype=torch.float64, seed=1, self_ref=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    if self_ref:
        pos, neg = label_masks(y)
    else:
        pos, neg = label_masks(y, torch.randint(0, 3, (m,), generator=g))
    s = (2 * torch.randn(pos.shape, generator=g, dtype=torch.float64)).to(dtype)
    return s.requires_grad_(), pos, neg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("self_ref", [True, False])
def test_dcl_equals_the_loop(dtype, self_ref):
    s, pos, neg = _spq(dtype=dtype, self_ref=self_ref)
    v, (g,) = _grads(lambda x: dcl(x, pos, neg), s)
    vr, (gr,) = _grads(lambda x: dcl_loop(x, pos, neg), s)
    torch.testing.assert_close(v, vr, **TOL[dtype])
    torch.testing.assert_close(g, gr, **TOL[dtype])
    v2, (g2,) = _grads(lambda x: dcl(x, pos, neg, check=False), s)
    torch.testing.assert_close(v2, vr, **TOL[dtype])
    torch.testing.assert_close(g2, gr, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dclw_equals_the_loop(dtype):
    s, pos, neg = _spq(dtype=dtype)
    t, sigma = 0.2, 0.5
    cos = (s * t).detach()  # S = cos / t
    w = vmf_loop(cos, pos, sigma)
    torch.testing.assert_close(vmf_weights(s, pos, t / sigma), w, **TOL[dtype])
    v, (g,) = _grads(lambda x: dclw(x, pos, neg, sigma, t), s)
    vr, (gr,) = _grads(lambda x: dcl_loop(x, pos, neg, w), s)
    torch.testing.assert_close(v, vr, **TOL[dtype])
    torch.testing.assert_close(g, gr, **TOL[dtype])


def test_dcl_reductions_and_no_pairs():
    s, pos, neg = _spq()
    none = dcl(s, pos, neg, reduction="none")
    assert none.shape == s.shape and bool((none[~pos] == 0).all())
    torch.testing.assert_close(none.sum(), dcl(s, pos, neg, reduction="sum"))
    torch.testing.assert_close(none.sum() / pos.sum(), dcl(s, pos, neg))
    torch.testing.assert_close(dcl(s, pos, neg, reduction="none", check=False), none)
    with pytest.raises(NoPairsError):
        dcl(s, torch.zeros_like(pos), neg)
    assert dcl(s, torch.zeros_like(pos), neg, check=False).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        dcl(s, pos, neg, reduction="avg")
    with pytest.raises(ValueError, match="sigma"):
        dclw(s, pos, neg, sigma=0)


def test_dcl_modules_on_views():
    x0, x1 = _views()
    emb, ids = views_batch(x0, x1)
    pos, neg = label_masks(ids)
    s = Cosine(0.1)(emb, emb)
    torch.testing.assert_close(DCL(0.1)(x0, x1), dcl(s, pos, neg), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(DCL(0.1)(emb, ids), dcl(s, pos, neg), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(DCLW(0.1, sigma=0.5)(x0, x1), dclw(s, pos, neg, 0.5, 0.1),
                               rtol=1e-6, atol=1e-6)
    # DCL leaves the positive out of the denominator: it is below NT-Xent's value
    assert DCL(0.1)(x0, x1).item() < simclr(x0, x1, 0.1).item()
    with pytest.warns(UserWarning):  # one instance per batch: no positive, PML's zero
        assert float(DCL()(x0, torch.arange(12))) == 0.0


# ---------------------------------------------------------------------------- lightly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.07, 0.5])
def test_equal_to_lightly(dtype, t):
    lightly_loss = pytest.importorskip("lightly.loss")
    x0, x1 = _views(b=32, d=16, dtype=dtype, seed=3)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for ours, ref in (
        (lambda a, b: simclr(a, b, t), lightly_loss.NTXentLoss(t)),
        (SimCLR(t), lightly_loss.NTXentLoss(t)),
        (DCL(t), lightly_loss.DCLLoss(t)),
        (DCLW(t, sigma=0.3), lightly_loss.DCLWLoss(t, sigma=0.3)),
    ):
        v, g = _grads(ours, x0, x1)
        with pytest.warns(UserWarning) if isinstance(ours, DCLW) else contextlib.nullcontext():
            vr, gr = _grads(ref, x0, x1)  # lightly's DCLW warns about torch.tensor(tensor)
        torch.testing.assert_close(v, vr, **tol)
        for a, b in zip(g, gr):
            torch.testing.assert_close(a, b, **tol)


def test_registry_ready_defaults():
    # lightly's defaults: NT-Xent 0.5; DCL/DCLW 0.1, sigma 0.5
    assert SimCLR().critic.temperature == pytest.approx(0.5)
    assert DCL().critic.temperature == pytest.approx(0.1)
    assert DCLW().sigma == 0.5
    assert isinstance(SimCLR(critic=Cosine(0.2)).critic, Cosine)
    s, pos, neg = _spq()
    torch.testing.assert_close(LF.ntxent(s, pos, neg), SimCLR().compute(s, pos, neg))
