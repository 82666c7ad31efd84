"""The ``contrastive`` command end to end, in subprocesses, on tiny budgets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_train_then_eval(tmp_path):
    out = tmp_path / "t"
    r = run_cli("train", "--loss", "triplet", "--steps", "10", "--output", str(out),
                "--set", "loss_kwargs.margin=0.2", "--set", "final_probe=false",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "map_at_r" in r.stdout
    ck = out / "checkpoints" / "last.pt"
    r = run_cli("eval", str(ck), "--output", str(tmp_path / "e"), "--no-progress")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert 0 < ev["metrics"]["linear_probe"] <= 1
    assert (tmp_path / "e" / "eval.md").read_text().startswith("| metric")


def test_list_and_help():
    r = run_cli("list")
    assert r.returncode == 0, r.stderr
    assert "infonce" in r.stdout and "bilinear" in r.stdout and "cub200" in r.stdout
    for cmd in ("compare", "train", "eval", "mi-bench", "reproduce", "list"):
        h = run_cli(cmd, "--help")
        assert h.returncode == 0 and "examples:" in h.stdout or cmd == "list", cmd


def test_user_errors_are_one_line():
    cases = [
        ("compare", "--losses", "nosuch", "--steps", "2"),
        ("compare", "--dataset", "cub200", "--data-dir", "/nonexistent/path"),
        ("train", "--dataset", "sop"),
        ("eval", "/nonexistent/ckpt.pt"),
        ("train", "--set", "batch_size=0"),
    ]
    for args in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [s for s in r.stderr.strip().splitlines() if s.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_mi_bench_and_reproduce_commands(tmp_path):
    r = run_cli("mi-bench", "--steps-per-level", "5", "--levels", "2,4", "--estimators",
                "infonce,dv", "--output", str(tmp_path / "mi"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "| infonce | 2.0 |" in r.stdout and "| dv | 4.0 |" in r.stdout
    for name in ("results.json", "results.csv", "results.md", "mi_benchmark.png"):
        assert (tmp_path / "mi" / name).is_file(), name
    r = run_cli("reproduce", "noniid", "--steps", "10", "--seeds", "0", "--output",
                str(tmp_path / "rep"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "| nce | noniid |" in r.stdout
    for name in ("noniid.json", "noniid.csv", "noniid.png"):
        assert (tmp_path / "rep" / name).is_file(), name
    r = run_cli("reproduce", "nosuch")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown experiment")
