"""Every loss of the functional core runs under ``torch.compile`` (CPU) with ``check=False``, in
one graph (``fullgraph=True``; ``torch._dynamo.explain`` counts no graph break), with values and
gradients equal to eager mode with ``check=True`` (the index-based path with the input checks).
The same compiled function gives PML's zero on a batch without a positive pair: masks and
clamped counts, no branch on tensor data.

Backend: ``aot_eager`` for every loss (dynamo's capture and AOTAutograd's forward and backward
graphs, without code generation, so the test stays fast on 2 cores); one loss also goes through
``inductor`` (C++ code generation; needs a C++ compiler, skipped without one).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import losses
from contrastive.pairs import NoPairsError, diagonal_masks, label_masks
from losses import functional as LF

N = 12  # small: compiling is the cost, not the loss


def _cases():
    def f(fn, **kw):
        return lambda s, p, q, check: fn(s, p, q, check=check, **kw)

    return {
        "infonce_all": f(LF.infonce, form="all"),
        "infonce_pair": f(LF.infonce, form="pair"),
        "ntxent": f(LF.ntxent),
        "supcon": f(LF.supcon),
        "nwj": f(LF.nwj),
        "js": f(LF.js),
        "dv": f(LF.dv),
        "infonce_bound": f(LF.infonce_bound),
        "npair": f(LF.multiclass_npair),
        "triplet_all": f(LF.triplet, margin=0.3),
        "triplet_all_mean": f(LF.triplet, margin=0.3, reduction="mean"),
        "triplet_hard": f(LF.triplet, margin=0.3, mining="hard"),
        "triplet_semihard": f(LF.triplet, margin=0.3, mining="semihard"),
        "triplet_soft_all": f(LF.triplet, margin=0.1, soft=True),
        "triplet_soft_hard": f(LF.triplet, margin=0.1, soft=True, mining="hard"),
        "triplet_soft_semihard": f(LF.triplet, margin=0.1, soft=True, mining="semihard"),
        "contrastive": f(LF.contrastive, pos_threshold=0.5, neg_threshold=-0.2),
        "supcon_none": f(LF.supcon, reduction="none"),
        "ntxent_none": f(LF.ntxent, reduction="none"),
    }


CASES = _cases()


def _batch(name):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, N, generator=g, dtype=torch.float64)
    if name == "npair":  # one positive per anchor
        pos, neg = diagonal_masks(N)
    else:  # 4 classes of 3, diagonal excluded
        pos, neg = label_masks(torch.arange(N) // 3)
    return s, pos, neg


def _value_and_grad(fn, s, pos, neg, check):
    x = s.clone().requires_grad_(True)
    v = fn(x, pos, neg, check)
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach(), g


@pytest.mark.parametrize("name", list(CASES))
def test_functional_core_compiles_in_one_graph_equal_to_eager(name):
    fn = CASES[name]
    s, pos, neg = _batch(name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p, q, check: fn(x, p, q, check), backend="aot_eager",
                             fullgraph=True)
    v, g = _value_and_grad(compiled, s, pos, neg, False)
    v_ref, g_ref = _value_and_grad(fn, s, pos, neg, True)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    # a batch without a positive pair, same compiled function: PML's zero and zero gradient
    # where eager raises NoPairsError, the eager value where the loss keeps a term (contrastive)
    none = torch.zeros_like(pos)
    v0, g0 = _value_and_grad(compiled, s, none, neg, False)
    try:
        v0_ref, g0_ref = _value_and_grad(fn, s, none, neg, True)
    except NoPairsError:
        v0_ref, g0_ref = torch.zeros_like(v0), torch.zeros_like(g0)
    torch.testing.assert_close(v0, v0_ref, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(g0, g0_ref, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("name", list(CASES))
def test_functional_core_has_no_graph_break(name):
    fn = CASES[name]
    s, pos, neg = _batch(name)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda x, p, q: fn(x, p, q, False))(
        s.clone().requires_grad_(True), pos, neg)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize(("name", "make"), [
    ("infonce_views", lambda check: losses.InfoNCE(temperature=0.2, check=check)),
    ("ntxent_views", lambda check: losses.NTXentLoss(temperature=0.2, check=check)),
])
def test_module_with_check_false_compiles_equal_to_eager(name, make):
    """The module with ``check=False``: a compiled training step equals the eager one with the
    default checks, on two views per instance."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 8, generator=g, dtype=torch.float64)
    y = torch.arange(N) // 2
    torch._dynamo.reset()
    compiled = torch.compile(make(False), backend="aot_eager")
    leaf = x.clone().requires_grad_(True)
    v = compiled(leaf, y)
    (grad,) = torch.autograd.grad(v, leaf)
    leaf2 = x.clone().requires_grad_(True)
    v2 = make(True)(leaf2, y)
    (grad2,) = torch.autograd.grad(v2, leaf2)
    torch.testing.assert_close(v.detach(), v2.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad2, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check=False: no NoPairsWarning, just the zero
        zero = compiled(x, torch.arange(N))
    assert float(zero) == 0.0


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor needs a C++ compiler")
def test_inductor_generated_code_equals_eager():
    """One loss through inductor's generated C++ (the slow compile, once)."""
    fn = CASES["contrastive"]
    s, pos, neg = _batch("contrastive")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, p, q, check: fn(x, p, q, check), backend="inductor",
                             fullgraph=True)
    v, g = _value_and_grad(compiled, s, pos, neg, False)
    v_ref, g_ref = _value_and_grad(fn, s, pos, neg, True)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_check_false_never_syncs_on_cuda(name):
    """check=False on CUDA: forward and backward under ``set_sync_debug_mode("error")``, which
    raises on any device-to-host synchronisation; values equal the CPU's."""
    fn = CASES[name]
    s, pos, neg = _batch(name)
    v_ref, g_ref = _value_and_grad(fn, s, pos, neg, True)
    s, pos, neg = s.cuda(), pos.cuda(), neg.cuda()
    x = s.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v = fn(x, pos, neg, False)
        (g,) = torch.autograd.grad(v.sum(), x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(v.detach().cpu(), v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-12, atol=1e-12)
