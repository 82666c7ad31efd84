"""Input checks shared by losses, critics and samplers.

Every check raises ``ValueError`` or ``TypeError`` with a message that names the argument and says
how to fix it, so a bad batch fails loudly instead of returning NaN. The checks that read tensor
values (a device-to-host sync) run only with ``check=True``; ``check=False`` keeps the type and
shape checks, which read no value, for compiled or CUDA-graph regions.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor


def check_embeddings(x: object, name: str = "embeddings", check: bool = True) -> Tensor:
    """Return ``x`` if it is a finite, floating 2-D tensor ``[N, d]``; raise otherwise
    (finiteness only with ``check``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [N, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}; "
            "flatten per-sample features first (e.g. x.flatten(1))"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}; call .float()")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); the batch needs rows")
    # one reduction instead of an elementwise isfinite pass: NaN/Inf propagate into the sum; a
    # sum of finite values that overflows is told apart by the exact check
    if check and not math.isfinite(float(x.detach().sum())) and not bool(
        torch.isfinite(x).all()
    ):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN or Inf in {bad.numel()} row(s) (first: {bad[:5].tolist()}); "
            "check the encoder output, the learning rate and autocast overflow"
        )
    return x


def check_labels(labels: object, n: int, name: str = "labels", emb_name: str = "embeddings",
                 check: bool = True):
    """Return ``labels`` as a 1-D integer tensor of length ``n``; raise otherwise (float labels
    are checked to be integral only with ``check``)."""
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except Exception as exc:  # pragma: no cover - torch's own message is kept
            raise TypeError(f"{name} must be a 1-D tensor of class ids: {exc}") from exc
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(labels.shape)}")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but {emb_name} has {n} rows; "
            "pass one label per embedding row"
        )
    if labels.is_floating_point():
        if check and not torch.equal(labels, labels.round()):
            raise ValueError(f"{name} must hold integer class ids, got non-integer floats")
        labels = labels.long()
    elif labels.dtype == torch.bool:
        labels = labels.long()
    return labels


def check_temperature(t: float, name: str = "temperature") -> float:
    """Return ``t`` as a float if it is finite and > 0."""
    try:
        value = float(t)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a positive number, got {t!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be > 0 (e.g. 0.1), got {t!r}")
    return value


def check_int(value: object, name: str, low: int = 0, high: int | None = None,
              why: str = "") -> int:
    """``value`` as an ``int`` if it is an integer -- Python or NumPy, not a bool -- in
    ``[low, high]`` (no upper end with ``high=None``); otherwise a ``ValueError`` that names
    ``name``, the range and, with ``why``, what the range is for."""
    if not isinstance(value, (bool, np.bool_)):
        try:
            out = operator.index(value)
        except TypeError:
            out = None
        if out is not None and out >= low and (high is None or out <= high):
            return int(out)
    if high is not None:
        wanted = f"an integer in [{low}, {high}]"
    else:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(
            low, f"an integer >= {low}")
    raise ValueError(f"{name} must be {wanted}{why}, got {value!r}")


def check_positive_int(v: int, name: str) -> int:
    """``v`` as an ``int >= 1`` (:func:`check_int`)."""
    return check_int(v, name, 1)
