"""Speed of ``evaluation.AccuracyCalculator`` against pytorch-metric-learning's and against
``evaluation.retrieval_metrics``, with the largest difference of the values printed per row.

Data: ``N x d`` float32 clustered Gaussians (``C`` classes of random sizes, query set ==
reference set), squared L2 on the raw embeddings (PML's default distance), all on the CPU;
then the pathological case, ``N`` identical embeddings in two classes.

Rows (each timed once, in this process, in the order listed; wall and CPU seconds):

* ``ours max_bin_count``: ``AccuracyCalculator(k="max_bin_count")`` on precision_at_1,
  r_precision, mean_average_precision_at_r; ``pml max_bin_count``: PML's with the same options;
  ``retrieval_metrics``: ours with ``metric="l2", index="exact"`` (the same three metrics plus
  Recall@K, the same search).
* ``ours k=None`` / ``pml k=None``: PML's default ``k`` (rank the whole reference set) with all
  five retrieval metrics (MAP and MRR over the whole ranking; NMI/AMI left out: k-means is the
  same FAISS call in both).

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
    rm, *t_rm = timed(lambda: retrieval_metrics(x, y, metric="l2", device="cpu", index="exact"))
    rm_keys = {"precision_at_1": "precision_at_1", "r_precision": "r_precision",
               "mean_average_precision_at_r": "map_at_r"}
    diff = max(abs(ours[k] - pml[k]) for k in RETRIEVAL)
    diff_rm = max(abs(ours[k] - rm[v]) for k, v in rm_keys.items())
    rows += [("ours max_bin_count", *t_ours, f"{diff:.1e} vs pml"),
             ("pml max_bin_count", *t_pml, ""),
             ("retrieval_metrics", *t_rm, f"{diff_rm:.1e} vs ours")]
    if with_k_none:
        ours, *t_ours = timed(lambda: AccuracyCalculator(
            include=ALL_KNN, device="cpu").get_accuracy(x, y))
        pml, *t_pml = timed(lambda: PML(include=ALL_KNN, device=cpu).get_accuracy(xt, yt))
        diff = max(abs(ours[k] - pml[k]) for k in ALL_KNN)
        rows += [("ours k=None", *t_ours, f"{diff:.1e} vs pml"), ("pml k=None", *t_pml, "")]
    print(f"\n{title}")
    print(f"{'contender':<22}{'wall s':>9}{'cpu s':>9}  max |diff|")
    for name, wall, cpu_s, note in rows:
        print(f"{name:<22}{wall:9.2f}{cpu_s:9.2f}  {note}")


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
