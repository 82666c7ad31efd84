"""Data for the reproduction of Tschannen et al. (ICLR 2020): two views of an image (``x`` = top
half, ``y`` = bottom half) and the 2-D Gaussian with non-i.i.d. batches.

* ``digits`` (default, no download): scikit-learn's 8x8 digits (1,797 images, pixels / 16 in
  [0, 1]); halves of 4x8 = 32 pixels; a fixed stratified 75/25 train/held-out split.
* ``mnist`` (the paper's setting): ``torchvision.datasets.MNIST(data_dir, download=False)``,
  pixels / 255; halves of 14x28 = 392 pixels; the official 60k/10k split.

The views get i.i.d. Gaussian pixel noise of std ``sigma = 0.05`` (fresh noise for every
training batch, one fixed draw for the evaluation features), which keeps the MI between the
continuous views finite.

Non-i.i.d. Gaussian (docs/architecture.md, The paper's protocol): per batch one shared
``Z ~ N(0, C_z)``, ``C_z = [[1, -0.5], [-0.5, 1]]``, per sample ``e_i ~ N(0, C_e)``,
``C_e = [[1, 0.9], [0.9, 1]]``, ``(X_i, Y_i) = Z + e_i``. Each pair's marginal is
``N(0, C_z + C_e) = N(0, [[2, 0.4], [0.4, 2]])`` with
``I(X; Y) = -1/2 log(1 - 0.2^2) = 0.0204`` nats, but within a batch the pairs are dependent:
``Cov(X_i, X_j) = 1``, ``Cov(X_i, Y_j) = -0.5`` for ``i != j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HalvesData",
    "load_halves",
    "split_halves",
    "add_noise",
    "NOISE_SIGMA",
    "SHARED_COV",
    "NOISE_COV",
    "MARGINAL_COV",
    "NEGATIVE_PAIR_COV",
    "gaussian_mi",
    "gaussian_kl",
    "TRUE_MI",
    "sample_noniid",
    "sample_iid",
]

NOISE_SIGMA = 0.05


@dataclass
class HalvesData:
    """Top (``x``) and bottom (``y``) halves, flattened, clean (noise is added by the user), with
    class labels, for a training and a held-out split. ``half_shape`` is ``(rows, cols)`` of one
    half (``(4, 8)`` for digits, ``(14, 28)`` for MNIST)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    labels_train: Tensor
    x_test: Tensor
    y_test: Tensor
    labels_test: Tensor
    half_shape: tuple[int, int]

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    def to(self, device: torch.device | str) -> HalvesData:
        kw = {k: getattr(self, k).to(device) for k in _TENSORS}
        return HalvesData(self.name, half_shape=self.half_shape, **kw)

    def subset(self, n_train: int | None, n_test: int | None) -> HalvesData:
        """The first ``n_train`` / ``n_test`` rows (``None`` keeps all); for tiny test runs."""
        tr = slice(None) if n_train is None else slice(0, int(n_train))
        te = slice(None) if n_test is None else slice(0, int(n_test))
        kw = {k: getattr(self, k)[tr if k.endswith("train") else te] for k in _TENSORS}
        return HalvesData(self.name, half_shape=self.half_shape, **kw)


_TENSORS = ("x_train", "y_train", "labels_train", "x_test", "y_test", "labels_test")


