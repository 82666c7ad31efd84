"""Linear probe: ours (torch, full-batch L-BFGS) vs scikit-learn ``LogisticRegression(lbfgs)`` at
the same regularisation (``C = 1 / (wd n)``), on synthetic Gaussian-class features.

Each measurement runs in a fresh process (spawned) on the same data (same seed), so memory of one
does not leak into the next. Reported per method: wall time of fit + predict (including our
standardisation and scikit-learn's ``StandardScaler``), test accuracy, optimiser iterations and
peak memory:

* ``peak RSS``: a thread samples the process's resident set size every 2 ms; the peak minus the
  RSS just before the call (covers torch's CPU allocations, which tracemalloc cannot see);
* ``tracemalloc``: peak of Python/numpy allocations during the call (numpy reports to it);
* ``CUDA peak``: ``torch.cuda.max_memory_allocated`` when our probe runs on a GPU.

Both sides get the same convergence tolerance (``--tol``, on the largest gradient entry of the
same mean-scaled objective) and iteration cap. ``ratio`` = scikit-learn time / ours.

    python benchmarks/linear_probe.py            # 20k x 512, 10 and 100 classes
    python benchmarks/linear_probe.py --quick    # 4k x 128, 10 classes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Gaussian classes ``x = mu_y + N(0, I)`` with ``mu ~ N(0, s^2 I)``, ``s`` set so that the
    problem is neither trivial nor hopeless (Bayes accuracy well below 1 at 100 classes)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sep = 1.4 / np.sqrt(dim)
    means = rng.normal(size=(classes, dim)) * sep * np.sqrt(np.log(classes) + 1)
    y = rng.integers(0, classes, n_train + n_test)
    x = (means[y] + rng.normal(size=(n_train + n_test, dim))).astype(np.float32)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class PeakRSS:
    """Peak resident set size above the starting point, sampled from /proc/self/statm."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.mb = (self.peak - self.base) / 2**20


def _measure(job: dict) -> dict:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    if job["threads"]:
        torch.set_num_threads(job["threads"])
        limits = threadpool_limits(job["threads"])
    xtr, ytr, xte, yte = make_data(job["n_train"], job["n_test"], job["dim"], job["classes"])
    wd, tol, max_iter = job["wd"], job["tol"], job["max_iter"]
    # our probe's device as evaluation.probe resolves it ("cuda", "cuda:1", None = CUDA if any)
    ours_device = torch.device(
        job["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    cuda = job["method"] != "sklearn" and ours_device.type == "cuda"
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from evaluation.probe import linear_probe, sklearn_C

    def fit(xtr, ytr, xte, yte):
        if job["method"] == "sklearn":
            clf = LogisticRegression(
                C=sklearn_C(wd, len(ytr), job["classes"]), tol=tol, max_iter=max_iter
            )
            model = make_pipeline(StandardScaler(), clf).fit(xtr, ytr)
            return float(model.score(xte, yte)), int(np.max(clf.n_iter_)), wd
        wds = None if job["method"] == "ours_sweep" else wd
        out = linear_probe(
            xtr, ytr, xte, yte, weight_decays=wds, tol=tol, max_iter=max_iter,
            device=job["device"],
        )
        if cuda:
            torch.cuda.synchronize(ours_device)
        return out["accuracy"], out["n_iter"], out["weight_decay"]

    # warm-up on a slice (library initialisation, thread pools, CUDA kernels), not measured
    fit(xtr[:500], ytr[:500], xte[:100], yte[:100])
    if cuda:
        torch.cuda.reset_peak_memory_stats(ours_device)
    tracemalloc.start()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        acc, n_iter, chosen = fit(xtr, ytr, xte, yte)
        seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if job["threads"]:
        limits.restore_original_limits()
    return {
        "seconds": seconds,
        "accuracy": acc,
        "n_iter": n_iter,
        "wd": chosen,
        "rss_mb": rss.mb,
        "tracemalloc_mb": py_peak / 2**20,
        "cuda_mb": torch.cuda.max_memory_allocated(ours_device) / 2**20 if cuda else None,
        "device": str(ours_device) if cuda else "cpu",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-test", type=int, default=5000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--device", default=None, help="our probe's device (default: cuda if any)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and BLAS/OpenMP threads for both sides (default: library default)")
    p.add_argument("--no-sweep", action="store_true", help="skip timing our default wd sweep")
    p.add_argument("--quick", action="store_true", help="4k x 128, 10 classes")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test, a.dim, a.classes = 4000, 1000, 128, [10]

    methods = ["ours", "sklearn"] + ([] if a.no_sweep else ["ours_sweep"])
    label = {
        "ours": f"ours torch L-BFGS (wd={a.weight_decay:g})",
        "sklearn": "sklearn lbfgs (same C)",
        "ours_sweep": "ours + default 5-value wd sweep",
    }
    ctx = mp.get_context("spawn")
    print(
        f"linear probe, {a.n_train} train / {a.n_test} test x {a.dim}, tol {a.tol:g}, "
        f"max_iter {a.max_iter}, threads {a.threads or 'default'}; memory: peak RSS over start "
        "(sampled), tracemalloc peak (numpy/python), CUDA max_memory_allocated"
    )
    header = (
        f"| {'classes':>7} | {'method':<44} | {'device':>6} | {'time s':>8} | {'ratio':>6} | "
        f"{'acc':>6} | {'iters':>5} | {'peak RSS MB':>11} | {'tracemalloc MB':>14} | "
        f"{'CUDA MB':>8} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for k in a.classes:
        results = {}
        for m in methods:
            job = dict(
                method=m, n_train=a.n_train, n_test=a.n_test, dim=a.dim, classes=k,
                wd=a.weight_decay, tol=a.tol, max_iter=a.max_iter, device=a.device,
                threads=a.threads,
            )
            with ctx.Pool(1) as pool:
                results[m] = pool.apply(_measure, (job,))
        base = results["sklearn"]["seconds"]
        for m in methods:
            r = results[m]
            name = label[m] + (f" -> wd={r['wd']:g}" if m == "ours_sweep" else "")
            cuda = f"{r['cuda_mb']:.0f}" if r["cuda_mb"] is not None else "-"
            print(
                f"| {k:>7} | {name:<44} | {r['device']:>6} | {r['seconds']:>8.2f} | "
                f"{base / r['seconds']:>6.2f} | {r['accuracy']:>6.4f} | {r['n_iter']:>5} | "
                f"{r['rss_mb']:>11.0f} | {r['tracemalloc_mb']:>14.1f} | {cuda:>8} |"
            )
        diff = abs(results["ours"]["accuracy"] - results["sklearn"]["accuracy"]) * 100
        print(f"|         | accuracy gap ours vs sklearn: {diff:.2f} points (target <= 0.5) |")


if __name__ == "__main__":
    main()
