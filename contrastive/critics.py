"""Critics: functions ``f(a_i, b_j)`` that map anchors ``a [N, d]`` and candidates ``b [M, d']`` to
a score matrix ``S [N, M]``, higher meaning more similar.

The critics are the ones studied by Tschannen et al. (ICLR 2020, sec. 3.2) plus the similarity
functions of deep metric learning:

============================  =================================  ==============================
critic                        ``S_ij``                           note
============================  =================================  ==============================
``Dot()``                     ``a_i . b_j``                      separable; multi-class N-pair
``Cosine(temperature)``       ``cos(a_i, b_j) / t``              NT-Xent / SupCon
``NegativeL2(squared)``       ``-||a_i - b_j||`` (or squared)    turns distance losses into scores
``Bilinear(dim)``             ``a_i^T W b_j``                    the paper's bilinear critic
``Separable(...)``            ``g(a_i) . h(b_j)``, MLPs g, h     the paper's separable critic
``Concat(...)``               ``MLP([a_i ; b_j])`` on all pairs  the paper's "MLP" critic
============================  =================================  ==============================
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry
from .validation import check_positive_int, check_temperature

__all__ = [
    "Critic",
    "Dot",
    "Cosine",
    "NegativeL2",
    "Bilinear",
    "Separable",
    "Concat",
    "mlp",
    "CRITICS",
    "get",
    "create",
    "available",
]


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int, activation=nn.ReLU
) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden_dim`` with ``activation``, then a linear map to
    ``out_dim`` (``layers=0`` is a single linear map)."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden_dim), activation()]
        width = hidden_dim
    mods.append(nn.Linear(width, out_dim))
    return nn.Sequential(*mods)


class Critic(nn.Module):
    """Base class. ``is_distance`` marks critics whose score is a negated distance, so that
    margin losses can take their margins in distance units. ``propagates_nonfinite`` marks
    critics for which a NaN or Inf anywhere in ``a`` or ``b`` makes some score NaN or Inf
    (products and sums of every entry: ``inf * 0`` is NaN, ``inf / inf`` is NaN), so that a
    loss's one finiteness read of the scores also stands for the embeddings' (the loss modules
    then name the embeddings only when the scores are not finite); False for a critic that may
    map a non-finite input to a finite score (e.g. through ``tanh``)."""

    is_distance: bool = False
    propagates_nonfinite: bool = False

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Dot(Critic):
    """``S_ij = a_i . b_j``: the separable critic of the multi-class N-pair loss (Sohn, 2016)."""

    propagates_nonfinite = True

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a @ b.T


#: ``F.normalize``'s default floor on the norm
NORM_EPS = 1e-12


def row_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """``F.normalize(x, dim=1)``'s divisor ``n = max(||x_i||, eps)`` ``[N, 1]`` and ``small``,
    the rows whose norm is below ``eps`` (where the clamp holds it, so its gradient passes
    no projection)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return norm.clamp_min(NORM_EPS), norm < NORM_EPS


def _unit_rows_backward(g: Tensor, y: Tensor, n: Tensor, small: Tensor,
                        inplace: bool = False) -> Tensor:
    """``dL/dx = (g - y (g . y)) / n`` of ``y = x / n`` (:func:`row_norms`) from ``g = dL/dy``,
    without the projection on the ``small`` rows (the clamp passes ``g / eps`` there); in
    place on ``g`` when it is a buffer of the caller's."""
    dot = row_dot(g, y).masked_fill_(small, 0.0)
    out = g.addcmul_(y, dot, value=-1.0) if inplace else torch.addcmul(g, y, dot, value=-1.0)
    return out.div_(n)


#: up to this many rows :func:`row_dot` multiplies and sums (two operations, no batched
#: product's views; measured on CPU, d = 128: 5 against 10 us at N = 128, 25 against 51 at
#: 1024); above it the ``[N, d]`` product's temporary costs more (306 against 219 us at 4096)
ROW_DOT_MAX_ROWS = 2048


def row_dot(g: Tensor, y: Tensor) -> Tensor:
    """``(g_i . y_i)`` per row, ``[N, 1]``."""
    if g.shape[0] <= ROW_DOT_MAX_ROWS:
        return (g * y).sum(1, keepdim=True)
    return torch.bmm(g.unsqueeze(1), y.unsqueeze(2)).squeeze(2)


