"""Forward + backward time and peak memory of our losses against pytorch-metric-learning.

Every row is measured in one run of this script, on the same inputs: our loss, its
pytorch-metric-learning (PML) counterpart, and the *floor*, the bare score-matrix work every
contrastive loss has to do (L2-normalise, one B x B matrix product, a row logsumexp, backward).

Usage::

    python benchmarks/losses.py                 # B = 128 .. 2048 (+ 4096: InfoNCE, new losses)
    python benchmarks/losses.py --quick         # B = 128, 512, few repeats
    python benchmarks/losses.py --small         # B = 128: the fixed per-call overhead
    python benchmarks/losses.py --sizes 1024 --cases infonce triplet

Time: median of ``--repeats`` timed samples after one warm-up pass, a sample being one
forward+backward pass or, for passes under ``MIN_SAMPLE_S``, the mean of a block of them (wall
clock, ``torch.get_num_threads()`` threads; ours, PML and the floor interleaved, ours and the
floor each right after an untimed pass of their own). Peak memory: the
highest level of torch's CPU allocations above the start of one pass, from torch.profiler's memory
events (``profile_memory=True``); on CUDA ``torch.cuda.max_memory_allocated``.

Every row compares the same loss: the same distance or critic, temperature, margins and
reduction on both sides, and the ``|diff|`` column prints ``|ours - PML|`` of the loss value on
that row's input (float32), so a row that compares different losses shows it.

PML cases whose cost grows as B^3 are skipped, with the reason printed, when the time or memory
predicted from the previous size (or, for the run's first size, from an untimed pass at
``PROBE_B`` = 128) exceeds ``--budget-s`` / ``--budget-gb`` (B^3 scaling for
NTXentLoss and for TripletMarginLoss while it builds its B^3 mask, i.e. B^3 < 2^31; B^2 otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.critics import Cosine  # noqa: E402
from losses import modules as M  # noqa: E402
from losses import native as N  # noqa: E402
from losses import pair_based as PB  # noqa: E402
from losses import proxies as PX  # noqa: E402

#: classes of the proxy losses' cases (labels = item index mod this)
PROXY_CLASSES = 100

# --------------------------------------------------------------------------- memory


@contextlib.contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at ``os.devnull`` while the block runs: Kineto (torch.profiler's
    backend) writes log lines (``USDT: ... profiler_start``, ``ERROR: gpuGetDeviceCount
    failed``) straight to it on every profile, whatever ``KINETO_LOG_LEVEL`` says, which would
    interleave with the printed table; and torch's allocator warns there of every block
    allocated before the profile and freed inside it (a loss's cached tensor, e.g. PML's
    ``MarginLoss`` beta). :class:`PeakMemory` runs its profiled block inside, a pass that has
    already run once unprofiled (so an error of its own would have shown there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class PeakMemory:
    """Peak bytes allocated by torch above the starting level while the ``with`` block runs.

    CPU: torch's profiler with ``profile_memory=True`` records every allocation and free of the
    CPU allocator; the running sum of their sizes in time order peaks at the answer. CUDA:
    ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, device):
        self.device = torch.device(device).type
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device == "cpu":
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._quiet = native_stderr_silenced()
            self._quiet.__enter__()
            self._prof.__enter__()
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.device == "cpu":
            try:
                self._prof.__exit__(*exc)
                events = [
                    (e.start_ns(), e.nbytes())
                    for e in self._prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
                ]
            finally:
                self._quiet.__exit__(None, None, None)
            level = peak = 0
            for _, nbytes in sorted(events):
                level += nbytes
                peak = max(peak, level)
            self.peak = peak
        else:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        return False


def memory_method(device) -> str:
    if torch.device(device).type == "cpu":
        return ("peak of torch's CPU allocations during one pass (torch.profiler, "
                "profile_memory=True; running sum of alloc/free sizes)")
    return "torch.cuda.max_memory_allocated"


# --------------------------------------------------------------------------- host reads

#: operators that read a tensor value or a data-dependent size on the host: each is a device
#: sync on a GPU (``item`` / ``bool`` / ``float`` go through ``_local_scalar_dense``)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "bincount", "_unique2", "unique_dim",
                      "unique_consecutive", "masked_select", "repeat_interleave"})
