"""Speed and peak memory of ``evaluation.retrieval_metrics`` against the references.

Contenders, each timed in its own subprocess on the same data (unit-norm clustered Gaussians,
``N x d``, ``C`` classes with random sizes, query set == reference set):

* ``ours-auto`` / ``ours-faiss`` / ``ours-torch``: ``retrieval_metrics(x, y, backend=...)``
  (Recall@{1,2,4,8}, those below N; Precision@1, R-Precision, MAP@R), cosine. ``auto`` on the
  CPU is FAISS for small k and, for larger k, blocks of rows spread over threads, each one matrix
  product and a top-k selection by the C scan (``evaluation/_scan.c``) and numpy
  (:class:`evaluation.backends.BlockScanBackend`, run by :mod:`evaluation.search`).
* ``ours-noscan``: ``auto`` without the C extension (what an install without a C compiler gets);
  ``ours-auto`` against ``ours-noscan`` in the large-k rows (few classes) is the C scan's gain.
* ``pml-default``: pytorch-metric-learning ``AccuracyCalculator(k=None)`` (its default k: the
  whole reference set) computing precision_at_1, r_precision and mean_average_precision_at_r
  (its default list also holds NMI/AMI/MAP/MRR; those are left out so the work compared is the
  same).
* ``pml-maxbin``: the same with ``k="max_bin_count"``.
* ``torch-mm-topk``: a plain ``S = x @ x.T`` over the whole set, diagonal masked, ``S.topk(k)``
  with the same k as ours (neighbours only, no metrics).
* ``floor``: one ``N x N x d`` matrix product (computed in row blocks into one reused buffer),
  the arithmetic every exact method must do.

Peak memory: the rise of the process's resident set (VmHWM - VmRSS before the call, after
``/proc/self/clear_refs`` resets the high-water mark; Linux), so it counts numpy, torch and
FAISS allocations alike. A contender is skipped, with the reason printed, when its estimated
memory exceeds half of MemAvailable, and killed when it runs past ``--cap`` seconds.

Usage: ``python benchmarks/retrieval.py [--quick] [--sizes 10000 30000] [--classes 100 1000]``.
The line ``max |ours - pml|`` is the largest difference of P@1, R-Precision and MAP@R over
every ``ours-*`` run against every ``pml-*`` run. The exit status is 1 when a run failed (after
all tables are printed); a skipped or killed run is not a failure.

``--scale``: exact against approximate search (:mod:`evaluation.ann`) at 100k and 1M x 128 with
1,000 classes (:func:`evaluation.ann.structured_embeddings`, ``--noise``), one subprocess per
(size, index). For each: the time and peak memory of ``retrieval_metrics(x, y, index=...)``;
on ``--sample`` random query rows (at most N, lone queries left out, the count printed per N;
the same rows for every index) the recall of the true 10 and true W nearest neighbours (W = the
metrics' window, the largest class), and the difference of P@1 / R-Precision / MAP@R against
exact search on those rows (paired: same queries). Exact
search over all query rows runs only up to ``--exact-max-n`` rows; above, its time is estimated
from the exact search of the sampled rows (scaled by N / sample) and its metrics are those of
the sample, labelled as such. HNSW runs only up to ``--hnsw-max-n`` rows (its graph build is
the slow part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SCALE_INDEXES = ("exact", "ivf", "ivfpq", "hnsw")
CONTENDERS = (
    "ours-auto", "ours-noscan", "ours-faiss", "ours-torch", "pml-default", "pml-maxbin",
    "torch-mm-topk", "floor",
)


# --------------------------------------------------------------------------------------------
# worker side


def make_data(n: int, n_classes: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    centers = rng.standard_normal((n_classes, d)).astype(np.float32)
    x = centers[y] + 2.5 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident-set rise over a block: VmHWM after clear_refs, else a 5 ms sampler."""

    def __enter__(self):
        self.base = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS"
            self.peak = self.base
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.peak = max(self.peak, _status("VmRSS"))
                    time.sleep(0.005)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            self.peak = _status("VmHWM")
        else:
            self.stop.set()
            self.thread.join()
        self.rise = max(0, self.peak - self.base)


def max_class_count(y: np.ndarray) -> int:
    return int(np.bincount(y).max())