class _UnitRows(torch.autograd.Function):
    """``F.normalize(x, dim=1)``, ``y = x / max(||x||, eps)`` (the same operations), with the
    backward pass in one step::

        dL/dx = (g - y (g . y)) / max(||x||, eps)

    (no projection on rows whose norm is below ``eps``, where the clamp passes ``g / eps``):
    autograd's chain through ``F.normalize`` runs about ten operations for it, most of the
    normalisation's cost at small batches. Double backward recomputes through ``F.normalize``.
    """

    @staticmethod
    def forward(ctx, x: Tensor):
        n, small = row_norms(x)
        y = x / n
        ctx.save_for_backward(x, y, n, small)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y, n, small = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            (gx,) = torch.autograd.grad(F.normalize(x, dim=1), x, g, create_graph=True)
            return gx
        return _unit_rows_backward(g, y, n, small)


class _UnitGram(torch.autograd.Function):
    """A critic's self-scores, ``S = f(G)`` with ``G = Y Y^T`` and ``Y = unit_rows(X)``, in one
    node whose backward pass uses that ``G`` is symmetric::

        dL/dY = (H + H^T) Y,   H = f'(G) * dL/dS,
        dL/dX = (dL/dY - Y (dL/dY . Y)) / max(||X||, eps)

    one matrix product instead of two, and no autograd chain through the normalisation. ``f``:
    ``"cosine"``, ``S = (s Y) Y^T`` (a fixed 0-d scale ``s = 1/t``); ``"l2"``,
    ``S = -sqrt(max(2 - 2G, 0))`` (gradient 0 where the distance is 0); ``"l2sq"``,
    ``S = -(2 - 2G)``. The forward operations are the plain critics', so the values are theirs.
    Double backward recomputes through the plain operations."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, kind: str, alpha: float | None = None):
        s, state = unit_gram_forward(x, scale, kind, alpha)
        ctx.kind = kind
        ctx.save_for_backward(x, *state.tensors())
        ctx.alpha = alpha
        return s

    @staticmethod
    def backward(ctx, g: Tensor):
        x, scale, y, n, small, inv = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            (gx,) = torch.autograd.grad(_unit_gram_plain(x, scale, ctx.kind), x, g,
                                        create_graph=True)
            return gx, None, None, None
        state = UnitGramState(ctx.kind, scale, ctx.alpha, y, n, small, inv)
        return unit_gram_backward(g, state), None, None, None


class UnitGramState(NamedTuple):
    """What :func:`unit_gram_backward` needs of :func:`unit_gram_forward`: the kind, the scale
    (and its float ``alpha``), the unit rows ``Y``, their divisors ``n``, the rows below
    ``eps`` and, for ``"l2"``, ``dS/dG``."""

    kind: str
    scale: Tensor | None
    alpha: float | None
    y: Tensor
    n: Tensor
    small: Tensor
    inv: Tensor | None

    def tensors(self) -> tuple:
        return self.scale, self.y, self.n, self.small, self.inv


def unit_gram_forward(x: Tensor, scale: Tensor | None, kind: str,
                      alpha: float | None = None,
                      dense: bool = True) -> tuple[Tensor, UnitGramState]:
    """:class:`_UnitGram`'s scores without autograd, and the state of its gradient
    (:func:`unit_gram_backward`): for a loss that takes the critic's gradient itself
    (:mod:`losses.lane`). ``dense=False``: the gradient will come from a few entries per row
    (:func:`unit_gram_sparse_backward`), so the ``"l2"`` critic's ``[N, N]`` inverse distance
    is not computed."""
    n, small = row_norms(x)
    y = x / n
    inv = None
    if kind == "cosine":
        s = y @ y.T if scale is None else (y * scale) @ y.T
    else:
        s = _two_minus_twice(y, y).clamp_(min=0.0)
        if kind == "l2":
            if dense:
                inv = _inverse_distance(s)
            s.sqrt_()
        s.neg_()
    return s, UnitGramState(kind, scale, alpha, y, n, small, inv)


class SparseRows(NamedTuple):
    """A ``dL/dS`` with a few entries per row: row ``i`` holds ``vals[i, c]`` at column
    ``cols[i, c]`` (``[N, c]`` each; a column may repeat, its values then add). A loss whose
    gradient touches a few pairs per anchor (batch-hard triplets: its hardest positive and
    negative) returns it, and :func:`unit_gram_sparse_backward` goes from it to ``dL/dX``
    without an ``[N, N]`` matrix or a product over it."""

    cols: Tensor
    vals: Tensor


def unit_gram_sparse_backward(g: SparseRows, s: Tensor, state: UnitGramState) -> Tensor:
    """``dL/dX`` from a sparse ``dL/dS`` (:class:`SparseRows`) of :func:`unit_gram_forward`'s
    scores ``s``: :func:`unit_gram_backward`'s formula on the listed entries only. With
    ``c_ij = dL/dS_ij dS/dG_ij`` (``G = Y Y^T``; ``dS/dG`` is the scale for the cosine, 2 for
    the squared distance, ``-1/S`` -- 0 where ``S = 0`` -- for the distance),
    ``dL/dY_i = sum_j c_ij Y_j`` over row ``i``'s entries plus ``sum c_ji Y_j`` over the
    entries in column ``i`` (an ``index_add``), then the normalisation's backward. O(N d) for
    a few entries per row, against the dense form's two ``[N, N] x [N, d]`` products."""
    kind, scale, alpha, y, n, small, _ = state
    cols, vals = g
    if kind == "cosine":
        c = vals if scale is None else vals * (alpha if alpha is not None else scale)
    elif kind == "l2":
        c = vals * _infinities_to_zero_(torch.reciprocal(s.gather(1, cols).neg_()))
    else:
        c = vals * 2.0
    rows_y = y.index_select(0, cols.reshape(-1)).view(*cols.shape, y.shape[1])
    # sum_j c_ij Y_j as a product and a sum (a batched product of [1, c] x [c, d] matrices
    # costs ten times more on CPU: 52 against 5 us at N = 128)
    gy = rows_y.mul_(c.unsqueeze(2)).sum(1)
    gy.index_add_(0, cols.reshape(-1), (c.unsqueeze(2) * y.unsqueeze(1)).view(-1, y.shape[1]))
    return _unit_rows_backward(gy, y, n, small, inplace=True)