#: of those, the ones counted only on a GPU: the losses call ``bincount`` on the CPU alone
#: (``kernels.positive_index``), where it reads nothing, and row sums on a GPU
GPU_ONLY_SYNC_OPS = frozenset({"bincount"})


class HostReads(TorchDispatchMode):
    """Counts a block's host reads of tensor values (:data:`SYNC_OPS`, and ``Tensor.tolist``,
    which does not dispatch on the CPU): deterministic, unlike a time, and each one a device
    sync on a GPU, where a loss at B = 128 waits on every one of them."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and (name not in GPU_ONLY_SYNC_OPS or any(
                isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)):
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = original = torch.Tensor.tolist

        def tolist(t):
            self.reads += 1
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def _counted(counter: TorchDispatchMode, fn, x, labels) -> TorchDispatchMode:
    """``counter`` (a counting dispatch mode) after one forward+backward pass of ``fn`` inside
    it, which follows an uncounted one (lazy initialisation and caches stay out)."""
    run_once(fn, x, labels, x.device)
    x.grad = None
    with counter:
        run_once(fn, x, labels, x.device)
    x.grad = None
    return counter


def host_reads(fn, x, labels) -> int:
    """Host reads of one forward+backward pass of ``fn`` (after an uncounted one)."""
    return _counted(HostReads(), fn, x, labels).reads


class Operations(TorchDispatchMode):
    """Counts a block's ATen operations (views included): deterministic, and at B = 128 on a
    CPU, where each costs a few microseconds more than its arithmetic, the best predictor of
    the time ratio to the floor that we found (docs/losses.md, "Fewer operations")."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations(fn, x, labels) -> int:
    """ATen operations of one forward+backward pass of ``fn`` (after an uncounted one)."""
    return _counted(Operations(), fn, x, labels).count


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str  # our loss
    ref_name: str  # its PML counterpart ("-" when none)
    composition: str  # "views" (2 views per instance) or "classes" (4 per class)
    ours: Callable[[], Callable]
    ref: Callable[[], Callable] | None
    ref_power: Callable[[int], int]  # PML cost grows as B^power at batch size B
    floor: Callable[[], Callable] | None = None  # None: the B x B floor (floor_fn)


def _pml():
    from pytorch_metric_learning import losses as pml
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.reducers import MeanReducer

    return pml, miners, MeanReducer


def _ref_hard():
    """PML's batch-hard: BatchHardMiner + TripletMarginLoss with its default reducer (the mean
    over non-zero terms), i.e. ``Triplet(mining="hard", reduction="nonzero")``."""
    pml, miners, _ = _pml()
    miner = miners.BatchHardMiner()
    loss = pml.TripletMarginLoss(margin=0.05)
    return lambda e, y: loss(e, y, miner(e, y))


def _cubic(b: int) -> int:
    return 3


def _quadratic(b: int) -> int:
    return 2


def _triplet_power(b: int) -> int:
    """TripletMarginLoss builds a B^3 mask while B^3 < 2^31, then loops over anchors."""
    return 3 if b**3 < 2**31 - 1 else 2


