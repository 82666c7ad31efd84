"""Plain JSON values from what results hold: one converter for every file the library writes.

Results mix Python numbers with NumPy and torch scalars and arrays, paths, tuples and the
occasional NaN. :func:`to_jsonable` turns such a value into dicts, lists, strings, numbers,
booleans and ``None`` that ``json.dumps`` writes as they are. Each writer keeps its own policy for
non-finite floats (``nan_to_none``: ``null`` for strict JSON, or ``NaN`` / ``Infinity`` as Python's
``json`` writes them) and for unknown objects (``strict``: ``TypeError``, or their ``str``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["to_jsonable"]


def to_jsonable(x: Any, *, nan_to_none: bool = True, strict: bool = False) -> Any:
    """A copy of ``x`` that ``json.dumps`` encodes without a ``default`` hook.

    * mappings -> dicts with ``str`` keys; lists, tuples, sets -> lists (converted recursively);
    * ``None``, ``bool``, ``int``, ``str`` -> unchanged; ``float`` and NumPy floats -> ``float``,
      non-finite ones -> ``None`` when ``nan_to_none`` (else kept: ``NaN`` / ``Infinity``);
    * NumPy integers / booleans -> ``int`` / ``bool``; NumPy arrays and torch tensors ->
      (nested) lists, 0-d ones -> their number; ``os.PathLike`` -> ``os.fspath``;
    * anything else -> ``str(x)``, or ``TypeError`` when ``strict``.
    """

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): conv(w) for k, w in v.items()}
        if isinstance(v, (list, tuple, set, frozenset)):
            return [conv(w) for w in v]
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return f if math.isfinite(f) or not nan_to_none else None
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, (np.ndarray, torch.Tensor)):
            return conv(v.tolist())
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if strict:
            raise TypeError(
                f"object of type {type(v).__name__} is not JSON serialisable; convert it to a "
                "number, string, list or dict first"
            )
        return str(v)

    return conv(x)
