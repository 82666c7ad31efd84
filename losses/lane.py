"""The small-batch lane of the loss modules: a plain call's normalising critic and fused loss
kernel in one autograd node.

At B = 128 on a CPU a loss's time is mostly the fixed cost of each tensor operation and of the
Python around it, not arithmetic (docs/losses.md, "Speed at small batches"). A plain call
``loss(embeddings, labels)`` of a module whose loss has a fused kernel
(:func:`losses.kernels.fused`) and whose critic scores the batch against itself through
:func:`contrastive.critics.unit_gram` goes straight from the embeddings to the kernel::

    S, state = unit_gram_forward(X)          # the critic's own forward, no autograd
    check(S, P, Q)                           # kernels.prepare's one host read
    L, dL/dS = kernel(S, P, Q, ...)          # the loss's fused kernel
    dL/dX = unit_gram_backward(dL/dS, state) # saved; backward: g * dL/dX

On a CPU, a kernel with a C form (:mod:`losses.native`) runs the check and the kernel in one
call instead (the same values to rounding; a batch its check refuses goes to ``check`` above,
which raises).

The operations are the general path's (the same critic, check and kernel); only the autograd
bookkeeping between them -- two nodes, the module's and the functional core's dispatch -- is
left out, so values and gradients are the general path's. A batch the check refuses
(non-finite scores, no term) leaves the lane, and the general path gives its warning or error.
Double backward recomputes through the general path.

A module takes the lane by returning its kernel from :meth:`losses.modules.PairLoss.lane_kernel`
(None: the general path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from contrastive.critics import (
    Cosine,
    NegativeL2,
    _unit_rows_backward,
    row_norms,
    unit_gram_backward,
    unit_gram_forward,
    unit_gram_sparse_backward,
)
from contrastive.pairs import NoPairsError

from . import kernels as K
from . import native as N

__all__ = ["CosineLane", "Lane", "is_sparse", "lane_critic", "lane_loss"]

#: the dtypes the lane computes in (others take the general path, which widens them)
_DTYPES = (torch.float32, torch.float64)


class Lane(torch.autograd.Function):
    """``kernel(unit_gram(X), P, Q, *args)`` in one node (see the module docstring).
    ``critic``: ``(kind, scale, alpha)`` of :func:`~contrastive.critics.unit_gram_forward`;
    ``loss``: ``(terms, kernel, args)``; ``general(X)``: the same loss through differentiable
    operations, for double backward."""

    @staticmethod
    def forward(ctx, x: Tensor, positives: Tensor, negatives: Tensor, critic: tuple,
                loss: tuple, general: Callable[[Tensor], Tensor]):
        terms, kernel, args = loss
        kind, scale, alpha = critic
        sparse = is_sparse(kernel)
        s, state = unit_gram_forward(x, scale, kind, alpha, dense=not sparse)
        # the kernel's C form (losses.native) checks in its first pass; where it finds a fault,
        # or there is none, the check below raises (the general path then) or the torch kernel
        # runs, with the masks' stacked bytes from the check
        out = N.run(kernel, s, positives, negatives, args, True, terms)
        if isinstance(out, int) or out is None:
            stacked = K.check_values(s, positives, negatives, terms, "")
            with K.sharing_stack(positives, negatives, stacked):
                out = kernel(s, positives, negatives, *args, True)
        value, ds = out
        gx = unit_gram_sparse_backward(ds, s, state) if sparse else unit_gram_backward(ds, state)
        ctx.general = general
        ctx.save_for_backward(x, gx)
        return value

    @staticmethod
    def backward(ctx, g: Tensor):
        x, gx = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            with torch.enable_grad():
                (gx,) = torch.autograd.grad(ctx.general(x), x, g, create_graph=True)
            return gx, None, None, None, None, None
        return gx * g, None, None, None, None, None


class CosineLane(torch.autograd.Function):
    """``kernel(cos(a_i, b_j) s, P, Q, *args)`` of a batch against a second set ``b`` (e.g. a
    proxy loss's learnable proxies) in one node, both gradients taken in the forward pass: the
    fixed-temperature ``Cosine`` critic's operations (:func:`~contrastive.critics.row_norms`,
    the quotients, ``(a s) b^T``) and the same backward formulas as its autograd path
    (``unit_rows``' one-step normalisation gradient, the product's two gradients). No check:
    the caller reads the value (a non-finite value sends it the general way).
    ``forward(a, b, positives, negatives, scale, kernel, args, general)``; ``general(a, b)``
    the same loss through differentiable operations, for double backward."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, positives: Tensor, negatives: Tensor,
                scale: Tensor | None, kernel, args: tuple, general):
        na, small_a = row_norms(a)
        nb, small_b = row_norms(b)
        an, bn = a / na, b / nb
        scaled = an if scale is None else an * scale
        # the C kernel where it has one, checking only for finite scores (a non-finite batch
        # takes the torch kernel, whose value the caller reads)
        value, ds = K.run_kernel(kernel, scaled @ bn.T, (positives, negatives, *args), True,
                                 None)
        ga = ds @ bn
        if scale is not None:
            ga.mul_(scale)
        ga = _unit_rows_backward(ga, an, na, small_a, inplace=True)
        gb = _unit_rows_backward(ds.T @ scaled, bn, nb, small_b, inplace=True)
        ctx.general = general
        ctx.save_for_backward(a, b, ga, gb)
        return value

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b, ga, gb = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            wrt = [t for t, need in zip((a, b), needs, strict=True) if need]
            with torch.enable_grad():
                grads = iter(torch.autograd.grad(ctx.general(a, b), wrt, g, create_graph=True))
            return (*(next(grads) if need else None for need in needs), *(None,) * 6)
        return (ga * g if needs[0] else None, gb * g if needs[1] else None, *(None,) * 6)