def unit_gram_backward(g: Tensor, state: UnitGramState) -> Tensor:
    """``dL/dX`` from ``g = dL/dS`` (:class:`_UnitGram`'s formula)."""
    kind, scale, alpha, y, n, small, inv = state
    if kind == "cosine":
        if scale is None or alpha is not None:  # the scale in the product
            gy = symmetric_product(g, y, 1.0 if scale is None else alpha)
        else:
            gy = symmetric_product(g, y).mul_(scale)
    elif kind == "l2":  # dS/dG = -1/S, 0 at S = 0
        gy = symmetric_product(g * inv, y)
    else:  # "l2sq": dS/dG = 2
        gy = symmetric_product(g, y, 2.0)
    return _unit_rows_backward(gy, y, n, small, inplace=True)


@functools.lru_cache(maxsize=32)
def _two(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The constant 2 (0-d), made once per dtype and device (read only; never an inference
    tensor)."""
    with torch.inference_mode(False):
        return torch.tensor(2.0, dtype=dtype, device=device)


def _two_minus_twice(a: Tensor, b: Tensor) -> Tensor:
    """``2 - 2 a b^T`` (the squared distance of unit rows) as one ``addmm``: bit-equal to the
    product, its doubling and the addition in three operations (measured, float32 and
    float64), and one operation instead of three."""
    return torch.addmm(_two(a.dtype, a.device), a, b.T, alpha=-2.0)


def _inverse_distance(sq: Tensor) -> Tensor:
    """``dS/dG = -1/S = 1/sqrt(sq)`` of ``S = -sqrt(sq)``, ``sq = max(2 - 2G, 0)``, and 0 where
    the distance is 0 (a subgradient: the diagonal, duplicates): ``rsqrt`` gives +inf exactly
    there (``sq`` is otherwise at least the type's resolution), which ``nan_to_num_`` zeroes;
    a NaN stays NaN. Computed in the forward pass (two passes), it leaves the backward pass one
    multiplication instead of ``-g / S`` with an ``==`` and a ``masked_fill_`` on a boolean
    mask (25 us of a B = 128 pass on CPU; all-triplets at B = 1024 about 4% faster)."""
    return _infinities_to_zero_(torch.rsqrt(sq))


def _infinities_to_zero_(t: Tensor) -> Tensor:
    """``t`` with its +-inf set to 0 in place, a NaN kept: the subgradient 0 of a distance's
    reciprocal where the distance is exactly 0."""
    return t.nan_to_num_(nan=float("nan"), posinf=0.0, neginf=0.0)


#: above this many rows, :func:`symmetric_product` lets the matrix product read ``H^T``
#: instead of adding ``H + H^T``: that sum reads one operand down its columns, which misses the
#: cache once ``H`` outgrows it (measured on CPU, one thread: N = 1024, 8.8 ms against 3.4 ms;
#: N = 4096, 247 ms against 69 ms; at N <= 512 the sum is about 15% faster)
SYMMETRIC_SUM_MAX_ROWS = 511


def symmetric_product(h: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
    """``alpha (H + H^T) Y`` for a square ``H [N, N]``: the sum, then one product, for small
    ``N`` (``alpha`` in the product: ``addmm``'s ``beta = 0`` ignores its first argument, so
    the scale costs no operation of its own); ``H Y + H^T Y`` above
    :data:`SYMMETRIC_SUM_MAX_ROWS` rows (the second product reads ``H`` transposed, which BLAS
    does at no extra cost)."""
    if h.shape[0] <= SYMMETRIC_SUM_MAX_ROWS:
        if alpha == 1.0:
            return torch.mm(h + h.T, y)
        return torch.addmm(y, h + h.T, y, beta=0.0, alpha=alpha)
    out = torch.addmm(torch.mm(h, y), h.T, y)
    return out if alpha == 1.0 else out.mul_(alpha)


def _unit_gram_plain(x: Tensor, scale: Tensor | None, kind: str) -> Tensor:
    """:class:`_UnitGram` as plain differentiable operations."""
    y = F.normalize(x, dim=1)
    if kind == "cosine":
        return y @ y.T if scale is None else (y * scale) @ y.T
    return _negative_l2_plain(y, y, kind == "l2sq", True)


def _plain(x: Tensor) -> bool:
    """Whether the normalising critics take plain operations for ``x`` instead of a fused
    autograd Function: under ``torch.compile``, for inputs without a gradient, and under
    autocast for ``x``'s device (autocast then picks each operation's dtype, as for the plain
    critics; the Functions would save rows in one dtype and get gradients in another)."""
    return (_compiling() or x.dim() != 2 or not (x.requires_grad and torch.is_grad_enabled())
            or torch.is_autocast_enabled(x.device.type))


def unit_gram(x: Tensor, kind: str, scale: Tensor | None = None,
              alpha: float | None = None) -> Tensor:
    """A normalising critic's scores of a batch against itself (see :class:`_UnitGram`):
    ``"cosine"`` (``scale`` a fixed 0-d tensor; ``alpha``, when given, its value as a float,
    which the backward pass then takes into its matrix product), ``"l2"`` or ``"l2sq"``. Plain
    operations under ``torch.compile``, under autocast, without a gradient, or when ``scale``
    needs a gradient itself."""
    if _plain(x) or (scale is not None and scale.requires_grad):
        return _unit_gram_plain(x, scale, kind)
    return _UnitGram.apply(x, scale, kind, alpha)


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, ``F.normalize(x, dim=1)`` with a one-step backward pass
    (:class:`_UnitRows`); plain ``F.normalize`` under ``torch.compile``, under autocast and
    for inputs without a gradient."""
    if _plain(x):
        return F.normalize(x, dim=1)
    return _UnitRows.apply(x)


class Cosine(Critic):
    """``S_ij = cos(a_i, b_j) / t``: the critic of NT-Xent (Chen et al., 2020) and SupCon
    (Khosla et al., 2020). ``learnable=True`` learns ``log(1/t)`` as in CLIP.

    A fixed temperature is kept in float64 so float64 inputs get ``1/t`` to full precision; the
    scale multiplies the ``[N, d]`` normalised anchors, not the ``[N, M]`` score matrix.
    """

    propagates_nonfinite = True

    def __init__(self, temperature: float = 0.1, learnable: bool = False):
        super().__init__()
        t = check_temperature(temperature)
        init = torch.tensor(-math.log(t), dtype=torch.float64)
        if learnable:
            self.log_inv_t = nn.Parameter(init.float())
        else:
            self.register_buffer("log_inv_t", init)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_inv_t.detach()))

    def _apply(self, fn, recurse=True):
        """Module casts (``.half()``, ``.float()``, ``.to(dtype)``) move a fixed temperature's
        buffer to the new device but keep it in float64: it is a setting, not a weight (as the
        Python float of pytorch-metric-learning's losses), and each call casts the scale to
        the inputs' type. A learnable temperature is a parameter and is cast with the rest."""
        fixed = None if isinstance(self.log_inv_t, nn.Parameter) else self.log_inv_t
        out = super()._apply(fn, recurse)
        if fixed is not None and self.log_inv_t.dtype != fixed.dtype:
            self.log_inv_t = fixed.to(device=self.log_inv_t.device)
        return out

    def scale(self, dtype: torch.dtype) -> Tensor | None:
        """``1/t`` as a 0-d tensor of ``dtype``, or None for a fixed temperature of exactly 1
        (nothing to multiply). A fixed temperature's is made once per (buffer, dtype) and
        reused until the buffer changes (its version counter: an in-place write, e.g.
        ``load_state_dict``, makes a new one): two operations fewer per call, about 3% of a
        B = 128 InfoNCE pass on CPU, and two more at ``t = 1``. A learnable one is computed
        in the graph."""
        return self.scale_and_value(dtype)[0]

    def scale_and_value(self, dtype: torch.dtype) -> tuple[Tensor | None, float | None]:
        """:meth:`scale` and, for a fixed temperature, its value as a Python float (read once
        per cache entry; :func:`unit_gram` takes it into its backward product)."""
        t = self.log_inv_t
        if t.requires_grad or _compiling():
            return t.exp().to(dtype), None
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] is not t or cached[1] != t._version:
            cached = (t, t._version, {})  # a new buffer, or one written in place
            self.__dict__["_scale_cache"] = cached
        entry = cached[2].get(dtype)
        if entry is None:
            with torch.inference_mode(False), torch.no_grad():  # usable by any later call
                scale = t.exp().to(dtype)
                value = float(scale)  # one host read per buffer version and dtype
                entry = (None if value == 1.0 else scale, value)
            cached[2][dtype] = entry
        return entry

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if b is a:
            return unit_gram(a, "cosine", *self.scale_and_value(a.dtype))
        an, bn = unit_rows(a), unit_rows(b)
        scale = self.scale(an.dtype)
        return (an if scale is None else an * scale) @ bn.T

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}"


