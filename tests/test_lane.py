"""``losses.lane``: a plain call's normalising critic and fused kernel in one autograd node.
The lane runs the general path's operations (the same critic forward and backward, check and
kernel) without the autograd bookkeeping between them, so its value and gradient must be the
general path's bit for bit; every call it does not apply to, and every batch its check refuses,
must take the general path with that path's warnings and errors."""

import warnings

import pytest
import torch

from contrastive.critics import Cosine, NegativeL2
from contrastive.pairs import NoPairsError, NoPairsWarning
from losses import lane as L
from losses import modules as M
from losses import pair_based as PB
from losses import proxies as PX

MODULES = {
    "infonce_pair": lambda r: M.InfoNCE(temperature=0.1, positives="pair", reduction=r),
    "supcon": lambda r: M.InfoNCE(temperature=0.07, reduction=r),
    "infonce_l2": lambda r: M.InfoNCE(critic=NegativeL2(normalize=True), reduction=r),
    "infonce_l2sq": lambda r: M.InfoNCE(critic=NegativeL2(squared=True, normalize=True),
                                        reduction=r),
    "nwj": lambda r: M.NWJ(reduction=r),
    "js": lambda r: M.JS(temperature=0.5, reduction=r),
    "dv": lambda r: M.DV(reduction=r),
    "contrastive": lambda r: M.Contrastive(reduction=r),
    "contrastive_cosine": lambda r: M.Contrastive(critic=Cosine(1.0), reduction=r),
    "multi_similarity": lambda r: PB.MultiSimilarity(reduction=r),
    "multi_similarity_mined": lambda r: PB.MultiSimilarity(epsilon=0.1, reduction=r),
    "multi_similarity_l2": lambda r: PB.MultiSimilarity(critic=NegativeL2(normalize=True),
                                                        reduction=r),
    "circle": lambda r: PB.Circle(reduction=r),
    "lifted": lambda r: PB.LiftedStructure(reduction=r),
    "margin": lambda r: PB.Margin(reduction=r),
    "margin_cosine": lambda r: PB.Margin(critic=Cosine(1.0), beta=0.3, reduction=r),
    "nca": lambda r: PB.NCA(softmax_scale=2.0, reduction=r),
    "triplet_all": lambda r: M.Triplet(margin=0.2, reduction=r),
    "triplet_hard": lambda r: M.Triplet(margin=0.2, mining="hard", reduction=r),
    "triplet_semihard": lambda r: M.Triplet(margin=0.2, mining="semihard", reduction=r),
    "triplet_cosine": lambda r: M.Triplet(margin=0.1, critic=Cosine(1.0), reduction=r),
}
REDUCTIONS = {name: ("nonzero", "mean", "sum")
              for name in ("contrastive", "contrastive_cosine", "circle", "margin",
                           "margin_cosine", "triplet_all", "triplet_hard", "triplet_semihard",
                           "triplet_cosine")}


def _general(module):
    """The same module with the lane switched off."""
    module.lane_kernel = lambda n: None
    return module


def _batch(dtype, n=48, classes=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    y[-1] = classes + 5  # an anchor without a positive
    return x, y


def _value_and_grad(module, x, y):
    t = x.clone().requires_grad_()
    v = module(t, y)
    v.backward()
    return v.detach(), t.grad, type(v.grad_fn).__name__


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lane_equals_the_general_path_bit_for_bit(name, dtype):
    """The same operations, so the same bits (at B = 48 the triplet losses take the dense lane,
    modules.SPARSE_LANE_MIN_ROWS; their sparse lane: tests/test_sparse_lane.py)."""
    for reduction in REDUCTIONS.get(name, ("mean", "sum")):
        x, y = _batch(dtype)
        v, g, node = _value_and_grad(MODULES[name](reduction), x, y)
        assert node == "LaneBackward", (name, reduction, node)
        v0, g0, node0 = _value_and_grad(_general(MODULES[name](reduction)), x, y)
        assert node0 != "LaneBackward"
        assert torch.equal(v, v0), (name, reduction, v, v0)
        assert torch.equal(g, g0), (name, reduction, (g - g0).abs().max())


@pytest.mark.parametrize("name", ["infonce_pair", "supcon", "nwj", "contrastive"])
def test_double_backward_through_the_general_path(name):
    x, y = _batch(torch.float64, n=20, classes=5)
    _same_double_backward((MODULES[name]("mean"), _general(MODULES[name]("mean"))), x, y)


def _same_double_backward(modules, x, y):
    """The two modules' gradients and the gradients of their squared norms agree."""
    grads = []
    for module in modules:
        t = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(t, y), t, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), t)
        grads.append((gx.detach(), ggx))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def _node(module, x, *args, **kwargs):
    out = module(x, *args, **kwargs)
    return type(out.grad_fn).__name__ if out.grad_fn is not None else None


