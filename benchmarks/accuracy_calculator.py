"""Speed of ``evaluation.AccuracyCalculator`` against pytorch-metric-learning's and against
``evaluation.retrieval_metrics``, with the largest difference of the values printed per row.

Data: ``N x d`` float32 clustered Gaussians (``C`` classes of random sizes, query set ==
reference set), squared L2 on the raw embeddings (PML's default distance), all on the CPU;
then the pathological case, ``N`` identical embeddings in two classes.

Rows (each timed once, in this process, in the order listed; wall and CPU seconds; the peak
memory of each is measured apart, in a process of its own, see below):

* ``ours max_bin_count``: ``AccuracyCalculator(k="max_bin_count")`` on precision_at_1,
  r_precision, mean_average_precision_at_r; ``pml max_bin_count``: PML's with the same options;
  ``retrieval_metrics``: ours with ``metric="l2", index="exact"`` (the same three metrics plus
  Recall@{1,2,4,8} -- those below N --, the same search).
* ``ours k=None`` / ``pml k=None``: PML's default ``k`` (rank the whole reference set) with all
  five retrieval metrics (MAP and MRR over the whole ranking; NMI/AMI left out: k-means is the
  same FAISS call in both).

``wall/ours`` and ``cpu/ours``: the row's time over ours of the same ``k`` (``ours
max_bin_count`` for the first three rows, ``ours k=None`` for the last two); above 1, ours is
faster.

``peak MB``: the rise of the resident set over the row's call (VmHWM - VmRSS before it, after
``/proc/self/clear_refs`` resets the high-water mark; else VmRSS sampled every 5 ms), so numpy,
torch and FAISS allocations count alike. Each row runs for it in a fresh process (forked from a
server that has imported the libraries and run nothing; the call is first warmed up there on the
first 200 rows): in one process a later row would reuse what the allocator kept from an earlier
one and its rise would under-count. ``mem/ours``: the row's peak over ours of the same ``k``
(above 1, ours uses less).

Usage: ``python benchmarks/accuracy_calculator.py [--n 10000] [--classes 100] [--dim 64]``.
On a shared machine the numbers move with the load; CPU seconds move less than wall seconds.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing as mp
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

RETRIEVAL = ("mean_average_precision_at_r", "precision_at_1", "r_precision")
ALL_KNN = ("mean_average_precision", "mean_average_precision_at_r", "mean_reciprocal_rank",
           "precision_at_1", "r_precision")
#: the rows of a case, in the order they run; the last two only with ``k=None``
MAX_BIN_ROWS = ("ours max_bin_count", "pml max_bin_count", "retrieval_metrics")
K_NONE_ROWS = ("ours k=None", "pml k=None")
#: rows of the warm-up call in a memory worker (libraries' lazy set-up, outside the measurement)
WARMUP_ROWS = 200
HERE, MODULE = Path(__file__).resolve().parent, Path(__file__).stem


def make_data(n: int, n_classes: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.standard_normal((n_classes, d)).astype(np.float32)
    return centers[y] + 2.5 * rng.standard_normal((n, d), dtype=np.float32), y


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def row_call(name: str, x: np.ndarray, y: np.ndarray) -> Callable[[], dict]:
    """The call that row ``name`` times (and measures): libraries imported and inputs wrapped
    here, outside it."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PML

    from evaluation import AccuracyCalculator, retrieval_metrics

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    cpu = torch.device("cpu")
    ks = tuple(k for k in (1, 2, 4, 8) if k < len(y)) or (1,)  # each query has N - 1 others
    calls = {
        "ours max_bin_count": lambda: AccuracyCalculator(
            include=RETRIEVAL, k="max_bin_count", device="cpu").get_accuracy(x, y),
        "pml max_bin_count": lambda: PML(
            include=RETRIEVAL, k="max_bin_count", device=cpu).get_accuracy(xt, yt),
        "retrieval_metrics": lambda: retrieval_metrics(x, y, ks=ks, metric="l2", device="cpu",
                                                       index="exact"),
        "ours k=None": lambda: AccuracyCalculator(
            include=ALL_KNN, device="cpu").get_accuracy(x, y),
        "pml k=None": lambda: PML(include=ALL_KNN, device=cpu).get_accuracy(xt, yt),
    }
    return calls[name]


