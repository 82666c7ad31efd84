"""One GPU check: every CUDA path of the project, measured in one command, written to docs/gpu.md.

``make gpu-check`` (this script) on a machine with a CUDA device runs, each part in its own
subprocess with a time limit, all parts within ``--budget-s`` (default 450 s, under 8 minutes):

========== ==================================================================================
tests      the CUDA-only tests (``pytest -m cuda`` over the test files that have them)
losses     ``benchmarks/losses.py`` on the GPU at B = 128, 1024 ... 8192: ours, PML, the floor
embed      ``embed`` of a timm ResNet-50 (random weights) with the CUDA defaults (autocast,
           channels_last) against the bare bf16 forward and the bare float32 forward, images/s
retrieval  retrieval metrics of 100k and 1M x 128 synthetic embeddings (1,000 classes): the torch
           CUDA backend, FAISS GPU, PML's AccuracyCalculator (where it fits), and the floor --
           the bare blockwise GPU matrix product of all query-reference scores
compare    a short ``contrastive compare`` cell (digits, MLP, two losses) on the GPU
========== ==================================================================================

with the peak GPU memory of each: torch's allocator peak (``max_memory_allocated``) and the
device-wide peak above the starting level (``mem_get_info`` sampled every 5 ms; it also sees
FAISS's own allocations). ``docs/gpu.md`` is rewritten after every part, so a run cut short
still leaves what it measured.

It runs from a checkout without ``pip install``: the repository goes on ``PYTHONPATH``, and the
packages a bare GPU machine lacks (pytorch-metric-learning, faiss-cpu, pytest, pydantic and
their dependencies) are unpacked from the wheels in ``benchmarks/wheels/`` (``make gpu-wheels``
fetches them on a machine with network; they are not committed) into ``runs/gpu_check/site``. The
optional C scan (``evaluation/_scan.c``) is compiled in place when a C compiler and the Python
headers are there. A backend that cannot run (no PML wheel, a FAISS without GPU support, ...) is
reported as "not tested" with the reason, never silently dropped.

Without a CUDA device it prints one line and exits 0. ``--dry-run`` lists what it would run
(with or without a GPU). ``--device cpu --tiny --output FILE`` runs every part at toy sizes on
the CPU: the rehearsal that checks the script itself where no GPU is available.

    make gpu-check                               # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --dry-run
    python benchmarks/gpu_check.py --device cpu --tiny --output /tmp/gpu.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

#: the start of this process: the budget counts from here (the imports of torch, the set-up)
T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "wheels"
SITE = ROOT / "runs" / "gpu_check" / "site"
DOC = ROOT / "docs" / "gpu.md"
#: import name -> wheel (distribution) name, for the packages a bare GPU machine lacks
WHEEL_MODULES = {
    "pytorch_metric_learning": "pytorch_metric_learning",
    "faiss": "faiss_cpu",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "packaging": "packaging",
    "pygments": "pygments",
    "pydantic": "pydantic",  # contrastive.app.config
    "pydantic_core": "pydantic_core",
    "annotated_types": "annotated_types",
    "typing_inspection": "typing_inspection",
    "typing_extensions": "typing_extensions",
}


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One subprocess: ``part`` with ``args``, killed after ``timeout`` seconds."""

    part: str
    label: str
    args: list[str] = field(default_factory=list)
    timeout: float = 60.0


def plan(device: str, tiny: bool) -> list[Step]:
    """The steps in the order they run, most informative first: the CUDA tests, the losses and
    embed, then retrieval against the GPU floor with the torch backend at both sizes (the
    backend that carries the GPU numbers when no faiss-gpu wheel travels), the compare cell,
    and last the contenders most likely to be absent or out of memory (faiss-gpu, PML's
    AccuracyCalculator), which a run short of time drops first."""
    if tiny:
        sizes, loss_sizes = [(600, 20), (1500, 30)], ["64", "128"]
    else:
        sizes = [(100_000, 1000), (1_000_000, 1000)]
        loss_sizes = ["128", "1024", "2048", "4096", "8192"]
    steps = [
        Step("tests", "CUDA-only tests", [], 150),
        Step("losses", "losses vs PML and the floor", loss_sizes, 150),
        Step("embed", "embed: ResNet-50, autocast + channels_last", [], 100),
    ]

    def retrieval(n: int, c: int, contender: str) -> Step:
        return Step("retrieval", f"retrieval {n:,} x 128, {contender}",
                    [str(n), str(c), contender], 60 if n <= 100_000 else 120)

    steps += [retrieval(n, c, contender) for n, c in sizes for contender in ("floor", "torch")]
    steps.append(Step("compare", "compare cell (digits, MLP)", [], 120))
    steps += [retrieval(n, c, contender) for n, c in sizes for contender in ("faiss-gpu", "pml")]
    return steps


