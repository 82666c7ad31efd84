"""``benchmarks/losses.py`` runs as documented and prints only its table: its peak-memory probe
(torch.profiler) measures a known allocation, and Kineto's log lines, which it writes to file
descriptor 2 on every profile, do not reach the output."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from losses import native as N

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_losses", ROOT / "benchmarks/losses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_peak_memory_measures_a_known_allocation():
    bench = _bench()
    with bench.PeakMemory("cpu") as pm:
        x = torch.ones(1 << 20)  # 4 MiB
        y = x * 2  # another 4 MiB while x lives
        del x, y
    assert 8 * 2**20 <= pm.peak < 9 * 2**20


def test_one_case_prints_its_row_and_no_profiler_log_lines():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/losses.py"), "--sizes", "128", "--cases", "nwj",
         "infonce", "margin", "--repeats", "2", "--extra-infonce-sizes"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    rows = [s for s in r.stdout.splitlines() if s.startswith(("NWJ ", "InfoNCE", "Margin"))]
    assert len(rows) == 3 and all(" 128 " in s for s in rows), r.stdout
    assert "ours/floor" in r.stdout  # the overhead summary, with the host reads per call
    summary = [s for s in r.stdout.splitlines() if s.startswith("#   InfoNCE")]
    # with the C kernels (losses.native) the CPU lane reads no tensor on the host: its check is
    # the C kernel's first pass; without them, the check's one read
    reads = 0 if N.AVAILABLE else 1
    assert summary and f"reads  {reads} (PML  2)" in summary[0], r.stdout
    # the operation counts: the floor's is fixed by its four lines of code
    assert "(floor  44)" in summary[0], r.stdout
    # PML's MarginLoss frees a tensor it made before the profiled pass: torch's allocator warns
    for noise in ("USDT", "profiler_start", "gpuGetDeviceCount", "CPUAllocator"):
        assert noise not in r.stdout + r.stderr, (noise, r.stderr)


def test_a_run_starting_above_the_probe_size_predicts_pml_from_a_probe():
    """``--sizes 512`` alone: PML's B^3 NT-Xent is not run blind (at B = 1024 it takes 17 GB);
    its cost at 512 is predicted from an untimed pass at ``PROBE_B`` and, over the budget,
    skipped with the prediction printed."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/losses.py"), "--sizes", "512", "--cases",
         "infonce", "--repeats", "1", "--budget-gb", "0.5", "--extra-infonce-sizes"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    row = next(s for s in r.stdout.splitlines() if s.startswith("InfoNCE"))
    assert " 512 " in row and "PML skipped (predicted" in row and "0.5 GB budget" in row, row
    # predicted from B = 128 as B^3: about 2 GB (17.4 GB measured at 1024, / 8)
    predicted = float(row.split("predicted ")[1].split(" GB")[0])
    assert predicted == pytest.approx(17.4 / 8, rel=0.5), row
    # and it is the probe's own measurement scaled by (512 / 128)^3: the same probe run here
    bench = _bench()
    args = argparse.Namespace(seed=0, dim=128, budget_s=20.0, budget_gb=0.5)
    probed = bench.probe(bench.cases()["infonce"], "cpu", args)
    assert predicted == pytest.approx(probed.mb * 64 / 1024, abs=0.06), (row, probed)


def test_predict_skip_scales_the_previous_size_by_its_power():
    """The prediction is the measured time and memory times ``(b / prev_b) ** power``; over
    either budget the case is skipped with the prediction, under both it runs."""
    bench = _bench()
    args = argparse.Namespace(budget_gb=6.0, budget_s=20.0)
    prev = bench.Result(ms=100.0, mb=200.0)  # 0.1 s, 200 MB at B = 128
    assert bench.predict_skip(prev, 128, 512, 3, args) == (
        "skipped (predicted 12.5 GB > 6 GB budget)")  # 200 MB * 64
    assert bench.predict_skip(prev, 128, 512, 2, args) == ""  # 3.2 GB, 1.6 s
    slow = bench.Result(ms=1000.0, mb=10.0)
    assert bench.predict_skip(slow, 128, 512, 3, args) == (
        "skipped (predicted 64 s > 20 s budget)")
    assert bench.predict_skip(None, None, 512, 3, args) == ""
    assert bench.predict_skip(bench.Result(skipped="x"), 128, 512, 3, args) == (
        "skipped at a smaller B")


def test_no_native_runs_the_torch_kernels_and_says_so():
    """`--no-native` times the torch kernels (the table a machine without a C compiler gets):
    the header says which kernels ran, and the lane's check is then its one host read."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/losses.py"), "--sizes", "128", "--cases",
         "infonce", "--repeats", "2", "--extra-infonce-sizes", "--no-native"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert "(losses.native): off (--no-native)" in r.stdout, r.stdout
    summary = [s for s in r.stdout.splitlines() if s.startswith("#   InfoNCE")]
    assert summary and "reads  1 (PML  2)" in summary[0], r.stdout
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/losses.py"), "--sizes", "128", "--cases",
         "infonce", "--repeats", "2", "--extra-infonce-sizes"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    state = N.kernel_set() or "not built (no C compiler at install)"
    assert f"(losses.native): {state}" in r.stdout, r.stdout
