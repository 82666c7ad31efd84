"""The C kernels of the small-batch fused losses (losses/_native.c via losses.native): every
kernel, reduction and dtype against its torch kernel (values and dL/dS, with and without a
gradient) on label masks, uneven classes, overlapping random masks, ties and rows without a
positive or a negative; the check folded into them (NaN / Inf scores, no term); where they are
taken and where not; and the loss modules with them on against the same modules with them off,
through the one-node lane and the functional core, including double backward."""

from __future__ import annotations

import os
import shutil
import sysconfig

import pytest
import torch
import torch.nn.functional as F

import losses
from contrastive.critics import Cosine
from losses import functional as LF
from losses import modules as M
from losses import native as N
from losses import pair_based as PB
from losses import proxies as PX
from losses.modules import Contrastive, InfoNCE, Triplet

needs_native = pytest.mark.skipif(not N.AVAILABLE,
                                  reason="the C extension losses._native is not built")


def test_extension_is_built_where_a_compiler_is_present():
    """`pip install` builds the extension when it can: a C compiler and Python's headers."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    assert N.AVAILABLE or not (cc and headers), "a compiler is here but losses._native is missing"


#: (torch kernel, argument sets after (S, P, Q)) for every kernel with a C form
KERNELS = [
    (LF._contrastive_kernel, [(0.7, 0.4, r) for r in ("mean", "sum", "nonzero")]),
    (PB._margin_lane_kernel, [(torch.tensor(b), 0.2, d, r) for b, d in ((0.3, False),
                                                                        (1.2, True))
                              for r in ("mean", "sum", "nonzero")]),
    (PB._margin_kernel, [(torch.tensor(0.3), 0.2, 0.0, False, r)
                         for r in ("mean", "sum", "nonzero")]),
    (LF._triplet_kernel, [(mg, mi, r) for mg in (0.2, 0.05) for mi in ("all", "hard", "semihard")
                          for r in ("mean", "sum", "nonzero")]),
    (PB._lifted_kernel, [(0.3, -0.2, r) for r in ("mean", "sum")] + [(0.0, -1.0, "mean")]),
    (PB._multi_similarity_masks_kernel, [(2.0, 50.0, 0.5, e, r) for e in (None, 0.1, 0.0)
                                          for r in ("mean", "sum")]),
    (PB._circle_kernel, [(0.4, 80.0, r) for r in ("mean", "sum", "nonzero")] +
     [(0.25, 256.0, "nonzero")]),
    (PB._nca_kernel, [(s, r) for s in (1.0, 4.0, 0.5) for r in ("mean", "sum")]),
    (LF._supcon_kernel, [("mean",), ("sum",)]),
    (LF._ntxent_kernel, [("mean",), ("sum",)]),
    (LF._nwj_kernel, [(1.0,), (23.0,)]),
    (LF._dv_kernel, [(1.0,), (23.0,)]),
    (LF._js_kernel, [(1.0,), (23.0,)]),
    (PX._proxy_anchor_kernel, [(32.0, 0.1, "mean"), (32.0, 0.1, "sum"), (8.0, 0.5, "mean")]),
]
CASES = [(k, a) for k, sets in KERNELS for a in sets]
IDS = [f"{k.__name__}-{'-'.join(str(x) for x in a if not isinstance(x, torch.Tensor))}"
       for k, a in CASES]


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    pos = same.clone()
    pos.fill_diagonal_(False)
    return pos, ~same


def batches(dtype: torch.dtype):
    """(name, S, P, Q): M-per-class, uneven classes with singletons (rows without a positive),
    random overlapping masks with empty rows, and scores with many ties."""
    g = torch.Generator().manual_seed(0)
    out = []
    x = F.normalize(torch.randn(128, 16, generator=g, dtype=dtype), dim=1)
    out.append(("m_per_class", x @ x.T, *label_masks(torch.arange(128) // 4)))
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6, 6, 7, 8, 9, 9, 9, 10, 11, 11, 12])
    x = F.normalize(torch.randn(y.numel(), 8, generator=g, dtype=dtype), dim=1)
    out.append(("uneven", x @ x.T, *label_masks(y)))
    s = torch.randn(30, 41, generator=g, dtype=dtype).tanh()
    p = torch.rand(30, 41, generator=g) < 0.1
    q = torch.rand(30, 41, generator=g) < 0.6  # overlaps P in places
    p[3], q[5], p[7], q[7] = False, False, False, False
    out.append(("random_masks", s, p, q))
    s = (torch.randint(0, 5, (64, 64), generator=g) / 4.0 - 0.5).to(dtype)
    out.append(("ties", s, *label_masks(torch.arange(64) // 8)))
    return out


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 2e-5, torch.float64: 1e-12}[dtype]
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, (a, b)


def _has_avx2() -> bool:
    if not N.AVAILABLE:
        return False
    try:
        previous = N._native.select("avx2")
    except ValueError:
        return False
    N._native.select(previous)
    return True


@pytest.fixture(params=[
    pytest.param("generic", marks=needs_native),
    pytest.param("avx2", marks=pytest.mark.skipif(not _has_avx2(),
                                                  reason="no extension, or no AVX2 + FMA")),
])
def kernel_set(request):
    """Each instruction set the extension holds (AVX2 where the CPU has it), restored after."""
    previous = N._native.select(request.param)
    assert N.kernel_set() == request.param
    yield request.param
    N._native.select(previous)


def test_kernel_set_selection():
    if not N.AVAILABLE:
        assert N.kernel_set() is None
        return
    assert N.kernel_set() == ("avx2" if _has_avx2() else "generic")
    with pytest.raises(ValueError, match="'generic' or 'avx2'"):
        N._native.select("sse9")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("kernel", "args"), CASES, ids=IDS)
def test_c_kernel_equals_torch_kernel(kernel, args, dtype, kernel_set):
    # a boundary comes in the scores' dtype (pair_based.margin casts it before the kernel)
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args)
    for name, s, p, q in batches(dtype):
        s = s.contiguous()
        if kernel in (PB._circle_kernel, PB._margin_lane_kernel, PB._margin_kernel,
                      LF._triplet_kernel) and not (bool(p.any(1).logical_and(q.any(1)).any())):
            continue
        with N.disabled():
            value, grad = kernel(s, p, q, *args, True)
            no_grad_value, none = kernel(s, p, q, *args, False)
        out = N.run(kernel, s, p, q, args, True)
        assert isinstance(out, tuple), name
        c_value, c_grad = out
        assert c_value.dtype == dtype and c_value.shape == () and c_grad.dtype == dtype
        close(c_value, value, dtype)
        close(c_grad, grad, dtype)
        c_value2, c_none = N.run(kernel, s, p, q, args, False)
        assert c_none is None and none is None
        assert float(c_value2) == float(c_value)
        close(c_value2, no_grad_value, dtype)


@needs_native
def test_same_active_terms_as_the_torch_kernel_at_the_margin(kernel_set):
    """Hinges exactly at 0 (S_an - S_ap + m = 0 in float32) count as inactive in both: the
    per-entry arithmetic is the torch kernel's, so the "nonzero" divisors agree exactly."""
    s = torch.tensor([[0.0, 0.5, 0.3, 0.25], [0.5, 0.0, 0.25, 0.3], [0.3, 0.25, 0.0, 0.5],
                      [0.25, 0.3, 0.5, 0.0]])
    p, q = label_masks(torch.tensor([0, 0, 1, 1]))
    for mining in ("all", "hard", "semihard"):
        args = (0.25, mining, "nonzero")
        with N.disabled():
            ref = LF._triplet_kernel(s, p, q, *args, True)
        out = N.run(LF._triplet_kernel, s, p, q, args, True)
        assert float(out[0]) == float(ref[0]) and torch.equal(out[1], ref[1])


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finds_non_finite_scores(bad):
    s = torch.rand(16, 16)
    s[3, 7] = bad
    p, q = label_masks(torch.arange(16) // 4)
    for terms in (None, "positives", "any", "both"):
        assert N.run(PB._nca_kernel, s, p, q, (1.0, "mean"), True, terms) == 1
    assert isinstance(N.run(PB._nca_kernel, s, p, q, (1.0, "mean"), True, "skip"), tuple)


@needs_native
def test_check_finds_missing_terms():
    s = torch.rand(8, 8)
    none = torch.zeros(8, 8, dtype=torch.bool)
    some = torch.eye(8, dtype=torch.bool)
    args = (1.0, "mean")
    assert N.run(PB._nca_kernel, s, none, some, args, True, "positives") == 2
    assert isinstance(N.run(PB._nca_kernel, s, some, none, args, True, "positives"), tuple)
    assert N.run(PB._nca_kernel, s, none, none, args, True, "any") == 2
    assert isinstance(N.run(PB._nca_kernel, s, none, some, args, True, "any"), tuple)
    assert N.run(PB._nca_kernel, s, some, none, args, True, "both") == 2
    assert isinstance(N.run(PB._nca_kernel, s, some, ~some, args, True, "both"), tuple)
    assert isinstance(N.run(PB._nca_kernel, s, none, none, args, True, None), tuple)
    # the kernels that divide by a count of pairs refuse a batch without them even unchecked
    # ("skip": the callers' own check has run), instead of a NaN
    assert N.run(LF._ntxent_kernel, s, none, ~some, ("mean",), True) == 2
    assert N.run(LF._nwj_kernel, s, none, ~some, (1.0,), True) == 2
    assert N.run(LF._dv_kernel, s, some, none, (1.0,), True) == 2


@needs_native
def test_where_the_c_kernels_are_not_taken():
    s = torch.rand(16, 16)
    p, q = label_masks(torch.arange(16) // 4)
    args = (1.0, "mean")
    assert N.run(LF._ntxent_slow, s, p, q, ("mean",), True) is None  # no C form
    assert N.run(PB._nca_kernel, s.T, p, q, args, True) is None  # not contiguous
    assert N.run(PB._nca_kernel, s.half(), p, q, args, True) is None  # dtype
    assert N.run(PB._nca_kernel, s, p.to(torch.uint8), q, args, True) is None  # not bool
    big = torch.rand(N.MAX_ENTRIES // 128 + 1, 128)
    bp, bq = torch.zeros_like(big, dtype=torch.bool), torch.ones_like(big, dtype=torch.bool)
    assert N.run(PB._nca_kernel, big, bp, bq, args, True) is None  # past MAX_ENTRIES
    per_anchor = torch.rand(16)
    assert N.run(PB._margin_kernel, s, p, q, (per_anchor, 0.2, 0.0, False, "mean"), True) is None
    assert N.run(PB._margin_kernel, s, p, q, (torch.tensor(1.0), 0.2, 0.1, False, "mean"),
                 True) is None  # the regulariser
    with N.disabled():
        assert not N.enabled()
        assert N.run(PB._nca_kernel, s, p, q, args, True) is None
    assert N.enabled()


MODULES = [
    lambda: Triplet(),
    lambda: Triplet(mining="hard", reduction="nonzero"),
    lambda: Triplet(mining="semihard"),
    lambda: Contrastive(),
    lambda: InfoNCE(temperature=0.1),
    lambda: InfoNCE(temperature=0.1, positives="pair"),
    lambda: PB.MultiSimilarity(),
    lambda: PB.MultiSimilarity(epsilon=0.1),
    lambda: PB.Circle(),
    lambda: PB.LiftedStructure(),
    lambda: PB.Margin(),
    lambda: PB.NCA(),
    lambda: PX.ProxyAnchor(24, 32),
    lambda: losses.NWJ(),
    lambda: losses.JS(),
    lambda: losses.DV(),
]


def _loss_and_grad(module, x, y, **kw):
    x = x.detach().clone().requires_grad_()
    params = [q for q in module.parameters() if q.requires_grad]
    for q in params:
        q.grad = None
    loss = module(x, y, **kw)
    loss.backward()
    if params:  # a proxy loss: its proxies' gradient too
        return loss.detach(), torch.cat([x.grad.flatten()] + [q.grad.flatten() for q in params])
    return loss.detach(), x.grad


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", MODULES, ids=lambda m: repr(m()))
def test_modules_with_c_kernels_equal_modules_without(make, dtype, monkeypatch, kernel_set):
    """The one-node lane (a plain call) takes the C kernel; values and gradients equal the
    torch kernels' to rounding."""
    calls = []
    real = N._native.run

    def counting(*a):
        calls.append(a[0])
        return real(*a)

    monkeypatch.setattr(N._native, "run", counting)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 32, generator=g, dtype=dtype)
    y = torch.arange(96) // 4
    torch.manual_seed(0)  # a proxy loss's proxies
    module = make().to(dtype)
    value, grad = _loss_and_grad(module, x, y)
    assert calls, "the C kernel was not taken"
    with N.disabled():
        ref_value, ref_grad = _loss_and_grad(module, x, y)
    close(value, ref_value, dtype)
    close(grad, ref_grad, dtype)


@needs_native
def test_functional_core_takes_the_c_kernels():
    """kernels.fused (a checked functional call) runs the C kernel when it has one, with and
    without a gradient; double backward recomputes through the differentiable form."""
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=1)
    p, q = label_masks(torch.arange(64) // 4)
    s = (x @ x.T).requires_grad_()
    value = PB.circle(s, p, q)
    (grad,) = torch.autograd.grad(value, s, create_graph=True)
    (gg,) = torch.autograd.grad(grad.pow(2).sum(), s)
    with N.disabled():
        s2 = s.detach().clone().requires_grad_()
        ref = PB.circle(s2, p, q)
        (ref_grad,) = torch.autograd.grad(ref, s2, create_graph=True)
        (ref_gg,) = torch.autograd.grad(ref_grad.pow(2).sum(), s2)
    close(value.detach(), ref.detach(), torch.float64)
    close(grad.detach(), ref_grad.detach(), torch.float64)
    close(gg, ref_gg, torch.float64)
    with torch.no_grad():
        close(LF.triplet(s, p, q), LF.triplet(s.detach(), p, q), torch.float64)


@needs_native
def test_lane_errors_and_warnings_unchanged():
    """The C check hands a faulty batch to the general path, which names the fault."""
    x = torch.randn(16, 8)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Triplet()(x.requires_grad_(), torch.arange(16) // 4)
    module = PB.NCA()
    with pytest.warns(losses.NoPairsWarning):
        loss = module(torch.randn(8, 4, requires_grad=True), torch.arange(8))
    assert float(loss) == 0.0
    with pytest.raises(losses.NoPairsError):
        PB.NCA(strict=True)(torch.randn(8, 4, requires_grad=True), torch.arange(8))


@needs_native
def test_modules_with_c_kernels_match_pml():
    """With the C kernels on (the default on a CPU), PML's numbers, as the drop-in promises."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    miners = pytest.importorskip("pytorch_metric_learning.miners")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 32, generator=g)
    y = torch.arange(128) // 4
    pairs = [
        (losses.TripletMarginLoss(), pml.TripletMarginLoss()),
        (losses.ContrastiveLoss(), pml.ContrastiveLoss()),
        (losses.MultiSimilarityLoss(), pml.MultiSimilarityLoss()),
        (losses.CircleLoss(), pml.CircleLoss()),
        (losses.GeneralizedLiftedStructureLoss(), pml.GeneralizedLiftedStructureLoss()),
        (losses.MarginLoss(), pml.MarginLoss()),
        (losses.NCALoss(), pml.NCALoss()),
        (losses.NTXentLoss(), pml.NTXentLoss()),
        (losses.SupConLoss(), pml.SupConLoss()),
    ]
    torch.manual_seed(4)
    ours = losses.ProxyAnchorLoss(32, 32)
    ref = pml.ProxyAnchorLoss(32, 32)
    with torch.no_grad():
        ref.proxies.copy_(ours.proxies)
    pairs.append((ours, ref))
    for ours, ref in pairs:
        value, grad = _loss_and_grad(ours, x, y)
        ref_value, ref_grad = _loss_and_grad(ref, x, y)
        assert torch.allclose(value, ref_value, rtol=1e-4, atol=1e-6), type(ours).__name__
        assert torch.allclose(grad, ref_grad, rtol=1e-3, atol=1e-6), type(ours).__name__
    hard = miners.BatchHardMiner()
    ref = pml.TripletMarginLoss()
    xr = x.clone().requires_grad_()
    ref_value = ref(xr, y, hard(xr, y))
    ref_value.backward()
    value, grad = _loss_and_grad(Triplet(mining="hard", reduction="nonzero"), x, y)
    assert torch.allclose(value, ref_value.detach(), rtol=1e-5)
    assert torch.allclose(grad, xr.grad, rtol=1e-4, atol=1e-7)


@needs_native
def test_disabled_is_per_thread_and_restored():
    import threading

    seen = []
    with N.disabled():
        t = threading.Thread(target=lambda: seen.append(N.enabled()))
        t.start()
        t.join()
        assert not N.enabled()
        with N.disabled():
            assert not N.enabled()
        assert not N.enabled()
    assert seen == [True] and N.enabled()


@needs_native
def test_partition_targets():
    """The multi-class N-pair loss's paired rows: one positive per row, every other column a
    negative; anything else gives None (the torch check then decides)."""
    perm = torch.tensor([2, 0, 1, 4, 3])
    p = torch.eye(5, dtype=torch.bool)[perm].contiguous()
    assert torch.equal(N.partition_targets(p, ~p), perm)
    two = p.clone()
    two[0, 0] = True
    assert N.partition_targets(two, ~two) is None  # two positives in row 0
    q = ~p
    q[1, 3] = False
    assert N.partition_targets(p, q) is None  # a column neither positive nor negative
    none = p.clone()
    none[4] = False
    assert N.partition_targets(none, ~none) is None  # a row without a positive
    assert N.partition_targets(p[:, :4], ~p[:, :4]) is None  # not contiguous
    with N.disabled():
        assert N.partition_targets(p, ~p) is None
    s = torch.randn(5, 5, requires_grad=True)
    value = LF.multiclass_npair(s, p, ~p)
    assert torch.allclose(value, F.cross_entropy(s, perm))
    with pytest.raises(ValueError, match="exactly one positive"):
        LF.multiclass_npair(s, two, ~p)


@needs_native
def test_extension_refuses_bad_calls():
    s = torch.rand(4, 4)
    p = torch.eye(4, dtype=torch.bool)
    args = (s.data_ptr(), p.data_ptr(), p.data_ptr(), 0, 4, 4, 0, -1, 0, 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown kernel 99"):
        N._native.run(99, *args)
    with pytest.raises(ValueError, match="null buffer"):
        N._native.run(N.NCA, 0, *args[1:])
    with pytest.raises(ValueError, match="bad sizes"):
        N._native.run(N.NCA, *args[:4], -1, *args[5:])
    with pytest.raises(ValueError, match="null buffer"):
        N._native.targets(p.data_ptr(), p.data_ptr(), 0, 4, 4)


@needs_native
def test_first_pairs_equals_first_pair_per_class():
    from contrastive.pairs import first_pair_per_class

    g = torch.Generator().manual_seed(5)
    cases = [torch.arange(128) // 4, torch.randint(-5, 40, (97,), generator=g),
             torch.randint(0, 3, (10,), generator=g), torch.tensor([7, 3, 7, 2**40, 3, -1]),
             torch.arange(9), torch.zeros(0, dtype=torch.long), torch.tensor([4])]
    for labels in cases:
        a, p = N.first_pairs(labels)
        ra, rp = first_pair_per_class(labels)
        assert torch.equal(a, ra) and torch.equal(p, rp), labels
    assert N.first_pairs(torch.arange(8, dtype=torch.int32)) is None
    assert N.first_pairs(torch.arange(16)[::2]) is None  # not contiguous
    with N.disabled():
        assert N.first_pairs(torch.arange(8)) is None


@needs_native
def test_npair_module_with_c_pairs_equals_torch_pairs():
    x = torch.randn(64, 16, dtype=torch.float64)
    y = torch.randint(0, 20, (64,), generator=torch.Generator().manual_seed(6))
    module = M.MultiClassNPair(critic=Cosine(1.0))
    value, grad = _loss_and_grad(module, x, y)
    with N.disabled():
        ref_value, ref_grad = _loss_and_grad(module, x, y)
    assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
