"""Conditional critics: a variational conditional density ``q(y | x)`` scored on all pairs,
``L_ij = log q(y_j | x_i)`` [N, M], the score matrix of the MI upper bounds (leave-one-out and
CLUB, :mod:`losses.bounds`).

:class:`GaussianConditional` is the conditional of Cheng et al. (CLUB, ICML 2020) and of Poole
et al. (2019, sec. 3.4): a diagonal Gaussian whose mean and log-variance are MLPs of ``x``. It is
fitted by maximum likelihood on the positive pairs (:func:`losses.bounds.conditional_nll`).
Core layer: imports only torch and :mod:`contrastive.critics`' MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .critics import mlp
from .validation import check_positive_int

__all__ = ["GaussianConditional", "gaussian_log_density_matrix"]


def gaussian_log_density_matrix(mean: Tensor, log_var: Tensor, y: Tensor) -> Tensor:
    """``L_ij = log N(y_j; mean_i, diag(exp(log_var_i)))`` for all pairs, in O(N M d) without an
    ``[N, M, d]`` tensor::

        L_ij = -(d/2) log(2 pi) - (1/2) sum_k [log_var_ik + (y_jk - mean_ik)^2 exp(-log_var_ik)]

    The quadratic form is expanded as ``prec y^2 - 2 mean prec y + prec mean^2``, whose terms
    cancel where ``q`` is sharp or ``y`` far from 0 (in float32, ``log_var = -8`` and
    ``|y| ~ 10``: a nat off on the diagonal); it is computed in float64 (float32 on MPS, which
    has no float64) and returned in the inputs' dtype.
    """
    if mean.shape != log_var.shape or mean.dim() != 2 or y.dim() != 2 or (
        y.shape[1] != mean.shape[1]
    ):
        raise ValueError(f"mean and log_var must be [N, d] and y [M, d], got "
                         f"{tuple(mean.shape)}, {tuple(log_var.shape)}, {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(mean.dtype, log_var.dtype), y.dtype)
    work = torch.float32 if mean.device.type == "mps" else torch.float64
    mean, log_var, y = mean.to(work), log_var.to(work), y.to(work)
    prec = (-log_var).exp()  # [N, d]
    quad = (prec @ (y * y).T) - 2.0 * ((mean * prec) @ y.T) + (mean * mean * prec).sum(1,
                                                                                       keepdim=True)
    const = -0.5 * mean.shape[1] * math.log(2.0 * math.pi)
    return (const - 0.5 * (log_var.sum(1, keepdim=True) + quad)).to(dtype)


class GaussianConditional(nn.Module):
    """``q(y | x) = N(mu(x), diag(exp(log_var(x))))``, ``mu`` and ``log_var`` MLPs of ``layers``
    hidden layers of ``hidden_dim`` (ReLU). ``forward(x, y)`` is ``L [N, M]``,
    ``L_ij = log q(y_j | x_i)``. The log-variance is squashed into ``[-max_log_var, max_log_var]``
    (``max_log_var * tanh(raw / max_log_var)``) so that an early step cannot overflow it."""

    def __init__(self, in_dim: int, out_dim: int | None = None, hidden_dim: int = 256,
                 layers: int = 2, max_log_var: float = 10.0):
        super().__init__()
        in_dim = check_positive_int(in_dim, "in_dim")
        out_dim = in_dim if out_dim is None else check_positive_int(out_dim, "out_dim")
        if not float(max_log_var) > 0:
            raise ValueError(f"max_log_var must be > 0, got {max_log_var!r}")
        self.max_log_var = float(max_log_var)
        self.mean = mlp(in_dim, hidden_dim, out_dim, layers)
        self.log_var = mlp(in_dim, hidden_dim, out_dim, layers)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(x), log_var(x))``, each ``[N, out_dim]``."""
        c = self.max_log_var
        return self.mean(x), c * (self.log_var(x) / c).tanh()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        mean, log_var = self.moments(x)
        return gaussian_log_density_matrix(mean, log_var, y)
