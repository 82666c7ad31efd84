"""The device a computation runs on, chosen in one place.

Every part of the library that takes a ``device=`` argument (the known-MI benchmark, the
reproduction, the linear probe, the k-NN search) resolves it with :func:`resolve_device`: ``None``
means CUDA when torch sees a GPU, else the CPU; an explicit value is checked, so that asking for
CUDA on a machine without one fails at once with a message naming the argument and the fix,
instead of deep inside the first ``.to(device)``.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(
    device: str | torch.device | None = None, *, name: str = "device"
) -> torch.device:
    """``torch.device(device)``, or for ``None`` ``cuda`` when ``torch.cuda.is_available()`` else
    ``cpu`` (no index is added: ``cuda`` stays ``cuda``, the current CUDA device).

    Raises ``ValueError`` naming the argument ``name`` when ``device`` is not a device
    (``"gpu"``, ``3.5``) or asks for CUDA on a machine where torch sees no CUDA GPU. A name in
    another case or with spaces (``"CPU"``, ``"Cuda:0"``) is refused, as torch refuses it, with
    the lower-case spelling as the fix in the message.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{name} must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}"
            + _spelling_fix(device, name)
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{name}={str(device)!r} but torch sees no CUDA GPU; use {name}='cpu' (or leave it "
            "unset: CUDA when available, else the CPU)"
        )
    return dev


def _spelling_fix(device: object, name: str) -> str:
    """The fix for a device name torch refuses only for its spelling (``"CPU"``, ``"Cuda:0"``,
    ``" cpu"``): torch takes lower case without spaces. It is refused rather than normalised
    here, because the callers pass the same text on to code that calls ``torch.device`` itself
    (the k-NN search, ``--device`` of the command line), which would then fail further in."""
    if not isinstance(device, str):
        return ""
    fixed = device.strip().lower()
    try:
        torch.device(fixed)
    except (RuntimeError, TypeError, ValueError):
        return ""
    return f"; torch spells device names in lower case, without spaces: use {name}={fixed!r}"
