"""Exact k-nearest-neighbour search for evaluation: FAISS on GPU or CPU, or blockwise torch.

One function, :func:`knn`, and the block iterator :func:`search_blocks` that the retrieval
metrics and the k-NN classifier reduce block by block, so that neither ever holds an
``N_query x N_reference`` matrix.

Scores
    ``metric="cosine"``: cosine similarity (rows are L2-normalised first; an all-zero row has
    similarity 0 with everything), descending. ``metric="ip"``: inner product, descending.
    ``metric="l2"``: **squared** Euclidean distance ``|q - r|^2`` (FAISS's convention), ascending.

Backends (``backend="auto"``)
    * CUDA device and a FAISS build with GPUs: ``GpuIndexFlatIP`` / ``GpuIndexFlatL2`` with queries
      in blocks; past FAISS-GPU's selection limit (k = 2048) a blockwise torch top-k on CUDA.
    * CUDA device and FAISS without GPUs (e.g. ``faiss-cpu``): blockwise torch top-k on CUDA.
    * CPU: ``IndexFlatIP`` / ``IndexFlatL2`` from ``faiss-cpu``; blockwise torch top-k on the CPU
      when ``import faiss`` fails.
    ``backend="faiss"`` or ``"torch"`` forces one family (tests use that to compare them).
    For the retrieval metrics only (``search_blocks(..., large_k_blocks=True)``), ``"auto"`` on
    the CPU with a window of ``k + margin >= BLOCK_SELECT_MIN_K`` (``>= BLOCK_SCAN_MIN_K`` when
    the C scan of :mod:`evaluation._topk` serves) takes the "cpu-blocks" path: blocks of query
    rows are tasks for ``torch.get_num_threads()`` Python threads, each computing its block's
    scores with one single-threaded matrix product and selecting with :mod:`evaluation._topk`
    while they are still in the cache (FAISS-CPU's heap costs about as much as the matrix
    product at such k). The per-block reduction of the retrieval metrics runs in those threads.

Ties
    Neighbours are ordered by (score, reference index): among equal scores the lower reference
    index comes first, and at the k-th place the lower indices are kept. Neither FAISS nor
    ``torch.topk`` promises this, and BLAS does not even promise that identical reference rows
    get identical float32 scores (a row in an edge tile of the matrix product is summed in another
    order). So (1) identical reference rows are grouped first (bitwise; one pass over the data and
    a sort) and searched once, so they share one score and tie exactly; a window of groups is
    expanded to its first ``k`` items in index order by a gather, with no sort unless two
    groups in it share a score (so 10,000 identical rows cost what 10,000 distinct ones do,
    not a sort of thousands of equal scores per query); (2) every backend returns
    a slightly wider window (``k + 8``, plus one for the query itself), re-sorted by
    (score, index); (3) a row whose k-th score equals the window's worst score (the tie may go on
    past the window) is recomputed over the whole reference set with wider windows until it is
    decided. The result is exact and deterministic with respect to the float32 scores that the
    backend computed. Residual caveat: *distinct* vectors whose scores are equal in exact
    arithmetic or differ by less than float32 rounding (about 1e-7 relative; e.g. permuted integer
    vectors under cosine) can be ordered differently by different backends or block sizes.

``exclude_self=True`` (the query set is the reference set) removes each query's own row by
index, not by distance, so a duplicate of the query stays a valid neighbour.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._inputs import as_float_matrix, check_k, check_metric, check_same_dim
from ._topk import SCAN_MIN_RATIO, padded_width, scan_kernel, topk_rows

__all__ = ["knn", "search_blocks", "resolve_backend", "normalize_rows", "BACKENDS"]

BACKENDS = ("auto", "faiss", "torch")
#: FAISS-GPU's k-selection limit (GPU_MAX_SELECTION_K for CUDA builds).
FAISS_GPU_MAX_K = 2048
#: extra neighbours fetched so that ties at the k-th place can be resolved by index.
TIE_MARGIN = 8
_CPU_BLOCK_BYTES = 1 << 27  # one float32 score block on the CPU (128 MiB)
_GPU_BLOCK_BYTES = 1 << 30  # and on a GPU (1 GiB)
_FAISS_OUT_BYTES = 1 << 26  # (scores, ids) returned by one FAISS search call


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_num_gpus(faiss) -> int:
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn is not None else 0
    except Exception:  # pragma: no cover - broken GPU build
        return 0


@dataclass(frozen=True)
class Plan:
    """Which implementation runs the search: ``kind`` in {"faiss-gpu", "faiss-cpu", "torch"}."""

    kind: str
    device: torch.device


def _resolve_device(device: object) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be like 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'")
    return dev


def resolve_backend(backend: str = "auto", device: object = None, k: int = 1) -> Plan:
    """Pick the implementation for a search of ``k`` neighbours (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = _resolve_device(device)
    if backend == "torch":
        return Plan("torch", dev)
    faiss = _import_faiss()
    if faiss is None:
        if backend == "faiss":
            raise ImportError(
                "backend='faiss' but faiss is not importable; `pip install faiss-cpu` "
                "(or faiss-gpu) or use backend='torch'"
            )
        return Plan("torch", dev)
    if dev.type == "cuda":
        if _faiss_num_gpus(faiss) > 0 and k <= FAISS_GPU_MAX_K:
            return Plan("faiss-gpu", dev)
        if backend == "faiss":
            return Plan("faiss-cpu", torch.device("cpu"))
        return Plan("torch", dev)
    return Plan("faiss-cpu", torch.device("cpu"))


def describe_plan(plan: Plan) -> str:
    """One-line name of an exact search backend, as results report it (``backend``)."""
    return {
        "faiss-cpu": "faiss-cpu IndexFlat exact",
        "faiss-gpu": f"faiss-gpu GpuIndexFlat exact ({plan.device})",
        "torch": f"torch exact ({plan.device})",
        "cpu-blocks": "torch-cpu blocks exact (matmul + top-k scan)",
    }.get(plan.kind, f"{plan.kind} exact")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Return ``x / max(|x|_2, 1e-12)`` row-wise in float32 (all-zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    inv = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)
    return x * inv[:, None]  # float32 throughout: no float64 copy of a large set


# --------------------------------------------------------------------------------------------
# duplicate reference rows


@dataclass(frozen=True)
class Duplicates:
    """Groups of identical reference rows (bitwise equal, with -0.0 == 0.0).

    The search runs over one representative per group, so identical rows get one score and tie
    exactly; :func:`expand_groups` turns a group back into its items in index order.
    """

    unique_rows: np.ndarray  # [U] lowest item index of each group
    mult: np.ndarray  # [U] items per group
    start: np.ndarray  # [U] offset of each group in `members`
    members: np.ndarray  # [Nr] item indices grouped by group, ascending inside a group

    def to(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(torch.from_numpy(a).to(device) for a in (self.mult, self.start, self.members))


def find_duplicates(x: np.ndarray) -> Duplicates | None:
    """Group identical rows of ``x``; ``None`` when every row is distinct (the usual case).

    A float64 random projection sorts the rows; only rows whose projections (nearly) coincide are
    compared bytewise, so the cost is one pass over ``x`` plus a sort of ``N`` numbers.
    """
    n, d = x.shape
    v = np.random.default_rng(0).standard_normal(d)
    proj = np.empty(n)
    scale = 0.0
    for s in range(0, n, 1 << 12):  # 4 MiB float64 chunks: reused memory, no page faults
        blk = x[s : s + (1 << 12)].astype(np.float64)
        proj[s : s + blk.shape[0]] = blk @ v
        scale = max(scale, float((np.abs(blk) @ np.abs(v)).max()))
    order = np.argsort(proj, kind="stable")
    ps = proj[order]
    close = np.flatnonzero(np.diff(ps) <= 1e-12 * scale)
    if close.size == 0:
        return None
    cand = np.unique(np.concatenate([order[close], order[close + 1]]))
    sub = np.ascontiguousarray(x[cand] + np.float32(0.0))  # -0.0 -> 0.0
    keys = sub.view(np.dtype((np.void, sub.dtype.itemsize * d))).ravel()
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    if first.size == cand.size:
        return None
    rep = np.arange(n)
    rep[cand] = cand[first[inv.ravel()]]  # cand is ascending, so this is the lowest index
    unique_rows, group = np.unique(rep, return_inverse=True)
    mult = np.bincount(group, minlength=unique_rows.size)
    members = np.argsort(group, kind="stable")
    start = np.cumsum(mult) - mult
    return Duplicates(unique_rows, mult, start, members)


# --------------------------------------------------------------------------------------------
# pure helpers over tensors


def block_keys(
    q: Tensor, r: Tensor, r_sq: Tensor | None, metric: str, out: Tensor | None = None
) -> Tensor:
    """Keys (higher = nearer): ``q r^T`` for ip, ``-(|q|^2 + |r|^2 - 2 q r^T)`` for l2.

    ``out``: an optional contiguous buffer of the result's size (saves page faults per block).
    """
    if metric == "l2":
        q_sq = (q * q).sum(1, keepdim=True)
        s = torch.addmm(-r_sq, q, r.T, alpha=2.0, out=out)  # type: ignore[operator]
        return s.sub_(q_sq).clamp_(max=0.0)
    return torch.mm(q, r.T, out=out)


def _order_ties_by_index(key: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows sorted by key descending: reorder runs of equal keys by ascending index."""
    ties = (key[:, 1:] == key[:, :-1]).any(dim=1)
    if not bool(ties.any()):
        return key, idx
    rows = ties.nonzero().flatten()
    sub_i, order = idx[rows].sort(dim=1)
    sub_k, order2 = key[rows].gather(1, order).sort(dim=1, descending=True, stable=True)
    key[rows], idx[rows] = sub_k, sub_i.gather(1, order2)  # in place: callers pass fresh tensors
    return key, idx


def sort_by_key_then_index(
    key: Tensor, idx: Tensor, presorted: bool = False
) -> tuple[Tensor, Tensor]:
    """Sort each row by key descending, ties by index ascending.

    One sort by key, then a second (index, then stable key) sort only for rows holding ties.
    ``presorted``: the rows are already sorted by key descending (FAISS output).
    """
    if not presorted:
        key, order = key.sort(dim=1, descending=True)
        idx = idx.gather(1, order)
    return _order_ties_by_index(key, idx)


def expand_groups(
    key: Tensor, gid: Tensor, mult: Tensor, start: Tensor, members: Tensor, cap: int
) -> tuple[Tensor, Tensor]:
    """Replace each group in a window by (at most ``cap`` of) its items, lowest indices first.

    ``key, gid`` [B, W] -> ``(key, idx)`` [B, L], padded with (-inf, int64 max).
    """
    b, w = gid.shape
    dev = gid.device
    m = mult[gid].clamp(max=cap)
    flat_m = m.reshape(-1)
    total = int(flat_m.sum())
    src = torch.repeat_interleave(torch.arange(b * w, device=dev), flat_m)
    off = torch.arange(total, device=dev) - (flat_m.cumsum(0) - flat_m)[src]
    items = members[start[gid.reshape(-1)[src]] + off]
    pos = (m.cumsum(1) - m).reshape(-1)[src] + off
    width = int(m.sum(1).max())
    out_key = torch.full((b, width), float("-inf"), dtype=key.dtype, device=dev)
    out_idx = torch.full((b, width), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
    row = src // w
    out_key[row, pos] = key.reshape(-1)[src]
    out_idx[row, pos] = items
    return out_key, out_idx


def expand_sorted_groups(
    key: Tensor, gid: Tensor, mult: Tensor, start: Tensor, members: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    """The first ``width`` items of a window of groups taken in column order, each group's
    items ascending: ``key, gid`` [B, W] -> ``(key, idx)`` [B, width], padded with
    (-inf, int64 max). Item ``p`` of a row is ``members[base_j + p]`` for the group ``j``
    holding position ``p`` (a binary search over the groups' cumulative sizes, skipped for rows
    whose first group fills the width), so a group of thousands of identical rows costs one
    gather per output entry and no sort.
    """
    b, w = gid.shape
    dev = gid.device
    m = mult[gid]
    ends = m.cumsum(1)
    base = start[gid] - (ends - m)  # members[base_j + p] is the item at position p of group j
    pos = torch.arange(width, device=dev)
    if bool((m[:, 0] >= width).all()):  # one group fills every row (e.g. collapsed embeddings)
        return key[:, :1].expand(b, width).contiguous(), members[base[:, :1] + pos]
    pos = pos.expand(b, width).contiguous()
    j = torch.searchsorted(ends, pos, right=True)  # the group holding each position
    valid = j < w
    j.clamp_(max=w - 1)
    flat = base.gather(1, j).add_(pos).masked_fill_(~valid, 0)
    out_key = key.gather(1, j).masked_fill_(~valid, float("-inf"))
    out_idx = members[flat].masked_fill_(~valid, torch.iinfo(torch.int64).max)
    return out_key, out_idx


def select_topk(
    key: Tensor,
    gid: Tensor,
    k: int,
    self_rows: Tensor | None,
    groups: tuple[Tensor, Tensor, Tensor] | None,
    complete: bool,
    presorted: bool = False,
    ties_ordered: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tie-correct top-``k`` items from a backend's top-``W`` window over the searched rows.

    ``key, gid`` [B, W]: a valid top-W over the searched (deduplicated) rows: every row scoring
    strictly above the window's worst key is in it (``presorted``: sorted by key descending,
    else in any order; ``ties_ordered``: sorted by (key desc, searched row asc) already, as
    :mod:`evaluation._topk` returns it). Items are ranked by (key desc, item index asc);
    ``self_rows[i]`` is never returned for query ``i``, and ``W > k`` when it is given (or the
    window is complete).
    Returns ``(key [B, k], idx [B, k], redo [B])``: ``redo`` marks rows whose k-th key equals
    the window's worst key, so tied rows may be missing (never set when ``complete``: the window
    holds every searched row).
    """
    worst = key[:, -1] if presorted else key.min(dim=1).values
    if groups is None:
        idx = gid
        if not (presorted and ties_ordered):
            key, idx = sort_by_key_then_index(key, gid, presorted)
    else:
        # groups in (key desc, group) order; where no two groups share a key, their items in
        # that order, each group's ascending, are already in (key desc, index asc) order: take
        # the first k + 1 by a gather (identical rows cost no sort). Rows where groups tie:
        # expand every group and sort.
        if not (presorted and ties_ordered):
            key, gid = sort_by_key_then_index(key, gid, presorted)
        width = k + 1
        # a tie matters where its first group starts within the width
        before = groups[0][gid].cumsum(1)[:, :-1] - groups[0][gid[:, :-1]]
        tied = ((key[:, 1:] == key[:, :-1]) & (before < width)).any(dim=1)
        out_k, idx = expand_sorted_groups(key, gid, *groups, width=width)
        if bool(tied.any()):
            rows = tied.nonzero().flatten()
            tk, ti = expand_groups(key[rows], gid[rows], *groups, cap=width)
            tk, ti = sort_by_key_then_index(tk, ti)
            n = min(width, tk.shape[1])
            out_k[rows, :n], idx[rows, :n] = tk[:, :n], ti[:, :n]
        key = out_k
    if self_rows is not None:  # drop the query's own row, or the last one if it is absent
        b, w = idx.shape
        is_self = idx == self_rows[:, None]
        at = torch.where(is_self.any(dim=1), is_self.to(torch.uint8).argmax(dim=1), w - 1)
        keep = torch.arange(w, device=idx.device) != at[:, None]  # w - 1 per row
        key, idx = key[keep].view(b, w - 1), idx[keep].view(b, w - 1)
    key, idx = key[:, :k], idx[:, :k]
    if complete:
        redo = torch.zeros(key.shape[0], dtype=torch.bool, device=key.device)
    else:
        redo = ~(key[:, k - 1] > worst)
    return key, idx, redo


# --------------------------------------------------------------------------------------------
# block iterator


def search_blocks(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    metric: str,
    self_index: np.ndarray | None = None,
    backend: str = "auto",
    device: object = None,
    block_size: int | None = None,
    progress: bool = False,
    large_k_blocks: bool = False,
    reduce: Callable[[slice, Tensor, Tensor], Any] | None = None,
    index: str = "exact",
    index_options: dict | None = None,
    info: dict | None = None,
) -> Iterator[tuple[slice, Tensor, Tensor]] | Iterator[tuple[slice, Any]]:
    """Yield ``(rows, key [B, k], idx [B, k])`` for consecutive blocks of query rows.

    ``query``/``reference``: validated float32 arrays, already normalised for cosine;
    ``metric`` in {"ip", "l2"}; ``key`` is the score for ip and minus the squared distance for
    l2 (higher = nearer), sorted by (key desc, index asc). ``self_index[i]`` is the reference row
    to leave out for query ``i`` (-1: none); the caller checks that ``k`` neighbours exist.
    Tensors live on the CPU for FAISS and on the search device for torch.

    ``large_k_blocks``: with ``backend="auto"`` on the CPU and a window of at least
    :data:`BLOCK_SELECT_MIN_K`, compute each block's scores with one matrix product and select
    with :func:`evaluation._topk.window_topk` instead of FAISS's heap (kind "cpu-blocks").

    ``reduce``: yield ``(rows, reduce(rows, key, idx))`` instead; on the "cpu-blocks" path it
    runs in the worker threads, in parallel (it must be thread-safe and use torch ops, which
    run single-threaded there, or numpy).

    ``index``/``index_options``: "exact", or an approximate FAISS index chosen as in
    :mod:`evaluation.ann` (which then runs the search). ``info``: a dict that receives
    ``info["backend"]``, the name of the search that ran (:func:`describe_plan`, or
    :meth:`evaluation.ann.AnnParams.describe`).
    """
    from .ann import ann_search_blocks, resolve_index  # lazy: evaluation.ann imports this module

    nq = query.shape[0]
    has_self = self_index is not None
    ann = resolve_index(index, reference.shape[0], reference.shape[1], k + int(has_self),
                        backend, device, index_options)
    if ann is not None:
        if info is not None:
            info["backend"] = ann.describe()
        yield from ann_search_blocks(
            query, reference, k, metric, ann, self_index, block_size, progress, reduce
        )
        return
    dup = find_duplicates(reference)
    searched = reference if dup is None else np.ascontiguousarray(reference[dup.unique_rows])
    n_s = searched.shape[0]
    window = min(n_s, k + int(has_self) + TIE_MARGIN)
    plan = resolve_backend(backend, device, window)
    if large_k_blocks and backend == "auto" and plan.kind == "faiss-cpu":
        scan = scan_kernel() is not None and n_s >= SCAN_MIN_RATIO * window
        # by the window over the items, not over the distinct rows: with many duplicates the
        # work is in expanding groups to k items and in `reduce`, which run in the workers
        wide = min(reference.shape[0], k + int(has_self) + TIE_MARGIN)
        if wide >= (min(BLOCK_SCAN_MIN_K, BLOCK_SELECT_MIN_K) if scan else BLOCK_SELECT_MIN_K):
            plan = Plan("cpu-blocks", plan.device)
    dev = plan.device
    if info is not None:
        info["backend"] = describe_plan(plan)
    self_all = torch.from_numpy(np.asarray(self_index, dtype=np.int64)) if has_self else None
    budget = _GPU_BLOCK_BYTES if dev.type == "cuda" else _CPU_BLOCK_BYTES
    # bytes per query row of a block's window and, with duplicates, of its expansion to
    # k + 1 items (about six int64 temporaries each)
    out_bytes = max(window * 12, 0 if dup is None else (k + 1) * 48)

    cache: dict[str, object] = {}
    cache_lock = threading.Lock()  # finish() may run in worker threads

    def torch_ref() -> tuple[Tensor, Tensor | None]:
        with cache_lock:
            if "ref" not in cache:
                r = torch.from_numpy(searched).to(dev)
                cache["ref"] = r
                cache["sq"] = (r * r).sum(1) if metric == "l2" else None
            return cache["ref"], cache["sq"]  # type: ignore[return-value]

    def groups_on(device_: torch.device):
        if dup is None:
            return None
        key = f"groups:{device_}"
        with cache_lock:
            if key not in cache:
                cache[key] = dup.to(device_)
            return cache[key]

    def refine(q_rows: Tensor, self_rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Exact top-k for rows whose window was too narrow: widen it over full score rows."""
        r, r_sq = torch_ref()
        groups = groups_on(dev)
        step = max(1, budget // (n_s * 4))
        keys, idxs = [], []
        for s in range(0, q_rows.shape[0], step):
            full = block_keys(q_rows[s : s + step], r, r_sq, metric)
            sr = None if self_rows is None else self_rows[s : s + step]
            out_k = torch.empty(full.shape[0], k, dtype=full.dtype, device=dev)
            out_i = torch.empty(full.shape[0], k, dtype=torch.int64, device=dev)
            todo = torch.arange(full.shape[0], device=dev)
            w = window
            while todo.numel():
                w = min(n_s, 4 * w)
                v, g = full[todo].topk(w, dim=1)
                kk, ii, redo = select_topk(
                    v, g, k, None if sr is None else sr[todo], groups, w == n_s
                )
                out_k[todo], out_i[todo] = kk, ii
                todo = todo[redo]
            keys.append(out_k)
            idxs.append(out_i)
        return torch.cat(keys), torch.cat(idxs)

    def finish(
        rows: slice, key: Tensor, gid: Tensor, q_block: Tensor, presorted: bool,
        ties_ordered: bool = False,
    ):
        sr = None if self_all is None else self_all[rows].to(key.device)
        key, idx, redo = select_topk(
            key, gid, k, sr, groups_on(key.device), window == n_s, presorted, ties_ordered
        )
        if bool(redo.any()):
            bad = redo.nonzero().flatten()
            rk, ri = refine(
                q_block[bad.to(q_block.device)].to(dev), None if sr is None else sr[bad].to(dev)
            )
            key[bad] = rk.to(key.device)
            idx[bad] = ri.to(idx.device)
        return (rows, key, idx) if reduce is None else (rows, reduce(rows, key, idx))

    bar = tqdm(total=nq, desc=f"knn ({plan.kind})", unit="query", disable=not progress)
    try:
        if plan.kind.startswith("faiss"):
            index, _keepalive = _faiss_index(plan, searched, metric)
            # rows per call: FAISS's output, and (duplicates) the rows expanded to k items
            step = block_size or max(1, min(nq, _FAISS_OUT_BYTES // out_bytes))
            for s in range(0, nq, step):
                rows = slice(s, min(nq, s + step))
                with _faiss_cpu_tiles(plan):
                    dist, ids = index.search(query[rows], window)
                key = torch.from_numpy(dist)
                if metric == "l2":
                    key = -key
                yield finish(
                    rows, key, torch.from_numpy(ids).long(), torch.from_numpy(query[rows]), True
                )
                bar.update(rows.stop - rows.start)
        elif plan.kind == "cpu-blocks":
            yield from _cpu_block_search(
                query, searched, metric, window, block_size, finish, bar
            )
        else:
            r, r_sq = torch_ref()
            min_rows = min(nq, 64)
            chunk = n_s if n_s * 4 * min_rows <= budget else max(window, budget // (4 * min_rows))
            step = block_size or max(1, min(nq, budget // (4 * chunk), budget // out_bytes))
            q_all = torch.from_numpy(query)
            buf = torch.empty(min(step, nq) * min(chunk, n_s), dtype=torch.float32, device=dev)
            for s in range(0, nq, step):
                rows = slice(s, min(nq, s + step))
                qb = q_all[rows].to(dev, non_blocking=True)
                best_k: Tensor | None = None
                best_i: Tensor | None = None
                for c0 in range(0, n_s, chunk):
                    rc = r[c0 : c0 + chunk]
                    out = buf[: qb.shape[0] * rc.shape[0]].view(qb.shape[0], rc.shape[0])
                    sc = block_keys(
                        qb, rc, None if r_sq is None else r_sq[c0 : c0 + chunk], metric, out
                    )
                    vk, vi = sc.topk(min(window, sc.shape[1]), dim=1, sorted=False)
                    vi += c0
                    if best_k is None:
                        best_k, best_i = vk, vi
                    else:
                        cat_k = torch.cat([best_k, vk], dim=1)
                        cat_i = torch.cat([best_i, vi], dim=1)  # type: ignore[list-item]
                        best_k, pos = cat_k.topk(window, dim=1, sorted=False)
                        best_i = cat_i.gather(1, pos)
                yield finish(rows, best_k, best_i, qb, False)  # type: ignore[arg-type]
                bar.update(rows.stop - rows.start)
    finally:
        bar.close()


#: smallest window (k + tie margin) for which ``large_k_blocks`` leaves FAISS-CPU's heap, with
#: the numpy selection (measured crossover at 30k x 128 on 2 cores: FAISS faster at 163, blocks
#: faster from 218) ...
BLOCK_SELECT_MIN_K = 200
#: ... and with the C scan (at 30k x 128: FAISS 7% faster at window 25, blocks 8% faster at 130
#: and as fast at 56)
BLOCK_SCAN_MIN_K = 48


def _cpu_task_rows(width: int, parts: int) -> int:
    """Query rows per worker task: large enough that MKL streams the reference matrix rarely
    (at most :data:`CPU_TASK_ROWS`), small enough that ``parts`` tasks hold at most
    :data:`_CPU_TASKS_BYTES` of scores (but at least 32 MiB each)."""
    budget = max(32 << 20, _CPU_TASKS_BYTES // parts)
    return max(16, min(CPU_TASK_ROWS, budget // (4 * width)))


#: rows per task of the CPU block search (measured at 30k and 100k x 128 on 2 cores: 400-500
#: rows are within 3% of the best, 250 rows cost 7% more at 100k)
CPU_TASK_ROWS = 512
_CPU_TASKS_BYTES = 512 << 20


@contextmanager
def torch_threads(n: int):
    """Set torch's intra-op threads to ``n`` inside the block, restore them after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cpu_block_search(query, searched, metric, window, block_size, finish, bar):
    """Top-``window`` over ``[B, Nr]`` score blocks, each block a task for one of
    ``torch.get_num_threads()`` Python threads: one single-threaded matrix product, then
    :func:`evaluation._topk.topk_rows` on the scores while they are still in the cache.

    Why threads rather than one parallel matrix product followed by a parallel selection: the
    OpenMP workers of the product spin after it returns and take the cores the selection
    needs, and a whole block of scores no longer fits in the cache (measured at 30k x 128 on
    2 cores: 1.48 s against 1.85 s). So torch runs single-threaded (its intra-op thread count
    is set to 1 while the search runs and restored after) and the rows are spread over threads.
    """
    nq, n_s = query.shape[0], searched.shape[0]
    width = padded_width(n_s, window)
    r = torch.from_numpy(searched)
    if width > n_s:
        r = torch.cat([r, r.new_zeros(width - n_s, r.shape[1])])
    r_sq = (r * r).sum(1) if metric == "l2" else None
    parts = max(1, torch.get_num_threads())
    step = block_size or _cpu_task_rows(width, parts)
    q_all = torch.from_numpy(query)
    local = threading.local()

    def task(s: int):
        rows = slice(s, min(nq, s + step))
        qb = q_all[rows]
        buf = getattr(local, "buf", None)
        if buf is None:  # one buffer per thread: no page faults per block
            buf = local.buf = torch.empty(min(step, nq) * width, dtype=torch.float32)
        out = buf[: qb.shape[0] * width].view(qb.shape[0], width)
        sc = block_keys(qb, r, r_sq, metric, out)
        if width > n_s:
            sc[:, n_s:] = float("-inf")
        key, gid = topk_rows(sc.numpy(), window, None, 1)
        return finish(rows, torch.from_numpy(key), torch.from_numpy(gid), qb, True, True)

    def done(result):
        rows = result[0]
        bar.update(rows.stop - rows.start)
        return result

    starts = range(0, nq, step)
    if parts == 1 or len(starts) == 1:
        for s in starts:
            yield done(task(s))
        return
    with torch_threads(1), ThreadPoolExecutor(parts) as pool:
        pending: deque = deque()
        for s in starts:  # at most parts + 1 tasks in flight: memory stays bounded
            pending.append(pool.submit(task, s))
            if len(pending) > parts:
                yield done(pending.popleft().result())
        while pending:
            yield done(pending.popleft().result())


#: FAISS-CPU's exhaustive search multiplies query x database tiles of this size (its defaults,
#: 4096 x 1024, leave it about twice slower than one large matrix product here; 4096 x 8192 is a
#: 128 MiB tile). Set around each search call and restored after it.
FAISS_CPU_TILES = (4096, 8192)


@contextmanager
def _faiss_cpu_tiles(plan: Plan):
    faiss = _import_faiss()
    cvar = getattr(faiss, "cvar", None)
    names = ("distance_compute_blas_query_bs", "distance_compute_blas_database_bs")
    if plan.kind != "faiss-cpu" or cvar is None or not all(hasattr(cvar, n) for n in names):
        yield
        return
    old = [getattr(cvar, n) for n in names]
    try:
        for n, v in zip(names, FAISS_CPU_TILES):
            setattr(cvar, n, v)
        yield
    finally:
        for n, v in zip(names, old):
            setattr(cvar, n, v)


def _faiss_index(plan: Plan, reference: np.ndarray, metric: str) -> tuple[object, object]:
    """A flat (exact) FAISS index holding ``reference``, plus what must stay alive with it."""
    faiss = _import_faiss()
    d = reference.shape[1]
    if plan.kind == "faiss-gpu":
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        # the device the caller asked for, else torch's current one (not always GPU 0)
        cfg.device = (plan.device.index if plan.device.index is not None
                      else torch.cuda.current_device())
        cls = faiss.GpuIndexFlatIP if metric == "ip" else faiss.GpuIndexFlatL2
        index = cls(res, d, cfg)
        index.add(reference)
        return index, res  # the resources must outlive the index
    index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    index.add(reference)
    return index, None


# --------------------------------------------------------------------------------------------
# public API


def knn(
    query: object,
    reference: object,
    k: int,
    metric: str = "cosine",
    exclude_self: bool = False,
    device: object = None,
    block_size: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    index: str = "auto",
    index_options: dict | None = None,
    return_backend: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, str]:
    """The k nearest neighbours of each query row in ``reference``: exact, or approximate for
    large reference sets (``index``).

    Args:
        query: ``[Nq, d]`` numpy array or torch tensor.
        reference: ``[Nr, d]``; ``None`` means the query set itself.
        k: neighbours per query, ``1 <= k <= Nr`` (``Nr - 1`` with ``exclude_self``).
        metric: "cosine" | "ip" (similarities, descending) | "l2" (squared distances, ascending).
        exclude_self: the query set is the reference set (same rows, same order); leave each
            query's own row out, by index.
        device: where to search (default: CUDA when torch sees a GPU, else the CPU).
        block_size: query rows per block (default: sized to keep a block's scores near
            128 MiB on CPU / 1 GiB on GPU).
        backend: "auto" | "faiss" | "torch" (see the module docstring).
        progress: show a tqdm bar over query blocks.
        index: "auto" (exact below :data:`evaluation.ann.ANN_MIN_N` reference rows, on a CUDA
            device or without FAISS; IVF-Flat otherwise) | "exact" | "ivf" | "ivfpq" | "hnsw"
            (approximate FAISS-CPU indexes, see :mod:`evaluation.ann`).
        index_options: settings of the approximate index, e.g. ``{"nlist": 4000, "nprobe": 32}``
            (defaults by N in :mod:`evaluation.ann`).
        return_backend: also return the name of the search that ran, e.g.
            ``"faiss-cpu IndexFlat exact"`` or ``"faiss-cpu IVF-Flat(nlist=4000, nprobe=16)
            approximate"``.

    Returns:
        ``(scores float32 [Nq, k], indices int64 [Nq, k])`` as numpy arrays, nearest first,
        ties broken by lower reference index (``+ (backend,)`` with ``return_backend``).
        Approximate indexes may miss true neighbours and break ties only among the candidates
        they return (:mod:`evaluation.ann`).
    """
    metric = check_metric(metric)
    q = as_float_matrix(query, "query")
    if reference is None or reference is query:
        r = q
    else:
        r = as_float_matrix(reference, "reference")
        check_same_dim(q, r, "query", "reference")
    self_index = None
    if exclude_self:
        if r is not q and (r.shape != q.shape or not np.array_equal(r, q)):
            raise ValueError(
                "exclude_self=True needs reference to be the query set itself (same rows, same "
                "order); pass reference=None, or exclude_self=False for a separate reference set"
            )
        r = q
        self_index = np.arange(q.shape[0], dtype=np.int64)
    avail = r.shape[0] - int(exclude_self)
    if avail < 1:
        raise ValueError("exclude_self=True needs at least 2 rows: each query needs a neighbour")
    k = check_k(k, "k", upper=avail, upper_what="the number of reference rows"
                + (" other than the query itself" if exclude_self else ""))
    if metric == "cosine":
        same = r is q
        q = normalize_rows(q)
        r = q if same else normalize_rows(r)
    search_metric = "l2" if metric == "l2" else "ip"
    nq = q.shape[0]
    scores = np.empty((nq, k), dtype=np.float32)
    indices = np.empty((nq, k), dtype=np.int64)
    info: dict[str, str] = {}
    for rows, key, idx in search_blocks(
        q, r, k, search_metric, self_index, backend, device, block_size, progress,
        index=index, index_options=index_options, info=info,
    ):
        if metric == "l2":
            key = (-key).clamp_(min=0.0)
        scores[rows] = key.cpu().numpy()
        indices[rows] = idx.cpu().numpy()
    if return_backend:
        return scores, indices, info.get("backend", "none")
    return scores, indices
