"""Approximate k-nearest-neighbour search with FAISS (IVF-Flat, IVF-PQ, HNSW) for large galleries.

Exact search (:mod:`evaluation.search`) costs ``N_query x N_reference x d`` multiply-adds: about
16 s for 100k x 128 on 2 CPU cores, about half an hour for 1M x 128. An approximate index
looks at a small part of the reference set per query instead. :func:`evaluation.knn` and
:func:`evaluation.retrieval_metrics` select it with ``index=``:

``"exact"``
    the exact search of :mod:`evaluation.search` (FAISS flat / torch / CPU blocks).
``"auto"`` (the default)
    ``"exact"`` below :data:`ANN_MIN_N` reference rows, on a CUDA device (exact search on a GPU
    is fast) and when FAISS is not installed; ``"ivf"`` otherwise.
``"ivf"``: ``IndexIVFFlat``
    k-means partitions the reference set into ``nlist`` cells (Jegou, Douze, Schmid, "Product
    Quantization for Nearest Neighbor Search", TPAMI 2011, the IVF part); a query is compared
    exactly with the rows of its ``nprobe`` nearest cells. Scores are exact; a neighbour is
    missed only when it lies outside the probed cells.
``"ivfpq"``: ``IndexIVFPQ`` + exact re-ranking
    the same cells, rows stored as ``pq_m`` product-quantisation codes of ``pq_bits`` bits
    (Jegou et al. 2011); the ``refine x window`` best candidates by the PQ estimate are re-scored
    exactly (``IndexRefineFlat``), so returned scores are exact (``refine=0``: no re-ranking,
    scores are the PQ estimates).
``"hnsw"``: ``IndexHNSWFlat``
    a hierarchical navigable small-world graph (Malkov, Yashunin, TPAMI 2018) with ``hnsw_m``
    links per node, built with ``ef_construction`` and searched with ``ef_search`` candidates.
    Scores are exact. Building is slower than IVF training (about 1.5 min at 100k x 128 on 2
    cores); with the large ``k`` of the retrieval metrics (the largest class) IVF is faster.

Defaults by the reference size ``N`` and the searched window ``W`` (``k``, plus one for the
query itself): ``nlist = round(4 sqrt(N))`` (at most ``N / 39``, FAISS's minimum of training
points per centroid), k-means trained on ``min(N, 64 nlist)`` rows drawn with ``seed``;
``nprobe = max(32, ceil(4 W nlist / N))`` (at least 32 cells, and enough that the probed
cells hold about 4 W rows; at most ``nlist``); ``pq_m`` = the largest divisor of ``d`` up to
``d / 8`` (one byte per 8 dimensions: 32x smaller than float32), ``pq_bits = 8`` (fewer when
``N`` is too small to train 256 centroids), sub-quantisers trained by 10 k-means iterations on
at most 64 points per centroid, ``refine = 4``; ``hnsw_m = 32``, ``ef_construction = 80``,
``ef_search = max(64, 2 W)`` (a given ``ef_search`` below ``W`` is a ``ValueError``: FAISS's
HNSW would return fewer than ``W`` neighbours). Any of them can be set with
``index_options={...}``. IVF-PQ
trains on its ``train_size`` sample, which must hold at least ``2**pq_bits`` rows (one per
sub-quantiser centroid); the defaults always do, and a ``train_size`` below that (given, or
``64 nlist`` from a given ``nlist``) is a ``ValueError`` naming the fixes rather than silently
enlarged, so the options that ran are the options that were asked for.

Result format: the same as exact search (``key`` higher = nearer, sorted by (key desc, index
asc), the query's own row excluded by index). What cannot hold: ties at the k-th place are broken
by index only among the candidates the index returned (exact search widens its window until
the tie is decided; an approximate index has no complete window to widen), identical reference
rows are not grouped, and a neighbour outside the probed cells / graph walk is missing.
Rows for which the index returns fewer than ``W`` neighbours (possible with a small
``nprobe``) are searched exactly instead. IVF results are deterministic given ``seed``; HNSW's
graph is built by several threads and can differ between runs.

Everything runs on FAISS-CPU (an approximate index on a CUDA device is built on the CPU).
:func:`structured_embeddings` makes the synthetic data with a known class structure that the
tests and ``benchmarks/retrieval.py --scale`` measure the accuracy cost on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from contrastive.validation import check_positive_int

from .backends import block_keys
from .ties import select_topk

__all__ = [
    "INDEXES",
    "ANN_MIN_N",
    "AnnParams",
    "resolve_index",
    "default_params",
    "build_index",
    "ann_search_blocks",
    "structured_embeddings",
]

INDEXES = ("auto", "exact", "ivf", "ivfpq", "hnsw")
#: ``index="auto"`` uses an approximate index (IVF-Flat) from this many reference rows on; below
#: it exact search takes under about a minute on 2 cores (100k x 128: ~16 s, 250k: ~100 s).
ANN_MIN_N = 250_000
#: options each index kind accepts in ``index_options``
OPTIONS = {
    "ivf": ("nlist", "nprobe", "train_size", "seed"),
    "ivfpq": ("nlist", "nprobe", "train_size", "seed", "pq_m", "pq_bits", "refine"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
}
_NAMES = {"ivf": "IVF-Flat", "ivfpq": "IVF-PQ", "hnsw": "HNSW-Flat"}
_OUT_BYTES = 1 << 26  # (scores, ids) of one FAISS search call
_MIN_POINTS_PER_CENTROID = 39  # FAISS warns below this many training points per centroid


@dataclass(frozen=True)
class AnnParams:
    """The approximate index and its settings (see the module docstring for the defaults)."""

    kind: str  # "ivf" | "ivfpq" | "hnsw"
    nlist: int = 0
    nprobe: int = 0
    train_size: int = 0
    seed: int = 0
    pq_m: int = 0
    pq_bits: int = 8
    refine: int = 0
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 0

    def describe(self) -> str:
        """One-line name of the backend, e.g. ``faiss-cpu IVF-Flat(nlist=4000, nprobe=16)``."""
        if self.kind == "hnsw":
            s = f"M={self.hnsw_m}, efConstruction={self.ef_construction}, efSearch={self.ef_search}"
        else:
            s = f"nlist={self.nlist}, nprobe={self.nprobe}"
            if self.kind == "ivfpq":
                s += f", m={self.pq_m}x{self.pq_bits}b, refine={self.refine}"
        return f"faiss-cpu {_NAMES[self.kind]}({s}) approximate"


def _positive_int(value: object, name: str) -> int:
    return check_positive_int(value, f"index_options[{name!r}]")


def default_params(kind: str, n: int, d: int, window: int) -> AnnParams:
    """Default settings for ``n`` reference rows of dimension ``d`` and ``window`` neighbours."""
    if kind not in OPTIONS:
        raise ValueError(f"kind must be one of {tuple(OPTIONS)}, got {kind!r}")
    if kind == "hnsw":
        return AnnParams("hnsw", ef_search=max(64, 2 * window))
    nlist = max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CENTROID))
    nprobe = min(nlist, max(32, math.ceil(4 * window * nlist / n)))
    params = AnnParams(kind, nlist=nlist, nprobe=nprobe, train_size=min(n, 64 * nlist))
    if kind == "ivfpq":
        pq_m = max(m for m in range(1, max(1, d // 8) + 1) if d % m == 0)
        bits = int(min(8, max(1, math.floor(math.log2(max(2, n // _MIN_POINTS_PER_CENTROID))))))
        params = replace(params, pq_m=pq_m, pq_bits=bits, refine=4)
    return params


def resolve_index(
    index: object,
    n_reference: int,
    d: int,
    window: int,
    backend: str = "auto",
    device: object = None,
    index_options: dict | None = None,
) -> AnnParams | None:
    """Validate ``index`` / ``index_options``; ``None`` means exact search.

    ``"auto"`` is exact below :data:`ANN_MIN_N` rows, with a CUDA device or without FAISS, and
    IVF-Flat otherwise (the module docstring lists the rules and defaults).
    """
    if index not in INDEXES:
        raise ValueError(
            f"index must be one of {INDEXES} (exact search, or an approximate FAISS index), "
            f"got {index!r}"
        )
    if index_options is not None and not isinstance(index_options, dict):
        raise ValueError(
            f"index_options must be a dict such as {{'nprobe': 32}}, got {index_options!r}"
        )
    if index == "exact" or (index == "auto" and (
        n_reference < ANN_MIN_N or backend in ("torch", "blocks") or _on_cuda(device)
        or _faiss() is None
    )):
        if index_options:
            raise ValueError(
                f"index_options is only used by an approximate index (index={index!r} chose "
                "exact search here); pass index='ivf', 'ivfpq' or 'hnsw' with it, or drop "
                "index_options"
            )
        return None
    kind = "ivf" if index == "auto" else str(index)
    if backend in ("torch", "blocks"):
        raise ValueError(
            f"index={index!r} is a FAISS index but backend={backend!r}; use backend='auto' (or "
            f"'faiss'), or index='exact' for the {backend} search"
        )
    if _faiss() is None:
        raise ImportError(
            f"index={index!r} needs FAISS; `pip install faiss-cpu`, or use index='exact'"
        )
    params = default_params(kind, n_reference, d, window)
    opts = dict(index_options or {})
    unknown = sorted(set(opts) - set(OPTIONS[kind]))
    if unknown:
        raise ValueError(
            f"index_options {unknown} do not apply to index={kind!r}; it takes "
            f"{list(OPTIONS[kind])}"
        )
    asked = set(opts)  # what the caller set (nprobe / train_size may follow from nlist below)
    for name, value in opts.items():
        if name == "refine" or name == "seed":
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(
                    f"index_options[{name!r}] must be an integer >= 0, got {value!r}"
                )
            opts[name] = int(value)
        else:
            opts[name] = _positive_int(value, name)
    if "nlist" in opts and "nprobe" not in opts:  # keep the default coverage for the new nlist
        opts["nprobe"] = min(opts["nlist"], max(32, math.ceil(4 * window * opts["nlist"]
                                                               / n_reference)))
    if "nlist" in opts and "train_size" not in opts:
        opts["train_size"] = min(n_reference, 64 * opts["nlist"])
    params = replace(params, **opts)
    if kind == "hnsw" and params.ef_search < window:
        raise ValueError(
            f"index_options ef_search={params.ef_search} is below the {window} neighbours "
            "searched per query (k, plus one for the query itself); FAISS's HNSW keeps only "
            "ef_search candidates, so it would return fewer and miss true neighbours; use "
            f"ef_search >= {window} (the default is max(64, 2 x {window}) = "
            f"{max(64, 2 * window)})"
        )
    if kind != "hnsw":
        if params.nlist > n_reference:
            raise ValueError(
                f"index_options nlist={params.nlist} exceeds the {n_reference} reference rows; "
                f"use nlist <= {n_reference // _MIN_POINTS_PER_CENTROID or 1}"
            )
        if params.nprobe > params.nlist:
            raise ValueError(
                f"index_options nprobe={params.nprobe} exceeds nlist={params.nlist}; use "
                f"nprobe <= nlist (nprobe = nlist searches every cell)"
            )
        if params.train_size < params.nlist or params.train_size > n_reference:
            raise ValueError(
                f"index_options train_size={params.train_size} must be between nlist="
                f"{params.nlist} and the number of reference rows ({n_reference})"
            )
    if kind == "ivfpq":
        if d % params.pq_m:
            raise ValueError(
                f"index_options pq_m={params.pq_m} must divide the dimension d={d}"
            )
        if params.pq_bits > 16:
            raise ValueError(f"index_options pq_bits={params.pq_bits} must be <= 16 (8 is usual)")
        centroids = 1 << params.pq_bits
        if params.train_size < centroids:  # FAISS's PQ k-means needs a point per centroid
            from_nlist = "nlist" in asked and "train_size" not in asked
            fixes = []
            if n_reference >= centroids:
                fixes.append(f"train_size >= {centroids}")
                if from_nlist:
                    fixes.append(f"nlist >= {-(-centroids // 64)}")
            fixes.append(f"pq_bits <= {params.train_size.bit_length() - 1}")
            raise ValueError(
                f"index_options train_size={params.train_size}"
                + (f" (64 * nlist, the default for nlist={params.nlist})" if from_nlist else "")
                + f" is fewer than the 2**pq_bits = {centroids} centroids each PQ "
                f"sub-quantiser trains (pq_bits={params.pq_bits}); pass index_options with "
                + " or ".join(fixes)
            )
    return params


def _on_cuda(device: object) -> bool:
    if device is None:
        return torch.cuda.is_available()
    try:
        return torch.device(device).type == "cuda"  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        return False  # the exact search reports the bad device


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_index(reference: np.ndarray, metric: str, params: AnnParams):
    """Train (on a seeded sample) and fill a FAISS-CPU index over ``reference``.

    ``metric`` in {"ip", "l2"} (cosine callers pass normalised rows and "ip").
    """
    faiss = _faiss()
    n, d = reference.shape
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if params.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, fmetric)
        index.hnsw.efConstruction = params.ef_construction
        index.add(reference)
        index.hnsw.efSearch = params.ef_search
        return index
    quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if params.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, params.nlist, fmetric)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, params.nlist, params.pq_m, params.pq_bits, fmetric)
    index.cp.seed = params.seed
    if params.kind == "ivfpq":  # FAISS's default (25 iterations, 256 points per centroid) costs
        index.pq.cp.seed = params.seed  # ~2 s per sub-quantiser on 2 busy cores
        index.pq.cp.niter = 10
        index.pq.cp.max_points_per_centroid = 64
    rng = np.random.default_rng(params.seed)
    sample = reference
    if params.train_size < n:
        sample = reference[np.sort(rng.choice(n, params.train_size, replace=False))]
    index.train(np.ascontiguousarray(sample))
    index.add(reference)
    index.nprobe = params.nprobe
    if params.kind == "ivfpq" and params.refine > 0:
        refined = faiss.IndexRefineFlat(index, faiss.swig_ptr(reference))
        refined.k_factor = float(params.refine)
        return refined
    return index


def _exact_rows(
    q: np.ndarray, reference: np.ndarray, window: int, metric: str
) -> tuple[Tensor, Tensor]:
    """Exact top-``window`` (key, index) of a few query rows over the whole reference set."""
    r = torch.from_numpy(reference)
    r_sq = (r * r).sum(1) if metric == "l2" else None
    step = max(1, (1 << 27) // (4 * r.shape[0]))
    keys, idxs = [], []
    for s in range(0, q.shape[0], step):
        sc = block_keys(torch.from_numpy(q[s : s + step]), r, r_sq, metric)
        v, i = sc.topk(window, dim=1)
        keys.append(v)
        idxs.append(i)
    return torch.cat(keys), torch.cat(idxs)


def ann_search_blocks(
    query: np.ndarray,
    reference: np.ndarray,
    k: int,
    metric: str,
    params: AnnParams,
    self_index: np.ndarray | None = None,
    block_size: int | None = None,
    progress: bool = False,
    reduce: Callable[[slice, Tensor, Tensor], Any] | None = None,
) -> Iterator[tuple[slice, Tensor, Tensor]] | Iterator[tuple[slice, Any]]:
    """Approximate counterpart of :func:`evaluation.search.search_blocks` (same arguments and
    result format; ``query``/``reference`` already normalised for cosine, ``metric`` in
    {"ip", "l2"}). Tensors are on the CPU."""
    nq, n = query.shape[0], reference.shape[0]
    has_self = self_index is not None
    window = min(n, k + int(has_self))
    index = build_index(reference, metric, params)
    self_all = torch.from_numpy(np.asarray(self_index, dtype=np.int64)) if has_self else None
    step = block_size or max(1, min(nq, _OUT_BYTES // (window * 12)))
    bar = tqdm(total=nq, desc=f"knn ({params.kind})", unit="query", disable=not progress)
    try:
        for s in range(0, nq, step):
            rows = slice(s, min(nq, s + step))
            dist, ids = index.search(query[rows], window)
            key = torch.from_numpy(dist)
            if metric == "l2":
                key = -key
            idx = torch.from_numpy(ids).long()
            short = (idx < 0).any(dim=1)
            if bool(short.any()):  # fewer than `window` found: search those rows exactly
                bad = short.nonzero().flatten()
                key[bad], idx[bad] = _exact_rows(
                    query[rows][bad.numpy()], reference, window, metric
                )
            sr = None if self_all is None else self_all[rows]
            key, idx, _ = select_topk(key, idx, k, sr, None, complete=True)
            yield (rows, key, idx) if reduce is None else (rows, reduce(rows, key, idx))
            bar.update(rows.stop - rows.start)
    finally:
        bar.close()


def structured_embeddings(
    n: int,
    n_classes: int = 1000,
    d: int = 128,
    noise: float = 0.7,
    intrinsic_dim: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic unit-norm embeddings with a known class structure: ``(x [n, d] float32, y [n])``.

    Class ``c`` has a unit-norm random centre ``mu_c``; item ``i`` of class ``y_i`` is
    ``x_i = normalise(mu_{y_i} + noise * (z_i B / sqrt(m) + 0.2 e_i / sqrt(d)))`` with ``z_i``
    standard normal in ``m = intrinsic_dim`` dimensions, ``B`` a class-specific random
    orthonormal ``[m, d]`` basis (the within-class variation of a trained embedding is
    low-dimensional) and ``e_i`` a small isotropic component. Labels are uniform over the
    classes. Generated in chunks: peak memory is about the output's size.
    """
    for name, v in (("n", n), ("n_classes", n_classes), ("d", d), ("intrinsic_dim", intrinsic_dim)):
        _positive_int(v, name)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    if intrinsic_dim > d:
        raise ValueError(f"intrinsic_dim={intrinsic_dim} must be <= d={d}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    mu = rng.standard_normal((n_classes, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    g = rng.standard_normal((n_classes, d, intrinsic_dim)).astype(np.float32)
    basis = np.linalg.qr(g)[0].transpose(0, 2, 1) / np.float32(math.sqrt(intrinsic_dim))
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 13):
        yc = y[s : s + (1 << 13)]
        z = rng.standard_normal((yc.size, intrinsic_dim), dtype=np.float32)
        e = rng.standard_normal((yc.size, d), dtype=np.float32) * np.float32(0.2 / math.sqrt(d))
        xc = mu[yc] + np.float32(noise) * (np.einsum("bm,bmd->bd", z, basis[yc]) + e)
        xc /= np.linalg.norm(xc, axis=1, keepdims=True)
        x[s : s + yc.size] = xc
    return x, y
