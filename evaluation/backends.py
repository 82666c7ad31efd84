"""Exact k-NN backends: one protocol, three implementations, and the choice between them.

The protocol, :class:`KnnBackend`, is one method::

    search(query [B, d], reference [N, d], k) -> (scores [B, k] float32, indices [B, k] int64)

on float32 tensors, ``metric`` (an attribute) in {"ip", "l2"}: inner products sorted descending,
or **squared** Euclidean distances ``|q - r|^2`` sorted ascending (FAISS's convention). The
contract is a *valid window*: every reference row scoring strictly better than the returned
``k``-th score is returned; ties at the ``k``-th place may go either way and, among equal
scores, the order is free. :class:`evaluation.ties.ExactTies` turns any backend into the exact,
index-ordered search of :func:`evaluation.search.knn`; :mod:`evaluation.pml_interop` adapts a
backend to pytorch-metric-learning's ``knn_func`` and back.

Implementations (each one top-k selection path):

* :class:`FaissBackend` -- ``IndexFlatIP`` / ``IndexFlatL2`` on the CPU, ``GpuIndexFlat*`` on a
  CUDA device when FAISS was built with GPUs (FAISS's heap / GPU selection);
* :class:`TorchBackend` -- blockwise ``q @ r.T`` and ``torch.topk`` over reference chunks, merged
  (CPU or CUDA);
* :class:`BlockScanBackend` -- one single-threaded matrix product per block and the large-k
  selection of :mod:`evaluation._topk` (chunk maxima; the optional C scan of
  ``evaluation/_scan.c`` when it is built), sorted by (score, index). It is the opt-in CPU
  accelerator for large k: :func:`evaluation.search.search_blocks` runs it over query blocks
  in worker threads ("cpu-blocks").

:func:`resolve_backend` picks one (``"auto"``: FAISS-GPU on a CUDA device, FAISS-CPU on the
CPU, torch where FAISS is missing or past FAISS-GPU's k limit; ``"blocks"`` opts into
:class:`BlockScanBackend`, which ``"auto"`` takes by itself only for the large windows of the
retrieval metrics). A backend never changes a
process-wide setting outside its ``search`` call: FAISS's BLAS tile sizes are set and restored
inside it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._topk import padded_width, topk_rows

__all__ = [
    "KnnBackend", "FaissBackend", "TorchBackend", "BlockScanBackend", "Plan", "BACKENDS",
    "resolve_backend", "describe_plan", "make_backend", "block_keys", "normalize_rows",
]

BACKENDS = ("auto", "faiss", "torch", "blocks")
#: FAISS-GPU's k-selection limit (GPU_MAX_SELECTION_K for CUDA builds).
FAISS_GPU_MAX_K = 2048
_CPU_BLOCK_BYTES = 1 << 27  # one float32 score block on the CPU (128 MiB)
_GPU_BLOCK_BYTES = 1 << 30  # and on a GPU (1 GiB)
#: FAISS-CPU's exhaustive search multiplies query x database tiles of this size (its defaults,
#: 4096 x 1024, leave it about twice slower than one large matrix product here; 4096 x 8192 is a
#: 128 MiB tile). Set around each search call and restored after it.
FAISS_CPU_TILES = (4096, 8192)


@runtime_checkable
class KnnBackend(Protocol):
    """``search(query, reference, k) -> (scores, indices)``: a valid top-``k`` window (see the
    module docstring); ``metric`` is "ip" (descending) or "l2" (squared, ascending)."""

    metric: str

    def search(self, query: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]: ...


# --------------------------------------------------------------------------------------------
# pure helpers


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Return ``x / max(|x|_2, 1e-12)`` row-wise in float32 (all-zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    inv = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)
    return x * inv[:, None]  # float32 throughout: no float64 copy of a large set


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


def to_scores(key: Tensor, metric: str) -> Tensor:
    """Keys (higher = nearer) to the protocol's scores: l2 keys are minus squared distances."""
    return -key if metric == "l2" else key


# --------------------------------------------------------------------------------------------
# choosing a backend


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
    """Which implementation runs the search: ``kind`` in {"faiss-gpu", "faiss-cpu", "torch",
    "cpu-blocks", "custom"}."""

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
    if backend == "blocks":
        if dev.type != "cpu":
            raise ValueError("backend='blocks' (the CPU block scan) runs on the CPU; pass "
                             "device='cpu' or use backend='auto' / 'torch' on a GPU")
        return Plan("cpu-blocks", dev)
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