def test_calls_the_lane_does_not_take():
    x, y = _batch(torch.float32)
    t = x.clone().requires_grad_()
    assert _node(M.InfoNCE(), t, y) == "LaneBackward"
    assert _node(M.InfoNCE(), t, y, None, t[:5], y[:5]) != "LaneBackward"  # a reference set
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    assert _node(M.InfoNCE(), t, y, pairs) != "LaneBackward"  # a miner's tuple
    assert _node(M.InfoNCE(reduction="none"), t, y) != "LaneBackward"
    assert _node(M.InfoNCE(critic=Cosine(0.1, learnable=True)), t, y) != "LaneBackward"
    assert _node(M.InfoNCE(critic=NegativeL2()), t, y) != "LaneBackward"  # not normalised
    assert _node(M.InfoNCE(check=False), t, y) != "LaneBackward"
    assert _node(M.Triplet(soft=True), t, y) != "LaneBackward"  # no fused kernel
    assert _node(PB.Margin(learn_beta=True), t, y) != "LaneBackward"  # a learnt boundary
    assert _node(PB.Margin(num_classes=20), t, y) != "LaneBackward"  # one per class
    big = torch.randn(300, 8, requires_grad=True)  # 300^2 > FUSED_MAX_ENTRIES
    assert _node(M.InfoNCE(), big, torch.arange(300) // 3) != "LaneBackward"
    assert _node(M.InfoNCE(), t.detach(), y) is None  # no gradient wanted
    with torch.no_grad():
        v_off = M.InfoNCE()(x, y)
    torch.testing.assert_close(v_off, M.InfoNCE()(x, y).detach(), rtol=0, atol=0)


def test_a_batch_without_a_term_leaves_the_lane():
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.arange(6)  # no positive pair
    loss = M.InfoNCE()
    with pytest.warns(NoPairsWarning):
        v = loss(x, y)
    assert v.item() == 0.0 and v.requires_grad
    with pytest.raises(NoPairsError):
        M.InfoNCE(strict=True)(x, y)


def test_non_finite_embeddings_leave_the_lane_with_their_own_error():
    x = torch.randn(8, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings"):
        M.InfoNCE()(x.requires_grad_(), torch.arange(8) // 2)


def test_lane_critic():
    assert L.lane_critic(Cosine(0.5), torch.float32)[0] == "cosine"
    assert L.lane_critic(Cosine(1.0), torch.float32)[1] is None  # t = 1: no scale
    assert L.lane_critic(Cosine(0.5, learnable=True), torch.float32) is None
    assert L.lane_critic(NegativeL2(normalize=True), torch.float32) == ("l2", None, None)
    assert L.lane_critic(NegativeL2(True, True), torch.float64) == ("l2sq", None, None)
    assert L.lane_critic(NegativeL2(), torch.float32) is None


def test_no_warning_on_a_plain_call():
    x, y = _batch(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.InfoNCE()(x.clone().requires_grad_(), y).backward()


def test_the_upstream_gradient_scales_the_lanes():
    """The node's backward multiplies by the gradient it is given (a weighted loss)."""
    x, y = _batch(torch.float64)
    for module in (M.InfoNCE(), _general(M.InfoNCE())):
        t = x.clone().requires_grad_()
        (2.5 * module(t, y)).backward()
        t1 = x.clone().requires_grad_()
        module(t1, y).backward()
        torch.testing.assert_close(t.grad, 2.5 * t1.grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("reduction", ["nonzero", "mean", "sum"])
def test_triplets_with_many_positives_per_anchor(reduction):
    """Two classes in 120 rows: about 60 positives per anchor, past the dense kernel's reach;
    the lane takes the sorted autograd form's gradient itself, equal to the general path's."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(120, 8, generator=g, dtype=torch.float64)
    y = torch.arange(120) % 2
    v, gr, node = _value_and_grad(M.Triplet(margin=0.3, reduction=reduction), x, y)
    assert node == "LaneBackward"
    v0, g0, _ = _value_and_grad(_general(M.Triplet(margin=0.3, reduction=reduction)), x, y)
    assert torch.equal(v, v0)
    torch.testing.assert_close(gr, g0, rtol=1e-12, atol=1e-15)


def _proxy_anchor_pair(dtype, reduction="mean"):
    lane = PX.ProxyAnchor(7, 16, reduction=reduction).to(dtype)
    general = PX.ProxyAnchor(7, 16, reduction=reduction).to(dtype)
    general.load_state_dict(lane.state_dict())
    general._one_node = lambda x, proxies, pos: None
    return lane, general


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_proxy_anchor_one_node_equals_its_general_path(dtype, reduction):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 16, generator=g, dtype=dtype)
    y = torch.randint(0, 7, (40,), generator=g)
    out = []
    for module in _proxy_anchor_pair(dtype, reduction):
        t = x.clone().requires_grad_()
        v = module(t, y)
        v.backward()
        out.append((v.detach(), t.grad, module.proxies.grad, type(v.grad_fn).__name__))
    assert out[0][3] == "CosineLaneBackward" and out[1][3] != "CosineLaneBackward"
    assert torch.equal(out[0][0], out[1][0])
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for mine, plain in zip(out[0][1:3], out[1][1:3], strict=True):
        torch.testing.assert_close(mine, plain, rtol=tol, atol=tol * float(plain.abs().max()))


def test_proxy_anchor_one_node_double_backward():
    x = torch.randn(12, 16, dtype=torch.float64)
    _same_double_backward(_proxy_anchor_pair(torch.float64), x, torch.arange(12) % 7)


def test_proxy_anchor_labels_out_of_range_still_raise():
    lane, _ = _proxy_anchor_pair(torch.float32)
    with pytest.raises(ValueError, match="class"):
        lane(torch.randn(4, 16, requires_grad=True), torch.tensor([0, 1, 2, 9]))


@pytest.mark.parametrize("name", ["infonce_pair", "supcon", "contrastive", "triplet_all"])
def test_lane_under_autocast_equals_the_general_path(name):
    """Under autocast the lane computes as the general path: autocast off, bf16 embeddings
    widened to float32 in the graph (their gradient comes back in bf16)."""
    x, y = _batch(torch.float32)
    out = []
    for module in (MODULES[name]("mean"), _general(MODULES[name]("mean"))):
        t = x.to(torch.bfloat16).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v = module(t, y)
        v.backward()
        out.append((v.detach(), t.grad, type(v.grad_fn).__name__))
    assert out[0][2] == "LaneBackward" and out[1][2] != "LaneBackward"
    assert v.dtype == torch.float32 and out[0][1].dtype == torch.bfloat16
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


def test_a_subclass_that_overrides_compute_keeps_the_general_path():
    """A user's variant of a shipped loss (its own ``compute``) must not get its parent's
    kernel: the general path calls its method."""

    class Doubled(M.InfoNCE):
        def compute(self, scores, positives, negatives, *, triplets=None, check=True):
            return 2.0 * super().compute(scores, positives, negatives, check=check)

    x, y = _batch(torch.float64)
    t = x.clone().requires_grad_()
    v = Doubled()(t, y)
    assert type(v.grad_fn).__name__ != "LaneBackward"
    torch.testing.assert_close(v, 2.0 * M.InfoNCE()(t, y), rtol=1e-14, atol=0)

    class Subclass(M.InfoNCE):  # nothing overridden: the lane stays
        pass

    assert _node(Subclass(), t, y) == "LaneBackward"
