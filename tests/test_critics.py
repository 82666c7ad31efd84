"""Critics against independent references (scikit-learn pairwise metrics, numpy, explicit loops
over pairs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances
from torch import nn

from contrastive import critics
from contrastive.critics import Bilinear, Concat, Cosine, Dot, NegativeL2, Separable, mlp


def data(n=7, m=5, d=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=dtype),
            torch.randn(m, d, generator=gen, dtype=dtype))


def test_dot():
    a, b = data()
    s = Dot()(a, b)
    assert s.shape == (7, 5)
    np.testing.assert_allclose(s.numpy(), a.numpy() @ b.numpy().T, rtol=1e-12)


@pytest.mark.parametrize("t", [0.07, 0.1, 1.0, 3.0])
def test_cosine_equals_sklearn_over_t(t):
    a, b = data()
    c = Cosine(t)
    np.testing.assert_allclose(c(a, b).numpy(), cosine_similarity(a, b) / t, rtol=1e-12)
    np.testing.assert_allclose(c(a, a).numpy(), cosine_similarity(a) / t, rtol=1e-12)
    assert c.temperature == pytest.approx(t, rel=1e-12)
    assert f"temperature={t:.4g}" in repr(c)


def test_cosine_float32_and_learnable():
    a, b = data(dtype=torch.float32)
    s = Cosine(0.07)(a, b)
    assert s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), cosine_similarity(a, b) / 0.07, rtol=1e-5)
    c = Cosine(0.5, learnable=True)
    assert isinstance(c.log_inv_t, nn.Parameter)
    c(a, b).sum().backward()
    assert c.log_inv_t.grad is not None and torch.isfinite(c.log_inv_t.grad)
    # a fixed temperature is a buffer (saved, not trained)
    assert "log_inv_t" in dict(Cosine(0.5).named_buffers())


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_negative_l2_equals_sklearn(squared, normalize):
    a, b = data()
    an, bn = a.numpy(), b.numpy()
    if normalize:
        an = an / np.linalg.norm(an, axis=1, keepdims=True)
        bn = bn / np.linalg.norm(bn, axis=1, keepdims=True)
    c = NegativeL2(squared=squared, normalize=normalize)
    assert c.is_distance
    np.testing.assert_allclose(
        c(a, b).numpy(), -euclidean_distances(an, bn, squared=squared), rtol=1e-10, atol=1e-12
    )
    self_s = c(a, a).numpy()
    np.testing.assert_allclose(self_s, -euclidean_distances(an, squared=squared), atol=1e-7)
    assert (self_s <= 0).all()


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_negative_l2_gradient_equals_cdist(squared, normalize):
    """Gradients of the fused critic against torch.cdist's autograd (away from zero
    distance)."""
    a, b = data()
    ra, rb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    w = torch.randn(7, 5, dtype=torch.float64)
    (NegativeL2(squared, normalize)(ra, rb) * w).sum().backward()
    qa, qb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    x, y = (torch.nn.functional.normalize(qa, dim=1), torch.nn.functional.normalize(qb, dim=1)) \
        if normalize else (qa, qb)
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    (-(d**2 if squared else d) * w).sum().backward()
    torch.testing.assert_close(ra.grad, qa.grad)
    torch.testing.assert_close(rb.grad, qb.grad)


def test_negative_l2_zero_distance_gradient_is_zero():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    s = NegativeL2()(x, x)
    assert float(s[0, 1].detach()) == 0.0
    s[0, 1].backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_bilinear():
    a, b = data()
    ident = Bilinear(6).double()
    torch.testing.assert_close(ident(a, b), Dot()(a, b))  # identity init = dot critic
    rnd = Bilinear(6, dim_b=6, init="random").double()
    w = rnd.weight.detach().numpy()
    np.testing.assert_allclose(rnd(a, b).detach().numpy(), a.numpy() @ w @ b.numpy().T,
                               rtol=1e-12)
    rect = Bilinear(6, dim_b=3).double()
    assert rect(a, b[:, :3]).shape == (7, 5)
    with pytest.raises(ValueError, match="Bilinear critic expects inputs of dims"):
        ident(a, b[:, :3])
    with pytest.raises(ValueError, match="init must be 'identity' or 'random'"):
        Bilinear(6, init="zeros")
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        Bilinear(0)


def numpy_mlp(net: nn.Sequential, x: np.ndarray) -> np.ndarray:
    """The MLP's forward pass from its weights in numpy: ``relu(x W^T + b)`` per hidden layer,
    a final affine map (the layer list itself is checked in ``test_mlp_structure``)."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert all(isinstance(m, (nn.Linear, nn.ReLU)) for m in net)
    for k, lin in enumerate(linears):
        x = x @ lin.weight.detach().numpy().T + lin.bias.detach().numpy()
        if k < len(linears) - 1:
            x = np.maximum(x, 0.0)
    return x


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_separable_is_dot_of_two_mlps(layers):
    """S_ij = g(a_i) . h(b_j) on every pair, with g and h evaluated in numpy from the weights:
    two different networks (a critic that used one MLP for both sides, or dropped a layer's bias
    or ReLU, would differ)."""
    a, b = data()
    c = Separable(6, hidden_dim=11, out_dim=4, layers=layers, in_dim_b=6).double()
    ga, hb = numpy_mlp(c.g, a.numpy()), numpy_mlp(c.h, b.numpy())
    assert ga.shape == (7, 4) and hb.shape == (5, 4)
    ref = np.array([[float(np.dot(ga[i], hb[j])) for j in range(5)] for i in range(7)])
    np.testing.assert_allclose(c(a, b).detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    assert np.abs(numpy_mlp(c.g, b.numpy()) - hb).max() > 1e-3  # g and h are separate networks
    c2 = Separable(6, hidden_dim=5, out_dim=3, in_dim_b=3).double()
    ref2 = numpy_mlp(c2.g, a.numpy()) @ numpy_mlp(c2.h, b[:, :3].numpy()).T
    np.testing.assert_allclose(c2(a, b[:, :3]).detach().numpy(), ref2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_concat_equals_mlp_on_every_concatenated_pair(chunk):
    """The split first layer and the chunked evaluation give MLP([a_i ; b_j]) exactly."""
    a, b = data(n=6, m=4, d=3)
    c = Concat(3, hidden_dim=9, layers=3, chunk_size=chunk).double()
    full = nn.Linear(6, 9).double()
    with torch.no_grad():
        full.weight.copy_(torch.cat([c.first_a.weight, c.first_b.weight], dim=1))
        full.bias.copy_(c.first_a.bias)
    ref = torch.empty(6, 4, dtype=torch.float64)
    for i in range(6):
        for j in range(4):
            h = torch.relu(full(torch.cat([a[i], b[j]])))
            ref[i, j] = c.rest(h).squeeze()
    torch.testing.assert_close(c(a, b), ref)


def test_mlp_structure():
    net = mlp(5, 8, 3, layers=2)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 8), (8, 8), (8, 3)]
    assert len(mlp(5, 8, 3, layers=0)) == 1