def describe_plan(plan: Plan, backend: object = None) -> str:
    """One-line name of an exact search backend, as results report it (``backend``)."""
    if plan.kind == "custom":
        return f"{getattr(backend, 'name', type(backend).__name__)} exact (custom backend)"
    return {
        "faiss-cpu": "faiss-cpu IndexFlat exact",
        "faiss-gpu": f"faiss-gpu GpuIndexFlat exact ({plan.device})",
        "torch": f"torch exact ({plan.device})",
        "cpu-blocks": "torch-cpu blocks exact (matmul + top-k scan)",
    }.get(plan.kind, f"{plan.kind} exact")


def make_backend(plan: Plan, metric: str, query_rows: int | None = None) -> KnnBackend:
    """The backend object of a :class:`Plan` (not for "custom": the caller holds that one)."""
    if plan.kind.startswith("faiss"):
        return FaissBackend(metric, plan.device)
    if plan.kind == "cpu-blocks":
        return BlockScanBackend(metric)
    return TorchBackend(metric, plan.device, query_rows=query_rows)


class _PerReference:
    """What a backend derives from its reference set (an index, norms), kept while the same
    tensor is passed again (a search calls ``search`` once per query block)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # BlockScanBackend.search runs in worker threads
        self._ref: Tensor | None = None
        self._tag: object = None
        self._value: object = None

    def get(self, reference: Tensor, build, tag: object = None):
        with self._lock:
            if self._ref is not reference or self._tag != tag:
                self._value, self._ref, self._tag = build(reference), reference, tag
            return self._value


# --------------------------------------------------------------------------------------------
# FAISS


@contextmanager
def _faiss_cpu_tiles(faiss):
    cvar = getattr(faiss, "cvar", None)
    names = ("distance_compute_blas_query_bs", "distance_compute_blas_database_bs")
    if cvar is None or not all(hasattr(cvar, n) for n in names):
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


class FaissBackend:
    """Exact FAISS flat index: ``IndexFlatIP`` / ``IndexFlatL2`` on the CPU, or
    ``GpuIndexFlatIP`` / ``GpuIndexFlatL2`` on ``device`` when it is a CUDA device (needs a FAISS
    build with GPUs; ``k <= 2048``). Output is sorted by score, ties in FAISS's order."""

    name = "faiss"

    def __init__(self, metric: str = "ip", device: object = "cpu") -> None:
        self.metric = metric
        self.device = torch.device(device)  # type: ignore[arg-type]
        self._faiss = _import_faiss()
        if self._faiss is None:
            raise ImportError("FaissBackend needs faiss (`pip install faiss-cpu` or faiss-gpu)")
        self._index = _PerReference()

    def _build(self, reference: Tensor) -> tuple[object, object]:
        faiss = self._faiss
        ref = np.ascontiguousarray(reference.detach().cpu().numpy(), dtype=np.float32)
        d = ref.shape[1]
        if self.device.type == "cuda":
            res = faiss.StandardGpuResources()
            cfg = faiss.GpuIndexFlatConfig()
            # the device the caller asked for, else torch's current one (not always GPU 0)
            cfg.device = (self.device.index if self.device.index is not None
                          else torch.cuda.current_device())
            cls = faiss.GpuIndexFlatIP if self.metric == "ip" else faiss.GpuIndexFlatL2
            index = cls(res, d, cfg)
            index.add(ref)
            return index, res  # the resources must outlive the index
        index = faiss.IndexFlatIP(d) if self.metric == "ip" else faiss.IndexFlatL2(d)
        index.add(ref)
        return index, None

    def search(self, query: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
        index, _res = self._index.get(reference, self._build)
        q = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
        if self.device.type == "cuda":
            dist, ids = index.search(q, k)
        else:
            with _faiss_cpu_tiles(self._faiss):
                dist, ids = index.search(q, k)
        return torch.from_numpy(dist), torch.from_numpy(ids).long()


# --------------------------------------------------------------------------------------------
# torch


class TorchBackend:
    """Blockwise ``q @ r.T`` (or squared distances) and ``torch.topk``, on ``device``: query
    rows in blocks, the reference in chunks when one block's scores would pass the budget
    (128 MiB on the CPU, 1 GiB on a GPU), chunk top-k merged. Output sorted by score."""

    name = "torch"

    def __init__(self, metric: str = "ip", device: object = "cpu",
                 block_size: int | None = None, query_rows: int | None = None) -> None:
        self.metric = metric
        self.device = torch.device(device)  # type: ignore[arg-type]
        self.block_size = block_size
        self.query_rows = query_rows  # the whole search's query rows (sizes the chunks)
        self._ref = _PerReference()

    def chunk_rows(self, nq: int, n: int, k: int) -> int:
        """Reference rows per chunk: all of them unless 64 query rows' scores pass the budget."""
        budget = self._budget()
        min_rows = min(nq, 64)
        return n if n * 4 * min_rows <= budget else max(k, budget // (4 * min_rows))

    def _budget(self) -> int:
        from . import backends  # tests shrink the budgets on the module

        return backends._GPU_BLOCK_BYTES if self.device.type == "cuda" else \
            backends._CPU_BLOCK_BYTES

    def _prepare(self, reference: Tensor) -> tuple[Tensor, Tensor | None]:
        r = reference.to(self.device)
        return r, (r * r).sum(1) if self.metric == "l2" else None

    def search(self, query: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
        from . import backends  # tests spy on backends.block_keys

        r, r_sq = self._ref.get(reference, self._prepare)
        nq, n = query.shape[0], r.shape[0]
        budget = self._budget()
        chunk = self.chunk_rows(self.query_rows or nq, n, k)
        step = self.block_size or max(1, min(nq, budget // (4 * chunk), budget // (12 * k)))
        keys, idxs = [], []
        size = min(step, nq) * min(chunk, n)
        buf = getattr(self, "_buf", None)
        if buf is None or buf.numel() < size:  # reused across calls: no page faults per block
            buf = self._buf = torch.empty(size, dtype=torch.float32, device=self.device)
        for s in range(0, nq, step):
            qb = query[s : s + step].to(self.device, non_blocking=True)
            best_k: Tensor | None = None
            best_i: Tensor | None = None
            for c0 in range(0, n, chunk):
                rc = r[c0 : c0 + chunk]
                out = buf[: qb.shape[0] * rc.shape[0]].view(qb.shape[0], rc.shape[0])
                sc = backends.block_keys(
                    qb, rc, None if r_sq is None else r_sq[c0 : c0 + chunk], self.metric, out
                )
                vk, vi = sc.topk(min(k, sc.shape[1]), dim=1, sorted=False)
                vi += c0
                if best_k is None:
                    best_k, best_i = vk, vi
                else:
                    cat_k = torch.cat([best_k, vk], dim=1)
                    cat_i = torch.cat([best_i, vi], dim=1)  # type: ignore[list-item]
                    best_k, pos = cat_k.topk(k, dim=1, sorted=False)
                    best_i = cat_i.gather(1, pos)
            best_k, order = best_k.sort(dim=1, descending=True)  # type: ignore[union-attr]
            keys.append(best_k)
            idxs.append(best_i.gather(1, order))  # type: ignore[union-attr]
        key = keys[0] if len(keys) == 1 else torch.cat(keys)
        idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs)
        return to_scores(key, self.metric), idx


# --------------------------------------------------------------------------------------------
# CPU blocks + the large-k selection of evaluation._topk (numpy, or the optional C scan)


class BlockScanBackend:
    """One matrix product per call (run it on blocks of a few hundred query rows, in the calling
    thread's torch settings) and :func:`evaluation._topk.topk_rows` while the scores are in the
    cache. Output sorted by (score, reference index): ``ties_ordered``."""

    name = "cpu-blocks"
    ties_ordered = True

    def __init__(self, metric: str = "ip") -> None:
        self.metric = metric
        self._ref = _PerReference()
        self._local = threading.local()

    def _prepare(self, reference: Tensor, width: int) -> tuple[Tensor, Tensor | None]:
        r, n = reference, reference.shape[0]
        if width > n:  # padding columns, set to -inf after the product
            r = torch.cat([r, r.new_zeros(width - n, r.shape[1])])
        return r, (r * r).sum(1) if self.metric == "l2" else None

    def search(self, query: Tensor, reference: Tensor, k: int) -> tuple[Tensor, Tensor]:
        n = reference.shape[0]
        width = padded_width(n, k)
        r, r_sq = self._ref.get(reference, lambda ref: self._prepare(ref, width), width)
        rows = query.shape[0]
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < rows * width:  # one buffer per thread: no page faults
            buf = self._local.buf = torch.empty(rows * width, dtype=torch.float32)
        out = buf[: rows * width].view(rows, width)
        sc = block_keys(query, r, r_sq, self.metric, out)
        if width > n:
            sc[:, n:] = float("-inf")
        key, gid = topk_rows(sc.numpy(), k, None, 1)
        return to_scores(torch.from_numpy(key), self.metric), torch.from_numpy(gid)
