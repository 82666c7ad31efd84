"""The command line as a user meets it, in subprocesses on tiny budgets: configs in usual
spellings, one-line errors (exit 2) against internal errors (traceback, exit 1), a stale
``compare`` cache, failing cells (exit 3), two runs into one folder, an existing ``train`` run,
a resume with other settings, Ctrl-C during ``train``, a diverging ``mi-bench``, a ``pml:``
loss that diverges, a user's own ``losses.py`` shadowing ours, ``--threads`` after the
command."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contrastive import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_threads():
    """``cli.main`` sets torch's thread count; give the test process its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "contrastive", *args], env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> str:
    """The stderr of a user mistake: exit 2, exactly one line, ``error: ...``."""
    lines = [s for s in r.stderr.strip().splitlines() if s.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_train_config_spellings_and_errors(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text('loss: triplet\nlr: 1e-3\nsteps: 3\nfinal_probe: "false"\ndim: 16\n')
    r = run_cli("train", "--config", str(cfg), "--set", "lr=3e-4", "--output",
                str(tmp_path / "t"), "--no-progress")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "t" / "result.json").read_text())
    assert saved["config"]["lr"] == 3e-4 and saved["config"]["final_probe"] is False
    assert "linear_probe" not in saved["metrics"]  # "false" really is false
    # an existing run: refused without --resume / --overwrite
    again = run_cli("train", "--config", str(cfg), "--output", str(tmp_path / "t"))
    one_error_line(again, "already holds a run", "--resume", "--overwrite")
    # resuming with other settings names the fields
    other = run_cli("train", "--config", str(cfg), "--output", str(tmp_path / "t"),
                    "--resume", "--set", "steps=5", "--set", "dim=8")
    one_error_line(other, "settings differ", "steps=3 there but 5 now",
                   "dim=16 there but 8 now")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: triplet\nloss_kwargs:\n  margn: 0.2\n")
    one_error_line(run_cli("train", "--config", str(bad)), "'loss_kwargs.margn'",
                   "did you mean 'margin'?", "bad.yaml")


def test_compare_never_reports_another_settings_numbers(tmp_path):
    out = tmp_path / "cmp"
    base = ("compare", "--losses", "infonce", "--seeds", "0", "--output", str(out),
            "--no-progress", "--set", "train.final_probe=false")
    r1 = run_cli(*base, "--steps", "4")
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(*base, "--steps", "2", "--critic", "dot")
    assert r2.returncode == 0, r2.stderr
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 2  # two settings, two cells: nothing was reused
    data = json.loads((out / "results.json").read_text())
    (rec,) = data["records"]
    assert rec["config"]["steps"] == 2 and rec["config"]["critic"] == "dot"
    assert rec["critic"] == "dot" and data["meta"]["config"]["steps"] == 2
    assert [h["step"] for h in rec["history"]][-1] == 2
    first = [json.loads(c.read_text()) for c in cells if json.loads(c.read_text())
             ["config"]["steps"] == 4][0]
    assert first["metrics"] != rec["metrics"]
    # the same settings again reuse their cell: nothing is trained, the numbers are the same
    stamps = [c.stat().st_mtime_ns for c in cells]
    r3 = run_cli(*base, "--steps", "4")
    assert r3.returncode == 0, r3.stderr
    assert [c.stat().st_mtime_ns for c in cells] == stamps
    again = json.loads((out / "results.json").read_text())["records"][0]
    assert again["metrics"] == first["metrics"] and again["config"]["steps"] == 4