def test_registry():
    assert set(critics.available()) >= {"dot", "cosine", "negative_l2", "bilinear", "separable",
                                        "concat"}
    c = critics.get("Cosine", temperature=0.2)
    assert isinstance(c, Cosine) and c.temperature == pytest.approx(0.2)
    assert isinstance(critics.get("negative-l2", squared=True), NegativeL2)
    with pytest.raises(ValueError, match=r"unknown critic 'nope'; choose one of"):
        critics.get("nope")
    with pytest.raises(ValueError, match="in_dim must be a positive integer"):
        Separable(0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        Concat(3, chunk_size=0)


def test_cosine_scale_is_exact_in_float64():
    """1/t reaches float64 inputs at full precision (a float32 temperature would be off by
    ~1e-8 relative)."""
    a, b = data()
    s = Cosine(0.07)(a, b)
    ref = cosine_similarity(a, b) / 0.07
    assert np.max(np.abs(s.numpy() - ref) / np.abs(ref)) < 1e-13
    assert math.isclose(Cosine(0.07).temperature, 0.07, rel_tol=1e-15)


PROPAGATING = [
    ("dot", lambda: critics.Dot()),
    ("cosine", lambda: critics.Cosine(0.1)),
    ("cosine_learnable", lambda: critics.Cosine(0.1, learnable=True)),
    ("l2", lambda: critics.NegativeL2()),
    ("l2sq", lambda: critics.NegativeL2(squared=True)),
    ("l2_unit", lambda: critics.NegativeL2(normalize=True)),
    ("l2sq_unit", lambda: critics.NegativeL2(squared=True, normalize=True)),
    ("bilinear", lambda: critics.Bilinear(6)),
    ("bilinear_random", lambda: critics.Bilinear(6, init="random")),
]


@pytest.mark.parametrize("name, make", PROPAGATING)
def test_critics_marked_propagating_turn_every_non_finite_input_into_a_non_finite_score(
        name, make):
    """``propagates_nonfinite``: the loss modules let the scores' finiteness read stand for the
    embeddings' own, so a NaN or Inf in any entry of ``a`` or ``b`` must leave some score NaN or
    Inf -- on the fused paths (a gradient) and the plain ones (none), against itself and
    against a second set (a regression: the plain ``NegativeL2`` read a NaN distance as 0)."""
    crit = make()
    assert crit.propagates_nonfinite
    gen = torch.Generator().manual_seed(0)
    for bad in (math.nan, math.inf, -math.inf):
        for grad in (True, False):
            for row, col in ((0, 0), (3, 5), (4, 2)):
                a = torch.randn(5, 6, generator=gen)
                a[row, col] = bad
                a.requires_grad_(grad)
                assert not bool(torch.isfinite(crit(a, a)).all()), (bad, grad, "self")
                b = torch.randn(7, 6, generator=gen)
                assert not bool(torch.isfinite(crit(a, b)).all()), (bad, grad, "anchors")
                assert not bool(torch.isfinite(crit(b, a)).all()), (bad, grad, "candidates")
    assert not critics.Critic.propagates_nonfinite  # a user's critic: not assumed


def test_plain_negative_l2_keeps_zero_distances_and_their_zero_gradient():
    """The plain form's ``sq == 0`` test (which keeps a NaN distance NaN) gives the same values
    and gradients as before on finite input: 0 on the diagonal and for duplicates, with a zero
    (not NaN) gradient there."""
    # small integers: the expansion |a|^2 + |b|^2 - 2 a.b is then exact, so a duplicate's
    # distance is exactly 0 (with random floats it is a rounding residue for about a third
    # of the seeds, and this test failed with the random state a test order left it)
    x = torch.randint(-3, 4, (4, 3), generator=torch.Generator().manual_seed(0)).float()
    x = torch.cat([x, x[:1]]).requires_grad_()  # a duplicate of row 0
    s = critics.NegativeL2()(x, x.detach().clone())  # no gradient to b: the plain path too
    assert float(s[0, 4]) == 0.0 and bool((s.diagonal() == 0).all())
    s.sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    want = -torch.cdist(x.detach(), x.detach())
    assert torch.allclose(s.detach(), want, atol=1e-5)
