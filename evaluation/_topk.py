"""Top-``w`` selection over a CPU score block, for large ``w`` (hundreds to thousands): the one
selection path of :class:`evaluation.backends.BlockScanBackend`.

FAISS-CPU and ``torch.topk`` keep a heap (or a partial sort) per row, whose cost grows with
``w``: at ``w ~ 400`` it is about as expensive as the matrix product that made the scores. Here
the selection runs on numpy's vectorised ``partition`` of 64-bit keys, and only over a small
part of the block, by a hierarchy of chunk maxima:

1. The ``n`` columns are cut into ``c`` strided slabs (column ``o * m + j``, ``m = n / c``); the
   *chunk* ``j`` is the ``c`` columns ``{o * m + j}``. One elementwise max over the slabs gives
   each chunk's maximum (the one pass over the whole block).
2. The ``w`` chunks with the largest maxima are found the same way, recursively, over the
   ``m`` maxima (down to a plain partition once ``m <= 8 w``).
3. Their ``c * w`` scores are the candidates; the best ``w`` of them, sorted, are returned.

Why it is a valid top-``w`` window: let ``tau`` be the ``w``-th largest chunk maximum. Each kept
chunk holds a score ``>= tau``, so the candidates' ``w``-th largest score ``s_w >= tau``, and a
score above ``s_w`` lies in a chunk whose maximum exceeds ``tau``, which was kept. So every
column scoring strictly above the returned window's worst score is in the window: the contract
of :func:`evaluation.ties.select_topk`, whose boundary recompute settles ties at the edge.

Ordering inside the window is exact and deterministic: each score is packed with its column
into one int64, ``(order-preserving bits of the float32) << 32 | (2^32 - 1 - column)``, so
integer order is (score descending, column ascending); ``-0.0`` is mapped to ``+0.0`` first so
that equal floats have equal keys. Scores must not be NaN.

When the optional C extension :mod:`evaluation._scan` is built (``pip install`` compiles it when
a C compiler is present; see ``evaluation/_scan.c``) and rows are long enough (``n >=``
:data:`SCAN_MIN_RATIO` ``* w``), steps 1-2 are replaced by one SIMD pass per row: a threshold
from a histogram of chunk maxima that keeps at least ``w`` scores, and a vectorised compare that
writes the (about ``1.1 w``) scores above it as packed keys; numpy then partitions and sorts
those. Same keys; the window is then the exact top-``w``. Measured on rows in the cache (AVX-512):
1.7x faster at ``w = 365, n = 30k`` and 3.7x at ``w = 1080, n = 100k``. Rows with more than
``2 w + 64`` candidates (many equal scores) take the numpy path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # the optional C extension (evaluation/_scan.c)
    from . import _scan
except ImportError:  # pragma: no cover - built wherever a C compiler is present
    _scan = None

__all__ = ["SLABS", "GROUP_BYTES", "padded_width", "window_topk", "topk_rows", "scan_kernel"]

#: slabs per level of the hierarchy, and the size (in multiples of w) solved by one partition.
SLABS = 4
_BASE = 8
#: bytes of scores selected together (a row group): they stay in the cache between the passes
#: (measured best around 4-8 MiB with a 32 MiB L3; 52 rows at n = 30k, 15 at n = 100k).
GROUP_BYTES = 6 << 20
_LOW = np.int64(0xFFFFFFFF)
#: the C scan serves rows of at least this many times ``w`` columns (it keeps chunk maxima of
#: 16 columns, so shorter rows leave too few chunks to set a tight threshold).
SCAN_MIN_RATIO = 32


def scan_kernel() -> str | None:
    """The instruction set the C scan runs with ("avx512f", "avx2", "generic"), or ``None``
    when the extension is not built (then the numpy path serves every row)."""
    return None if _scan is None else _scan.current()


def _use_scan(n: int, w: int) -> bool:
    return _scan is not None and n >= SCAN_MIN_RATIO * w


def padded_width(n: int, w: int) -> int:
    """Columns the score block should have (padding columns hold ``-inf``)."""
    if n <= _BASE * w or _use_scan(n, w):
        return n
    return -(-n // SLABS) * SLABS


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """int32 whose signed order is the float order of ``x`` (``-0.0`` treated as ``+0.0``)."""
    b = (x + np.float32(0.0)).view(np.int32)
    return b ^ ((b >> 31) & np.int32(0x7FFFFFFF))


def _pack(x: np.ndarray) -> np.ndarray:
    """int64 keys whose descending order is (x descending, position in the row ascending)."""
    key = _ordered_bits(x).astype(np.int64)
    key <<= 32
    key |= _LOW - np.arange(x.shape[1], dtype=np.int64)
    return key


def _top_set(key: np.ndarray, w: int) -> np.ndarray:
    """The ``w`` largest keys of each row, in no particular order (``key`` is overwritten)."""
    n = key.shape[1]
    if w >= n:
        return key
    key.partition(n - w, axis=1)
    return key[:, n - w :]


def _level(scores: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Candidates ``[B, L]`` holding a valid top-``w`` window of each row of ``scores``.

    Either the row itself (``chunks`` None) or the ``SLABS`` slabs' scores of the best ``w``
    chunks, laid out ``(slab, chunk)`` with the chunks ascending, so that position order is
    column order. Returns ``(candidates, chunks [B, w] or None, m)``.
    """
    b, n = scores.shape
    if n <= _BASE * w or n % SLABS:
        return scores, None, n
    m = n // SLABS
    chunk_max = scores.reshape(b, SLABS, m).max(axis=1)
    mp = padded_width(m, w)
    if mp != m:
        chunk_max = np.concatenate(
            [chunk_max, np.full((b, mp - m), -np.inf, dtype=np.float32)], axis=1
        )
    chunks = _select(chunk_max, w)
    flat = chunks + (np.arange(b, dtype=np.int64) * n)[:, None]
    src = scores.reshape(-1)
    cand = np.empty((b, SLABS, w), dtype=np.float32)
    for o in range(SLABS):  # ascending indices: a flat take is then cache-friendly
        np.take(src[o * m :], flat, out=cand[:, o, :])
    return cand.reshape(b, SLABS * w), chunks, m