# --------------------------------------------------------------------------------------------
# bootstrap: wheels and the C extension
# --------------------------------------------------------------------------------------------
def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _wheel_fits(path: Path) -> str:
    """'' when the wheel's tags fit this interpreter, else the reason it does not."""
    tags = path.stem.split("-")[-3:]  # python tag, abi tag, platform tag
    py, _abi, plat = tags
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not (py.startswith("py3") or here in py.split(".") or (py.startswith("cp3") and
                                                             _abi == "abi3")):
        return f"built for {py}, this is {here}"
    if plat != "any" and platform.machine() not in plat:
        return f"built for {plat}, this is {platform.machine()}"
    return ""


def unpack_wheels(site: Path = SITE, wheels: Path = WHEELS,
                  modules: dict[str, str] = WHEEL_MODULES) -> dict[str, str]:
    """Unpack each wheel of ``wheels`` whose module is not importable yet into ``site``.

    Returns ``{module: status}`` for every module of ``modules`` (import name -> distribution
    name; default :data:`WHEEL_MODULES`): "installed" (found
    already), "from wheel <file>", or why it is missing. A wheel is a zip archive; unpacking it
    is all a pure-Python or manylinux wheel needs (its shared libraries find each other through
    their relative rpath)."""
    status: dict[str, str] = {}
    found = {p.name.split("-")[0].lower(): p for p in sorted(wheels.glob("*.whl"))}
    for module, dist in modules.items():
        if _importable(module):  # (``site`` is not on this process's path)
            if (site / module).is_dir():  # never shadow an installed build (e.g. faiss-gpu)
                shutil.rmtree(site / module)
            status[module] = "installed"
            continue
        if (site / module).exists():
            status[module] = f"from wheel (unpacked earlier in {site})"
            continue
        wheel = found.get(dist.lower())
        if wheel is None:
            status[module] = f"missing: no {dist}-*.whl in benchmarks/wheels (make gpu-wheels)"
            continue
        why = _wheel_fits(wheel)
        if why:
            status[module] = f"missing: {wheel.name} is {why}"
            continue
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                target = z.extract(info, site)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(target, mode)
        status[module] = f"from wheel {wheel.name}"
    return status


