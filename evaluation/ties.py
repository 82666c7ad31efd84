"""Exact ties and duplicate rows: one wrapper, :class:`ExactTies`, over any k-NN backend.

A backend (:class:`evaluation.backends.KnnBackend`) returns a *valid window*: every reference
row scoring strictly better than its last returned score is in it, in any order among equal
scores. This module makes the search exact and deterministic:

* **Order.** Neighbours are ordered by (score, reference index): among equal scores the lower
  reference index comes first, and at the k-th place the lower indices are kept. Neither FAISS
  nor ``torch.topk`` promises this, and BLAS does not even promise that identical reference rows
  get identical float32 scores (a row in an edge tile of the matrix product is summed in another
  order).
* **Duplicates.** Identical reference rows are grouped first (:func:`find_duplicates`: bitwise;
  one pass over the data and a sort) and searched once, so they share one score and tie
  exactly; a window of groups is expanded to its first ``k`` items in index order by a gather
  (:func:`expand_sorted_groups`), with no sort unless two groups in it share a score (so 10,000
  identical rows cost what 10,000 distinct ones do).
* **Margin.** The backend is asked for a slightly wider window (``k +`` :data:`TIE_MARGIN`,
  plus one for the query itself), re-sorted by (score, index) (:func:`select_topk`).
* **Boundary.** A row whose k-th score equals the window's worst score (the tie may go on past
  the window) is recomputed over the whole reference set with wider windows until it is decided
  (:meth:`TieSearch.refine`, a torch matrix product on the search device).

The result is exact with respect to the float32 scores that the backend computed. Residual
caveat: *distinct* vectors whose scores are equal in exact arithmetic or differ by less than
float32 rounding (about 1e-7 relative) can be ordered differently by different backends or block
sizes. ``self_rows`` (the query set is the reference set) removes each query's own row by
index, not by distance, so a duplicate of the query stays a valid neighbour.

Internally scores are *keys*, higher = nearer: the inner product, or minus the squared distance.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .backends import _CPU_BLOCK_BYTES, _GPU_BLOCK_BYTES, KnnBackend, block_keys, to_scores

__all__ = [
    "TIE_MARGIN", "Duplicates", "find_duplicates", "sort_by_key_then_index", "expand_groups",
    "expand_sorted_groups", "select_topk", "ExactTies", "TieSearch",
]

#: extra neighbours fetched so that ties at the k-th place can be resolved by index.
TIE_MARGIN = 8


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
# selection over a window


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
# the wrapper


class TieSearch:
    """One prepared search: ``backend`` over the distinct rows of ``reference`` for ``k``
    neighbours (``has_self``: each query's own row is to be left out, so one more is fetched).

    :meth:`block` runs the backend on a block of query rows and returns the exact
    ``(key [B, k], idx [B, k])``; :meth:`finish` does the same from a window the caller already
    has (the CPU block path computes it in worker threads). Thread-safe.
    """

    def __init__(self, backend: KnnBackend, reference: np.ndarray, k: int, has_self: bool,
                 device: torch.device, dup: Duplicates | None | bool = True) -> None:
        self.backend, self.metric, self.k, self.device = backend, backend.metric, k, device
        self.dup = find_duplicates(reference) if dup is True else (dup or None)
        searched = (reference if self.dup is None
                    else np.ascontiguousarray(reference[self.dup.unique_rows]))
        self.searched = torch.from_numpy(searched)
        self.n_searched = searched.shape[0]
        self.window = min(self.n_searched, k + int(has_self) + TIE_MARGIN)
        self.ties_ordered = bool(getattr(backend, "ties_ordered", False))
        self._cache: dict[str, object] = {}
        self._lock = threading.Lock()

    def _torch_ref(self) -> tuple[Tensor, Tensor | None]:
        with self._lock:
            if "ref" not in self._cache:
                r = self.searched.to(self.device)
                self._cache["ref"] = r
                self._cache["sq"] = (r * r).sum(1) if self.metric == "l2" else None
            return self._cache["ref"], self._cache["sq"]  # type: ignore[return-value]

    def groups_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        if self.dup is None:
            return None
        key = f"groups:{device}"
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self.dup.to(device)
            return self._cache[key]  # type: ignore[return-value]

    def window_of(self, q_block: Tensor) -> tuple[Tensor, Tensor]:
        """The backend's window over the searched rows, as keys (higher = nearer)."""
        scores, gid = self.backend.search(q_block, self.searched, self.window)
        return to_scores(scores, self.metric), gid

    def block(self, q_block: Tensor, self_rows: Tensor | None) -> tuple[Tensor, Tensor]:
        key, gid = self.window_of(q_block)
        return self.finish(key, gid, q_block, self_rows)

    def finish(self, key: Tensor, gid: Tensor, q_block: Tensor,
               self_rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Exact top-k from a window sorted by key (descending)."""
        sr = None if self_rows is None else self_rows.to(key.device)
        key, idx, redo = select_topk(
            key, gid, self.k, sr, self.groups_on(key.device), self.window == self.n_searched,
            True, self.ties_ordered,
        )
        if bool(redo.any()):
            bad = redo.nonzero().flatten()
            rk, ri = self.refine(
                q_block[bad.to(q_block.device)].to(self.device),
                None if sr is None else sr[bad].to(self.device),
            )
            key[bad] = rk.to(key.device)
            idx[bad] = ri.to(idx.device)
        return key, idx

    def refine(self, q_rows: Tensor, self_rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Exact top-k for rows whose window was too narrow: widen it over full score rows."""
        r, r_sq = self._torch_ref()
        groups = self.groups_on(self.device)
        k, n_s = self.k, self.n_searched
        budget = _GPU_BLOCK_BYTES if self.device.type == "cuda" else _CPU_BLOCK_BYTES
        step = max(1, budget // (n_s * 4))
        keys, idxs = [], []
        for s in range(0, q_rows.shape[0], step):
            full = block_keys(q_rows[s : s + step], r, r_sq, self.metric)
            sr = None if self_rows is None else self_rows[s : s + step]
            out_k = torch.empty(full.shape[0], k, dtype=full.dtype, device=self.device)
            out_i = torch.empty(full.shape[0], k, dtype=torch.int64, device=self.device)
            todo = torch.arange(full.shape[0], device=self.device)
            w = self.window
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


class ExactTies:
    """Exact-tie repair and duplicate grouping over any :class:`KnnBackend` (also one that wraps
    a pytorch-metric-learning ``knn_func``); itself a backend with exact, index-ordered output.

    ``search(query, reference, k, self_index=None)``: ``self_index[i]`` is the reference row
    left out for query ``i`` (the query set is the reference set).
    """

    def __init__(self, backend: KnnBackend, device: object = "cpu") -> None:
        self.backend = backend
        self.metric = backend.metric
        self.device = torch.device(device)  # type: ignore[arg-type]

    def prepare(self, reference: np.ndarray, k: int, has_self: bool) -> TieSearch:
        return TieSearch(self.backend, reference, k, has_self, self.device)

    def search(self, query: Tensor, reference: Tensor, k: int,
               self_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ref = np.ascontiguousarray(reference.detach().cpu().numpy(), dtype=np.float32)
        run = self.prepare(ref, k, self_index is not None)
        key, idx = run.block(query.detach().float(), self_index)
        return to_scores(key, self.metric), idx