def _columns(pos: np.ndarray, chunks: np.ndarray | None, m: int, w: int) -> np.ndarray:
    if chunks is None:
        return pos
    return (pos // w) * m + np.take_along_axis(chunks, pos % w, axis=1)


def _select(scores: np.ndarray, w: int) -> np.ndarray:
    """Columns ``[B, w]`` (ascending) of a valid top-``w`` window of each row."""
    cand, chunks, m = _level(scores, w)
    pos = _LOW - (_top_set(_pack(cand), w) & _LOW)
    return np.sort(_columns(pos, chunks, m, w), axis=1)


def window_topk(scores: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``w`` window of each row of ``scores`` ``[B, n]`` (see the module docstring).

    ``n`` must be :func:`padded_width` of the real width, padding columns ``-inf``, ``w <= n``.
    Returns ``(values float32 [B, w], columns int64 [B, w])`` sorted by (value desc, column asc).
    """
    if _use_scan(scores.shape[1], w):
        return _scan_topk(np.ascontiguousarray(scores), w)
    cand, chunks, m = _level(scores, w)
    val, pos = _best_sorted(cand, w)
    return val, np.ascontiguousarray(_columns(pos, chunks, m, w))


def _best_sorted(cand: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``w`` best of each row of ``cand``, sorted: (values, positions in the row)."""
    return _unpack(np.sort(_top_set(_pack(cand), w), axis=1)[:, ::-1])


def _unpack(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values float32, positions int64) of packed keys."""
    pos = _LOW - (key & _LOW)
    hi = (key >> 32).astype(np.int32)
    val = (hi ^ ((hi >> 31) & np.int32(0x7FFFFFFF))).view(np.float32)
    return np.ascontiguousarray(val), np.ascontiguousarray(pos)


def _scan_topk(scores: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`window_topk` by the C scan (rows it flags take the numpy path)."""
    b, n = scores.shape
    cap = 2 * w + 64
    keys = np.empty((b, cap), dtype=np.int64)
    counts = np.empty(b, dtype=np.int64)
    _scan.scan_rows(scores, b, n, w, cap, keys, counts)
    top = np.partition(keys, cap - w, axis=1)[:, cap - w :]  # unused slots hold INT64_MIN
    top.sort(axis=1)
    val, pos = _unpack(top[:, ::-1])
    bad = np.flatnonzero(counts < 0)
    if bad.size:
        val[bad], pos[bad] = _best_sorted(scores[bad], w)
    return val, pos


def topk_rows(
    scores: np.ndarray, w: int, pool: ThreadPoolExecutor | None, parts: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`window_topk` over groups of rows of :data:`GROUP_BYTES` (a group's scores stay
    in the cache between the passes), the groups spread over ``parts`` tasks on ``pool``
    (numpy releases the GIL in these loops, so the tasks run in parallel)."""
    b = scores.shape[0]
    group = max(4, GROUP_BYTES // (4 * scores.shape[1]))
    values = np.empty((b, w), dtype=np.float32)
    columns = np.empty((b, w), dtype=np.int64)

    def run(lo_hi: tuple[int, int]) -> None:
        for s in range(lo_hi[0], lo_hi[1], group):
            e = min(lo_hi[1], s + group)
            values[s:e], columns[s:e] = window_topk(scores[s:e], w)

    parts = min(-(-b // group), parts)
    if pool is None or parts <= 1:
        run((0, b))
    else:
        bounds = np.linspace(0, b, parts + 1).astype(int)
        list(pool.map(run, zip(bounds[:-1].tolist(), bounds[1:].tolist())))
    return values, columns