def build_scan() -> str:
    """Compile ``evaluation/_scan.c`` in place for this interpreter; returns what happened."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = ROOT / "evaluation" / f"_scan{suffix}"
    source = ROOT / "evaluation" / "_scan.c"
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return f"built ({target.name}, up to date)"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"not built: no Python.h under {include} (numpy path used; same results)"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        cc = ["cc"]
        if shutil.which("cc") is None:
            return "not built: no C compiler (numpy path used; same results)"
    cmd = [*cc, "-O3", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(target)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not built: {exc}"
    if r.returncode != 0:
        return f"not built: {' '.join(cmd[:2])} failed: {r.stderr.strip()[-300:]}"
    return f"built ({target.name})"


def preflight() -> str:
    """Whether the project imports in a child process as the parts will see it: 'ok' or the
    error (a package missing on this machine, with no wheel for it)."""
    code = "import contrastive.cli, contrastive.app, evaluation, losses"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=child_env(), cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        return "FAILED: the imports took over 120 s"
    if r.returncode == 0:
        return "ok"
    return "FAILED: " + (r.stderr.strip().splitlines() or ["?"])[-1]


def child_env(site: Path = SITE) -> dict[str, str]:
    paths = [str(ROOT)] + ([str(site)] if site.exists() else [])
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + ([old] if old else [])),
                PYTHONUNBUFFERED="1", TQDM_DISABLE="1")


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
class GpuPeak:
    """Peak GPU memory of a block: torch's allocator peak and the device-wide peak above the
    starting level (``mem_get_info`` sampled every 5 ms, which also sees FAISS's memory).
    On the CPU both are None."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.allocated_mb: float | None = None
        self.device_mb: float | None = None

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def __enter__(self) -> GpuPeak:
        if self.device.type != "cuda":
            return self
        torch = self.torch
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base_alloc = torch.cuda.memory_allocated(self.device)
        self.base = self.peak = self._used()
        self.stop = threading.Event()

        def sample() -> None:
            while not self.stop.is_set():
                self.peak = max(self.peak, self._used())
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type != "cuda":
            return
        torch = self.torch
        torch.cuda.synchronize(self.device)
        self.peak = max(self.peak, self._used())
        self.stop.set()
        self.thread.join()
        self.allocated_mb = (torch.cuda.max_memory_allocated(self.device) - self.base_alloc) / 2**20
        self.device_mb = (self.peak - self.base) / 2**20

    def as_dict(self) -> dict:
        return {"peak_alloc_mb": self.allocated_mb, "peak_device_mb": self.device_mb}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """(best wall seconds over ``repeats``, the last result) of ``fn()``."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


# --------------------------------------------------------------------------------------------
# parts (each runs in its own subprocess: ``gpu_check.py --part NAME ARGS``)
# --------------------------------------------------------------------------------------------
def synthetic(n: int, classes: int, dim: int, device) -> tuple:
    """``n`` embeddings of ``dim`` around ``classes`` random centres (``n / classes`` each),
    float32 on the CPU, made on ``device`` (fast at 1M); labels int64. The noise makes the
    classes overlap, so the metrics sit well inside (0, 1)."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(classes, dim, generator=g, device=device)
    labels = torch.arange(n, device=device) % classes
    x = centres[labels] + 1.5 * torch.randn(n, dim, generator=g, device=device)
    return x.cpu(), labels.cpu()


def part_retrieval(n: int, classes: int, contender: str, device: str, dim: int = 128) -> dict:
    import torch

    x, y = synthetic(n, classes, dim, device)
    out: dict = {"n": n, "classes": classes, "dim": dim, "contender": contender}
    if contender == "floor":
        xd = torch.nn.functional.normalize(x.to(device), dim=1)
        budget = (1 << 30) if torch.device(device).type == "cuda" else (1 << 26)
        step = max(1, min(n, budget // (4 * n)))
        buf = torch.empty(step * n, device=device)

        def floor():
            for s in range(0, n, step):
                q = xd[s : s + step]
                torch.mm(q, xd.T, out=buf[: q.shape[0] * n].view(q.shape[0], n))

        with GpuPeak(device) as mem:
            out["seconds"], _ = timed(floor, device, repeats=2, warmup=1)
        out["tflops"] = 2.0 * n * n * dim / out["seconds"] / 1e12
    elif contender in ("torch", "faiss-gpu"):
        from evaluation.retrieval import retrieval_metrics

        backend = "torch" if contender == "torch" else "faiss"
        if contender == "faiss-gpu":
            why = faiss_gpu_missing()
            if why:
                return {**out, "not_tested": why}
        import inspect

        # exact search: the approximate indexes (evaluation.ann) are measured elsewhere
        exact = ({"index": "exact"} if "index" in inspect.signature(retrieval_metrics).parameters
                 else {})
        # a warm-up on a slice (CUDA's lazily loaded kernels, cuBLAS, FAISS's resources), as
        # the floor has one: the timed call is the search itself
        w = _warmup_rows(n, classes)
        retrieval_metrics(x[:w], y[:w], backend=backend, device=device, **exact)
        with GpuPeak(device) as mem:
            out["seconds"], m = timed(
                lambda: retrieval_metrics(x, y, backend=backend, device=device, **exact), device)
        out["metrics"] = {k: float(m[k]) for k in ("precision_at_1", "r_precision", "map_at_r")}
        out["backend_used"] = getattr(m, "backend", None)  # what evaluation says it ran
    elif contender == "pml":
        try:
            from pytorch_metric_learning.distances import CosineSimilarity
            from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
            from pytorch_metric_learning.utils.inference import CustomKNN
        except ImportError as exc:
            return {**out, "not_tested": f"pytorch-metric-learning not importable ({exc})"}
        k = int(torch.bincount(y).max())  # max_bin_count: R for the largest class
        need = n * k * 12 * 2  # int64 ids + float32 scores, and a copy while sorting
        if torch.device(device).type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.6 * free:
                return {**out, "not_tested": f"needs ~{need / 2**30:.0f} GiB of {free / 2**30:.0f}"
                        " GiB free (its k-NN keeps n x max_bin_count ids and scores)"}
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count", device=torch.device(device),
            knn_func=CustomKNN(CosineSimilarity(), batch_size=max(1, (1 << 30) // (4 * n))),
        )
        xd, yd = x.to(device), y.to(device)
        w = _warmup_rows(n, classes)
        calc.get_accuracy(xd[:w], yd[:w])  # warm-up, as for the torch backend
        with GpuPeak(device) as mem:
            out["seconds"], m = timed(lambda: calc.get_accuracy(xd, yd), device)
        out["metrics"] = {"precision_at_1": float(m["precision_at_1"]),
                          "r_precision": float(m["r_precision"]),
                          "map_at_r": float(m["mean_average_precision_at_r"])}
    else:
        raise ValueError(f"unknown contender {contender!r}")
    out.update(mem.as_dict())
    return out


def _warmup_rows(n: int, classes: int) -> int:
    """Rows of the warm-up call: a few per class, at most 20,000."""
    return min(n, max(classes * 4, min(20_000, n // 10)))


def faiss_gpu_missing() -> str:
    """'' when FAISS is importable with GPU support, else why not."""
    try:
        import faiss
    except ImportError as exc:
        return f"faiss not importable ({exc})"
    get = getattr(faiss, "get_num_gpus", None)
    if get is None or get() == 0:
        return (f"faiss {getattr(faiss, '__version__', '?')} has no GPU support (a faiss-cpu "
                "build; faiss-gpu is too large to travel with the repository); the torch CUDA "
                "backend carries the GPU numbers")
    return ""


def part_embed(device: str, tiny: bool) -> dict:
    import torch
    from torch.utils.data import TensorDataset

    from contrastive.embedders import Embedder
    from contrastive.inference import _channels_last, amp_dtype, channels_last_safe, embed

    name, size, n, bs = ("test_resnet", 64, 64, 16) if tiny else ("resnet50", 224, 2048, 256)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = Embedder(name, dim=128, pretrained=False).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n)
    dtype = amp_dtype(device)
    layout = cuda and channels_last_safe(model)
    batches = [x[i : i + bs].to(device) for i in range(0, n, bs)]
    if layout:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]

    def bare(amp: bool):
        # the weights in the inputs' layout for the call, as embed() stores them (mixed layouts
        # would make cuDNN convert one side per convolution: not the same work)
        def run():
            with _channels_last(model, layout), torch.inference_mode(), torch.autocast(
                    torch.device(device).type, dtype=dtype, enabled=amp):
                return [model(b) for b in batches]
        return run

    ways = {
        (f"bare forward ({str(dtype).split('.')[-1]} autocast)" if cuda
         else "bare forward (CPU: no autocast)"): bare(cuda),
        "embed() over a TensorDataset (host memory)": lambda: embed(
            model, TensorDataset(x, y), batch_size=bs, device=device, progress=False),
        "bare forward (float32; cuDNN may use TF32)": bare(False),
    }
    out: dict = {"model": name, "image_size": size, "images": n, "batch_size": bs,
                 "amp_dtype": str(dtype), "channels_last": layout, "rows": {}}
    for label, fn in ways.items():
        with GpuPeak(device) as mem:
            seconds, _ = timed(fn, device, repeats=3 if not tiny else 1, warmup=1)
        out["rows"][label] = {"images_per_s": n / seconds, **mem.as_dict()}
    with _channels_last(model, layout), torch.inference_mode(), torch.autocast(
            torch.device(device).type, dtype=dtype, enabled=cuda):
        ref = model(batches[0]).float().cpu()
    emb, _ = embed(model, TensorDataset(x[:bs], y[:bs]), batch_size=bs, device=device,
                   progress=False)
    out["max_abs_diff_vs_bare"] = float((emb - ref).abs().max())
    return out


#: benchmarks/losses.py without pytorch-metric-learning: its cases with PML's side left out
#: (the proxy cases build PML's loss to copy its proxies: they go too)
_LOSSES_WITHOUT_PML = """
import dataclasses, importlib.util, sys, types
path = sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("bench_losses", path)
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_losses"] = bench
spec.loader.exec_module(bench)
class _Absent(types.SimpleNamespace):
    def __getattr__(self, name):
        return None
_cases = bench.cases
bench._pml = lambda: (_Absent(), _Absent(), _Absent())
bench.cases = lambda: {k: dataclasses.replace(c, ref=None, ref_name="(no PML)")
                       for k, c in _cases().items() if c.composition != "proxies"}
bench.NEW_CASES[:] = [k for k in bench.NEW_CASES if k in bench.cases()]
sys.exit(bench.main())
"""


def part_losses(sizes: list[str], device: str, tiny: bool) -> dict:
    script = str(ROOT / "benchmarks" / "losses.py")
    args = ["--device", device, "--sizes", *sizes, "--extra-infonce-sizes",
            "--repeats", "2" if tiny else "5", "--budget-s", "2" if tiny else "4",
            "--budget-gb", "60"]
    if tiny:
        args += ["--cases", "infonce", "triplet"]
    note = ""
    if _child_imports("pytorch_metric_learning"):
        cmd = [sys.executable, script, *args]
    else:  # the bare GPU machine without the PML wheel: ours and the floor still run
        note = ("pytorch-metric-learning not importable: PML's columns and the proxy losses "
                "(whose cases build PML's proxies) not tested; ours and the floor measured")
        cmd = [sys.executable, "-c", _LOSSES_WITHOUT_PML, script, *args]
    code, stdout, stderr = _run_within_budget(cmd)
    return {"command": " ".join(["benchmarks/losses.py", *args]), "returncode": code,
            "table": stdout.strip(), "stderr": stderr.strip()[-2000:], "note": note}


def _run_within_budget(cmd: list[str]) -> tuple[int | str, str, str]:
    """Run ``cmd`` until 10 s before this part's own limit; on a timeout keep what it printed
    (benchmarks/losses.py prints its table row by row)."""
    limit = float(os.environ.get("GPU_CHECK_TIMEOUT_S", "600")) - 10
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT,
                           timeout=max(limit, 5))
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as exc:
        def text(b) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        return (f"stopped after {limit:.0f} s (the rows above finished)", text(exc.stdout),
                text(exc.stderr))


def _child_imports(module: str) -> bool:
    """Whether ``module`` imports in a child process with the parts' environment (the wheels'
    site directory on its path), as the command the part starts will see it."""
    try:
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                           env=child_env(), cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def part_tests(device: str, tiny: bool) -> dict:
    files = cuda_test_files()
    if not _importable("pytest"):
        return {"not_tested": "pytest not importable (no wheel in benchmarks/wheels)",
                "files": files}
    # one file that cannot be imported (a wheel missing) must not stop the others
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           "-rs", "--continue-on-collection-errors", *files]
    code, stdout, stderr = _run_within_budget(cmd)
    tail = stdout.strip().splitlines()
    summary = next((s for s in reversed(tail) if re.search(r"passed|failed|error|skipped", s)),
                   "")
    if not isinstance(code, int):
        summary = f"{code}; {summary}"
    return {"files": files, "returncode": code, "summary": summary.strip("= "),
            "output": "\n".join(tail[-60:]) + ("\n" + stderr[-1500:] if stderr else "")}


def part_compare(device: str, tiny: bool) -> dict:
    """Two losses x one seed on digits with the MLP, through the CLI's own entry point."""
    import torch

    from contrastive import cli

    steps = 20 if tiny else 300
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_compare_"))
    argv = ["compare", "--losses", "infonce,triplet", "--seeds", "0", "--steps", str(steps),
            "--batch-size", "64", "--output", str(out_dir), "--no-progress"]
    env_device = "cuda" if torch.cuda.is_available() else "cpu"  # compare's own default
    err = io.StringIO()
    with GpuPeak(device) as mem, contextlib.redirect_stderr(err):
        t0 = time.perf_counter()
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
        seconds = time.perf_counter() - t0
    cells = []
    results = out_dir / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        for cell in _cells(data):
            m = cell.get("metrics") or {}
            cells.append({"loss": cell.get("loss"), "status": cell.get("status"),
                          "train_time_s": cell.get("train_time_s"),
                          "precision_at_1": m.get("precision_at_1"),
                          "map_at_r": m.get("map_at_r"), "error": cell.get("error")})
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"argv": argv, "exit_code": code, "seconds": seconds, "steps": steps,
            "device": env_device, "cells": cells, "stderr": err.getvalue()[-1500:],
            **mem.as_dict()}


def _cells(data) -> list[dict]:
    """The per-cell records of a results.json, wherever the report keeps them."""
    if isinstance(data, list):
        return [c for c in data if isinstance(c, dict) and "loss" in c and "status" in c]
    if isinstance(data, dict):
        for key in ("cells", "runs", "results"):
            if isinstance(data.get(key), list):
                return _cells(data[key])
        found = []
        for v in data.values():
            if isinstance(v, (dict, list)):
                found += _cells(v)
        return found
    return []


def run_part(name: str, args: list[str], device: str, tiny: bool) -> dict:
    if name == "retrieval":
        n, classes, contender = int(args[0]), int(args[1]), args[2]
        return part_retrieval(n, classes, contender, device)
    if name == "embed":
        return part_embed(device, tiny)
    if name == "losses":
        return part_losses(args, device, tiny)
    if name == "tests":
        return part_tests(device, tiny)
    if name == "compare":
        return part_compare(device, tiny)
    raise ValueError(f"unknown part {name!r}")


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _mb(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _num(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def render(env: dict, results: list[tuple[Step, dict]], total_s: float, budget_s: float) -> str:
    """The markdown of docs/gpu.md from what ran so far."""
    lines = [
        "# GPU check",
        "",
        f"Written by `make gpu-check` (`benchmarks/gpu_check.py`) on {env.get('date', '?')}; "
        f"{total_s:.0f} s of a {budget_s:.0f} s budget. Numbers from one run; "
        "regenerate with `make gpu-check`.",
        "",
        "## Machine",
        "",
    ]
    for key in ("device", "capability", "memory", "torch", "cuda", "python", "bf16"):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    lines.append(f"- C scan (`evaluation/_scan.c`): {env.get('scan', '?')}")
    lines.append(f"- project imports in a child process: {env.get('imports', '?')}")
    for module, status in env.get("wheels", {}).items():
        lines.append(f"- `{module}`: {status}")
    lines.append("")
    by_part: dict[str, list[tuple[Step, dict]]] = {}
    for step, res in results:
        by_part.setdefault(step.part, []).append((step, res))

    for _step, res in by_part.get("tests", []):
        lines += ["## CUDA-only tests", "", f"`pytest -m cuda {' '.join(res.get('files', []))}`"
                  f": **{res.get('summary') or _status(res)}**", ""]
        if res.get("output"):
            lines += ["```", res["output"][-4000:], "```", ""]
    for _step, res in by_part.get("losses", []):
        lines += ["## Losses on the GPU (forward + backward)", "",
                  f"`python {res.get('command', '')}`" if "command" in res else _status(res), ""]
        if res.get("note"):
            lines += [f"Not tested: {res['note']}.", ""]
        if res.get("table"):
            lines += ["```", res["table"], "```", ""]
        if res.get("returncode"):
            lines += [f"exit code {res['returncode']}:", "```", res.get("stderr", ""), "```", ""]
    for _step, res in by_part.get("embed", []):
        lines += ["## embed() throughput", ""]
        if "rows" not in res:
            lines += [_status(res), ""]
            continue
        lines += [f"{res['model']} (random weights), {res['images']} images of "
                  f"{res['image_size']} px, batch {res['batch_size']}; embed's autocast dtype "
                  f"{res['amp_dtype']}, channels_last {res['channels_last']}; max |embed - bare| "
                  f"= {res['max_abs_diff_vs_bare']:.2e}.", "",
                  "| path | images/s | peak alloc MB | peak device MB |", "|---|---:|---:|---:|"]
        for label, row in res["rows"].items():
            lines.append(f"| {label} | {row['images_per_s']:,.0f} | {_mb(row['peak_alloc_mb'])} "
                         f"| {_mb(row['peak_device_mb'])} |")
        lines.append("")
    retrieval = by_part.get("retrieval", [])
    if retrieval:
        sets = {(int(s.args[0]), int(s.args[1])) for s, _ in retrieval}
        classes = ", ".join(f"{c:,} at N = {n:,}" for n, c in sorted(sets))
        lines += ["## Retrieval metrics (P@1, R-Precision, MAP@R), 128-d synthetic classes", "",
                  "Each class: a random centre plus Gaussian noise (sigma 1.5 per dimension); "
                  f"classes: {classes}.", "",
                  "Floor: the bare blockwise matrix product of all query x reference scores on "
                  "the GPU. Differences against the torch backend's metrics.", "",
                  "| N | contender | time s | x floor | peak alloc MB | peak device MB | P@1 | "
                  "R-Prec | MAP@R | max abs diff |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        floors = {r["n"]: r.get("seconds") for s, r in retrieval
                  if r.get("contender") == "floor" and "n" in r}
        refs = {r["n"]: r.get("metrics") for s, r in retrieval
                if r.get("contender") == "torch" and "n" in r}
        rank = {c: i for i, c in enumerate(("floor", "torch", "faiss-gpu", "pml"))}
        # by size, then contender (the plan runs them out of that order: the likely-absent
        # contenders last)
        for step, r in sorted(retrieval, key=lambda sr: (int(sr[0].args[0]),
                                                          rank.get(sr[0].args[2], 9))):
            n = int(step.args[0])
            if "seconds" not in r:
                lines.append(f"| {n:,} | {step.args[2]} | {_status(r)} | | | | | | | |")
                continue
            m, ref, fl = r.get("metrics") or {}, refs.get(n) or {}, floors.get(n)
            diff = (max(abs(m[k] - ref[k]) for k in m) if m and ref and r["contender"] != "torch"
                    else None)
            ratio = r["seconds"] / fl if fl else None
            extra = f" ({r['tflops']:.1f} TFLOP/s)" if "tflops" in r else ""
            if r.get("backend_used"):
                extra = f" [ran: {r['backend_used']}]"
            lines.append(
                f"| {n:,} | {r['contender']}{extra} | {r['seconds']:.2f} | {_num(ratio, '.1f')} | "
                f"{_mb(r.get('peak_alloc_mb'))} | {_mb(r.get('peak_device_mb'))} | "
                f"{_num(m.get('precision_at_1'))} | {_num(m.get('r_precision'))} | "
                f"{_num(m.get('map_at_r'))} | {_num(diff, '.1e')} |")
        lines.append("")
    for _step, res in by_part.get("compare", []):
        lines += ["## compare cell", ""]
        if "cells" not in res:
            lines += [_status(res), ""]
            continue
        lines += [f"`contrastive {' '.join(res['argv'][:-3])} ...` on {res['device']}: exit code "
                  f"{res['exit_code']}, {res['seconds']:.1f} s in all, peak alloc "
                  f"{_mb(res.get('peak_alloc_mb'))} MB, peak device "
                  f"{_mb(res.get('peak_device_mb'))} MB.", "",
                  "| loss | status | train s | P@1 | MAP@R |", "|---|---|---:|---:|---:|"]
        for c in res["cells"]:
            lines.append(f"| {c['loss']} | {c['status']} | {_num(c['train_time_s'], '.1f')} | "
                         f"{_num(c['precision_at_1'])} | {_num(c['map_at_r'])} |")
        lines.append("")
        if res["exit_code"] and res.get("stderr"):
            lines += ["```", res["stderr"], "```", ""]
    not_run = [f"- {s.label}: {r['skipped'] if 'skipped' in r else _status(r)}"
               for s, r in results if any(k in r for k in ("not_tested", "skipped", "failed"))]
    not_run += [f"- {s.label}: not tested: {r['note']}" for s, r in results if r.get("note")]
    not_run += [f"- `{m}`: {st}" for m, st in env.get("wheels", {}).items()
                if st.startswith("missing")]
    if env.get("stopped"):
        not_run.append(f"- {env['stopped']}")
    if not_run:
        lines += ["## Not run", "", "What gave no numbers in this run, and why:", "",
                  *not_run, ""]
    return "\n".join(lines)


def _status(res: dict) -> str:
    for key in ("not_tested", "skipped", "failed"):
        if key in res:
            word = "not tested" if key == "not_tested" else key
            return f"{word}: {res[key]}"
    return "?"


def environment(device: str) -> dict:
    import torch

    env: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "torch": torch.__version__, "cuda": torch.version.cuda,
                 "python": platform.python_version()}
    if torch.device(device).type == "cuda":
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        env["device"] = f"{p.name} x {torch.cuda.device_count()}"
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(i)))
        env["memory"] = f"{p.total_memory / 2**30:.0f} GiB"
        try:
            from contrastive.inference import amp_dtype

            env["bf16"] = f"embed's autocast dtype {amp_dtype('cuda')}"
        except Exception as exc:  # reported, the parts say more
            env["bf16"] = f"? (contrastive.embedders does not import: {exc})"
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores): rehearsal, not GPU numbers"
    return env


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
#: the part's process running now (its process group is ended on SIGTERM)
_RUNNING: list[subprocess.Popen] = []


