"""``benchmarks/gpu_check.py`` (``make gpu-check``) is ready for its first GPU run: the dry run
lists every part, without a GPU it says so in one line and exits 0 without touching
docs/gpu.md, the wheels a bare GPU machine lacks are unpacked (and never shadow an installed
build), and its CPU-runnable parts -- the retrieval contenders, the report -- give correct
numbers at toy sizes. (The embed, losses, tests and compare parts were rehearsed on the CPU with
``--device cpu --tiny``; they take too long for the suite.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    """``benchmarks/gpu_check.py`` as a module, without putting ``benchmarks/`` on
    ``sys.path``: that folder holds a ``losses.py``, which would shadow the ``losses`` package
    for every test that runs after this file is collected in the same process (the package's
    own shadowing check then refuses to run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" /
                                                  "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def test_dry_run_lists_every_part_within_the_time_limit():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for part in ("tests", "losses", "embed", "retrieval", "compare"):
        assert f"  {part} " in out
    for label in ("100,000 x 128, torch", "1,000,000 x 128, faiss-gpu", "1,000,000 x 128, pml",
                  "1,000,000 x 128, floor"):
        assert label in out
    assert "128 1024 2048 4096 8192" in out  # the loss batch sizes
    assert "tests/test_embedders.py" in out and "tests/test_cuda.py" in out
    assert "budget 450 s" in out  # under the 8-minute limit with room for the set-up


def test_plan_budget_and_cuda_test_files():
    steps = gpu_check.plan("cuda", tiny=False)
    assert [s.part for s in steps][:3] == ["tests", "losses", "embed"]
    assert {tuple(s.args) for s in steps if s.part == "retrieval"} == {
        (str(n), "1000", c) for n in (100_000, 1_000_000)
        for c in ("floor", "torch", "faiss-gpu", "pml")}
    # the GPU floor and the torch backend at both sizes before the compare cell; the
    # contenders most likely absent (no faiss-gpu wheel) or out of memory (PML) last
    order = [s.part if s.part != "retrieval" else s.args[2] for s in steps]
    assert order[3:] == ["floor", "torch", "floor", "torch", "compare", "faiss-gpu", "pml",
                         "faiss-gpu", "pml"]
    files = gpu_check.cuda_test_files()
    assert "tests/test_embedders.py" in files and "tests/test_cuda.py" in files
    assert "tests/test_gpu_check.py" not in files  # this file has no CUDA-marked test


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_one_line_and_exit_0(tmp_path, capsys):
    report = tmp_path / "gpu.md"
    assert gpu_check.main(["--output", str(report)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
    assert not report.exists()


def _wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_unpack_wheels(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels / "zz_gpucheck_pure-1.0-py3-none-any.whl",
           {"zz_gpucheck_pure/__init__.py": "VALUE = 42\n"})
    _wheel(wheels / "zz_gpucheck_old-1.0-cp27-cp27mu-manylinux1_x86_64.whl",
           {"zz_gpucheck_old/__init__.py": ""})
    (site / "json").mkdir(parents=True)  # a stale copy of an installed module
    modules = {"zz_gpucheck_pure": "zz_gpucheck_pure", "zz_gpucheck_old": "zz_gpucheck_old",
               "zz_gpucheck_none": "zz_gpucheck_none", "json": "json"}
    status = gpu_check.unpack_wheels(site, wheels, modules)
    assert status["zz_gpucheck_pure"].startswith("from wheel zz_gpucheck_pure-1.0")
    assert (site / "zz_gpucheck_pure" / "__init__.py").read_text() == "VALUE = 42\n"
    assert "built for cp27" in status["zz_gpucheck_old"]
    assert "make gpu-wheels" in status["zz_gpucheck_none"]
    assert status["json"] == "installed" and not (site / "json").exists()  # never shadowed
    again = gpu_check.unpack_wheels(site, wheels, modules)
    assert again["zz_gpucheck_pure"].startswith("from wheel (unpacked earlier")
    env = gpu_check.child_env(site)
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT), str(site)]


def test_retrieval_contenders_agree_on_cpu():
    """The parts the GPU run times, at toy size: the torch backend and PML's calculator give the
    same metrics as a direct call; the floor reports its time."""
    from evaluation.retrieval import retrieval_metrics

    n, classes = 240, 8
    x, y = gpu_check.synthetic(n, classes, 128, "cpu")
    assert x.shape == (n, 128) and torch.equal(torch.bincount(y), torch.full((classes,), 30))
    direct = retrieval_metrics(x, y)
    assert 0.2 < direct["map_at_r"] < 0.99  # neither trivial nor hopeless
    ours = gpu_check.part_retrieval(n, classes, "torch", "cpu")
    pml = gpu_check.part_retrieval(n, classes, "pml", "cpu")
    floor = gpu_check.part_retrieval(n, classes, "floor", "cpu")
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        assert ours["metrics"][key] == pytest.approx(direct[key], abs=1e-12)
        assert pml["metrics"][key] == pytest.approx(direct[key], abs=1e-6)
    assert floor["seconds"] > 0 and floor["peak_alloc_mb"] is None  # no GPU memory on CPU
    # no FAISS GPU here: reported, not dropped
    gpu = gpu_check.part_retrieval(n, classes, "faiss-gpu", "cpu")
    if not gpu_check.faiss_gpu_missing():
        pytest.skip("this faiss has GPUs")
    assert "not_tested" in gpu and "seconds" not in gpu


def test_report_shows_numbers_and_what_did_not_run():
    S = gpu_check.Step
    results = [
        (S("tests", "t"), {"files": ["tests/test_cuda.py"], "summary": "5 passed in 3.1s"}),
        (S("retrieval", "r", ["1000", "10", "floor"]),
         {"n": 1000, "contender": "floor", "seconds": 0.5, "tflops": 1.0,
          "peak_alloc_mb": 10.0, "peak_device_mb": 12.0}),
        (S("retrieval", "r", ["1000", "10", "torch"]),
         {"n": 1000, "contender": "torch", "seconds": 1.0, "peak_alloc_mb": 20.0,
          "peak_device_mb": 30.0,
          "metrics": {"precision_at_1": 0.9, "r_precision": 0.5, "map_at_r": 0.4}}),
        (S("retrieval", "r", ["1000", "10", "pml"]),
         {"n": 1000, "contender": "pml", "seconds": 3.0, "peak_alloc_mb": 40.0,
          "peak_device_mb": 50.0,
          "metrics": {"precision_at_1": 0.9, "r_precision": 0.5, "map_at_r": 0.4002}}),
        (S("retrieval", "r", ["1000", "10", "faiss-gpu"]), {"not_tested": "no GPU faiss"}),
        (S("embed", "e"), {"failed": "killed after 100 s"}),
        (S("compare", "c"), {"skipped": "time budget (450 s) spent"}),
    ]
    md = gpu_check.render({"date": "today", "device": "X"}, results, 12.0, 450.0)
    assert "**5 passed in 3.1s**" in md
    assert "| 1,000 | torch | 1.00 | 2.0 | 20 | 30 | 0.9000 | 0.5000 | 0.4000 | - |" in md
    assert "| 1,000 | pml | 3.00 | 6.0 | 40 | 50 |" in md and "| 2.0e-04 |" in md
    assert "not tested: no GPU faiss" in md
    assert "failed: killed after 100 s" in md
    assert "- c: time budget (450 s) spent" in md


def test_a_part_cut_short_keeps_the_rows_it_printed(monkeypatch):
    """benchmarks/losses.py prints row by row: a part stopped at its limit keeps those rows."""
    monkeypatch.setenv("GPU_CHECK_TIMEOUT_S", "12")  # 10 s kept in reserve: stops after 2 s
    code = "import time; print('row 1', flush=True); time.sleep(30); print('row 2')"
    status, out, _ = gpu_check._run_within_budget([sys.executable, "-c", code])
    assert isinstance(status, str) and status.startswith("stopped after 2 s")
    assert out.strip() == "row 1"
    status, out, _ = gpu_check._run_within_budget([sys.executable, "-c", "print('done')"])
    assert (status, out) == (0, "done\n")


# --------------------------------------------------------------------------------------------
# the bare GPU machine: packages blocked as they are missing there
# --------------------------------------------------------------------------------------------
def _blocking_env(tmp_path, monkeypatch, *modules: str) -> None:
    """Child processes (through PYTHONPATH) see ``modules`` as not installed."""
    (tmp_path / "block").mkdir(exist_ok=True)
    (tmp_path / "block" / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "block"))