class _NegativeL2Scores(torch.autograd.Function):
    """``S = -||a_i - b_j||`` (or its square) from one matrix product, computed in place.

    ``unit=True`` means the rows of ``a`` and ``b`` have norm 1, so ``||a - b||^2 = 2 - 2 a.b``.
    The backward pass maps ``dL/dS`` to ``dL/d(a.b)`` with one elementwise pass and two matrix
    products; where the distance is 0 (duplicates, the diagonal) the gradient is 0, not NaN.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, squared: bool, unit: bool):
        if unit:
            s = _two_minus_twice(a, b)
        else:
            s = (a @ b.T).mul_(-2.0)
            s.add_((a * a).sum(1, keepdim=True)).add_((b * b).sum(1)[None, :])
        s.clamp_(min=0.0)
        if a is b and not unit:
            # a row's distance to itself: 0, not the expansion's rounding residue, which grows
            # with the norm (|a|^2 eps: 0.03 at norm 100 in float32, after the square root)
            s.diagonal().zero_()
        if not squared:
            s.sqrt_()
        s.neg_()
        ctx.squared, ctx.unit = squared, unit
        ctx.save_for_backward(a, b, s)
        return s

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, b, s = ctx.saved_tensors
        # dL/dsq: squared -> -g ; else S = -sqrt(sq), dS/dsq = 1 / (2 S); 0 where S = 0
        if torch.is_grad_enabled():  # create_graph=True: differentiable, out of place
            if ctx.squared:
                gsq = torch.where(s < 0, -grad, 0.0)
            else:
                neg = s < 0
                gsq = torch.where(neg, grad / (2.0 * torch.where(neg, s, -1.0)), 0.0)
        elif ctx.squared:  # one temporary
            gsq = grad.neg().masked_fill_(s == 0, 0.0)
        else:  # g / (2 S), 0 where S = 0: 1 / S is +-inf exactly there (|S| is otherwise at
            # least the square root of the type's resolution), which nan_to_num_ zeroes, and a
            # NaN stays NaN; cheaper on CPU than an == and a masked_fill_ (about half at
            # [128, 4096])
            gsq = _infinities_to_zero_(torch.reciprocal(s)).mul_(grad).mul_(0.5)
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = gsq @ b
            ga = -2.0 * ga if ctx.unit else 2.0 * (a * gsq.sum(1, keepdim=True) - ga)
        if ctx.needs_input_grad[1]:
            gb = gsq.T @ a
            gb = -2.0 * gb if ctx.unit else 2.0 * (b * gsq.sum(0)[:, None] - gb)
        return ga, gb, None, None


class NegativeL2(Critic):
    """``S_ij = -||a_i - b_j||`` (``squared=True``: ``-||a_i - b_j||^2``), optionally on
    L2-normalised rows (``normalize=True``, the usual metric-learning setting).

    One matrix product and in-place elementwise work (a fused autograd function); the gradient
    at zero distance is 0. ``normalize=True`` takes the normalised rows to have norm 1,
    ``||a - b||^2 = 2 - 2 a.b``: a row whose norm is below ``F.normalize``'s ``eps`` (1e-12; a
    zero row) is at distance sqrt(2) from every row, where pytorch-metric-learning's
    ``LpDistance(normalize_embeddings=True)`` (``cdist`` on the normalised rows) gives 1 from
    unit rows and 0 between two such rows. Exact handling would cost every call several
    elementwise passes (measured: 9 more operations per forward+backward on a batch against
    itself, 22 against a second set); an encoder whose output row is zero has collapsed anyway.
    """

    propagates_nonfinite = True

    is_distance = True

    def __init__(self, squared: bool = False, normalize: bool = False):
        super().__init__()
        self.squared = squared
        self.normalize = normalize

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.normalize and b is a:
            return unit_gram(a, "l2sq" if self.squared else "l2")
        if self.normalize:
            an = unit_rows(a)
            a, b = an, (an if b is a else unit_rows(b))
        # plain operations under torch.compile (the fused Function breaks the graph when given
        # one tensor twice) and under autocast (it picks the dtypes, as for the plain critics)
        if _compiling() or torch.is_autocast_enabled(a.device.type):
            return _negative_l2_plain(a, b, self.squared, self.normalize)
        return _NegativeL2Scores.apply(a, b, self.squared, self.normalize)

    def extra_repr(self) -> str:
        return f"squared={self.squared}, normalize={self.normalize}"


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _negative_l2_plain(a: Tensor, b: Tensor, squared: bool, unit: bool) -> Tensor:
    """:class:`_NegativeL2Scores` as plain differentiable tensor code (what ``torch.compile``
    traces): the same expansion, and a zero (not NaN) gradient where the distance is 0."""
    ab = a @ b.T
    if unit:
        sq = 2.0 - 2.0 * ab
    else:
        sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * ab
    sq = sq.clamp_min(0.0)
    if a is b and not unit:  # a row's distance to itself: 0, as in the fused form
        sq = sq.diagonal_scatter(sq.new_zeros(sq.shape[0]))
    if squared:
        return -sq
    # ``sq == 0``, not ``sq > 0``: a NaN distance (a NaN or Inf embedding) stays NaN, as in
    # the fused forms, instead of reading as the distance 0
    return -torch.where(sq == 0, torch.zeros_like(sq), sq.clamp_min(1e-30).sqrt())


class Bilinear(Critic):
    """``S_ij = a_i^T W b_j`` with ``W [dim, dim_b]`` (Tschannen et al. 2020, bilinear critic).

    ``init="identity"`` starts as the dot critic; ``"random"`` uses Glorot-uniform like the
    paper's TensorFlow code.
    """

    propagates_nonfinite = True

    def __init__(self, dim: int, dim_b: int | None = None, init: str = "identity"):
        super().__init__()
        dim = check_positive_int(dim, "dim")
        dim_b = dim if dim_b is None else check_positive_int(dim_b, "dim_b")
        self.weight = nn.Parameter(torch.empty(dim, dim_b))
        if init == "identity":
            with torch.no_grad():
                self.weight.zero_()
                k = min(dim, dim_b)
                self.weight[:k, :k] = torch.eye(k)
        elif init == "random":
            nn.init.xavier_uniform_(self.weight)
        else:
            raise ValueError(f"init must be 'identity' or 'random', got {init!r}")

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[1] != self.weight.shape[0] or b.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"Bilinear critic expects inputs of dims {tuple(self.weight.shape)}, got "
                f"{a.shape[1]} and {b.shape[1]}; set dim (and dim_b) to the embedding sizes"
            )
        return (a @ self.weight) @ b.T


class Separable(Critic):
    """``S_ij = g(a_i) . h(b_j)`` with MLPs ``g`` and ``h`` (Tschannen et al. 2020, separable
    critic: ``layers`` hidden layers of ``hidden_dim``, output ``out_dim``)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 100,
        out_dim: int = 100,
        layers: int = 1,
        in_dim_b: int | None = None,
    ):
        super().__init__()
        in_dim = check_positive_int(in_dim, "in_dim")
        self.g = mlp(in_dim, hidden_dim, out_dim, layers)
        self.h = mlp(in_dim if in_dim_b is None else in_dim_b, hidden_dim, out_dim, layers)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.g(a) @ self.h(b).T