def run_step(step: Step, device: str, tiny: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", step.part, "--device",
               device, "--result", str(out), *(["--tiny"] if tiny else []), "--", *step.args]
        # a session of its own, so that a timeout also ends the part's children (pytest,
        # benchmarks/losses.py)
        env = dict(child_env(), GPU_CHECK_TIMEOUT_S=str(timeout))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT, start_new_session=True)
        _RUNNING[:] = [proc]
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return {"failed": f"killed after {timeout:.0f} s"}
        finally:
            _RUNNING.clear()
        if out.exists():
            return json.loads(out.read_text())
        err = (stderr or stdout).strip().splitlines()
        return {"failed": f"exit code {proc.returncode}: " + " | ".join(err[-3:])}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def write_report(out: Path, text: str) -> None:
    """Replace ``out`` in one step: a run killed while writing leaves the previous version."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for the rehearsal")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU rehearsal)")
    p.add_argument("--budget-s", type=float, default=450.0, help="all parts together")
    p.add_argument("--output", default=str(DOC), help="the markdown report (docs/gpu.md)")
    p.add_argument("--only", nargs="+", default=None, help="run only these parts")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    steps = [s for s in plan(a.device, a.tiny) if a.only is None or s.part in a.only]

    if a.part:  # a child: one part, its result as JSON
        sys.path[:0] = [str(ROOT)] + ([str(SITE)] if SITE.exists() else [])
        res = run_part(a.part, a.args, a.device, a.tiny)
        Path(a.result).write_text(json.dumps(res, default=str))
        return 0

    if a.dry_run:
        print(f"gpu-check plan (device {a.device}{', tiny sizes' if a.tiny else ''}, budget "
              f"{a.budget_s:.0f} s, report {a.output}):")
        print(f"  setup: unpack wheels from {WHEELS.relative_to(ROOT)} into "
              f"{SITE.relative_to(ROOT)} ({len(list(WHEELS.glob('*.whl')))} wheels there); "
              "compile evaluation/_scan.c")
        for s in steps:
            print(f"  {s.part:<9} {s.label:<48} timeout {s.timeout:>4.0f} s  "
                  f"{' '.join(s.args)}")
        print(f"  tests files: {' '.join(cuda_test_files())}")
        return 0

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible to torch {torch.__version__} "
              f"(CUDA build {torch.version.cuda}); nothing to check here, exiting")
        return 0

    start = T0  # the budget includes this process's start-up and the set-up below
    wheels = unpack_wheels()
    sys.path[:0] = [str(ROOT)] + ([str(SITE)] if SITE.exists() else [])
    env = environment(a.device)
    env["wheels"] = wheels
    env["scan"] = build_scan()
    env["imports"] = preflight()
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[tuple[Step, dict]] = []
    current: list[Step] = []

    def report(extra: str = "") -> None:
        now = [f"running: {current[0].label}"] if current and not extra else []
        if extra or now:
            env["stopped"] = extra or now[0]
        write_report(out, render(env, results, time.perf_counter() - start, a.budget_s))
        env.pop("stopped", None)

    def stop(signum, _frame) -> None:  # the caller's timeout: keep what ran, end the part
        for proc in list(_RUNNING):
            _kill_group(proc)
        label = current[0].label if current else "the set-up"
        report(f"stopped by signal {signum} during {label}; the parts after it did not run")
        print(f"gpu-check: stopped by signal {signum}; wrote {out}", flush=True)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    for step in steps:
        current[:] = [step]
        report()  # the machine and the parts so far, before a part that may not return
        left = a.budget_s - (time.perf_counter() - start)
        if left < min(30.0, step.timeout):
            res = {"skipped": f"time budget ({a.budget_s:.0f} s) spent"}
        else:
            t0 = time.perf_counter()
            res = run_step(step, a.device, a.tiny, min(step.timeout, left))
            res.setdefault("wall_s", time.perf_counter() - t0)
        results.append((step, res))
        current.clear()
        print(f"gpu-check: {step.label}: {_brief(res)}", flush=True)
        report()
    print(f"gpu-check: wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


def _brief(res: dict) -> str:
    for key in ("failed", "not_tested", "skipped"):
        if key in res:
            return f"{key.replace('_', ' ')}: {res[key]}"
    if res.get("returncode"):  # a part whose command failed (an int) or was stopped (a str)
        code = res["returncode"]
        return f"exit code {code}" if isinstance(code, int) else str(code)
    if "summary" in res:
        return res["summary"]
    if "seconds" in res:
        return f"{res['seconds']:.2f} s"
    return f"done in {res.get('wall_s', 0):.0f} s"


if __name__ == "__main__":
    sys.exit(main())
