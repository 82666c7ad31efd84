"""The building blocks every loss of :mod:`losses` computes with, over a score matrix
``S [N, M]`` and boolean masks ``P`` (positives) and ``Q`` (negatives): input validation
(:func:`prepare`), the reductions (:func:`reduce_terms`, :data:`REDUCTIONS`), positives as
indices (:func:`positive_index`, :func:`padded_positives`), masked log-sum-exps with one work
buffer (:class:`MaskedLogSumExp`; :func:`stacked_lse` for several at once on 0/1 masks), the
masked softplus sum of the JS bound
and the fused small-batch path (:class:`FusedLoss`, :func:`fused`): a loss's value and
``dL/dS`` from one pass of plain tensor code, the backward pass one multiplication.

They are public so that a new loss -- here or in a user's project -- is written with the same
pieces as the shipped ones (:mod:`losses.functional`, :mod:`losses.pair_based`,
:mod:`losses.proxies`, :mod:`losses.bounds`); their semantics are the functional core's
(``docs/architecture.md``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.pairs import require_positives, require_terms, terms_flag

from . import native

NEG_INF = float("-inf")
POS_INF = float("inf")

#: the reductions every function takes; the triplet and contrastive losses also take "nonzero"
REDUCTIONS = ("mean", "sum", "none")
NONZERO = ("nonzero", *REDUCTIONS)


class NonFiniteScoresError(ValueError):
    """The score matrix holds NaN or Inf (:func:`prepare`); a ``ValueError``, so callers that
    catch that keep working, and its own type, so that a loss module can tell it apart and name
    the embeddings when they are the cause."""


def count_rows(mask: Tensor) -> Tensor:
    """``mask.sum(1)`` for a boolean ``[N, M]`` mask, as int32 (summing the bytes in int32 is
    ~15x faster on CPU than torch's bool -> int64 reduction)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32)


def as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask as 0/1 values of ``dtype``, through its bytes (about 3x faster on CPU than
    ``mask.to(dtype)``); multiplying by it is then several times faster than ``torch.where``
    on the mask."""
    return mask.view(torch.uint8).to(dtype)


def no_autocast(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` when autocast is on for that device, else
    a context that does nothing (cheaper than entering a disabled autocast): the losses and
    their critics compute in full precision (:func:`full_precision`)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def full_precision(x: Tensor) -> Tensor:
    """``x`` in float32 unless it is float32 or float64 already: the compute dtype of the
    losses (bf16 / fp16 inputs, e.g. from autocast, are widened; anything that is not a tensor
    passes through, for :func:`prepare` to refuse)."""
    if isinstance(x, Tensor) and x.dtype not in (torch.float32, torch.float64):
        return x.float()
    return x


def count(mask: Tensor) -> Tensor:
    """The number of entries of a boolean mask, as a 0-d tensor (no sync)."""
    return count_rows(mask).sum()


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    """``reduction`` if it is one of ``allowed``, else a ``ValueError`` naming them."""
    if reduction not in allowed:
        raise ValueError(
            f"reduction must be one of {', '.join(repr(r) for r in allowed)} (as torch's losses; "
            f"'nonzero' is the mean over the terms > 0), got {reduction!r}"
        )
    return reduction


def reduce_terms(terms: Tensor, reduction: str, count: Tensor | int | None = None) -> Tensor:
    """``"none"``: ``terms``; ``"sum"``: their sum; ``"mean"``: the sum over ``count`` (the number
    of terms that exist, at least 1; ``terms.numel()`` when None); ``"nonzero"``: the sum over
    the number of terms > 0 (0 when none), pytorch-metric-learning's ``AvgNonZeroReducer``."""
    if reduction == "none":
        return terms
    total = terms.sum()
    if reduction == "sum":
        return total
    if reduction == "nonzero":
        return total / (terms.detach() > 0).sum().clamp_min(1)
    if count is None:
        count = terms.numel()
    if isinstance(count, Tensor):
        return total / count.clamp_min(1)
    return total / max(int(count), 1)


def gate(x: Tensor, ok: Tensor) -> Tensor:
    """``x`` where ``ok`` (a 0-d or broadcastable bool tensor), else 0: the masked form of
    "no term, zero loss" (no branch on tensor data)."""
    return torch.where(ok, x, torch.zeros_like(x))


def prepare(scores: Tensor, positives: Tensor, negatives: Tensor | None, check: bool = True,
            terms: str | None = None, what: str = "this loss"):
    """Validate ``(S, P, Q)``; return S in float32 (float64 stays) and boolean masks. Shapes are
    always checked (static); with ``check`` also that the scores are finite and, when ``terms``
    names what the loss needs (:data:`contrastive.pairs.TERMS`), that the masks give ``what``
    a term (:class:`~contrastive.pairs.NoPairsError` otherwise). Both are one host read (one
    device sync on a GPU), not one per check."""
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(
            f"scores must be a 2-D tensor [N, M], got {getattr(scores, 'shape', type(scores))}"
        )
    if positives.shape != scores.shape:
        raise ValueError(
            f"positives has shape {tuple(positives.shape)} but scores {tuple(scores.shape)}; "
            "the masks must match the score matrix"
        )
    positives = positives if positives.dtype == torch.bool else positives.bool()
    if negatives is None:
        negatives = ~positives
    elif negatives.dtype != torch.bool:
        negatives = negatives.bool()
    if negatives.shape != scores.shape:
        raise ValueError(
            f"negatives has shape {tuple(negatives.shape)} but scores {tuple(scores.shape)}; "
            "the masks must match the score matrix"
        )
    scores = full_precision(scores)
    if check:
        check_values(scores, positives, negatives, terms, what)
    return scores, positives, negatives


def check_values(scores: Tensor, positives: Tensor, negatives: Tensor, terms: str | None,
                 what: str) -> Tensor | None:
    """:func:`prepare`'s checks in one host read (also the one-node lane's, :mod:`losses.lane`):
    the scores' sum (one reduction instead of an elementwise ``isfinite``: NaN/Inf propagate
    into it; an overflowing sum of finite scores is told apart by the exact check) and, with
    ``terms``, whether there is a term. Raises :class:`NonFiniteScoresError` or
    :class:`~contrastive.pairs.NoPairsError`. Returns the masks' stacked bytes
    ``[2, N, M]`` where it built them (``terms`` "both" or "any"), else None: the lane hands
    them to its kernel (:func:`sharing_stack`)."""
    total = scores.detach().sum()
    stacked = None
    if terms is None:
        value, present = float(total), True
    elif terms in ("both", "any") and plain_masks(positives, negatives) and positives.numel():
        # both masks' "any" in one reduction over their bytes, read with the sum (5 operations
        # instead of 9: at B = 128 each costs more than its arithmetic)
        stacked = torch.stack((positives, negatives)).view(torch.uint8)
        flags = stacked.amax((1, 2))
        value, has_p, has_q = torch.cat((total.view(1), flags)).tolist()
        present = (has_p and has_q) if terms == "both" else (has_p or has_q)
    else:
        value, present = torch.stack((total, terms_flag(terms, positives, negatives))).tolist()
    if not math.isfinite(value) and not bool(torch.isfinite(scores.detach()).all()):
        raise NonFiniteScoresError(
            "scores contain NaN or Inf; check the embeddings and the critic "
            "(temperature too small?)"
        )
    if not present:
        require_terms(terms, positives, negatives, what)  # raises, saying what is missing
    return stacked


class PosIndex(NamedTuple):
    """Positive pairs as indices: ``rows[t], cols[t]`` for t < #positives (row-major), and
    ``count[i] = |P_i|``."""

    rows: Tensor
    cols: Tensor
    count: Tensor


def positive_index(positives: Tensor, what: str | None) -> PosIndex | None:
    """The positive pairs as :class:`PosIndex`. A mask without a positive raises (the sampler
    hint, naming ``what``), or gives None with ``what=None``."""
    rows, cols = positives.nonzero(as_tuple=True)
    if rows.numel() == 0:
        if what is None:
            return None
        require_positives(positives, what)  # raises with the sampler hint
    if positives.is_cuda and positives.dtype == torch.bool:
        # a row sum: no sync (bincount sizes its output from a maximum it reads on the host)
        count = count_rows(positives).to(torch.int64)
    else:  # on the CPU bincount reads nothing it would not anyway, and is the cheaper pass
        count = torch.bincount(rows, minlength=positives.shape[0])
    return PosIndex(rows, cols, count)


def sparse_positives(positives: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`padded_positives` of the positives' index when they are few per anchor, else None:
    no positive at all, or an anchor whose positives fill more than a quarter of the columns
    (where an ``[N, k]`` index costs more than a pass over ``[N, M]``). The large-batch forms
    that take the positives by index (the mined multi-similarity, batch-hard triplets) ask
    it first."""
    pi = positive_index(positives, None)
    if pi is None:
        return None
    idx, valid = padded_positives(pi)
    return None if idx.shape[1] * 4 > positives.shape[1] else (idx, valid)


def padded_positives(pi: PosIndex) -> tuple[Tensor, Tensor]:
    """``idx [N, k]`` (k = max |P_i|) holding each anchor's positive columns, left-aligned, and
    ``valid [N, k]`` marking the real ones (padding points at column 0)."""
    n = pi.count.shape[0]
    k = int(pi.count.max())
    if pi.rows.numel() == n * k:  # every row has k positives (M per class): no padding, and the
        # row-major columns of ``nonzero`` are the index as they stand
        return pi.cols.view(n, k), torch.ones(n, k, dtype=torch.bool, device=pi.cols.device)
    starts = torch.cumsum(pi.count, 0) - pi.count
    slot = torch.arange(pi.rows.numel(), device=pi.rows.device) - starts[pi.rows]
    idx = torch.zeros(n, k, dtype=torch.long, device=pi.rows.device)
    idx[pi.rows, slot] = pi.cols
    valid = torch.arange(k, device=idx.device)[None, :] < pi.count[:, None]
    return idx, valid


def positive_sum(scores: Tensor, pi: PosIndex) -> Tensor:
    """``sum_{j in P_i} S_ij`` per anchor, from the positives' indices (no [N, M] temporary
    in the forward pass)."""
    return scores.new_zeros(scores.shape[0]).index_add(0, pi.rows, scores[pi.rows, pi.cols])


def masked_row_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``sum_{j : mask_ij} x_ij`` per row, from the mask (static shapes)."""
    return torch.where(mask, x, torch.zeros_like(x)).sum(1)


class MaskedLogSumExp(torch.autograd.Function):
    """``log sum_{keep} exp(x)`` along ``dim`` (rows) or over all entries (``dim=None``).

    One ``[N, M]`` work buffer: filled with the masked scores, shifted and exponentiated in
    place, and kept for the backward pass, whose gradient ``g * exp(x - lse)`` is then one
    multiplication. Double backward recomputes with differentiable operations.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor | None, dim: int | None):
        w = x.clone() if keep is None else x.masked_fill(~keep, NEG_INF)
        if dim is None:
            m = w.max()
        else:
            m = w.amax(dim=dim, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w.sub_(m).exp_()
        z = w.sum() if dim is None else w.sum(dim=dim, keepdim=True)
        out = m + z.log()
        out = out if dim is None else out.squeeze(dim)
        ctx.dim, ctx.keep, ctx.w, ctx.z = dim, keep, w, z
        ctx.save_for_backward(x, out)  # an output, so double backward sees its graph
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        dim = ctx.dim
        g = grad if dim is None else grad.unsqueeze(dim)
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            x, out = ctx.saved_tensors
            out = out.masked_fill(~torch.isfinite(out.detach()), 0.0)  # empty rows: -inf
            p = torch.exp(x - (out if dim is None else out.unsqueeze(dim)))
            if ctx.keep is not None:
                p = p.masked_fill(~ctx.keep, 0.0)
            return p * g, None, None
        z = ctx.z
        coef = torch.where(z > 0, g / torch.where(z > 0, z, torch.ones_like(z)), 0.0)
        return ctx.w * coef, None, None


def masked_lse(x: Tensor, keep: Tensor | None, dim: int | None) -> Tensor:
    if x.numel() == 0:  # no entry: -inf (of the reduced shape), still in the graph
        return (x.sum() if dim is None else x.sum(dim)) + NEG_INF
    return MaskedLogSumExp.apply(x, keep, dim)


class FusedLoss(torch.autograd.Function):
    """A loss whose value and gradient ``dL/dS`` come from one pass without autograd
    (``kernel(scores, *args, need_grad) -> (value, dS)``, plain tensor code under no_grad): the
    backward pass is then one multiplication, ``g * dS``, instead of one autograd node per
    elementwise operation -- at small batches that per-node cost, not the arithmetic, is most
    of a loss's time. Double backward (``create_graph=True``) recomputes the gradient from
    ``slow(scores, *args)``, the same loss written with differentiable operations."""

    @staticmethod
    def forward(ctx, scores: Tensor, kernel, slow, args: tuple):
        value, grad = run_kernel(kernel, scores, args, True)
        ctx.grad, ctx.slow, ctx.args = grad, slow, args
        ctx.save_for_backward(scores)
        return value

    @staticmethod
    def backward(ctx, g: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            (s,) = ctx.saved_tensors
            (gs,) = torch.autograd.grad(ctx.slow(s, *ctx.args), s, g, create_graph=True)
            return gs, None, None, None
        return ctx.grad * g, None, None, None


#: the largest score matrix (entries) the losses send through :class:`FusedLoss`: below it
#: the fixed cost per operation and per autograd node is most of a loss's time (B = 128:
#: 2-3x the score-matrix floor); above it the fused kernels' stacked ``[2, N, M]`` passes
#: (positives over the whole matrix, not by index) cost more than they save (measured on CPU,
#: B = 2048: Circle 1.14x -> 1.56x the floor, NCA 1.20x -> 1.57x), so the autograd forms run
FUSED_MAX_ENTRIES = 1 << 16


def fusable(scores: Tensor, positives: Tensor, negatives: Tensor | None, check: bool,
             reduction: str, max_entries: int | None = None) -> bool:
    """Whether a loss takes its fused small-batch path: checked eager call (``check``), a
    reduced loss, boolean masks and a score matrix of at most ``max_entries`` (None:
    :data:`FUSED_MAX_ENTRIES`; a loss whose kernel pays off further passes its own)."""
    limit = FUSED_MAX_ENTRIES if max_entries is None else max_entries
    return (check and reduction != "none" and 0 < scores.numel() <= limit
            and plain_masks(positives, negatives))


def fused(kernel, slow, scores: Tensor, *args) -> Tensor:
    """``kernel``'s loss of ``scores`` through :class:`FusedLoss` (its gradient only computed
    when ``scores`` needs one)."""
    if scores.requires_grad and torch.is_grad_enabled():
        return FusedLoss.apply(scores, kernel, slow, args)
    with torch.no_grad():
        return run_kernel(kernel, scores, args, False)[0]


def run_kernel(kernel, scores: Tensor, args: tuple, need_grad: bool,
               terms: str | None = "skip"):
    """``kernel(scores, *args, need_grad)`` (``args`` starting with the masks ``P, Q``), by its
    C form on a CPU where it has one (:mod:`losses.native`). ``terms``: the C kernel's check
    (:func:`native.run`; "skip": the caller has checked the scores and the masks). Where the C
    check refuses the batch, the torch kernel runs (its value then tells the caller)."""
    out = (native.run(kernel, scores, args[0], args[1], args[2:], need_grad, terms)
           if len(args) > 1 else None)
    return kernel(scores, *args, need_grad) if out is None or isinstance(out, int) else out


#: the exponent floor of :func:`stacked_lse`, just above ``log(finfo.tiny)``: ``exp`` of a
#: more negative number is a denormal, which x86 CPUs compute ~30x slower (measured: 32k
#: denormal results 880 us, normal ones 28 us; large scales -- multi-similarity's beta = 50,
#: Circle's gamma = 80 on its positives -- reach that range on spread-out scores), and a term
#: below ``exp(-87)`` of the row maximum changes no sum
EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def stacked_lse(x: Tensor, keep: Tensor, dim: int = -1, overwrite: bool = False):
    """``log sum_{keep} exp(x)`` along ``dim``, without autograd, the mask as 0/1 values
    ``keep`` (:func:`as_float`, :func:`stack_as_float`; ``x`` broadcasts to its shape). The
    dropped entries become ``x - finfo.max`` (one addition: a ``torch.where`` on a boolean mask
    costs several times more on CPU), the exponents are floored at :data:`EXP_FLOOR` (no
    denormal is computed). Returns ``(lse, e, m, z)``, all keeping the reduced dimension: ``m``
    the kept entries' maximum, ``e = exp(max(x - m, floor))`` on the kept entries and exactly 0
    on the dropped ones (a new buffer, or ``x`` itself with ``overwrite=True`` when it has
    ``keep``'s shape), ``z = sum e`` (taken before the zeroing: the dropped entries add
    ``exp(floor)`` each, which changes no sum of a row with a kept entry). A row has a kept
    entry exactly when ``z >= 1`` (its maximum gives ``exp(0)``); the softmax is ``e / z`` and
    ``d softplus(lse) / dx = e / (exp(-m) + z)``. A row without a kept entry has
    ``m = finfo.min / 2``, ``0 < z < 1`` and a hugely negative, finite ``lse``, whose softplus
    and sigmoid are exactly 0. For scores of magnitude below ``finfo.max / 2``."""
    big = torch.finfo(x.dtype).max
    off = keep - 1.0
    w = (x.add_(off, alpha=big) if overwrite and x.shape == off.shape
         else torch.add(x, off, alpha=big))
    m = w.amax(dim, keepdim=True).clamp_min_(-0.5 * big)
    e = w.sub_(m).clamp_min_(EXP_FLOOR.get(w.dtype, -87.0)).exp_()
    z = e.sum(dim, keepdim=True)
    return m + z.log(), e.mul_(keep), m, z


#: the masks' stacked bytes that :func:`check_values` built, while the one-node lane runs its
#: kernel on the same masks (:func:`sharing_stack`; per thread)
_SHARED = threading.local()


def stack_as_float(masks: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """Boolean masks stacked as ``[len(masks), N, M]`` 0/1 values (:func:`stacked_lse`'s
    ``keep`` for several log-sum-exps in one pass). Inside :func:`sharing_stack` for the very
    mask objects ``(P, Q)`` it was given, from the check's stacked bytes (one stack per call,
    not two)."""
    shared = getattr(_SHARED, "stack", None)
    if (shared is not None and len(masks) == 2 and masks[0] is shared[0]
            and masks[1] is shared[1]):
        return shared[2].to(dtype)
    return as_float(torch.stack(masks), dtype)


@contextlib.contextmanager
def sharing_stack(positives: Tensor, negatives: Tensor, stacked: Tensor | None):
    """While the block runs, :func:`stack_as_float` of exactly ``(positives, negatives)``
    converts ``stacked`` (their stacked bytes, :func:`check_values`'s return) instead of
    stacking them again. The lane's forward wraps its kernel call in it; with ``stacked``
    None it changes nothing."""
    previous = getattr(_SHARED, "stack", None)
    _SHARED.stack = None if stacked is None else (positives, negatives, stacked)
    try:
        yield
    finally:
        _SHARED.stack = previous


@functools.lru_cache(maxsize=256)
def const(values: tuple[float, ...], dtype: torch.dtype, device: torch.device,
          shape: tuple[int, ...] | None = None) -> Tensor:
    """A small constant tensor (viewed as ``shape``, e.g. ``(2, 1, 1)`` to broadcast over a
    stacked pass), made once per (values, dtype, device, shape): building one per call costs as
    much as an elementwise pass at small batches. Read only; never an inference tensor, so one
    made under ``torch.inference_mode`` serves training too."""
    with torch.inference_mode(False):
        t = torch.tensor(values, dtype=dtype, device=device)
    return t if shape is None else t.view(shape)


def plain_masks(positives: Tensor, negatives: Tensor | None) -> bool:
    """Whether ``(P, Q)`` are plain boolean masks (not a miner's integer counts)."""
    return positives.dtype == torch.bool and (negatives is None or negatives.dtype == torch.bool)


class MaskedSoftplusSum(torch.autograd.Function):
    """``sum_{keep} softplus(x)``. The forward pass uses ``max(x, 0) + log(1 + exp(-|x|))``
    in place (torch's CPU softplus and log1p are ~5x slower than this; the absolute error is
    below one float ulp of 1); the backward pass is ``g * sigmoid(x)`` on the kept entries."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor):
        t = x.abs().neg_().exp_().add_(1.0).log_()
        t.add_(x.clamp_min(0.0))
        t.masked_fill_(~keep, 0.0)
        ctx.save_for_backward(x, keep)
        return t.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, keep = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable
            return torch.sigmoid(x).masked_fill(~keep, 0.0) * grad, None
        return torch.sigmoid(x).masked_fill_(~keep, 0.0).mul_(grad), None


def masked_softplus_sum(x: Tensor, keep: Tensor) -> Tensor:
    return MaskedSoftplusSum.apply(x, keep)


def valid(positives: Tensor, negatives: Tensor) -> Tensor:
    return torch.logical_or(positives, negatives)


#: :func:`softplus`'s cut-off: above it ``softplus(z) = z`` to within ``exp(-40) = 4e-18``
SOFTPLUS_CUT = 40.0


def softplus(z: Tensor) -> Tensor:
    """``log(1 + exp(z))`` in one operation: torch's ``softplus`` with its linear cut-off moved
    from 20 (off by ~2e-9 there, visible in float64) to :data:`SOFTPLUS_CUT` (``exp(40)``
    still fits float32); below it ``log1p(exp(z))``, exact to a unit in the last place. One
    operation instead of the stable form's six (``max(z, 0) + log1p(exp(-|z|))``), which
    matters on the ``[N]`` vectors the kernels apply it to (docs/losses.md, "Fewer
    operations"). Other dtypes (``exp(40)`` overflows float16) take the stable form."""
    if z.dtype in (torch.float32, torch.float64):
        return F.softplus(z, threshold=SOFTPLUS_CUT)
    return z.clamp_min(0.0) + torch.log1p(torch.exp(-z.abs()))


def any_pair(positives: Tensor, negatives: Tensor) -> Tensor:
    """0-d bool: a positive and a negative somewhere in the batch (no sync)."""
    return positives.any() & negatives.any()