def cases() -> dict[str, Case]:
    """Like for like: each PML loss against our module configured to be the same loss."""
    pml, _, _ = _pml()
    return {
        "infonce": Case(
            "InfoNCE(pair,t=.1)", "NTXentLoss", "views",
            lambda: M.InfoNCE(temperature=0.1, positives="pair"),
            lambda: pml.NTXentLoss(temperature=0.1), _cubic,
        ),
        "ntxent": Case(
            "InfoNCE(pair,t=.1)", "NTXentLoss", "classes",
            lambda: M.InfoNCE(temperature=0.1, positives="pair"),
            lambda: pml.NTXentLoss(temperature=0.1), _cubic,
        ),
        "supcon": Case(
            "InfoNCE(all,t=.1)", "SupConLoss", "classes",
            lambda: M.InfoNCE(temperature=0.1, positives="all"),
            lambda: pml.SupConLoss(temperature=0.1), _quadratic,
        ),
        "npair": Case(
            # PML's NPairsLoss() normalises (DotProductSimilarity's default): Cosine(1.0)
            "NPair(Cosine(1))", "NPairsLoss", "classes",
            lambda: M.MultiClassNPair(critic=Cosine(1.0)), lambda: pml.NPairsLoss(), _quadratic,
        ),
        "triplet": Case(
            "Triplet(all)", "TripletMarginLoss", "classes",
            lambda: M.Triplet(), lambda: pml.TripletMarginLoss(), _triplet_power,
        ),
        "triplet_hard": Case(
            "Triplet(hard,nz)", "TMLoss+BatchHard", "classes",
            lambda: M.Triplet(mining="hard", reduction="nonzero"), _ref_hard, _quadratic,
        ),
        "triplet_semihard": Case(
            # PML's semihard TripletMarginMiner keeps every semi-hard triplet, a different loss
            "Triplet(semihard)", "-", "classes", lambda: M.Triplet(mining="semihard"), None,
            _quadratic,
        ),
        "contrastive": Case(
            "Contrastive", "ContrastiveLoss", "classes",
            lambda: M.Contrastive(), lambda: pml.ContrastiveLoss(), _quadratic,
        ),
        "multi_similarity": Case(
            "MultiSim(eps=.1)", "MSLoss+MSMiner", "classes",
            lambda: PB.MultiSimilarity(epsilon=0.1), _ref_ms, _quadratic,
        ),
        "multi_similarity_all": Case(
            "MultiSim", "MultiSimilarityLoss", "classes",
            lambda: PB.MultiSimilarity(), lambda: pml.MultiSimilarityLoss(), _quadratic,
        ),
        "circle": Case("Circle", "CircleLoss", "classes", lambda: PB.Circle(),
                       lambda: pml.CircleLoss(), _quadratic),
        "lifted": Case("LiftedStructure", "GenLiftedStruct", "classes",
                       lambda: PB.LiftedStructure(),
                       lambda: pml.GeneralizedLiftedStructureLoss(), _quadratic),
        "margin": Case("Margin(all)", "MarginLoss(all)", "classes", lambda: PB.Margin(),
                       lambda: pml.MarginLoss(triplets_per_anchor="all"), _triplet_power),
        "nca": Case("NCA", "NCALoss", "classes", lambda: PB.NCA(), lambda: pml.NCALoss(),
                    _quadratic),
        **_proxy_cases(pml),
        "nwj": Case("NWJ", "-", "views", lambda: M.NWJ(), None, _quadratic),
        "js": Case("JS", "-", "views", lambda: M.JS(), None, _quadratic),
        "dv": Case("DV", "-", "views", lambda: M.DV(), None, _quadratic),
    }


def _ref_ms():
    """PML's multi-similarity with its pair mining: MultiSimilarityMiner(0.1) + the loss."""
    pml, miners, _ = _pml()
    miner = miners.MultiSimilarityMiner(0.1)
    loss = pml.MultiSimilarityLoss()
    return lambda e, y: loss(e, y, miner(e, y))


def _proxy_cases(pml) -> dict[str, Case]:
    """Proxy losses against PML's with the same proxies: ``ours()`` builds both modules (ours
    initialised from PML's) and ``ref()`` returns the PML one it built."""
    c, built = PROXY_CLASSES, {}
    specs = {  # key: (our name, PML name, ours, PML, PML keeps W [d, C])
        "proxy_nca": ("ProxyNCA", "ProxyNCALoss", PX.ProxyNCA, pml.ProxyNCALoss, False),
        "proxy_anchor": ("ProxyAnchor", "ProxyAnchorLoss", PX.ProxyAnchor,
                         pml.ProxyAnchorLoss, False),
        "norm_softmax": ("NormSoftmax", "NormalizedSoftmax", PX.NormalizedSoftmax,
                         pml.NormalizedSoftmaxLoss, True),
        "cosface": ("CosFace", "CosFaceLoss", PX.CosFace, pml.CosFaceLoss, True),
        "arcface": ("ArcFace", "ArcFaceLoss", PX.ArcFace, pml.ArcFaceLoss, True),
    }

    def make(key, ours_cls, ref_cls, transposed):
        def ours():
            ref = ref_cls(num_classes=c, embedding_size=DIM)
            mine = ours_cls(c, DIM)
            with torch.no_grad():
                mine.proxies.copy_(ref.W.data.T if transposed else ref.proxies.data)
            built[key] = ref
            return mine

        return ours, lambda: built[key]

    out = {}
    for key, (name, ref_name, ours_cls, ref_cls, transposed) in specs.items():
        ours, ref = make(key, ours_cls, ref_cls, transposed)
        out[key] = Case(name, ref_name, "proxies", ours, ref, _quadratic, proxy_floor_fn)
    return out


