"""The pair-based, proxy and decoupled losses (issue 14) under ``torch.compile`` on CPU: with
``check=False`` each functional core traces into one graph (``fullgraph=True``, no graph break),
and its value and gradient equal eager ``check=True`` (backend ``aot_eager``: no C++ compiler
needed); the same for each whole module (``torch.compile(module, fullgraph=True)``), gradients
to its own parameters included."""

import pytest
import torch
import torch._dynamo

from losses import pair_based as PB
from losses import proxies as PX
from losses import self_supervised as SS


def _batch():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 16, generator=g, dtype=torch.float64).tanh()
    y = torch.arange(4).repeat_interleave(4)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
    neg = y[:, None] != y[None, :]
    sp = torch.randn(16, 5, generator=g, dtype=torch.float64).tanh()
    ppos = torch.nn.functional.one_hot(torch.arange(16) % 5, 5).bool()
    return (s, pos, neg), (sp, ppos, ~ppos)


CASES = {
    "multi_similarity": (PB.multi_similarity, 0),
    "circle": (PB.circle, 0),
    "lifted_structure": (PB.lifted_structure, 0),
    "margin": (PB.margin, 0),
    "nca": (PB.nca, 0),
    "proxy_nca": (PX.proxy_nca, 1),
    "proxy_anchor": (PX.proxy_anchor, 1),
    "normalized_softmax": (PX.normalized_softmax, 1),
    "cosface": (PX.cosface, 1),
    "arcface": (PX.arcface, 1),
    "dcl": (SS.dcl, 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_new_loss_cores_compile_in_one_graph_equal_to_eager(name):
    fn, which = CASES[name]
    s, pos, neg = _batch()[which]
    torch._dynamo.reset()

    def loss(scores):
        return fn(scores, pos, neg, check=False)

    assert torch._dynamo.explain(loss)(s).graph_break_count == 0
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    eager = fn(a, pos, neg)  # check=True: the module boundary's path
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(b)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    eager.backward()
    compiled.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
    assert float(eager.detach()) != 0.0 and bool(a.grad.abs().sum() > 0)


# ------------------------------------------------------------------ whole modules

MODULES = {
    "MultiSimilarity": lambda check: PB.MultiSimilarity(epsilon=0.1, check=check),
    "Circle": lambda check: PB.Circle(check=check),
    "LiftedStructure": lambda check: PB.LiftedStructure(check=check),
    "Margin": lambda check: PB.Margin(learn_beta=True, num_classes=4, nu=0.1, check=check),
    "NCA": lambda check: PB.NCA(check=check),
    "ProxyNCA": lambda check: PX.ProxyNCA(4, 8, check=check),
    "ProxyAnchor": lambda check: PX.ProxyAnchor(4, 8, check=check),
    "NormalizedSoftmax": lambda check: PX.NormalizedSoftmax(4, 8, check=check),
    "CosFace": lambda check: PX.CosFace(4, 8, check=check),
    "ArcFace": lambda check: PX.ArcFace(4, 8, check=check),
    "DCL": lambda check: SS.DCL(check=check),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_new_loss_modules_compile_whole_in_one_graph_equal_to_eager(name):
    """``torch.compile(module, fullgraph=True)`` of the whole loss module (``check=False``:
    critic, masks, loss; a graph break would raise) against the eager module with
    ``check=True`` (the validated, small-batch fused path): the same value and the same
    gradients, to the embeddings and to the module's own parameters (proxies, a learnable
    margin-loss boundary)."""
    torch.manual_seed(0)
    eager = MODULES[name](True).double()
    compiled_module = MODULES[name](False).double()
    compiled_module.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    y = torch.arange(16) % 4
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    want, got = eager(a, y), compiled(b, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)
    for p_eager, p_compiled in zip(eager.parameters(), compiled_module.parameters(),
                                   strict=True):
        if p_eager.requires_grad:
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-12, atol=1e-12)
    assert float(want.detach()) != 0.0 and float(a.grad.abs().sum()) > 0
