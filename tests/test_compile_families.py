"""The pair-based, proxy and decoupled losses (issue 14) under ``torch.compile`` on CPU: with
``check=False`` each functional core traces into one graph (``fullgraph=True``, no graph break),
and its value and gradient equal eager ``check=True`` (backend ``aot_eager``: no C++ compiler
needed)."""

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
    assert float(eager) != 0.0 and bool(a.grad.abs().sum() > 0)
