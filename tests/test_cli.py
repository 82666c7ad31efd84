"""The ``contrastive`` command end to end on tiny budgets.

Most commands run in-process through :func:`contrastive.cli.main` (the same argument parsing,
dispatch and exit codes as the console script, without 2 s of imports per call); two subprocesses
check what only a real process shows: the installed ``contrastive`` console script, and a
``compare`` run that a second run finds finished.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("compare", "train", "eval", "mi-bench", "reproduce", "list")


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "contrastive", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_compare_end_to_end_and_resume(tmp_path):
    out = tmp_path / "cmp"
    args = ("compare", "--losses", "infonce,triplet,pml:ContrastiveLoss", "--seeds", "0,1",
            "--steps", "15", "--output", str(out), "--no-progress")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "results.csv", "results.md", "map_probe.png",
                 "mi_vs_accuracy.png", "curves.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 100
    md = (out / "results.md").read_text()
    for loss in ("infonce", "triplet", "pml:ContrastiveLoss"):
        assert f"| {loss} " in md
        assert loss in r.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["loss"] for row in rows] == ["infonce", "triplet", "pml:ContrastiveLoss"]
    data = json.loads((out / "results.json").read_text())
    ok = [rec for rec in data["records"] if rec["status"] == "ok"]
    assert len(ok) == 6
    mean = sum(rec["metrics"]["map_at_r"] for rec in ok if rec["loss"] == "infonce") / 2
    assert abs(float(rows[0]["map_at_r_mean"]) - mean) < 1e-6
    # a second run finds every cell finished and trains nothing
    cells = sorted((out / "cells").glob("*.json"))
    assert len(cells) == 6
    stamps = [c.stat().st_mtime_ns for c in cells]
    r2 = run_cli(*args)
    assert r2.returncode == 0, r2.stderr
    assert [c.stat().st_mtime_ns for c in cells] == stamps


@pytest.mark.parametrize("dataset, batch, m", [("digits", 48, 16), ("latent_classes", 64, 4)])
def test_compare_class_disjoint_protocol(tmp_path, main, dataset, batch, m):
    """``--protocol class-disjoint`` trains on the training classes and evaluates on the test
    classes, with the data set's batch composition (digits: 3 classes x 16, since a tuning fold
    keeps 3 of its 6 training classes; many classes: 16 x 4) and the MLP for vector data; an
    explicit ``--batch-size`` wins, and ``--tune`` refuses ``--protocol iid``."""
    out = tmp_path / dataset
    rc, _, err = main("compare", "--protocol", "class-disjoint", "--dataset", dataset,
                      "--losses", "infonce", "--seeds", "0", "--steps", "2", "--no-progress",
                      "--set", "train.final_probe=false", "--output", str(out))
    assert rc == 0, err
    config = json.loads((out / "results.json").read_text())["records"][0]["config"]
    assert (config["train_split"], config["eval_split"]) == ("train_classes", "test_classes")
    assert (config["batch_size"], config["m_per_class"], config["backbone"]) == (batch, m, "mlp")
    rc, _, err = main("compare", "--protocol", "class-disjoint", "--dataset", dataset,
                      "--losses", "infonce", "--seeds", "0", "--steps", "2", "--no-progress",
                      "--batch-size", "32", "--set", "train.final_probe=false",
                      "--output", str(tmp_path / "mine"))
    assert rc == 0, err
    mine = json.loads((tmp_path / "mine" / "results.json").read_text())["records"][0]["config"]
    assert (mine["batch_size"], mine["m_per_class"]) == (32, m)
    rc, _, err = main("compare", "--tune", "--protocol", "iid")
    assert rc == 2 and "class-disjoint protocol only" in err


def test_train_then_eval_reproduces_the_runs_own_metrics(tmp_path, main):
    """``eval`` of the checkpoint gives the numbers the training run reported for it: every
    retrieval, clustering, probe and k-NN metric (same model, data, seed)."""
    out = tmp_path / "t"
    rc, stdout, err = main("train", "--loss", "triplet", "--steps", "10", "--output", str(out),
                           "--set", "loss_kwargs.margin=0.2", "--set", "final_probe=true",
                           "--no-progress")
    assert rc == 0, err
    trained = json.loads((out / "result.json").read_text())["metrics"]
    assert "map_at_r" in stdout and f"{100 * trained['map_at_r']:6.2f} %" in stdout
    rc, stdout, err = main("eval", str(out / "checkpoints" / "last.pt"), "--output",
                           str(tmp_path / "e"), "--no-progress")
    assert rc == 0, err
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())["metrics"]
    keys = ("recall_at_1", "recall_at_8", "precision_at_1", "r_precision", "map_at_r", "nmi",
            "ami", "linear_probe", "knn_top1")
    assert set(keys) <= set(trained) and set(keys) <= set(ev)
    for key in keys:
        assert ev[key] == pytest.approx(trained[key], abs=1e-6), key
    md = (tmp_path / "e" / "eval.md").read_text()
    # the table as printed (rates in %), the CSV the JSON's numbers exactly
    assert md.startswith("| metric") and f"| map_at_r | {100 * ev['map_at_r']:.2f} % |" in md
    header, values = (tmp_path / "e" / "eval.csv").read_text().splitlines()
    row = dict(zip(header.split(","), values.split(",")))
    assert all(float(row[k]) == v for k, v in ev.items())


def test_list_and_help(main):
    rc, out, err = main("list")
    assert rc == 0, err
    for word in ("infonce", "triplet", "bilinear", "separable", "digits", "cub200", "noniid",
                 "timm models"):
        assert word in out, word
    rc, out, _ = main("list", "critics")
    assert rc == 0 and out.startswith("critics:") and "losses:" not in out
    for cmd in COMMANDS:
        rc, out, err = main(cmd, "--help")
        assert rc == 0, (cmd, err)
        assert "examples:" in out and f"contrastive {cmd}" in out, cmd
    rc, out, _ = main("--help")
    assert rc == 0 and all(cmd in out for cmd in COMMANDS)
    rc, _, err = main()  # no command: the help, and a usage error status
    assert rc == 2


def test_console_script_is_installed_and_runs():
    """The one check that needs a real process: the ``contrastive`` entry point of the
    installed package reaches :func:`contrastive.cli.main`."""
    exe = Path(sys.executable).with_name("contrastive")
    script = str(exe) if exe.exists() else shutil.which("contrastive")
    assert script, "the contrastive console script is not installed (pip install -e .)"
    r = subprocess.run([script, "list", "losses"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("losses:") and "infonce" in r.stdout and "pml:" in r.stdout


def test_user_errors_are_one_line(main):
    cases = [
        ("compare", "--losses", "nosuch", "--steps", "2"),
        ("compare", "--dataset", "cub200", "--data-dir", "/nonexistent/path"),
        ("train", "--dataset", "sop"),
        ("eval", "/nonexistent/ckpt.pt"),
        ("train", "--set", "batch_size=0"),
        ("reproduce", "nosuch"),
    ]
    for args in cases:
        rc, _, err = main(*args)
        assert rc == 2, (args, err)
        lines = [s for s in err.strip().splitlines() if s.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert "Traceback" not in err


def test_mi_bench_command(tmp_path, main):
    rc, out, err = main("mi-bench", "--steps-per-level", "5", "--levels", "2,4", "--estimators",
                        "infonce,dv", "--output", str(tmp_path / "mi"), "--no-progress")
    assert rc == 0, err
    assert "| infonce | 2.0 |" in out and "| dv | 4.0 |" in out
    for name in ("results.json", "results.csv", "results.md", "mi_benchmark.png"):
        assert (tmp_path / "mi" / name).is_file(), name
    saved = json.loads((tmp_path / "mi" / "results.json").read_text())
    # the options reach the benchmark: 2 levels x 5 steps per estimator, the truth per step
    assert saved["config"]["estimators"] == ["infonce", "dv"]
    assert saved["config"]["levels"] == [2.0, 4.0] and saved["config"]["steps_per_level"] == 5
    assert saved["true_mi"] == [2.0] * 5 + [4.0] * 5
    assert {k: len(v) for k, v in saved["estimates"].items()} == {"infonce": 10, "dv": 10}


def test_reproduce_command_passes_its_options(tmp_path, main, monkeypatch):
    """``reproduce noniid`` through the command line, with the experiment's default evaluation
    size made tiny (200 held-out batches at every evaluation made this one call a minute long):
    the seeds and steps given reach the experiment, and its table and files come out."""
    from contrastive.app.reproduce import experiments

    small = dataclasses.replace(experiments.DEFAULTS["noniid"], eval_batches=2, batch_size=16)
    monkeypatch.setitem(experiments.DEFAULTS, "noniid", small)
    rep = tmp_path / "rep"
    rc, out, err = main("reproduce", "noniid", "--steps", "4", "--seeds", "0,1", "--output",
                        str(rep), "--no-progress")
    assert rc == 0, err
    assert "| infonce | noniid |" in out and "| nwj | iid |" in out
    for name in ("noniid.json", "noniid.csv", "noniid.png"):
        assert (rep / name).is_file(), name
    saved = json.loads((rep / "noniid.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["config"]["steps"] == 4
    assert saved["config"]["eval_batches"] == 2 and saved["paper_size"] is False
    assert len(saved["runs"]) == 2 * 2 * 2  # seeds x samplers x estimators
