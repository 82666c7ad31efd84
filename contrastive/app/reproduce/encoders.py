"""Encoders of Tschannen et al. (ICLR 2020) for flattened image halves.

* :func:`mlp_encoder`: the MLP ``in -> 300 -> 300 -> 100`` with ReLU.
* :class:`ConvEncoder`: two 5x5 stride-2 convolutions with 64 and 128 channels, each followed
  by LayerNorm (over channels and positions) and ReLU, global average pooling, dense to 100.

Adapting the ConvNet to 8x8 digits: a half is a 4x8 image. The convolutions use "same"
padding (2 pixels, as TensorFlow's ``padding="SAME"`` with stride 2), so the spatial size goes
4x8 -> 2x4 -> 1x2 (MNIST halves: 14x28 -> 7x14 -> 4x7). The architecture is otherwise kept
as in the paper; on digits most of each 5x5 kernel sees padding, so the ConvNet there is close
to a small MLP with weight sharing along the 8 columns -- keep that in mind when reading the
``encoders`` experiment on digits.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contrastive.critics import mlp
from contrastive.validation import check_positive_int

__all__ = ["mlp_encoder", "ConvEncoder", "conv_out_size", "make_encoder"]


def mlp_encoder(in_dim: int, hidden: int = 300, out_dim: int = 100, layers: int = 2) -> nn.Module:
    """The paper's MLP encoder, ``in -> 300 -> 300 -> 100`` (ReLU) by default."""
    return mlp(check_positive_int(in_dim, "in_dim"), hidden, out_dim, layers)


def conv_out_size(size: int, kernel: int = 5, stride: int = 2, padding: int = 2) -> int:
    """Output length of a convolution: ``floor((size + 2 p - k) / s) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


class ConvEncoder(nn.Module):
    """The paper's ConvNet on flattened ``[N, rows * cols]`` halves (see module docstring)."""

    def __init__(
        self,
        half_shape: tuple[int, int],
        channels: tuple[int, int] = (64, 128),
        out_dim: int = 100,
        kernel: int = 5,
    ):
        super().__init__()
        rows, cols = (check_positive_int(s, "half_shape") for s in half_shape)
        self.half_shape = (rows, cols)
        pad = kernel // 2
        mods: list[nn.Module] = []
        c_in = 1
        for c in channels:
            rows, cols = conv_out_size(rows, kernel, 2, pad), conv_out_size(cols, kernel, 2, pad)
            mods += [
                nn.Conv2d(c_in, c, kernel, stride=2, padding=pad),
                nn.LayerNorm([c, rows, cols]),
                nn.ReLU(),
            ]
            c_in = c
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(c_in, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        rows, cols = self.half_shape
        if x.dim() != 2 or x.shape[1] != rows * cols:
            raise ValueError(
                f"ConvEncoder expects flattened halves [N, {rows * cols}] "
                f"(half_shape={self.half_shape}), got {tuple(x.shape)}"
            )
        h = self.features(x.view(-1, 1, rows, cols))
        return self.head(torch.mean(h, dim=(2, 3)))


def make_encoder(kind: str, in_dim: int, half_shape: tuple[int, int], out_dim: int = 100):
    """``"mlp"`` or ``"conv"`` encoder with the paper's sizes."""
    if kind == "mlp":
        return mlp_encoder(in_dim, out_dim=out_dim)
    if kind == "conv":
        return ConvEncoder(half_shape, out_dim=out_dim)
    raise ValueError(f"encoder kind must be 'mlp' or 'conv', got {kind!r}")