def split_halves(images: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, H, W]`` images -> flattened top ``[N, (H//2) W]`` and bottom halves."""
    if images.dim() != 3 or images.shape[1] % 2:
        raise ValueError(
            f"images must be [N, H, W] with an even H, got shape {tuple(images.shape)}"
        )
    h = images.shape[1] // 2
    return images[:, :h].flatten(1), images[:, h:].flatten(1)


def _digits(test_fraction: float, split_seed: int) -> HalvesData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.as_tensor(d.images / 16.0, dtype=torch.float32)
    labels = torch.as_tensor(d.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=split_seed,
        stratify=d.target,
    )
    top, bottom = split_halves(images)
    tr, te = torch.as_tensor(idx_tr), torch.as_tensor(idx_te)
    return HalvesData(
        "digits", top[tr], bottom[tr], labels[tr], top[te], bottom[te], labels[te], (4, 8)
    )


def _mnist(data_dir: str | Path | None) -> HalvesData:
    if data_dir is None:
        raise ValueError(
            "dataset='mnist' needs data_dir: a folder that holds MNIST/raw/ (the four idx files "
            "as torchvision.datasets.MNIST stores them); nothing is downloaded"
        )
    from torchvision.datasets import MNIST

    out = []
    for train in (True, False):
        try:
            ds = MNIST(str(data_dir), train=train, download=False)
        except RuntimeError as exc:
            raise ValueError(
                f"MNIST not found under data_dir={str(data_dir)!r} ({exc}); put the idx files in "
                f"{Path(data_dir) / 'MNIST' / 'raw'} (torchvision layout), nothing is downloaded"
            ) from exc
        images = ds.data.float() / 255.0
        top, bottom = split_halves(images)
        out += [top, bottom, ds.targets.long()]
    return HalvesData("mnist", *out, half_shape=(14, 28))


def load_halves(
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> HalvesData:
    """Load ``"digits"`` (scikit-learn, bundled) or ``"mnist"`` (local torchvision copy under
    ``data_dir``) as top/bottom halves; see the module docstring."""
    key = str(dataset).lower()
    if key == "digits":
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        return _digits(test_fraction, split_seed)
    if key == "mnist":
        return _mnist(data_dir)
    raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")


def add_noise(x: Tensor, sigma: float = NOISE_SIGMA, generator: torch.Generator | None = None):
    """``x + sigma * N(0, I)`` (the paper's pixel noise)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma * noise


# --------------------------------------------------------------------------- 2-D Gaussians

SHARED_COV = ((1.0, -0.5), (-0.5, 1.0))
NOISE_COV = ((1.0, 0.9), (0.9, 1.0))
MARGINAL_COV = ((2.0, 0.4), (0.4, 2.0))
#: distribution of a within-batch negative pair (X_i, Y_j), i != j, under the non-i.i.d. sampler
NEGATIVE_PAIR_COV = ((2.0, -0.5), (-0.5, 2.0))


def gaussian_mi(cov) -> float:
    """``I(X; Y) = -1/2 log(1 - rho^2)`` nats for a bivariate Gaussian with covariance ``cov``."""
    c = np.asarray(cov, dtype=float)
    rho = c[0, 1] / math.sqrt(c[0, 0] * c[1, 1])
    return -0.5 * math.log1p(-(rho**2))


def gaussian_kl(cov_p, cov_q) -> float:
    """``KL(N(0, P) || N(0, Q)) = 1/2 [tr(Q^-1 P) - d + log(det Q / det P)]`` nats."""
    p, q = np.asarray(cov_p, dtype=float), np.asarray(cov_q, dtype=float)
    d = p.shape[0]
    return 0.5 * float(
        np.trace(np.linalg.solve(q, p)) - d + np.log(np.linalg.det(q) / np.linalg.det(p))
    )


TRUE_MI = gaussian_mi(MARGINAL_COV)


def _mvn(shape: tuple[int, ...], cov, generator, device, dtype) -> Tensor:
    chol = torch.linalg.cholesky(torch.tensor(cov, dtype=torch.float64)).to(dtype)
    z = torch.randn((*shape, 2), generator=generator, dtype=dtype)
    return (z @ chol.T).to(device)


def sample_noniid(
    n_batches: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[n_batches, batch_size, 2]`` pairs ``(X_i, Y_i) = Z_b + e_i``: one ``Z_b ~ N(0, C_z)``
    per batch, ``e_i ~ N(0, C_e)`` per sample (module docstring). Drawn on the CPU from
    ``generator`` and moved to ``device`` so results do not depend on the device."""
    z = _mvn((n_batches, 1), SHARED_COV, generator, device, dtype)
    e = _mvn((n_batches, batch_size), NOISE_COV, generator, device, dtype)
    return z + e


def sample_iid(
    n_batches: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[n_batches, batch_size, 2]`` i.i.d. pairs from the same marginal ``N(0, C_z + C_e)``."""
    return _mvn((n_batches, batch_size), MARGINAL_COV, generator, device, dtype)
