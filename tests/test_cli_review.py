"""Review of the command line as a user runs it: what it prints, what it writes, its exit codes.

Every command runs in-process through the ``main`` fixture (:func:`contrastive.cli.main`) on
tiny budgets of the embedded digits data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 5-step digits run, trained once for the module."""
    from contrastive import cli

    root = tmp_path_factory.mktemp("run")
    out = root / "runs" / "nce"
    assert cli.main(["train", "--steps", "5", "--output", str(out), "--no-progress",
                     "--set", "final_probe=false"]) == 0
    return out / "checkpoints" / "last.pt"


def test_eval_of_a_file_that_is_not_a_checkpoint_is_one_error_line(main, tmp_path):
    text = tmp_path / "log.csv"
    text.write_text("step,loss\n10,2.5\n")
    rc, out, err = main("eval", str(text), "--no-progress")
    assert rc == 2
    line = _error_line(err)
    assert str(text) in line


def test_eval_json_names_the_checkpoint_by_its_absolute_path(main, trained, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(trained, tmp_path)
    assert not Path(rel).is_absolute()
    rc, out, err = main("eval", str(rel), "--output", "ev", "--no-progress")
    assert rc == 0, err
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert Path(data["checkpoint"]).is_absolute()
    assert Path(data["checkpoint"]) == trained.resolve()


def _folder_data(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(6):
                a = (rng.random((8, 8, 3)) * 60 + c * 80).astype("uint8")
                Image.fromarray(a).save(d / f"{i}.png")


def test_eval_from_another_directory_finds_the_runs_relative_data_dir(main, tmp_path,
                                                                      monkeypatch):
    """A run trained with a relative --data-dir is evaluated on that data set from any working
    directory (and never on a folder of the same name under the new one)."""
    work = tmp_path / "work"
    _folder_data(work / "data")
    monkeypatch.chdir(work)
    rc, _, err = main("train", "--dataset", "folder", "--data-dir", "data", "--backbone", "mlp",
                      "--steps", "2", "--batch-size", "6", "--set", "m_per_class=2",
                      "--output", "runs/f", "--no-progress", "--set", "final_probe=false")
    assert rc == 0, err
    trained = json.loads((work / "runs" / "f" / "result.json").read_text())["metrics"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out, err = main("eval", "../work/runs/f/checkpoints/last.pt", "--output", "ev",
                        "--no-progress")
    assert rc == 0, err
    ev = json.loads((elsewhere / "ev" / "eval.json").read_text())
    assert ev["metrics"]["map_at_r"] == pytest.approx(trained["map_at_r"], abs=1e-6)
    assert ev["metrics"]["num_queries"] == 18


def test_eval_output_holding_another_checkpoints_evaluation_is_refused(main, trained,
                                                                       tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text(json.dumps({"checkpoint": "/elsewhere/last.pt"}))
    rc, _, err = main("eval", str(trained), "--output", str(out), "--no-progress")
    assert rc == 2
    assert "--overwrite" in _error_line(err)
    assert json.loads((out / "eval.json").read_text()) == {"checkpoint": "/elsewhere/last.pt"}
    # the same checkpoint again, or --overwrite, replaces it
    rc, _, err = main("eval", str(trained), "--output", str(out), "--no-progress",
                      "--overwrite")
    assert rc == 0, err
    rc, _, err = main("eval", str(trained), "--output", str(out), "--no-progress")
    assert rc == 0, err
    assert Path(json.loads((out / "eval.json").read_text())["checkpoint"]) == trained.resolve()


@pytest.mark.parametrize("size, key", [("steps=abc", "steps"), ("lr=abc", "lr"),
                                       ("hidden=1.5", "hidden"), ("layers=true", "layers")])
def test_reproduce_size_of_the_wrong_type_is_one_error_line_naming_the_key(main, tmp_path,
                                                                           size, key):
    rc, _, err = main("reproduce", "noniid", "--size", size, "--output", str(tmp_path / "r"),
                      "--no-progress")
    assert rc == 2
    assert key in _error_line(err)
    assert not (tmp_path / "r").exists()


def test_reproduce_steps_given_twice_is_one_error_line(main, tmp_path):
    rc, _, err = main("reproduce", "noniid", "--steps", "5", "--size", "steps=6", "--output",
                      str(tmp_path / "r"), "--no-progress")
    assert rc == 2
    assert "steps" in _error_line(err)


@pytest.mark.parametrize("url", ["postgresql+nosuchdriver://user@host/db", "not a url"])
def test_tune_storage_that_cannot_be_opened_is_one_error_line(main, tmp_path, url):
    """A --storage URL whose database driver is not installed (or that is no URL) is the
    user's to fix: one error line naming --storage, before anything trains."""
    out = tmp_path / "t"
    rc, _, err = main("compare", "--tune", "--storage", url, "--trials", "1", "--steps", "2",
                      "--seeds", "0", "--losses", "infonce", "--output", str(out),
                      "--no-progress")
    assert rc == 2
    assert "--storage" in _error_line(err)
    assert not (out / "cells").exists()


def _epilog_examples() -> list[tuple[str, list[str]]]:
    """``(command, words)`` of every ``contrastive ...`` example line of the help epilogs."""
    import shlex

    from contrastive import cli

    out = []
    for name in sorted(n for n in dir(cli) if n.startswith("EPILOG_")):
        for line in getattr(cli, name).splitlines()[1:]:
            words = shlex.split(line, comments=True)
            if words[:1] == ["contrastive"]:
                out.append((words[1], words[1:]))
    return out


#: Small budgets appended to each example (the last value of an option wins).
_SMALL = {
    "compare": ["--steps", "2", "--seeds", "0", "--no-progress", "--set",
                "train.final_probe=false"],
    "train": ["--steps", "2", "--no-progress", "--set", "final_probe=false"],
    "eval": ["--no-progress"],
    "mi-bench": ["--steps-per-level", "2", "--levels", "2", "--no-progress"],
    "reproduce": ["--steps", "2", "--seeds", "0", "--size", "eval_batches=2", "--no-progress"],
    "list": [],
}


@pytest.mark.parametrize("command, index", [(c, i) for c in sorted(_SMALL) for i in
                                            range(sum(1 for k, _ in _epilog_examples()
                                                      if k == c))])
def test_every_help_example_runs(main, tmp_path, monkeypatch, command, index):
    """Each example of ``contrastive COMMAND --help`` runs as written on a tiny budget (exit
    0; ``eval`` on a run trained first); one that needs a data set on disk (``~/data``) stops
    with one error line, and the shared-study example runs on a SQLite URL instead of its
    database server."""
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "no-data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    words = [words for cmd, words in _epilog_examples() if cmd == command][index]
    if command == "eval":  # the run the examples evaluate
        rc, _, err = main("train", "--output", "runs/nce", *_SMALL["train"])
        assert rc == 0, err
    words = [w.replace("~/data", str(data)) for w in words]
    words = [str(root / w) if w.startswith("examples/") else w for w in words]
    if "--storage" in words:
        words[words.index("--storage") + 1] = f"sqlite:///{tmp_path / 'shared.db'}"
    extra = list(_SMALL[command])
    if "--tune" in words:
        extra = ["--trials", "1", "--steps", "2", "--seeds", "0", "--losses", "infonce",
                 "--no-progress"]
    if "--resume" in words:  # the run it continues: the example above it
        rc, _, err = main(*[w for w in words if w != "--resume"], *extra)
        assert rc == 0, err
    rc, _, err = main(*words, *extra)
    if "--data-dir" in words:
        assert rc == 2, (words, err)
        _error_line(err)
    else:
        assert rc == 0, (words, err)