def test_losses_part_without_pml_still_measures_ours_and_the_floor(tmp_path, monkeypatch):
    _blocking_env(tmp_path, monkeypatch, "pytorch_metric_learning")
    monkeypatch.setenv("GPU_CHECK_TIMEOUT_S", "120")
    res = gpu_check.part_losses(["32"], "cpu", tiny=True)
    assert res["returncode"] == 0, res.get("stderr")
    assert "InfoNCE" in res["table"] and "Triplet" in res["table"]
    assert "pytorch-metric-learning not importable" in res["note"]
    md = gpu_check.render({}, [(gpu_check.Step("losses", "l"), res)], 1.0, 450.0)
    assert "pytorch-metric-learning not importable" in md


def test_a_failed_losses_part_is_not_reported_as_done():
    brief = gpu_check._brief({"command": "x", "returncode": 1, "table": "", "wall_s": 2.0})
    assert "exit code 1" in brief


def test_cuda_test_files_collect_without_pydantic(tmp_path, monkeypatch):
    """One CUDA test file failing to import must not stop the others (pytest stops at a
    collection error): pydantic travels as a wheel that may be missing."""
    _blocking_env(tmp_path, monkeypatch, "pydantic")
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-m", "cuda", *gpu_check.cuda_test_files()],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env=gpu_check.child_env())
    assert "error" not in r.stdout.lower(), r.stdout[-2000:]
    assert r.returncode == 0, r.stdout[-2000:]


def test_cuda_ddp_children_keep_the_wheels_on_their_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/some/site")
    import test_cuda

    env = test_cuda._child_env(hide_gpus=False)
    assert "/some/site" in env["PYTHONPATH"].split(os.pathsep)
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] != ""


def test_a_killed_run_leaves_a_valid_partial_report(tmp_path):
    report = tmp_path / "gpu.md"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                             "--device", "cpu", "--tiny", "--only", "losses", "embed",
                             "--output", str(report)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not report.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert report.exists() and proc.poll() is None  # written before the first part ends
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    md = report.read_text()
    assert md.startswith("# GPU check") and "## Machine" in md
    assert "stopped by signal 15" in md
    assert proc.returncode != 0


def test_report_lists_every_part_that_gave_no_numbers():
    S = gpu_check.Step
    results = [(S("retrieval", "r faiss", ["10", "2", "faiss-gpu"]), {"not_tested": "no GPU"}),
               (S("embed", "e"), {"failed": "killed after 100 s"}),
               (S("compare", "c"), {"skipped": "time budget (450 s) spent"})]
    md = gpu_check.render({}, results, 1.0, 450.0)
    tail = md.split("## Not run", 1)[1]
    for line in ("- r faiss: not tested: no GPU", "- e: failed: killed after 100 s",
                 "- c: time budget (450 s) spent"):
        assert line in tail