#: the pair-based and proxy losses (issue 14), also run at the extra sizes by default
NEW_CASES = ["multi_similarity", "multi_similarity_all", "circle", "lifted", "margin", "nca",
             "proxy_nca", "proxy_anchor", "norm_softmax", "cosface", "arcface"]

#: the embedding size (set from --dim before the cases are built)
DIM = 128


def proxy_floor_fn(t: float = 0.1) -> Callable:
    """The proxy losses' floor: normalise, one B x C product with the proxies, logsumexp,
    backward (into the embeddings and the proxies)."""
    proxies: dict = {}  # one leaf per device, made on first use (no copy inside the timing)

    def f(e, _labels):
        if e.device not in proxies:
            proxies[e.device] = torch.randn(PROXY_CLASSES, DIM, device=e.device,
                                            requires_grad=True)
        z = F.normalize(e, dim=1)
        w = F.normalize(proxies[e.device], dim=1)
        return torch.logsumexp((z @ w.T) / t, dim=1).mean()

    return f


def labels_for(composition: str, b: int, device) -> torch.Tensor:
    if composition == "proxies":
        return torch.arange(b, device=device) % PROXY_CLASSES
    per = 2 if composition == "views" else 4
    return torch.arange(b, device=device) // per


def floor_fn(t: float = 0.1) -> Callable:
    """The bare score-matrix work: normalise, B x B product, logsumexp, (backward)."""

    def f(e, _labels):
        z = F.normalize(e, dim=1)
        return torch.logsumexp((z @ z.T) / t, dim=1).mean()

    return f


# --------------------------------------------------------------------------- timing


def _sync(device):
    if torch.device(device).type != "cpu":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def run_once(fn, x, labels, device, passes: int = 1) -> float:
    """Seconds per pass of ``passes`` consecutive forward+backward passes."""
    _sync(device)
    t0 = CLOCK()
    for _ in range(passes):
        x.grad = None
        loss = fn(x, labels)
        loss.backward()
    _sync(device)
    return (CLOCK() - t0) / passes


#: a timed sample lasts at least this long: passes shorter than it are timed in blocks (the
#: mean of a block), so that millisecond passes at B = 128 are not single clock readings
MIN_SAMPLE_S = 0.02


@dataclass
class Result:
    ms: float | None = None
    mb: float | None = None
    skipped: str = ""


def measure_interleaved(fns: dict, x, labels, device, repeats: int, budget_s: float) -> dict:
    """Warm each function up, take its peak memory on one pass, then time ``repeats`` passes
    round-robin (ours, floor, PML, ours, ...) so that load from other processes hits all of
    them alike; the median per function. Ours and the floor each run one untimed pass before
    every timed one, so neither is timed on the caches a large PML pass just flushed."""
    out, passes = {}, {}
    for key, fn in fns.items():
        run_once(fn, x, labels, device)  # warm-up: first-touch, lazy init
        x.grad = None  # freed before the profile starts (its free inside would be unmatched)
        with PeakMemory(device) as pm:
            one = run_once(fn, x, labels, device)
        out[key] = (pm.peak / 2**20, [one])
        passes[key] = max(1, min(50, int(MIN_SAMPLE_S / max(one, 1e-6))))
    for _ in range(repeats - 1):
        for key, fn in fns.items():
            mb, times = out[key]
            if sum(times) < budget_s:  # slow cases get fewer repeats
                if key != "ref":
                    # an untimed pass first: a B^3 PML pass just before evicts the caches, which
                    # would otherwise charge whichever of ours / floor runs after it
                    run_once(fn, x, labels, device)
                times.append(run_once(fn, x, labels, device, passes[key]))
    return {k: Result(ms=1e3 * statistics.median(t), mb=mb) for k, (mb, t) in out.items()}


#: the batch size at which a PML case is first measured, untimed in the table, when the run
#: starts above it: the prediction of a larger size needs a measured smaller one
PROBE_B = 128


