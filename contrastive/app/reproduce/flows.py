"""RealNVP-style invertible encoders (Dinh et al. 2017) for the bijective experiments of
Tschannen et al. (ICLR 2020).

A flow is a stack of coupling layers, each followed by a fixed random permutation of the
coordinates. A coupling layer splits ``x = [x1, x2]`` (``x1`` the first ``dim // 2``
coordinates) and leaves ``x1`` unchanged::

    additive (NICE):  y2 = x2 + t(x1)                    log|det J| = 0
    affine (RealNVP): y2 = x2 * exp(s(x1)) + t(x1)        log|det J| = sum s(x1)

with ``s = tanh(.)`` bounded so that one layer scales by at most ``e``. Both are bijections
whatever ``s`` and ``t`` are, so ``I(x; g(x))`` is maximal throughout training -- the point
of the experiments. The coupling MLPs' last layer starts at ``N(0, init_std^2)`` (the paper's
official code uses std 1e-4) with zero bias, so a fresh flow is the identity up to ~1e-4
followed by the permutations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.critics import mlp
from contrastive.validation import check_positive_int

__all__ = ["Coupling", "Flow", "coupling_forward", "coupling_inverse"]


def coupling_forward(x2: Tensor, shift: Tensor, log_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """``y2 = x2 * exp(log_scale) + shift`` (``log_scale=None``: additive) and the per-row
    ``log|det J| = sum_k log_scale_k``."""
    if log_scale is None:
        return x2 + shift, x2.new_zeros(x2.shape[0])
    return x2 * log_scale.exp() + shift, log_scale.sum(1)


def coupling_inverse(y2: Tensor, shift: Tensor, log_scale: Tensor | None) -> Tensor:
    """Inverse of :func:`coupling_forward`: ``x2 = (y2 - shift) * exp(-log_scale)``."""
    if log_scale is None:
        return y2 - shift
    return (y2 - shift) * (-log_scale).exp()


class Coupling(nn.Module):
    """One coupling layer on ``dim`` coordinates: an MLP of ``x1`` (``layers`` hidden layers of
    ``hidden``) gives the shift (and for ``affine=True`` the log-scale) applied to ``x2``."""

    def __init__(
        self,
        dim: int,
        hidden: int = 512,
        layers: int = 2,
        affine: bool = False,
        init_std: float = 1e-4,
    ):
        super().__init__()
        dim = check_positive_int(dim, "dim")
        if dim < 2:
            raise ValueError(f"a coupling layer needs dim >= 2 to split the input, got dim={dim}")
        self.dim, self.split, self.affine = dim, dim // 2, bool(affine)
        n_out = (dim - self.split) * (2 if self.affine else 1)
        self.net = mlp(self.split, check_positive_int(hidden, "hidden"), n_out, layers)
        last = self.net[-1]
        nn.init.normal_(last.weight, std=float(init_std))
        nn.init.zeros_(last.bias)

    def _params(self, x1: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.net(x1)
        if not self.affine:
            return out, None
        shift, raw = out.chunk(2, dim=1)
        return shift, torch.tanh(raw)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        y2, logdet = coupling_forward(x2, *self._params(x1))
        return torch.cat([x1, y2], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        y1, y2 = y[:, : self.split], y[:, self.split :]
        return torch.cat([y1, coupling_inverse(y2, *self._params(y1))], dim=1)


class Flow(nn.Module):
    """``couplings`` coupling layers, each followed by a fixed random permutation drawn from
    ``seed``; ``forward(x)`` gives ``g(x)`` of the same shape, ``inverse(g(x)) = x``.

    The paper's MNIST encoder (392 inputs): 30 additive couplings with ``[512, 512]`` MLPs.
    """

    def __init__(
        self,
        dim: int,
        couplings: int = 30,
        hidden: int = 512,
        layers: int = 2,
        affine: bool = False,
        init_std: float = 1e-4,
        seed: int = 0,
    ):
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        couplings = check_positive_int(couplings, "couplings")
        self.layers = nn.ModuleList(
            Coupling(dim, hidden, layers, affine, init_std) for _ in range(couplings)
        )
        gen = torch.Generator().manual_seed(int(seed))
        perms = torch.stack([torch.randperm(dim, generator=gen) for _ in range(couplings)])
        self.register_buffer("perms", perms)
        self.register_buffer("inverse_perms", perms.argsort(dim=1))

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"{name} must have shape [N, {self.dim}], got {tuple(x.shape)}; flatten the "
                "input and build the flow with dim equal to its number of features"
            )

    def forward_and_logdet(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(g(x), log|det dg/dx|)`` per row (0 for additive couplings)."""
        self._check(x, "x")
        logdet = x.new_zeros(x.shape[0])
        for layer, perm in zip(self.layers, self.perms):
            x, ld = layer(x)
            x = x[:, perm]
            logdet = logdet + ld
        return x, logdet

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_and_logdet(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        """``g^{-1}(y)``: undo the permutations and couplings in reverse order."""
        self._check(y, "y")
        for layer, inv in zip(reversed(self.layers), reversed(self.inverse_perms)):
            y = layer.inverse(y[:, inv])
        return y
