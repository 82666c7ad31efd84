"""Top-``w`` selection over a CPU score block, for large ``w`` (hundreds to thousands).

FAISS-CPU and ``torch.topk`` keep a heap (or a partial sort) per row, whose cost grows with
``w``: at ``w ~ 400`` it is about as expensive as the matrix product that made the scores. This
module selects in two rounds over a small fraction of the block, using numpy's vectorised
``partition`` on 64-bit keys:

1. The ``n`` columns are cut into ``c`` strided slabs (column ``o * m + j``, ``m = n / c``); the
   *chunk* ``j`` is the ``c`` columns ``{o * m + j}``. One elementwise max over the slabs gives
   each chunk's maximum; the ``w`` chunks with the largest maxima are kept.
2. Their ``c * w`` scores are the candidates; the best ``w`` of them, sorted, are returned.

Why it is a valid top-``w`` window: let ``tau`` be the ``w``-th largest chunk maximum. Each kept
chunk holds a score ``>= tau``, so the candidates' ``w``-th largest score ``s_w >= tau``, and a
score above ``s_w`` lies in a chunk whose maximum exceeds ``tau``, which was kept. So every
column scoring strictly above the returned window's worst score is in the window, the contract
of :func:`evaluation.knn.select_topk` (whose boundary recompute settles ties at the edge).

Ordering inside the window is exact and deterministic: each score is packed with its column
into one int64, ``(order-preserving bits of the float32) << 32 | (2^32 - 1 - column)``, so
integer order is (score descending, column ascending). ``-0.0`` is mapped to ``+0.0`` first so
that equal floats have equal keys. With ``c ~ sqrt(n / w)`` each round touches about
``sqrt(n w)`` numbers per row instead of ``n``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["chunk_count", "window_topk", "topk_rows"]

_LOW = np.int64(0xFFFFFFFF)


def chunk_count(n: int, w: int) -> int:
    """Slabs per row: ``c ~ sqrt(n / w)`` balances the two rounds; 1 means a plain partition."""
    return max(1, min(64, int(round(math.sqrt(n / max(w, 1))))))


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """int32 whose signed order is the float order of ``x`` (``-0.0`` treated as ``+0.0``)."""
    b = (x + np.float32(0.0)).view(np.int32)
    return b ^ ((b >> 31) & np.int32(0x7FFFFFFF))


def _pack(x: np.ndarray, col: np.ndarray) -> np.ndarray:
    """int64 keys ordered by (x descending, col ascending) when sorted descending."""
    key = _ordered_bits(x).astype(np.int64)
    key <<= 32
    key |= _LOW - col
    return key


def _top_keys(key: np.ndarray, w: int) -> np.ndarray:
    """The ``w`` largest keys of each row, sorted descending (``key`` is overwritten)."""
    n = key.shape[1]
    if w < n:
        key.partition(n - w, axis=1)
        key = key[:, n - w :]
    return np.sort(key, axis=1)[:, ::-1]


def _unpack(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    col = _LOW - (key & _LOW)
    hi = (key >> 32).astype(np.int32)
    val = (hi ^ ((hi >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
    return val, col


def window_topk(scores: np.ndarray, w: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``w`` window of each row of ``scores`` ``[B, c * m]`` (see the module docstring).

    Returns ``(values float32 [B, w], columns int64 [B, w])`` sorted by (value desc, column
    asc). Padding columns must hold ``-inf``; ``w <= c * m`` (and ``w <= m`` when ``c > 1``).
    """
    b, n = scores.shape
    if c == 1:
        return _unpack(_top_keys(_pack(scores, np.arange(n, dtype=np.int64)), w))
    m = n // c
    slabs = scores.reshape(b, c, m)
    chunk_max = slabs.max(axis=1)
    chunks = _unpack(_top_keys(_pack(chunk_max, np.arange(m, dtype=np.int64)), w))[1]
    cols = chunks[:, None, :] + (np.arange(c, dtype=np.int64) * m)[None, :, None]  # [B, c, w]
    flat = cols + (np.arange(b, dtype=np.int64) * n)[:, None, None]
    cand = scores.reshape(-1).take(flat)  # a flat take is much faster than take_along_axis
    return _unpack(_top_keys(_pack(cand, cols).reshape(b, c * w), w))


def topk_rows(
    scores: np.ndarray, w: int, c: int, pool: ThreadPoolExecutor | None, parts: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`window_topk` with the rows split in ``parts`` run on ``pool`` (numpy drops the
    GIL in these loops)."""
    b = scores.shape[0]
    parts = min(b, parts)
    if pool is None or parts <= 1:
        return window_topk(scores, w, c)
    bounds = np.linspace(0, b, parts + 1).astype(int)
    res = list(pool.map(lambda s: window_topk(scores[s[0] : s[1]], w, c),
                        zip(bounds[:-1], bounds[1:])))
    return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])