def probe(case, device, args) -> Result:
    """PML's time and peak memory for ``case`` at :data:`PROBE_B` (one pass after a warm-up):
    what :func:`predict_skip` scales from when the run's first size is larger. Without it a
    run started at ``--sizes 1024`` would run PML's ``B^3`` NT-Xent (measured: 48 s and
    17.4 GB at B = 1024) and the next such case would exhaust a 24 GB machine."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(PROBE_B, args.dim, generator=gen).to(device).requires_grad_(True)
    fn = case.ref()
    fn = fn.to(device) if isinstance(fn, torch.nn.Module) else fn
    labels = labels_for(case.composition, PROBE_B, device)
    return measure_interleaved({"ref": fn}, x, labels, device, 1, args.budget_s)["ref"]


def predict_skip(prev: Result | None, prev_b: int | None, b: int, power: int, args) -> str:
    if prev is None or prev.ms is None:
        return "" if prev is None else "skipped at a smaller B"
    scale = (b / prev_b) ** power
    t_pred, m_pred = prev.ms * scale / 1e3, prev.mb * scale / 1024
    if m_pred > args.budget_gb:
        return f"skipped (predicted {m_pred:.1f} GB > {args.budget_gb:g} GB budget)"
    if t_pred > args.budget_s:
        return f"skipped (predicted {t_pred:.0f} s > {args.budget_s:g} s budget)"
    return ""


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--extra-infonce-sizes", type=int, nargs="*", default=[4096],
                   help="sizes at which only the --extra-cases run")
    p.add_argument("--extra-cases", nargs="*", default=["infonce", *NEW_CASES],
                   help="the cases that also run at --extra-infonce-sizes")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=None, help=f"subset of {sorted(cases())}")
    p.add_argument("--budget-s", type=float, default=20.0, help="per PML pass, seconds")
    p.add_argument("--budget-gb", type=float, default=6.0, help="per PML pass, GB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="B = 128, 512; 5 repeats")
    p.add_argument("--small", action="store_true",
                   help="B = 128 only, 15 repeats: the fixed per-call overhead (ours / floor "
                        "and the PML speed-up per case, summarised at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-native", action="store_true",
                   help="the torch kernels instead of the C ones (losses.native) on a CPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: this process's CPU time (default on CPU with one thread: robust "
                        "to other processes on a shared machine); wall: perf_counter")
    args = p.parse_args(argv)
    global CLOCK, DIM
    DIM = args.dim
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and torch.get_num_threads() == 1 else "wall"
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.sizes, args.repeats, args.extra_infonce_sizes = [128, 512], 5, []
    if args.small:
        args.sizes, args.repeats, args.extra_infonce_sizes = [128], 15, []

    dev = torch.device(args.device)
    clock = "process CPU time" if args.clock == "cpu" else "wall clock"
    print(f"# torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"d = {args.dim}, forward+backward, median of {args.repeats} ({clock}, interleaved)")
    print(f"# memory: {memory_method(args.device)}")
    native_state = ("off (--no-native)" if args.no_native else
                    N.kernel_set() or "not built (no C compiler at install)")
    print(f"# C kernels of the small-batch losses on a CPU (losses.native): {native_state}")
    with N.disabled() if args.no_native else contextlib.nullcontext():
        run_cases(args, dev)
    return 0


def run_cases(args, dev) -> None:
    """The table: every chosen case at every size, then the overhead summary."""
    all_cases = cases()
    chosen = args.cases or list(all_cases)
    print("# composition: views = 2 views per instance (B/2 instances); "
          "classes = 4 items per class (B/4 classes); proxies = "
          f"{PROXY_CLASSES} classes and proxies (the floor is then B x {PROXY_CLASSES})")
    print("# speed-up = PML time / ours; mem ratio = PML peak / ours; floor = normalise + "
          "B x B matmul + logsumexp + backward, same run")
    head = (f"{'loss':<18} {'PML':<18} {'comp':<7} {'B':>5} {'ours ms':>9} {'PML ms':>10} "
            f"{'speed-up':>9} {'ours MB':>8} {'PML MB':>8} {'mem ratio':>9} {'floor ms':>9} "
            f"{'ours/floor':>10} {'floor MB':>8} {'|diff|':>8}")
    print(head)
    print("-" * len(head))
    prev_ref: dict[str, tuple[int, Result]] = {}
    smallest: dict[str, tuple[int, float, float | None]] = {}  # the overhead summary
    sizes = [(b, False) for b in args.sizes] + [(b, True) for b in args.extra_infonce_sizes]
    for b, infonce_only in sizes:
        gen = torch.Generator().manual_seed(args.seed + b)
        x = torch.randn(b, args.dim, generator=gen).to(dev).requires_grad_(True)
        for key in chosen:
            c = all_cases[key]
            if infonce_only and key not in args.extra_cases:
                continue
            labels = labels_for(c.composition, b, dev)
            fns = {"ours": c.ours().to(dev), "floor": (c.floor or floor_fn)()}
            skipped = "no PML counterpart"
            if c.ref is not None:
                pb, pres = prev_ref.get(key, (None, None))
                if pres is None and b > PROBE_B:  # nothing measured yet to predict from
                    pb, pres = PROBE_B, probe(c, dev, args)
                skipped = predict_skip(pres, pb, b, c.ref_power(b), args)
                if not skipped:
                    fn = c.ref()
                    fns["ref"] = fn.to(dev) if isinstance(fn, torch.nn.Module) else fn
            diff = None
            if "ref" in fns:
                with torch.no_grad():
                    diff = abs(float(fns["ours"](x, labels)) - float(fns["ref"](x, labels)))
            res = measure_interleaved(fns, x, labels, dev, args.repeats, args.budget_s)
            ours, fl = res["ours"], res["floor"]
            ref = res.get("ref", Result(skipped=skipped))
            if c.ref is not None:
                prev_ref[key] = (b, ref)
            speed = ref.ms / ours.ms if ref.ms else None
            memr = ref.mb / max(ours.mb, 1e-3) if ref.mb is not None else None
            line = (f"{c.name:<18} {c.ref_name:<18} {c.composition:<7} {b:>5} "
                    f"{ours.ms:>9.2f} {fmt(ref.ms, '>10.1f')} {fmt(speed, '>9.1f')} "
                    f"{ours.mb:>8.1f} {fmt(ref.mb, '>8.1f')} {fmt(memr, '>9.1f')} "
                    f"{fl.ms:>9.2f} {ours.ms / fl.ms:>10.2f} {fl.mb:>8.1f} "
                    f"{fmt(diff, '>8.1e')}")
            if ref.skipped and c.ref is not None:
                line += f"  PML {ref.skipped}"
            print(line, flush=True)
            if key not in smallest or b < smallest[key][0]:
                reads = (host_reads(fns["ours"], x, labels),
                         host_reads(fns["ref"], x, labels) if "ref" in fns else None)
                ops = (operations(fns["ours"], x, labels), operations(fns["floor"], x, labels))
                smallest[key] = (b, ours.ms / fl.ms, speed, reads, ops)
            del fns, res
            gc.collect()
        del x
        gc.collect()
    print_overhead_summary(smallest, all_cases)


def print_overhead_summary(smallest: dict, all_cases: dict, target: float = 1.5) -> None:
    """One line per case at its smallest B: ours / floor (the fixed per-call overhead; target
    ``<= target``) and the speed-up over PML (target ``>= 1``)."""
    if not smallest:
        return
    print(f"# overhead at the smallest B: ours/floor (target <= {target:g}), PML speed-up "
          "(target >= 1), host reads per forward+backward, ours and PML's (each a device "
          "sync on a GPU), and ATen operations per forward+backward, ours and the floor's")
    for key, (b, ratio, speed, (reads, ref_reads), (ops, floor_ops)) in smallest.items():
        flags = [f"> {target:g}x floor"] if ratio > target else []
        if speed is not None and speed < 1.0:
            flags.append("slower than PML")
        print(f"#   {all_cases[key].name:<18} B={b:<5} ours/floor {ratio:5.2f}  "
              f"PML speed-up {fmt(speed, '5.2f')}  reads {reads:>2} (PML {fmt(ref_reads, '>2')})"
              f"  ops {ops:>3} (floor {floor_ops:>3})  {'; '.join(flags) or 'ok'}")


if __name__ == "__main__":
    raise SystemExit(main())
