"""Speed of ``evaluation.AccuracyCalculator`` against pytorch-metric-learning's and against
``evaluation.retrieval_metrics``, with the largest difference of the values printed per row.

Data: ``N x d`` float32 clustered Gaussians (``C`` classes of random sizes, query set ==
reference set), squared L2 on the raw embeddings (PML's default distance), all on the CPU;
then the pathological case, ``N`` identical embeddings in two classes.

Rows (each timed once, in this process, in the order listed; wall and CPU seconds):

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

Usage: ``python benchmarks/accuracy_calculator.py [--n 10000] [--classes 100] [--dim 64]``.
On a shared machine the numbers move with the load; CPU seconds move less than wall seconds.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

RETRIEVAL = ("mean_average_precision_at_r", "precision_at_1", "r_precision")
ALL_KNN = ("mean_average_precision", "mean_average_precision_at_r", "mean_reciprocal_rank",
           "precision_at_1", "r_precision")


def make_data(n: int, n_classes: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.standard_normal((n_classes, d)).astype(np.float32)
    return centers[y] + 2.5 * rng.standard_normal((n, d), dtype=np.float32), y


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run_case(title: str, x: np.ndarray, y: np.ndarray, with_k_none: bool) -> None:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator as PML

    from evaluation import AccuracyCalculator, retrieval_metrics

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    cpu = torch.device("cpu")
    rows = []
    ours, *t_ours = timed(lambda: AccuracyCalculator(
        include=RETRIEVAL, k="max_bin_count", device="cpu").get_accuracy(x, y))
    pml, *t_pml = timed(lambda: PML(
        include=RETRIEVAL, k="max_bin_count", device=cpu).get_accuracy(xt, yt))
    ks = tuple(k for k in (1, 2, 4, 8) if k < len(y)) or (1,)  # each query has N - 1 others
    rm, *t_rm = timed(lambda: retrieval_metrics(x, y, ks=ks, metric="l2", device="cpu",
                                                index="exact"))
    rm_keys = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
               "mean_average_precision_at_r": "map_at_r"}
    diff = max(abs(ours[k] - pml[k]) for k in RETRIEVAL)
    diff_rm = max(abs(ours[k] - rm[v]) for k, v in rm_keys.items())
    rows += [("ours max_bin_count", *t_ours, t_ours, f"{diff:.1e} vs pml"),
             ("pml max_bin_count", *t_pml, t_ours, ""),
             ("retrieval_metrics", *t_rm, t_ours, f"{diff_rm:.1e} vs ours")]
    if with_k_none:
        ours, *t_ours = timed(lambda: AccuracyCalculator(
            include=ALL_KNN, device="cpu").get_accuracy(x, y))
        pml, *t_pml = timed(lambda: PML(include=ALL_KNN, device=cpu).get_accuracy(xt, yt))
        diff = max(abs(ours[k] - pml[k]) for k in ALL_KNN)
        rows += [("ours k=None", *t_ours, t_ours, f"{diff:.1e} vs pml"),
                 ("pml k=None", *t_pml, t_ours, "")]
    print(f"\n{title}")
    print(f"{'contender':<22}{'wall s':>9}{'cpu s':>9}{'wall/ours':>11}{'cpu/ours':>10}  "
          "max |diff|")
    for name, wall, cpu_s, (ours_wall, ours_cpu), note in rows:
        print(f"{name:<22}{wall:9.2f}{cpu_s:9.2f}{_ratio(wall, ours_wall):>11}"
              f"{_ratio(cpu_s, ours_cpu):>10}  {note}")


def _ratio(t: float, ours: float) -> str:
    """``t / ours`` as ``"3.00x"`` (a time over ours of the same k; above 1: ours is faster)."""
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