def recall_ks(n: int) -> tuple[int, ...]:
    """The K of Recall@K that ours computes on ``n`` rows: 1, 2, 4, 8, those below ``n`` (each
    query has ``n - 1`` candidates)."""
    return tuple(k for k in (1, 2, 4, 8) if k < n) or (1,)


def search_k(y: np.ndarray) -> int:
    """The k that ours searches (and ``torch-mm-topk`` with it): the largest Recall@K or the
    largest class less the query itself, whichever is larger."""
    return max(recall_ks(len(y))[-1], max_class_count(y) - 1)


def run_contender(name: str, x: np.ndarray, y: np.ndarray):
    import torch

    if name.startswith("ours"):
        from evaluation.retrieval import retrieval_metrics

        backend = name.split("-")[1]
        if backend == "noscan":
            import evaluation._topk

            evaluation._topk._scan = None
            backend = "auto"
        ks = recall_ks(len(y))
        return lambda: retrieval_metrics(x, y, ks=ks, backend=backend, device="cpu")
    if name.startswith("pml"):
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k=None if name == "pml-default" else "max_bin_count",
            device=torch.device("cpu"),
        )
        return lambda: calc.get_accuracy(x, y)
    xt = torch.from_numpy(x)
    if name == "torch-mm-topk":
        k = search_k(y)

        def mm_topk():
            s = xt @ xt.T
            s.fill_diagonal_(float("-inf"))
            v, i = s.topk(k, dim=1)
            return {"k": k, "checksum": float(v[:, 0].sum())}

        return mm_topk
    if name == "floor":

        def floor():
            n = xt.shape[0]
            step = max(1, min(n, (1 << 28) // (4 * n)))
            buf = torch.empty(step * n)
            for s in range(0, n, step):
                q = xt[s : s + step]
                torch.mm(q, xt.T, out=buf[: q.shape[0] * n].view(q.shape[0], n))
            return {"flops": 2.0 * n * n * xt.shape[1]}

        return floor
    raise ValueError(name)


def _sample_rows(n: int, sample: int) -> np.ndarray:
    return np.sort(np.random.default_rng(123).choice(n, min(n, sample), replace=False))


def _sample_search(x, y, rows, k, index, opts=None):
    """Neighbours of the sampled query rows (own row excluded) and their metric sums."""
    import torch

    from evaluation.retrieval import _block_sums, relevance_counts
    from evaluation.search import search_blocks

    idx = np.concatenate([
        i.numpy() for _, _, i in search_blocks(
            x[rows], x, k, "ip", rows, large_k_blocks=True, index=index, index_options=opts
        )
    ])
    r_q = relevance_counts(y[rows], y, True)
    match = torch.from_numpy(y[idx] == y[rows][:, None])
    sums = _block_sums(match, torch.from_numpy(r_q), (1,))
    return idx, {m: sums[m] / len(rows) for m in ("precision_at_1", "r_precision", "map_at_r")}


def scale_worker(index: str, n: int, n_classes: int, d: int, noise: float, sample: int,
                 exact_max_n: int, cache: str, nprobe: int = 0) -> None:
    """One row of the --scale table (prints one JSON line)."""
    opts = {"nprobe": nprobe} if nprobe and index in ("ivf", "ivfpq") else None
    import torch

    from evaluation.ann import structured_embeddings
    from evaluation.retrieval import relevance_counts, retrieval_metrics

    x, y = structured_embeddings(n, n_classes, d, noise=noise)
    rows = _sample_rows(n, sample)
    rows = rows[relevance_counts(y[rows], y, True) > 0]  # lone queries count in no metric
    window = max(8, int(relevance_counts(y, y, True).max()))
    xs, ys = structured_embeddings(2000, 20, d, noise=noise, seed=1)
    retrieval_metrics(xs, ys, index="exact" if index == "exact" else index)  # warm-up
    out = {"index": index, "window": window, "threads": torch.get_num_threads(),
           "sample_rows": int(len(rows))}
    if index == "exact":
        t0 = time.perf_counter()
        _sample_search(x, y, rows[:16], window, "exact")  # the fixed cost (setup, 16 rows)
        t_fixed = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        idx, sub = _sample_search(x, y, rows, window, "exact")
        t_sample, c_sample = time.perf_counter() - t0, time.process_time() - c0
        np.save(cache, idx)
        out["sample_metrics"] = sub
        if n <= exact_max_n:
            full_index = "exact"
        else:  # fixed cost + N x the cost per query row measured on the sample
            per_row = max(0.0, t_sample - t_fixed) / max(1, len(rows) - 16)
            out.update(time=t_fixed + per_row * n, cpu=c_sample * n / len(rows), estimated=True,
                       peak=None, backend=None,
                       metrics=sub, sample_time=t_sample)
            print(json.dumps(out))
            return
    else:
        full_index = index
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        res = retrieval_metrics(x, y, ks=(1,), index=full_index, index_options=opts)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.update(time=elapsed, cpu=cpu, estimated=False, peak=mem.rise, mem_method=mem.method,
               backend=res.backend, metrics={k: float(v) for k, v in res.items()})
    if index != "exact":
        idx, sub = _sample_search(x, y, rows, window, index, opts)
        out["sample_metrics"] = sub
        true = np.load(cache)
        for kk, name in ((10, "recall_at_10"), (window, "recall_at_w")):
            hits = [np.intersect1d(a[:kk], b[:kk]).size for a, b in zip(idx, true)]
            out[name] = float(np.sum(hits)) / (kk * len(rows))
    print(json.dumps(out))


def run_scale(args) -> list[str]:
    """The --scale tables, one per size; returns the (size, index) runs that failed."""
    import tempfile

    import torch

    print(f"# retrieval --scale: d={args.dim}, {args.scale_classes} classes, structured synthetic "
          f"(noise={args.noise}), cosine, query set == reference set, CPU, torch threads="
          f"{torch.get_num_threads()}, cores={os.cpu_count()}, load avg at start="
          f"{os.getloadavg()[0]:.1f}; recall and metric differences on random query rows "
          f"(--sample {args.sample}, fewer where N is smaller; lone queries left out)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="retrieval-scale-")
    failed = []
    for n in args.scale_sizes:
        cache = os.path.join(tmp, f"exact-{n}.npy")
        results = {}
        for index in args.scale_indexes:
            if index == "hnsw" and n > args.hnsw_max_n:
                results[index] = f"skipped: N > --hnsw-max-n={args.hnsw_max_n} (graph build time)"
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--scale-worker", index, str(n),
                   str(args.scale_classes), str(args.dim), str(args.noise), str(args.sample),
                   str(args.exact_max_n), cache, str(args.nprobe)]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap,
                                      cwd=root, env={**os.environ, "PYTHONPATH": root})
            except subprocess.TimeoutExpired:
                results[index] = f"killed: over the {args.cap:.0f} s cap"
                continue
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                results[index] = f"failed (exit {proc.returncode}): {tail[0][:100]}"
                failed.append(f"N={n} {index}")
                continue
            results[index] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[index]["wall"] = time.perf_counter() - t0
        scale_report(n, args, results)
    return failed


def scale_report(n: int, args, results: dict) -> None:
    ex = results.get("exact")
    ex_sub = ex["sample_metrics"] if isinstance(ex, dict) else None
    done = [r for r in results.values() if isinstance(r, dict)]
    w = done[0]["window"] if done else "?"
    sampled = f"{done[0]['sample_rows']:,}" if done else "?"
    print(f"\n## N={n:,} x {args.dim}, {args.scale_classes} classes, window W={w}, "
          f"{sampled} sampled query rows, load avg now {os.getloadavg()[0]:.1f}")
    print(f"{'index':<7} {'time s':>9} {'cpu s':>9} {'peak MB':>9} {'recall@10':>10} "
          f"{'recall@W':>9} {'P@1':>7} {'R-P':>7} {'MAP@R':>7} {'dP@1':>8} {'dR-P':>8} "
          f"{'dMAP@R':>8}  backend")
    for index, r in results.items():
        if not isinstance(r, dict):
            print(f"{index:<7} {r}")
            continue
        t = f"{r['time']:.1f}" + ("*" if r["estimated"] else "")
        peak = "-" if r["peak"] is None else fmt_mb(r["peak"])
        m = r["metrics"]
        rec10 = f"{r['recall_at_10']:.4f}" if "recall_at_10" in r else "1"
        recw = f"{r['recall_at_w']:.4f}" if "recall_at_w" in r else "1"
        diffs = ["", "", ""]
        if ex_sub is not None:
            diffs = [f"{r['sample_metrics'][k] - ex_sub[k]:+.4f}"
                     for k in ("precision_at_1", "r_precision", "map_at_r")]
        c = f"{r['cpu']:.0f}" + ("*" if r["estimated"] else "")
        print(f"{index:<7} {t:>9} {c:>9} {peak:>9} {rec10:>10} {recw:>9} "
              f"{m['precision_at_1']:>7.4f} {m['r_precision']:>7.4f} {m['map_at_r']:>7.4f} "
              f"{diffs[0]:>8} {diffs[1]:>8} "
              f"{diffs[2]:>8}  {r['backend'] or 'exact, estimated'}")
    if isinstance(ex, dict) and ex["estimated"]:
        print(f"* exact at N={n:,}: not run over all query rows (> --exact-max-n="
              f"{args.exact_max_n}); time ESTIMATED as fixed cost (a 16-row search) + N x the cost "
              f"per row of the exact search of the {ex['sample_rows']:,} sampled rows "
              f"({ex['sample_time']:.1f}"
              f" s); P@1 / R-P / MAP@R of those sampled rows")
    print("time (wall), cpu (process CPU time, all threads: about 2x the wall time on 2 idle "
          "cores), peak (resident-set rise) and P@1 / R-P / MAP@R: the full retrieval_metrics "
          "call; recall and d* (index - exact): the sampled query rows")


def worker(name: str, n: int, n_classes: int, d: int) -> None:
    import torch

    x, y = make_data(n, n_classes, d)
    # warm up libraries, thread pools and allocator on a smaller problem, outside the measurement
    xs, ys = make_data(min(n, 2000), max(2, n_classes * min(n, 2000) // n), d, seed=1)
    run_contender(name, xs, ys)()
    fn = run_contender(name, x, y)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
    result = {k: float(v) for k, v in result.items()}
    print(json.dumps({
        "time": elapsed, "peak": mem.rise, "mem_method": mem.method, "result": result,
        "threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------------------------
# driver side


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(name: str, n: int, kmax: int) -> int:
    """Rough peak estimate, used only to skip runs that would exhaust the machine."""
    if name == "pml-default":
        return 60 * n * n  # kNN over the whole set: ~60 bytes per (query, neighbour)
    if name == "pml-maxbin":
        return 60 * n * kmax + 400 * n
    if name == "torch-mm-topk":
        return 4 * n * n + 12 * n * kmax
    return 0


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); exits with status 1 when a run failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--cap", type=float, default=600.0, help="seconds per run before it is killed")
    ap.add_argument("--quick", action="store_true", help="sizes 2000 and 5000, 50 classes")
    ap.add_argument("--worker", nargs=4, metavar=("NAME", "N", "C", "D"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", action="store_true",
                    help="exact vs approximate index at --scale-sizes (see the docstring)")
    ap.add_argument("--scale-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--scale-classes", type=int, default=1000)
    ap.add_argument("--scale-indexes", nargs="+", default=list(SCALE_INDEXES),
                    choices=SCALE_INDEXES)
    ap.add_argument("--noise", type=float, default=2.0, help="structured_embeddings noise")
    ap.add_argument("--sample", type=int, default=5000, help="query rows for recall / diffs")
    ap.add_argument("--exact-max-n", type=int, default=200_000,
                    help="largest N at which exact search runs over all query rows")
    ap.add_argument("--hnsw-max-n", type=int, default=200_000)
    ap.add_argument("--nprobe", type=int, default=0,
                    help="IVF cells probed (0: evaluation.ann's default by N)")
    ap.add_argument("--scale-worker", nargs=9, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.scale_worker:
        i, n, c, d, noise, sample, emax, cache, nprobe = args.scale_worker
        scale_worker(i, int(n), int(c), int(d), float(noise), int(sample), int(emax), cache,
                     int(nprobe))
        return
    if args.scale:
        if "exact" not in args.scale_indexes:
            ap.error("--scale-indexes must include exact (the reference for recall)")
        args.scale_indexes = ["exact"] + [i for i in args.scale_indexes if i != "exact"]
        if args.cap == 600.0:
            args.cap = 1800.0
        exit_on_failures(run_scale(args))
        return
    if args.worker:
        name, n, c, d = args.worker
        worker(name, int(n), int(c), int(d))
        return
    if args.quick:
        args.sizes, args.classes = [2000, 5000], [50]

    import torch

    from evaluation._topk import scan_kernel

    print(f"# retrieval benchmark: d={args.dim}, query set == reference set, cosine, CPU, "
          f"torch threads={torch.get_num_threads()}, cores={os.cpu_count()}, "
          f"C scan kernel={scan_kernel()}, load avg at start={os.getloadavg()[0]:.1f}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failed = []
    for n in args.sizes:
        for c in args.classes:
            _, y = make_data(n, c, 4)
            rows = {}
            for name in args.contenders:
                need = estimate_bytes(name, n, search_k(y))
                avail = mem_available()
                if need > avail / 2:
                    rows[name] = f"skipped: needs ~{fmt_mb(need)} MB, {fmt_mb(avail)} MB available"
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, str(n), str(c),
                       str(args.dim)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cap,
                                          cwd=root, env={**os.environ, "PYTHONPATH": root})
                except subprocess.TimeoutExpired:
                    rows[name] = f"killed: over the {args.cap:.0f} s cap"
                    continue
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                    rows[name] = f"failed (exit {proc.returncode}): {tail[0][:80]}"
                    failed.append(f"N={n} C={c} {name}")
                    continue
                rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            report(n, c, y, rows)
    exit_on_failures(failed)


def exit_on_failures(failed: list[str]) -> None:
    """Exit with status 1, naming them, when any run failed (the tables are printed first)."""
    if failed:
        sys.exit(f"retrieval benchmark: {len(failed)} run(s) failed: {', '.join(failed)}")


def report(n: int, c: int, y: np.ndarray, rows: dict) -> None:
    """One size's table: time, peak memory and ratios, and the agreement of the metrics."""
    print(f"\n## N={n:,} x d, {c} classes (largest class {max_class_count(y)}: k searched by "
          f"ours and torch-mm-topk = {search_k(y)})")
    ours = [r for k, r in rows.items() if k.startswith("ours") and isinstance(r, dict)]
    t_ours = min((r["time"] for r in ours), default=None)
    floor = rows.get("floor")
    print(f"{'contender':<15} {'time s':>9} {'peak MB':>9} {'vs best ours':>13} {'vs floor':>9}")
    for name, r in rows.items():
        if not isinstance(r, dict):
            print(f"{name:<15} {r}")
            continue
        vs_ours = f"{r['time'] / t_ours:.2f}x" if t_ours else "-"
        vs_floor = f"{r['time'] / floor['time']:.2f}x" if isinstance(floor, dict) else "-"
        print(f"{name:<15} {r['time']:>9.2f} {fmt_mb(r['peak']):>9} {vs_ours:>13} {vs_floor:>9}")
    if isinstance(floor, dict):
        print(f"floor: {floor['result']['flops'] / floor['time'] / 1e9:.1f} GFLOP/s")
    # agreement of the metric values (ours vs PML)
    pml = [r for k, r in rows.items() if k.startswith("pml") and isinstance(r, dict)]
    if ours and pml:  # every one of ours against every PML run
        diff = max(abs(o["result"][mo] - p["result"][mp]) for o in ours for p in pml
                   for mo, mp in (("precision_at_1", "precision_at_1"),
                                  ("r_precision", "r_precision"),
                                  ("map_at_r", "mean_average_precision_at_r")))
        o = ours[0]["result"]
        print(f"max |ours - pml| over P@1, R-P, MAP@R, all {len(ours)} ours x {len(pml)} pml "
              f"runs: {diff:.2e} (MAP@R {o['map_at_r']:.4f}, P@1 {o['precision_at_1']:.4f})")
    methods = {r["mem_method"] for r in rows.values() if isinstance(r, dict)}
    print(f"peak memory = rise of the resident set during the call ({', '.join(sorted(methods))})")


if __name__ == "__main__":
    main()