def _row_peak_worker(conn: Connection, name: str, x: np.ndarray, y: np.ndarray) -> None:
    """In the worker process: warm row ``name`` up on the first rows, then send ``("ok", (peak
    resident-set rise over the call on all of them in bytes, how it was read))`` on ``conn``, or
    ``("error", traceback)``."""
    try:
        from retrieval import PeakRSS  # benchmarks/retrieval.py: VmHWM after clear_refs

        logging.getLogger("PML").setLevel(logging.ERROR)
        row_call(name, x[:WARMUP_ROWS], y[:WARMUP_ROWS])()
        fn = row_call(name, x, y)
        with PeakRSS() as mem:
            fn()
        conn.send(("ok", (mem.rise, mem.method)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


_SERVER: list = []  # the forkserver context, set up once per process


def _fresh_processes() -> mp.context.BaseContext:
    """A forkserver context whose server has imported the libraries (and run nothing), so each
    worker starts fresh in a few milliseconds instead of importing torch again."""
    if not _SERVER:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([
            "numpy", "torch", "evaluation", "pytorch_metric_learning.utils.accuracy_calculator",
            "retrieval", MODULE])
        _SERVER.append(ctx)
    return _SERVER[0]


def row_peak(name: str, x: np.ndarray, y: np.ndarray) -> tuple[int, str]:
    """Peak resident-set rise (bytes) of row ``name`` on ``(x, y)``, measured in a fresh process
    of its own, and the method (``"VmHWM"`` or ``"sampled VmRSS"``)."""
    # the worker is this file imported by name, from the fork server, which keeps the path it
    # started with; the caller's path gets this folder only meanwhile (it holds a losses.py
    # that would shadow the library's losses package in a process that imported this file)
    added = str(HERE) not in sys.path
    if added:
        sys.path.insert(0, str(HERE))
    try:
        worker = importlib.import_module(MODULE)._row_peak_worker
        ctx = _fresh_processes()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker, args=(send, name, x, y), daemon=True)
        proc.start()
    finally:
        if added:
            sys.path.remove(str(HERE))
    send.close()
    try:
        status, result = recv.recv()
    except EOFError:  # it died before sending (killed, e.g. out of memory)
        proc.join()
        status, result = "error", f"the worker died (exit code {proc.exitcode})"
    finally:
        recv.close()
        proc.join()
    if status != "ok":
        raise RuntimeError(f"memory of {name!r}: {result}")
    return result


def run_case(title: str, x: np.ndarray, y: np.ndarray, with_k_none: bool) -> None:
    names = MAX_BIN_ROWS + (K_NONE_ROWS if with_k_none else ())
    out, times = {}, {}
    for name in names:  # timed first, all in this process, as before memory was measured
        out[name], *times[name] = timed(row_call(name, x, y))
    rm_keys = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
               "mean_average_precision_at_r": "map_at_r"}
    ours, pml, rm = (out[k] for k in MAX_BIN_ROWS)
    notes = {
        "ours max_bin_count": f"{max(abs(ours[k] - pml[k]) for k in RETRIEVAL):.1e} vs pml",
        "retrieval_metrics": f"{max(abs(ours[k] - rm[v]) for k, v in rm_keys.items()):.1e} "
                             "vs ours",
    }
    if with_k_none:
        ours, pml = (out[k] for k in K_NONE_ROWS)
        notes["ours k=None"] = f"{max(abs(ours[k] - pml[k]) for k in ALL_KNN):.1e} vs pml"
    peaks = {name: row_peak(name, x, y) for name in names}
    methods = sorted({method for _, method in peaks.values()})
    print(f"\n{title}")
    print(f"{'contender':<22}{'wall s':>9}{'cpu s':>9}{'wall/ours':>11}{'cpu/ours':>10}"
          f"{'peak MB':>10}{'mem/ours':>10}  max |diff|")
    for name in names:
        ref = "ours k=None" if name in K_NONE_ROWS else "ours max_bin_count"
        (wall, cpu_s), (ours_wall, ours_cpu) = times[name], times[ref]
        peak, ours_peak = peaks[name][0], peaks[ref][0]
        print(f"{name:<22}{wall:9.2f}{cpu_s:9.2f}{_ratio(wall, ours_wall):>11}"
              f"{_ratio(cpu_s, ours_cpu):>10}{peak / 2**20:10.1f}{_ratio(peak, ours_peak):>10}"
              f"  {notes.get(name, '')}".rstrip())
    print(f"peak MB: resident-set rise of the call, each row in a fresh process "
          f"({', '.join(methods)})")


def _ratio(t: float, ours: float) -> str:
    """``t / ours`` as ``"3.00x"`` (a time or a peak over ours of the same k; above 1: ours is
    faster or smaller); ``"-"`` when ours is 0."""
    return f"{t / ours:.2f}x" if ours > 0 else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--no-k-none", action="store_true", help="skip the k=None rows")
    args = ap.parse_args()
    logging.getLogger("PML").setLevel(logging.ERROR)
    print(f"torch threads {torch.get_num_threads()}")
    x, y = make_data(args.n, args.classes, args.dim)
    run_case(f"clustered: N={args.n}, C={args.classes}, d={args.dim}", x, y,
             not args.no_k_none)
    y2 = np.random.default_rng(1).integers(0, 2, args.n)
    run_case(f"identical embeddings: N={args.n}, 2 classes, d={args.dim}",
             np.ones((args.n, args.dim), dtype=np.float32), y2, False)
    run_case(f"random embeddings (the ordinary input of that size): N={args.n}, 2 classes",
             make_data(args.n, 1, args.dim)[0], y2, False)


if __name__ == "__main__":
    main()