def _main_error(capsys, *args: str) -> str:
    """``cli.main`` in this process (the subprocess tests cover the process itself): a user
    mistake returns 2 and prints one ``error:`` line."""
    code = cli.main(list(args))
    err = capsys.readouterr().err
    lines = [s for s in err.strip().splitlines() if s.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def test_compare_problems_common_to_every_cell_are_one_error(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert "did you mean 'pml:NTXentLoss'?" in _main_error(
        capsys, "compare", "--losses", "infonce,pml:NTXentLos", "--output", out)
    assert "no critic" in _main_error(capsys, "compare", "--losses", "pml:NTXentLoss",
                                      "--critic", "dot", "--output", out)
    line = _main_error(capsys, "compare", "--batch-size", "128", "--set",
                       "train.m_per_class=4", "--output", out)
    assert "32 classes per batch" in line and "only 10 classes" in line
    assert "'step'" in _main_error(capsys, "compare", "--set", "step=3", "--output", out)
    assert not (tmp_path / "c").exists()  # nothing trained, nothing written


def test_pml_loss_that_diverges_is_one_error_line(tmp_path, capsys):
    line = _main_error(capsys, "train", "--loss", "pml:NTXentLoss", "--steps", "3", "--set",
                       "lr=1e12", "--set", "grad_clip=null", "--output", str(tmp_path / "p"),
                       "--no-progress")
    assert "diverged" in line and "lower lr" in line


def test_failing_cells_are_reported_and_exit_nonzero(tmp_path):
    out = tmp_path / "f"
    r = run_cli("compare", "--losses", "infonce,pml:NTXentLoss", "--seeds", "0", "--steps", "3",
                "--output", str(out), "--no-progress", "--set", "train.lr=1e12",
                "--set", "train.grad_clip=null")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "cell infonce seed 0 failed: DivergedError" in r.stderr
    assert "cell pml:NTXentLoss seed 0 failed: DivergedError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 cells failed")
    md = (out / "results.md").read_text()
    assert "## Failed cells" in md and "diverged" in md
    recs = json.loads((out / "results.json").read_text())["records"]
    assert [x["status"] for x in recs] == ["failed", "failed"]
    assert not list((out / "cells").glob("*.json"))  # a failed cell is not cached


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_two_compare_runs_into_one_folder_and_ctrl_c(tmp_path):
    out = tmp_path / "busy"
    args = ["compare", "--losses", "infonce", "--seeds", "0", "--output", str(out),
            "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "contrastive", *args, "--steps", "100000"],
                             env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / ".lock.owner", first)
        second = run_cli(*args, "--steps", "5")
        one_error_line(second, f"output folder {out} is in use by another run",
                       f"pid {first.pid}")
        logs = list((out / "runs").glob("*/log.jsonl"))
        while not logs:
            assert first.poll() is None
            time.sleep(0.1)
            logs = list((out / "runs").glob("*/log.jsonl"))
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err
    assert "run the same command again to continue" in err
    (ck,) = (out / "runs").glob("*/checkpoints/last.pt")
    assert ck.is_file() and not (out / ".lock.owner").exists()


def test_ctrl_c_during_train_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--steps", "120", "--output", str(out), "--no-progress",
            "--set", "log_every=2", "--set", "final_probe=false", "--set", "dim=16"]
    proc = subprocess.Popen([sys.executable, "-m", "contrastive", *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "log.jsonl", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    import torch

    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 120
    assert f"interrupted by SIGINT at step {state['step']}" in err
    hint = err.strip().splitlines()[-1].strip()
    assert hint.startswith("contrastive train ") and hint.endswith(" --resume")
    resumed = run_cli(*shlex.split(hint)[1:])
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 120
    logged = [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(2, 121, 2))  # no step lost or logged twice


def test_diverging_mi_bench_is_reported_and_exits_nonzero(tmp_path):
    r = run_cli("mi-bench", "--lr", "1e6", "--steps-per-level", "4", "--levels", "2",
                "--estimators", "nwj,infonce", "--output", str(tmp_path / "mi"),
                "--no-progress")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "| nwj | 2.0 | non-finite |" in r.stdout and "DIVERGED" in r.stdout
    assert r.stderr.strip().startswith("error: estimator diverged: nwj (")
    saved = json.loads((tmp_path / "mi" / "results.json").read_text())
    assert saved["diverged"]["nwj"] >= 1
    assert (tmp_path / "mi" / "mi_benchmark.png").stat().st_size > 1000


@pytest.mark.parametrize("shadow", ["losses.py", "evaluation/__init__.py"])
def test_a_users_own_losses_module_is_named(tmp_path, shadow):
    p = tmp_path / shadow
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("# the user's own module\n")
    r = run_cli("list", "losses", cwd=tmp_path)
    line = one_error_line(r, str(p.resolve()), "shadows contrastive-mi's package")
    assert "run from another folder" in line


def test_user_and_internal_errors_and_threads_after_the_command(monkeypatch, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--threads", "3"]).threads == 3
    assert parser.parse_args(["--threads", "2", "train"]).threads == 2
    assert parser.parse_args(["train"]).threads is None
    assert parser.parse_args(["mi-bench", "--debug"]).debug is True
    # a user mistake: one line, exit 2
    assert cli.main(["train", "--set", "lr=fast"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config field 'lr' in --set: got 'fast'") and err.count("\n") == 1

    # an internal error (a plain ValueError from a bug) is not dressed up as the user's
    def broken(cfg):
        raise ValueError("an internal bug")

    monkeypatch.setattr("contrastive.app.train.fit", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["train", "--steps", "2", "--threads", "1"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cli.default_threads() == 1
    r = subprocess.run([sys.executable, "-c", "import sys; from contrastive.cli import main; "
                        "import contrastive.app.train as t; t.fit = lambda c: 1 / 0; "
                        "sys.exit(main(['train']))"], env=_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr
