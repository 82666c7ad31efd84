"""C kernels for the small-batch fused losses on CPU: the optional extension ``losses._native``
(``losses/_native.c``), which ``pip install`` builds where a C compiler is found.

At B = 128 a loss's torch kernel (:func:`losses.kernels.fused`) is 20-40 tensor operations over
a ``[128, 128]`` score matrix, each costing a few microseconds of fixed overhead -- more than
its arithmetic (docs/losses.md, "Speed at small batches"). The C kernel of a loss computes the
same value and ``dL/dS`` in one call: the same formulas, the same per-entry arithmetic in the
scores' dtype and in the same order (so the same comparisons decide which terms are active),
sums taken in double. With the lane's check (:func:`losses.kernels.check_values`: finite scores,
a term of the asked kind) folded into its first pass, a plain ``loss(embeddings, labels)`` call
goes ``unit_gram_forward -> C kernel -> unit_gram_backward``.

A torch kernel has a C counterpart when it carries a ``native`` attribute: a function of the
kernel's arguments after ``(S, P, Q)`` that gives ``(kernel id, reduction code, a, b, c, d)``
(the C parameters), or None where the C kernel does not cover that call (then the torch kernel
runs). :func:`run` takes it for contiguous float32 / float64 CPU scores of at most
:data:`MAX_ENTRIES` entries and contiguous boolean masks; anything else (a GPU, other dtypes,
views, larger matrices where torch's threads win) stays with the torch kernel. The kernels:

======================  =============================================  ==========================
torch kernel            loss                                           paper
======================  =============================================  ==========================
_contrastive_kernel     ``relu(t_pos - S)`` on P + ``relu(S - t_neg)``   Hadsell et al. 2006
_margin_lane_kernel     ``relu(m + b - S_ap) + relu(m + S_an - b)``    Wu et al. 2017
_triplet_kernel         ``relu(S_an - S_ap + m)``: all / batch-hard /  Schroff et al. 2015;
                        semi-hard                                      Hermans et al. 2017
_lifted_kernel          ``relu(lse_P(t_pos - S) + lse_Q(S - t_neg))``  Oh Song et al. 2016
_multi_similarity_...   ``softplus(lse_P -a(S - base)) / a +           Wang et al. 2019
                        softplus(lse_Q b(S - base)) / b``, mining eps
_circle_kernel          ``softplus(lse_P x_P + lse_Q x_Q)``            Sun et al. 2020
_nca_kernel             ``lse_{P u Q}(s S) - lse_P(s S)``              Goldberger et al. 2005
======================  =============================================  ==========================

The extension holds each kernel twice, for the compiler's baseline and for AVX2 + FMA, and takes
the second where the CPU has both (:func:`kernel_set`). Results equal the torch kernels' to
rounding (float32: the exponential is a ~1 ulp polynomial,
sums in double): ``tests/test_native.py`` compares every kernel, reduction and dtype, with and
without gradient, on batches with ties, empty rows and overlapping masks, and the modules
against pytorch-metric-learning with the C kernels on. :func:`disabled` turns them off (the
torch kernels then run), e.g. to compare.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable

import torch
from torch import Tensor

try:  # the optional C extension (losses/_native.c)
    from . import _native
except ImportError:  # no compiler at install time: the torch kernels
    _native = None

__all__ = ["AVAILABLE", "MAX_ENTRIES", "disabled", "enabled", "first_pairs", "kernel_set",
           "partition_targets", "run"]

#: whether the extension is built
AVAILABLE = _native is not None

#: the largest score matrix (entries) the C kernels take: kernels.FUSED_MAX_ENTRIES, the fused
#: path's own limit (one thread; past it torch's threaded kernels and autograd forms serve)
MAX_ENTRIES = 1 << 16

# the C side's codes (losses/_native.c)
CONTRASTIVE, MARGIN, TRIPLET_ALL, TRIPLET_HARD, TRIPLET_SEMIHARD = 0, 1, 2, 3, 4
LIFTED, MULTI_SIMILARITY, CIRCLE, NCA, SUPCON, NTXENT, PROXY_ANCHOR = 5, 6, 7, 8, 9, 10, 11
NWJ, DV, JS = 12, 13, 14
_REDUCTION = {"mean": 0, "sum": 1, "nonzero": 2}
#: the check's kinds of term (kernels.check_values); "skip": no check (the caller has checked)
_TERMS = {None: 0, "positives": 1, "any": 2, "both": 3, "skip": -1}
_TRIPLET = {"all": TRIPLET_ALL, "hard": TRIPLET_HARD, "semihard": TRIPLET_SEMIHARD}
_DTYPES = (torch.float32, torch.float64)

_STATE = threading.local()


def kernel_set() -> str | None:
    """The instruction set the C kernels run with: ``"avx2"`` (AVX2 + FMA, where the CPU has
    them) or ``"generic"`` (the compiler's baseline); None without the extension."""
    return None if _native is None else _native.current()


def enabled() -> bool:
    """Whether :func:`run` uses the C kernels (built, and not turned off by :func:`disabled`
    in this thread)."""
    return AVAILABLE and not getattr(_STATE, "off", False)


@contextlib.contextmanager
def disabled():
    """While the block runs (in this thread), the fused losses take their torch kernels."""
    previous = getattr(_STATE, "off", False)
    _STATE.off = True
    try:
        yield
    finally:
        _STATE.off = previous


def run(kernel: Callable, scores: Tensor, positives: Tensor, negatives: Tensor, args: tuple,
        need_grad: bool, terms: str | None = "skip") -> tuple[Tensor, Tensor | None] | int | None:
    """``kernel(scores, positives, negatives, *args, need_grad)`` by its C counterpart:
    ``(value, dL/dS or None)``; None where it has none or the inputs are not the C kernels'
    (see the module docstring); with ``terms`` (a kind of :func:`kernels.check_values`, or
    None: finiteness only) the check first, and an int where it fails (1: a NaN or Inf score,
    2: no term; nothing computed: the caller's own check then raises)."""
    params = getattr(kernel, "native", None)
    if params is None or not enabled() or torch.compiler.is_compiling():
        return None
    if not (scores.dtype in _DTYPES and scores.device.type == "cpu" and scores.dim() == 2
            and 0 < scores.numel() <= MAX_ENTRIES and positives.dtype == torch.bool
            and negatives.dtype == torch.bool and positives.shape == scores.shape
            and negatives.shape == scores.shape and scores.is_contiguous()
            and positives.is_contiguous() and negatives.is_contiguous()):
        return None
    spec = params(*args)
    if spec is None:
        return None
    kid, red, a, b, c, d = spec
    n, m = scores.shape
    grad = torch.empty_like(scores) if need_grad else None
    status, value = _native.run(kid, scores.data_ptr(), positives.data_ptr(),
                                negatives.data_ptr(), 0 if grad is None else grad.data_ptr(),
                                n, m, scores.dtype == torch.float64, _TERMS[terms], red,
                                a, b, c, d)
    if status:
        return status
    return torch.tensor(value, dtype=scores.dtype), grad


def partition_targets(positives: Tensor, negatives: Tensor) -> Tensor | None:
    """Each row's positive column (int64 ``[N]``) when every row of the masks has exactly one
    positive and every other column is a negative (``P xor Q`` everywhere: the multi-class
    N-pair loss's paired rows, a cross-entropy against the targets), in one C pass instead of
    a dozen tensor operations; None where that does not hold, or without the C kernels (the
    caller's torch check then decides)."""
    if not (enabled() and positives.device.type == "cpu" and positives.dtype == torch.bool
            and negatives.dtype == torch.bool and positives.dim() == 2
            and positives.shape == negatives.shape and positives.numel() > 0
            and positives.is_contiguous() and negatives.is_contiguous()):
        return None
    n, m = positives.shape
    target = torch.empty(n, dtype=torch.int64)
    if _native.targets(positives.data_ptr(), negatives.data_ptr(), target.data_ptr(), n, m):
        return target
    return None


def first_pairs(labels: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`contrastive.pairs.first_pair_per_class` of a batch against itself (for every
    label with two or more items, in ascending label order, its first and second position),
    in one C call instead of a sort and ten tensor operations; None without the C kernels or
    for labels that are not a contiguous int64 CPU vector (the caller's torch form then)."""
    if not (enabled() and labels.device.type == "cpu" and labels.dtype == torch.int64
            and labels.dim() == 1 and labels.is_contiguous()):
        return None
    n = labels.numel()
    a = torch.empty(n // 2, dtype=torch.int64)
    p = torch.empty(n // 2, dtype=torch.int64)
    if n < 2:  # no pair (and empty buffers have no address)
        return a, p
    k = _native.first_pairs(labels.data_ptr(), n, a.data_ptr(), p.data_ptr())
    return a[:k], p[:k]


# ----------------------------------------------------------------------------- parameters
# one per torch kernel: its arguments after (S, P, Q) -> the C kernel's, or None


def contrastive(pos_threshold: float, neg_threshold: float, reduction: str):
    return CONTRASTIVE, _REDUCTION[reduction], float(pos_threshold), float(neg_threshold), 0.0, 0.0


def margin_lane(beta: Tensor, m: float, distance: bool, reduction: str):
    b = float(beta.detach().reshape(()))
    return MARGIN, _REDUCTION[reduction], -b if distance else b, float(m), 0.0, 0.0


def margin(beta: Tensor, m: float, nu: float, distance: bool, reduction: str):
    if nu or beta.numel() != 1:  # the regulariser, one boundary per anchor: the torch kernel
        return None
    return margin_lane(beta, m, distance, reduction)


def triplet(margin: float, mining: str, reduction: str):
    return _TRIPLET[mining], _REDUCTION[reduction], float(margin), 0.0, 0.0, 0.0


def lifted(pos_threshold: float, neg_threshold: float, reduction: str):
    return LIFTED, _REDUCTION[reduction], float(pos_threshold), float(neg_threshold), 0.0, 0.0


def multi_similarity(alpha: float, beta: float, base: float, epsilon: float | None,
                     reduction: str):
    eps = math.nan if epsilon is None else float(epsilon)
    return MULTI_SIMILARITY, _REDUCTION[reduction], float(alpha), float(beta), float(base), eps


def circle(m: float, gamma: float, reduction: str):
    return CIRCLE, _REDUCTION[reduction], float(m), float(gamma), 0.0, 0.0


def nca(scale: float, reduction: str):
    return NCA, _REDUCTION[reduction], float(scale), 0.0, 0.0, 0.0


def supcon(reduction: str):
    return SUPCON, _REDUCTION[reduction], 0.0, 0.0, 0.0, 0.0


def ntxent(reduction: str):
    return NTXENT, _REDUCTION[reduction], 0.0, 0.0, 0.0, 0.0


def proxy_anchor(alpha: float, margin: float, reduction: str):
    return PROXY_ANCHOR, _REDUCTION[reduction], float(alpha), float(margin), 0.0, 0.0


def nwj(scale: float):
    return NWJ, 0, float(scale), 0.0, 0.0, 0.0


def dv(scale: float):
    return DV, 0, float(scale), 0.0, 0.0, 0.0


def js(scale: float):
    return JS, 0, float(scale), 0.0, 0.0, 0.0