def is_sparse(kernel) -> bool:
    """Whether a lane kernel gives its ``dL/dS`` as :class:`~contrastive.critics.SparseRows`
    (a function attribute ``sparse = True``): the lane then takes the critic's sparse backward
    (no ``[N, N]`` product), without the dense kernels' size limit."""
    return bool(getattr(kernel, "sparse", False))


def lane_critic(critic, dtype: torch.dtype) -> tuple | None:
    """``(kind, scale, alpha)`` of :func:`~contrastive.critics.unit_gram_forward` for the
    critics the lane computes (a fixed-temperature ``Cosine``; ``NegativeL2(normalize=True)``,
    squared or not), else None."""
    if type(critic) is Cosine:
        if critic.log_inv_t.requires_grad:
            return None
        return ("cosine", *critic.scale_and_value(dtype))
    if type(critic) is NegativeL2 and critic.normalize:
        return ("l2sq" if critic.squared else "l2", None, None)
    return None


def lane_loss(x: Tensor, positives: Tensor, negatives: Tensor, critic, terms: str,
              kernel: tuple, general: Callable[[Tensor], Tensor]) -> Tensor | None:
    """The loss of ``x`` against itself, with the label masks of
    :func:`~contrastive.pairs.label_masks` (a self-reference :class:`~contrastive.pairs.Pairs`),
    through :class:`Lane`, or None where the lane does not apply: no gradient wanted, not a
    2-D floating-point batch, under ``torch.compile``, more than ``kernels.FUSED_MAX_ENTRIES``
    scores for a kernel with a dense ``dL/dS`` (where the kernels give way to autograd forms;
    a sparse one, :func:`is_sparse`, has no limit), a critic the lane does not compute
    (:func:`lane_critic`), or a batch the check refuses (non-finite scores, no term: the
    general path gives the error or the warning). Under autocast it computes as the general
    path does: autocast off for the device, bf16 / fp16 embeddings widened to float32 (the
    widening in the graph, so their gradient comes back in their dtype)."""
    limit = None if is_sparse(kernel[0]) else K.FUSED_MAX_ENTRIES
    if not (x.requires_grad and torch.is_grad_enabled() and x.dim() == 2
            and x.is_floating_point() and x.shape[0] > 0
            and (limit is None or x.shape[0] ** 2 <= limit)):
        return None
    if torch.compiler.is_compiling():
        return None
    # the masks are label masks of the batch against itself (the modules take the lane only
    # for a Pairs with self_reference): a triplet somewhere exactly when a positive pair and a
    # negative pair, which the check reads in one reduction over both masks
    terms = "both" if terms == "triplet" else terms
    with K.no_autocast(x.device.type):
        x = K.full_precision(x)
        spec = lane_critic(critic, x.dtype)
        if spec is None or x.dtype not in _DTYPES:
            return None
        try:
            return Lane.apply(x, positives, negatives, spec, (terms, *kernel), general)
        except (K.NonFiniteScoresError, NoPairsError):
            return None
