"""Proxy losses (losses/proxies.py) against pytorch-metric-learning 2.9: value and gradient
(embeddings and proxies) of ProxyNCALoss, ProxyAnchorLoss, NormalizedSoftmaxLoss, CosFaceLoss
and ArcFaceLoss in float32 and float64, our proxies copied from PML's, over the hyper-parameter
ranges users set, with and without a PML miner's ``indices_tuple``, and at a batch above
``kernels.FUSED_MAX_ENTRIES``; the modules' fast lane (one autograd node from the embeddings
and the proxies) against plain autograd (critic, masks, functional core), double backward
included; and the optimiser's parameter groups."""

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


# ------------------------------------------------------------------ the modules' fast lane

LANE_MODULES = {
    "ProxyNCA": lambda **kw: PX.ProxyNCA(C, D, softmax_scale=3.0, **kw),
    "NormalizedSoftmax": lambda **kw: PX.NormalizedSoftmax(C, D, 0.1, **kw),
    "CosFace": lambda **kw: PX.CosFace(C, D, margin=0.3, scale=16.0, **kw),
    "ArcFace": lambda **kw: PX.ArcFace(C, D, margin=60.0, scale=16.0, **kw),
    "ProxyAnchor": lambda **kw: PX.ProxyAnchor(C, D, margin=0.2, alpha=16.0, **kw),
}


def plain(loss, x, y):
    """The module's loss in plain torch autograd: its critic called directly (F.normalize,
    matmul), the one-hot masks, and the functional core without checks."""
    pos = y[:, None] == torch.arange(C)[None, :]
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return loss.compute(loss.critic(xs, loss.proxies.to(xs.dtype)), pos, ~pos, check=False)


def lane_module(name, reduction="mean", dtype=torch.float64):
    torch.manual_seed(0)
    return LANE_MODULES[name](reduction=reduction).to(dtype)


@pytest.mark.parametrize("name", list(LANE_MODULES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fast_lane_equals_plain_autograd(name, reduction):
    """Value and gradients (embeddings, proxies) of the module (the softmax losses' fast lane,
    Proxy-Anchor's general path) against plain autograd, with a zero embedding (F.normalize's
    eps floor) and, for ArcFace, proxies opposite their class (the theta > pi - m branch)."""
    loss = lane_module(name, reduction)
    x, y = batch(torch.float64, 8, n=40)
    x[5] = 0.0
    if name == "ArcFace":
        with torch.no_grad():
            loss.proxies[1] = -x[y == 1].mean(0)
    outs = []
    for fn in (loss, lambda e, y: plain(loss, e, y)):
        e = x.clone().requires_grad_(True)
        v = fn(e, y)
        outs.append((v.detach(), *torch.autograd.grad(v, [e, loss.proxies])))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(LANE_MODULES))
def test_fast_lane_double_backward_and_retained_graph(name):
    loss = lane_module(name)
    x, y = batch(torch.float64, 9)
    outs = []
    for fn in (loss, lambda e, y: plain(loss, e, y)):
        e = x.clone().requires_grad_(True)
        v = fn(e, y)
        g, gp = torch.autograd.grad(v, [e, loss.proxies], create_graph=True)
        gg, ggp = torch.autograd.grad(g.square().sum() + gp.square().sum(), [e, loss.proxies])
        outs.append((g.detach(), gp.detach(), gg, ggp))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    e = x.clone().requires_grad_(True)
    v = loss(e, y)
    v.backward(retain_graph=True)
    first = e.grad.clone()
    v.backward()  # the saved dL/dz is not consumed
    torch.testing.assert_close(e.grad, 2 * first)


@pytest.mark.parametrize("name", list(LANE_MODULES))
def test_fast_lane_half_inputs_and_no_grad(name):
    """float16 embeddings run in float32 on both paths; under no_grad, the value alone."""
    loss = lane_module(name, dtype=torch.float32)
    x, y = batch(torch.float32, 10)
    x = x.half()
    got, want = loss(x, y), plain(loss, x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loss(x, y), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["norm_softmax", "cosface", "arcface", "proxy_nca",
                                  "proxy_anchor"])
def test_large_batch_equals_pml(case):
    """B x C above ``kernels.FUSED_MAX_ENTRIES`` (the benchmark's sizes): PML's value and
    gradients in float64."""
    ours_cls, ref_cls, transpose = {
        "norm_softmax": (PX.NormalizedSoftmax, pml.NormalizedSoftmaxLoss, True),
        "cosface": (PX.CosFace, pml.CosFaceLoss, True),
        "arcface": (PX.ArcFace, pml.ArcFaceLoss, True),
        "proxy_nca": (PX.ProxyNCA, pml.ProxyNCALoss, False),
        "proxy_anchor": (PX.ProxyAnchor, pml.ProxyAnchorLoss, False),
    }[case]
    torch.manual_seed(0)
    c, d, n = 100, 16, 700
    ref = ref_cls(num_classes=c, embedding_size=d).double()
    ours = ours_cls(c, d).double()
    with torch.no_grad():
        ours.proxies.copy_(ref.W.data.T if transpose else ref.proxies.data)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % c
    outs = []
    for loss, param in ((ours, ours.proxies), (ref, ref.W if transpose else ref.proxies)):
        e = x.clone().requires_grad_(True)
        v = loss(e, y)
        ge, gp = torch.autograd.grad(v, [e, param])
        outs.append((v.detach(), ge, gp.T if transpose and loss is ref else gp))
    for got, want in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_fast_lane_is_taken_by_plain_calls_only(monkeypatch):
    """The plain checked call takes the lane; a miner's tuple, ``reduction="none"`` and
    ``check=False`` take the general path (which the PML tests above compare too)."""
    calls = []
    apply = PX._ProxySoftmax.apply
    monkeypatch.setattr(PX._ProxySoftmax, "apply", lambda *a: calls.append(1) or apply(*a))
    x, y = batch(torch.float32, 12)
    loss = PX.CosFace(C, D)
    loss(x, y)
    assert calls == [1]
    loss(x, y, pml_miners.TripletMarginMiner(margin=0.2)(x, y))
    terms = PX.CosFace(C, D, reduction="none")(x, y)
    PX.CosFace(C, D, check=False)(x, y)
    assert calls == [1] and terms.shape == (x.shape[0],)
