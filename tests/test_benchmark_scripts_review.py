"""Review of the benchmark scripts ``benchmarks/retrieval.py``, ``embed.py``, ``linear_probe.py``,
``accuracy_calculator.py`` and ``memory.py``: what they print is what ran.

Each test runs a script's functions (or the script) at toy sizes, with clocks, subprocesses or
library calls replaced where a computed number has to be checked exactly; no timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> types.ModuleType:
    """A benchmark script as a module (by path: ``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_review_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# benchmarks/retrieval.py


def _worker_json(name: str) -> str:
    """The JSON line a retrieval worker prints for contender ``name`` (made-up values)."""
    if name.startswith("ours"):
        result = {"precision_at_1": 0.5, "r_precision": 0.25, "map_at_r": 0.125}
    elif name.startswith("pml"):
        result = {"precision_at_1": 0.5, "r_precision": 0.25,
                  "mean_average_precision_at_r": 0.125}
    elif name == "floor":
        result = {"flops": 1e6}
    else:
        result = {"k": 8.0, "checksum": 1.0}
    return json.dumps({"time": 1.0, "peak": 0, "mem_method": "VmHWM", "result": result,
                       "threads": 1})


def test_retrieval_exits_nonzero_when_a_contender_fails(monkeypatch, capsys):
    """A contender whose worker exits with an error is printed as failed, and the command's exit
    status says so (the other rows are still printed)."""
    bench = _load("retrieval")

    def fake_run(cmd, **kwargs):
        name = cmd[cmd.index("--worker") + 1]
        if name == "ours-torch":
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nValueError: boom\n")
        return subprocess.CompletedProcess(cmd, 0, _worker_json(name) + "\n", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["retrieval.py", "--sizes", "50", "--classes", "5",
                                      "--contenders", "ours-auto", "ours-torch", "pml-maxbin",
                                      "floor"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code not in (0, None)
    out = capsys.readouterr().out
    assert "failed (exit 1): ValueError: boom" in out
    assert "pml-maxbin" in out and "floor" in out


def test_retrieval_agreement_line_covers_every_ours_contender(capsys):
    """``max |ours - pml|`` is the largest difference over all of our contenders: a backend whose
    metrics are off shows up even when another one agrees."""
    bench = _load("retrieval")
    rows = {name: json.loads(_worker_json(name)) for name in
            ("ours-auto", "ours-torch", "pml-maxbin", "floor")}
    rows["ours-torch"]["result"]["r_precision"] += 0.25
    bench.report(100, 5, np.repeat(np.arange(5), 20), rows)
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|ours - pml\|[^:]*: ([0-9.e+-]+)", out).group(1))
    assert diff == pytest.approx(0.25)


@pytest.mark.parametrize("name", ["ours-auto", "ours-torch", "torch-mm-topk", "pml-maxbin"])
def test_retrieval_contenders_run_at_tiny_sizes(name):
    """``--sizes 6``: fewer rows than the default Recall@8 and k = 8 need."""
    bench = _load("retrieval")
    x, y = bench.make_data(6, 2, 4)
    result = bench.run_contender(name, x, y)()
    assert result


def test_retrieval_scale_prints_the_sampled_rows_that_ran(monkeypatch, capsys):
    """``--sample`` larger than N: the header and the footnote name the query rows actually
    sampled (all N of them), not the flag's value."""
    bench = _load("retrieval")
    monkeypatch.setattr(sys, "argv", [
        "retrieval.py", "--scale", "--scale-sizes", "300", "--scale-classes", "5", "--dim", "16",
        "--sample", "5000", "--scale-indexes", "exact", "--exact-max-n", "100"])
    bench.main()
    out = capsys.readouterr().out
    assert "exact" in out and "ESTIMATED" in out
    counts = re.findall(r"([0-9][0-9,]*) sampled", out)
    assert counts and set(counts) == {"300"}, out


# --------------------------------------------------------------------------------------------
# benchmarks/accuracy_calculator.py


def test_accuracy_calculator_runs_at_tiny_sizes(capsys):
    """``--n 8``: retrieval_metrics's default Recall@8 needs 8 other rows per query."""
    bench = _load("accuracy_calculator")
    x, y = bench.make_data(8, 2, 4)
    bench.run_case("tiny", x, y, True)
    out = capsys.readouterr().out
    assert "retrieval_metrics" in out and "pml k=None" in out


def test_accuracy_calculator_prints_time_ratios_against_ours(monkeypatch, capsys):
    """Each row's wall and CPU time as a ratio to ours of the same k (clock values injected)."""
    bench = _load("accuracy_calculator")
    clock = iter([(2.0, 4.0), (6.0, 10.0), (1.0, 1.0), (3.0, 3.0), (30.0, 45.0)])

    def fake_timed(fn):
        wall, cpu = next(clock)
        return fn(), wall, cpu

    monkeypatch.setattr(bench, "timed", fake_timed)
    x, y = bench.make_data(60, 3, 4)
    bench.run_case("ratios", x, y, True)
    # the two time ratios (the memory ratio after them reads "-" when ours' resident-set rise
    # is 0, which depends on the machine)
    ratios = {line[:22].strip(): re.findall(r"\b([0-9.]+x)\b", line)[:2] for line in
              capsys.readouterr().out.splitlines() if line.startswith(("ours", "pml", "retr"))}
    assert ratios["ours max_bin_count"] == ["1.00x", "1.00x"]
    assert ratios["pml max_bin_count"] == ["3.00x", "2.50x"]
    assert ratios["retrieval_metrics"] == ["0.50x", "0.25x"]
    assert ratios["ours k=None"] == ["1.00x", "1.00x"]
    assert ratios["pml k=None"] == ["10.00x", "15.00x"]


# --------------------------------------------------------------------------------------------
# benchmarks/memory.py


def test_memory_times_exclude_the_profiled_pass(monkeypatch):
    """The pass that runs under the memory profiler is slower (the profiler records every op);
    the median time is of the unprofiled passes only, ``--repeats`` of them."""
    bench = _load("memory")
    state = {"now": 0.0, "profiling": False, "passes": 0}

    class FakePeak:
        def __init__(self, device: str) -> None:
            self.peak = 2**20

        def __enter__(self) -> FakePeak:
            state["profiling"] = True
            return self

        def __exit__(self, *exc: object) -> None:
            state["profiling"] = False

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        state["now"] += 100.0 if state["profiling"] else 1.0
        state["passes"] += 1
        return (x * 0).sum() + (y * 0).sum()

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: state["now"]))
    a = torch.zeros(2, 3, requires_grad=True)
    b = torch.zeros(2, 3, requires_grad=True)
    res = bench.measure({"ours": fn, "ref": fn}, a, b, torch.device("cpu"), 2, FakePeak)
    assert res["ours"] == (1e3, 1.0)
    assert res["ref"] == (1e3, 1.0)


# --------------------------------------------------------------------------------------------
# benchmarks/linear_probe.py


def test_linear_probe_names_an_indexed_cuda_device(monkeypatch):
    """``--device cuda:0`` runs our probe on the GPU: the row says cuda and reports its CUDA
    peak (here with the probe and torch.cuda's counters replaced, so no GPU is needed)."""
    bench = _load("linear_probe")
    import evaluation.probe

    def fake_probe(xtr, ytr, xte, yte, weight_decays=None, tol=None, max_iter=None,
                   device=None):
        return {"accuracy": 1.0, "n_iter": 3, "weight_decay": weight_decays, "device": device}

    monkeypatch.setattr(evaluation.probe, "linear_probe", fake_probe)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**20)
    job = dict(method="ours", n_train=40, n_test=10, dim=4, classes=3, wd=1e-3, tol=1e-4,
               max_iter=10, device="cuda:0", threads=None)
    out = bench._measure(job)
    assert out["device"] == "cuda:0"
    assert out["cuda_mb"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------
# benchmarks/embed.py


def test_embed_sanity_check_covers_every_row_of_both_paths(monkeypatch):
    """The check that ``embed`` gives what the bare forward gives covers the ``embed+DL`` path
    and every batch: a path that returns wrong rows after the first batch is caught."""
    bench = _load("embed")
    real_embed = bench.embed

    def broken_embed(model, data, **kwargs):
        z, y = real_embed(model, data, **kwargs)
        if isinstance(data, bench._PlainDataset):
            z = z.clone()
            z[kwargs["batch_size"]:] = 0.0
        return z, y

    monkeypatch.setattr(bench, "embed", broken_embed)
    with pytest.raises((AssertionError, RuntimeError), match="embed"):
        bench.bench_one("test_resnet", 32, 4, 12, 1, torch.device("cpu"), bench.time.thread_time)


def test_embed_bench_one_reports_each_way():
    """The untouched paths agree and the row holds images/s and memory for each way."""
    bench = _load("embed")
    r = bench.bench_one("test_resnet", 32, 4, 12, 1, torch.device("cpu"), bench.time.thread_time)
    assert set(r) == {"bare", "embed", "embed+DL"}
    assert all(np.isfinite(v[0]) and v[0] > 0 for v in r.values())