class Concat(Critic):
    """``S_ij = MLP([a_i ; b_j])`` on every pair (Tschannen et al. 2020, the "MLP"/concat critic).

    The first layer is split, ``W [a; b] = W_a a + W_b b``, so it costs two small matrix products;
    the rest of the MLP runs on rows of anchors in chunks of ``chunk_size`` pairs so that memory is
    bounded by ``chunk_size * hidden_dim`` whatever ``N x M`` is.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 200,
        layers: int = 1,
        in_dim_b: int | None = None,
        chunk_size: int = 1 << 20,
    ):
        super().__init__()
        in_dim = check_positive_int(in_dim, "in_dim")
        layers = check_positive_int(layers, "layers")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self.first_a = nn.Linear(in_dim, hidden_dim)
        self.first_b = nn.Linear(in_dim if in_dim_b is None else in_dim_b, hidden_dim, bias=False)
        self.rest = mlp(hidden_dim, hidden_dim, 1, layers - 1)
        self.act = nn.ReLU()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ha, hb = self.first_a(a), self.first_b(b)
        rows = max(1, self.chunk_size // max(1, b.shape[0]))
        out = []
        for start in range(0, a.shape[0], rows):
            h = self.act(ha[start : start + rows, None, :] + hb[None, :, :])
            out.append(self.rest(h).squeeze(-1))
        return torch.cat(out, dim=0)


#: The critics by name. ``meta["size"]`` names the constructor argument that takes the embedding
#: size (``None``: the critic has no parameters that depend on it); :func:`create` fills it in.
CRITICS: Registry[Critic] = Registry("critic")
CRITICS.register("dot", Dot, meta={"size": None, "separable": True})
CRITICS.register("cosine", Cosine, meta={"size": None, "separable": True})
CRITICS.register("negative_l2", NegativeL2, aliases=("l2",), meta={"size": None,
                                                                    "separable": False})
CRITICS.register("bilinear", Bilinear, meta={"size": "dim", "separable": True})
CRITICS.register("separable", Separable, meta={"size": "in_dim", "separable": True})
CRITICS.register("concat", Concat, aliases=("mlp",), meta={"size": "in_dim", "separable": False})


def available() -> list[str]:
    """Names accepted by :func:`get` and :func:`create` (canonical names and aliases)."""
    return sorted([*CRITICS.available(), *CRITICS.aliases()])


def get(name: str, **kwargs) -> Critic:
    """Build a critic by name, e.g. ``get("cosine", temperature=0.1)``."""
    return CRITICS.create(name, **kwargs)


def create(name: str, embedding_dim: int | None = None, **kwargs) -> Critic:
    """Build a critic by name on ``embedding_dim``-dimensional embeddings: the critics with
    parameters (bilinear ``dim``, separable / concat ``in_dim``) get the size from
    ``embedding_dim`` unless ``kwargs`` set it; the others ignore it. The one place that knows
    which critic takes which size argument."""
    size = CRITICS.get(name).meta.get("size")
    if size is not None and size not in kwargs:
        if embedding_dim is None:
            raise ValueError(f"critic {name!r} needs the embedding size: pass embedding_dim= "
                             f"(or {size}=)")
        kwargs[size] = embedding_dim
    return CRITICS.create(name, **kwargs)
