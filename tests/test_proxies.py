"""Proxy losses (losses/proxies.py) against pytorch-metric-learning 2.9: value and gradient
(embeddings and proxies) of ProxyNCALoss, ProxyAnchorLoss, NormalizedSoftmaxLoss, CosFaceLoss
and ArcFaceLoss in float32 and float64, our proxies copied from PML's, over the hyper-parameter
ranges users set, with and without a PML miner's ``indices_tuple``; and the optimiser's
parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import miners as pml_miners

from contrastive.critics import Cosine
from losses import proxies as PX

DTYPES = [torch.float32, torch.float64]
C, D = 7, 12


def tol(dtype):
    # float64: alpha = 32 exponentials summed over a class's embeddings amplify rounding in
    # the proxies' gradients to ~1e-9 relative (PML's own order of operations differs)
    return {"rtol": 5e-5, "atol": 5e-5} if dtype == torch.float32 else {"rtol": 1e-8,
                                                                         "atol": 1e-9}


def batch(dtype, seed=0, n=30):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=gen)
    y[0] = 0  # class 0 always present, class C - 1 sometimes absent
    y[y == C - 1] = 1
    x = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    return x, y


def pair(ours_cls, ref_cls, dtype, ours_kw=None, ref_kw=None, transpose=False):
    """Our module with its proxies copied from PML's (``W [d, C]`` transposed)."""
    torch.manual_seed(0)
    ref = ref_cls(num_classes=C, embedding_size=D, **(ref_kw or {})).to(dtype)
    ours = ours_cls(C, D, **(ours_kw or {})).to(dtype)
    w = ref.W.data.T if transpose else ref.proxies.data
    with torch.no_grad():
        ours.proxies.copy_(w)
    return ours, ref, (ref.W if transpose else ref.proxies)


def check_same(ours, ref, ref_param, dtype, x, y, mine=False, transpose=False):
    miner = pml_miners.TripletMarginMiner(margin=0.2) if mine else None
    outs = []
    for loss, param in ((ours, ours.proxies), (ref, ref_param)):
        e = x.detach().clone().requires_grad_(True)
        it = miner(e.detach(), y) if miner else None
        v = loss(e, y, it)
        ge, gp = torch.autograd.grad(v, [e, param])
        outs.append((v.detach(), ge, gp))
    (v1, ge1, gp1), (v2, ge2, gp2) = outs
    assert v1.dtype == dtype
    torch.testing.assert_close(v1, v2, **tol(dtype))
    torch.testing.assert_close(ge1, ge2, **tol(dtype))
    torch.testing.assert_close(gp1, gp2.T if transpose else gp2, **tol(dtype))
    return float(v1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, 8.0])
@pytest.mark.parametrize("mine", [False, True])
def test_proxy_nca_equals_pml(dtype, scale, mine):
    x, y = batch(dtype, 1)
    ours, ref, rp = pair(PX.ProxyNCA, pml.ProxyNCALoss, dtype, {"softmax_scale": scale},
                         {"softmax_scale": scale})
    check_same(ours, ref, rp, dtype, x, y, mine)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin,alpha", [(0.1, 32), (0.0, 16), (0.3, 64)])
@pytest.mark.parametrize("mine", [False, True])
def test_proxy_anchor_equals_pml(dtype, margin, alpha, mine):
    x, y = batch(dtype, 2)
    ours, ref, rp = pair(PX.ProxyAnchor, pml.ProxyAnchorLoss, dtype,
                         {"margin": margin, "alpha": alpha}, {"margin": margin, "alpha": alpha})
    check_same(ours, ref, rp, dtype, x, y, mine)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.05, 0.5])
@pytest.mark.parametrize("mine", [False, True])
def test_normalized_softmax_equals_pml(dtype, t, mine):
    x, y = batch(dtype, 3)
    ours, ref, rp = pair(PX.NormalizedSoftmax, pml.NormalizedSoftmaxLoss, dtype,
                         {"temperature": t}, {"temperature": t}, transpose=True)
    check_same(ours, ref, rp, dtype, x, y, mine, transpose=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin,scale", [(0.35, 64), (0.2, 30), (0.5, 16)])
@pytest.mark.parametrize("mine", [False, True])
def test_cosface_equals_pml(dtype, margin, scale, mine):
    x, y = batch(dtype, 4)
    kw = {"margin": margin, "scale": scale}
    ours, ref, rp = pair(PX.CosFace, pml.CosFaceLoss, dtype, kw, kw, transpose=True)
    check_same(ours, ref, rp, dtype, x, y, mine, transpose=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin,scale", [(28.6, 64), (10.0, 30), (60.0, 16)])
@pytest.mark.parametrize("mine", [False, True])
def test_arcface_equals_pml(dtype, margin, scale, mine):
    x, y = batch(dtype, 5)
    kw = {"margin": margin, "scale": scale}
    ours, ref, rp = pair(PX.ArcFace, pml.ArcFaceLoss, dtype, kw, kw, transpose=True)
    if margin == 60.0:  # proxies near some embeddings' opposites: the theta > pi - m branch
        with torch.no_grad():
            ours.proxies[1] = -x[y == 1].mean(0)
            ref.W.data[:, 1] = ours.proxies[1]
    check_same(ours, ref, rp, dtype, x, y, mine, transpose=True)


def test_arcface_closed_form():
    """One embedding at angle theta to its class proxy and orthogonal to the other: the loss is
    log(1 + exp(s cos(pi/2)) / exp(s cos(theta + m)))."""
    theta, m, s = 0.7, 0.5, 10.0
    x = torch.tensor([[math.cos(theta), math.sin(theta), 0.0]], dtype=torch.float64)
    S = torch.tensor([[math.cos(theta), 0.0]], dtype=torch.float64)
    pos = torch.tensor([[True, False]])
    got = PX.arcface(S, pos, ~pos, m, s)
    want = math.log(1 + math.exp(0.0 - s * math.cos(theta + m)))
    assert abs(float(got) - want) < 1e-12
    assert x.shape[0] == 1


def test_reductions_and_check_false():
    x, y = batch(torch.float64, 6)
    s = Cosine(1.0)(x, torch.randn(C, D, dtype=torch.float64))
    pos = y[:, None] == torch.arange(C)[None, :]
    for fn in (PX.proxy_nca, PX.proxy_anchor, PX.normalized_softmax, PX.cosface, PX.arcface):
        mean = fn(s, pos, ~pos)
        assert torch.allclose(fn(s, pos, ~pos, check=False), mean)
        assert torch.allclose(fn(s, pos, ~pos, reduction="none").sum(),
                              fn(s, pos, ~pos, reduction="sum"))


def test_param_groups_and_errors():
    model = torch.nn.Linear(D, D)
    loss = PX.ProxyAnchor(C, D)
    groups = PX.param_groups(list(model.parameters()) + list(loss.parameters()), loss, 1e-4,
                             1e-2)
    assert [g["lr"] for g in groups] == [1e-4, 1e-2]
    assert groups[1]["params"] == [loss.proxies] and len(groups[0]["params"]) == 2
    opt = torch.optim.Adam(groups)
    x, y = batch(torch.float32, 7)
    loss(model(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="class indices"):
        loss(x, torch.full((x.shape[0],), C))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, y, None, x, y)
