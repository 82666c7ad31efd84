"""Follow-ups of the review of ``contrastive/app/reproduce``: means over fewer seeds than a
variant ran, a report setup line for results folders that mix runs, result files written as one
set, and the adversarial experiment's divergence stop. Tiny sizes, no network."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch

from contrastive.app.reproduce import run
from contrastive.app.reproduce.experiments import summarise
from contrastive.app.reproduce.paper_report import verdict, write_report

TINY_NONIID = dict(steps=2, evals=1, eval_batches=2, batch_size=8, progress=False)
TINY_ADVERSARIAL = dict(evals=4, n_train=64, n_test=40, eval_batches=1, batch_size=16,
                        couplings=2, hidden=8, warmup=2, inner_steps=1, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- 1. partial means


def test_summary_gives_the_number_of_seeds_behind_each_mean():
    rows = [{"k": "a", "m": 1.0}, {"k": "a", "m": None}, {"k": "a", "m": 3.0}]
    (row,) = summarise(rows, ["k"], ["m"])
    assert row["n"] == 3  # seeds of the variant
    assert row["m_mean"] == 2.0  # over the two seeds that have a value
    assert row["m_n"] == 2  # ... and says so


@pytest.fixture(scope="module")
def critics_with_a_diverged_seed(tmp_path_factory):
    """A critics run of two seeds whose concat critic has the highest I_NWJ in both seeds and
    the worst probe in seed 1, while its seed-0 run diverged (no probe, as ``_train_views``
    leaves it); the summary is recomputed from those runs as ``critics`` computes it."""
    out = tmp_path_factory.mktemp("critics")
    run("critics", out, steps=1, seeds=(0, 1), evals=1, n_train=40, n_test=20, eval_batches=1,
        batch_size=8, critics=("bilinear", "concat"), estimators=("nwj",), encoder_hidden=8,
        out_dim=4, concat_hidden=4, progress=False)
    res = json.loads((out / "critics.json").read_text())
    for r in res["runs"]:
        concat = r["critic"] == "concat"
        r["bound"] = 3.0 if concat else 1.0
        r["accuracy"] = (None if r["seed"] == 0 else 0.5) if concat else 0.8
    res["summary"] = summarise(res["runs"], ["critic", "estimator"],
                               ["bound", "train_bound", "infonce", "nwj", "accuracy"])
    (out / "critics.json").write_text(json.dumps(res))
    return out, res


def test_report_table_says_when_a_mean_is_over_fewer_seeds(critics_with_a_diverged_seed,
                                                           tmp_path):
    out, _ = critics_with_a_diverged_seed
    text = write_report(out, tmp_path / "r.md", tmp_path / "figures").read_text()
    concat_row = next(line for line in text.splitlines() if line.startswith("| concat | nwj |"))
    # one seed with a value: its mean alone (a std of one value would be a spread never
    # measured), and how many seeds it is over
    assert "| 0.500 (1 of 2 seeds) |" in concat_row, concat_row
    bilinear_row = next(line for line in text.splitlines()
                        if line.startswith("| bilinear | nwj |"))
    assert "of 2 seeds" not in bilinear_row  # a full mean is shown as before


def test_critics_verdict_does_not_take_a_partial_mean_for_a_full_one(
        critics_with_a_diverged_seed):
    _, res = critics_with_a_diverged_seed
    # seed 0 of concat has no probe: "concat has the worst probe" is not shown in that seed;
    # the highest bound is (both seeds), so the rule gives "partly"
    word, why = verdict("critics", res)
    assert word == "partly", why


# --------------------------------------------------------------------------- 2. setup line


def test_report_setup_line_gives_each_experiments_sizes_device_torch_and_threads(tmp_path):
    out = tmp_path / "res"
    run("adversarial", out, steps=2, seeds=(0,), **TINY_ADVERSARIAL)
    run("noniid", out, seeds=(0,), paper_size=True, **TINY_NONIID)
    # the noniid run came from another machine
    path = out / "noniid.json"
    res = json.loads(path.read_text())
    res.update(device="cuda:0", torch="9.9.9", threads=7)
    path.write_text(json.dumps(res))
    text = write_report(out, tmp_path / "r.md", tmp_path / "f").read_text()
    line = next(line for line in text.splitlines() if line.startswith("* Sizes"))
    assert "the defaults (adversarial)" in line and "the paper's (noniid)" in line, line
    assert "cpu (adversarial)" in line and "cuda:0 (noniid)" in line, line
    assert f"{torch.__version__} (adversarial)" in line and "9.9.9 (noniid)" in line, line
    assert "1 (adversarial)" in line and "7 (noniid)" in line, line


# --------------------------------------------------------------------------- 3. one set of files

_FILES = ("noniid.json", "noniid.csv", "noniid_runs.csv", "noniid_curves.csv", "noniid.png")


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def old_set(tmp_path):
    """A complete noniid result set of seed 0 in ``tmp_path / "out"``."""
    out = tmp_path / "out"
    run("noniid", out, seeds=(0,), **TINY_NONIID)
    before = _snapshot(out)
    assert set(before) == set(_FILES)
    return out, before


def test_a_figure_that_fails_leaves_the_previous_result_set(old_set, monkeypatch):
    from contrastive.app.reproduce import plots

    out, before = old_set

    def broken(res, fig):
        raise RuntimeError("the figure failed")

    monkeypatch.setitem(plots._PLOTS, "noniid", (broken, (4, 3)))
    with pytest.raises(RuntimeError, match="the figure failed"):
        run("noniid", out, seeds=(1,), **TINY_NONIID)
    assert _snapshot(out) == before  # the old complete set, nothing of the new run, no temp


def test_a_figure_write_that_fills_the_disk_leaves_the_previous_result_set(old_set,
                                                                           monkeypatch):
    from matplotlib.figure import Figure

    out, before = old_set
    real = Figure.savefig

    def half_then_full(self, fname, *args, **kwargs):
        buf = io.BytesIO()
        real(self, buf, *args, **{"format": "png", **kwargs})
        data = buf.getvalue()[:100]
        if hasattr(fname, "write"):
            fname.write(data)
        else:
            with open(fname, "wb") as fh:
                fh.write(data)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        run("noniid", out, seeds=(1,), **TINY_NONIID)
    assert _snapshot(out) == before


def test_a_json_write_that_fails_leaves_the_previous_result_set(old_set, monkeypatch):
    out, before = old_set
    real_dump = json.dump

    def partial_dump(obj, fh, *args, **kwargs):
        fh.write('{"experiment": ')
        raise OSError(28, "No space left on device")

    def failing_dumps(obj, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", partial_dump)
    monkeypatch.setattr(json, "dumps", failing_dumps)
    with pytest.raises(OSError, match="No space left"):
        run("noniid", out, seeds=(1,), **TINY_NONIID)
    monkeypatch.setattr(json, "dump", real_dump)
    assert _snapshot(out) == before


def test_a_write_that_fails_while_staging_leaves_the_previous_result_set(old_set,
                                                                         monkeypatch):
    import os

    out, before = old_set

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)  # every file's fsync fails: the disk is full
    with pytest.raises(OSError, match="No space left"):
        run("noniid", out, seeds=(1,), **TINY_NONIID)
    assert _snapshot(out) == before  # and the staging folder is gone


def test_a_new_run_replaces_the_whole_set(old_set):
    out, before = old_set
    run("noniid", out, seeds=(1,), **TINY_NONIID)
    after = _snapshot(out)
    assert set(after) == set(before)  # no staging folder or temporary file left behind
    assert json.loads(after["noniid.json"])["seeds"] == [1]
    assert after["noniid_runs.csv"] != before["noniid_runs.csv"]


# --------------------------------------------------------------------------- 4. adversarial stop


def test_adversarial_stops_at_divergence_and_records_it(tmp_path):
    # Adam at lr 1e8 breaks the flow at its first step: the encoder's output is NaN after it
    res = run("adversarial", tmp_path / "bad", steps=4, seeds=(0,), lr=1e8, **TINY_ADVERSARIAL)
    final = res["runs"][0]
    at = final["diverged_at"]
    assert at is not None and 1 <= at < 4, final
    steps = [r["step"] for r in res["curves"]]
    assert steps == sorted(steps) and steps[-1] == at  # no training (or evaluation) after it
    assert res["curves"][-1]["diverged_at"] == at  # the row of the stop says so, as in views
    assert final["step"] == at
    word, why = verdict("adversarial", res)
    assert word in ("reproduces", "partly", "does not reproduce"), why


def test_adversarial_run_that_does_not_diverge_records_none(tmp_path):
    res = run("adversarial", tmp_path / "ok", steps=2, seeds=(0,), **TINY_ADVERSARIAL)
    assert res["runs"][0]["diverged_at"] is None
    assert [r["step"] for r in res["curves"]] == [0, 1, 2]
    assert all(math.isfinite(r["accuracy"]) for r in res["curves"])


def test_report_names_the_runs_that_diverged_and_when(critics_with_a_diverged_seed, tmp_path):
    res = copy.deepcopy(critics_with_a_diverged_seed[1])
    for r in res["runs"]:
        r["diverged_at"] = 7 if (r["critic"] == "concat" and r["seed"] == 0) else None
    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "critics.json").write_text(json.dumps(res))
    text = write_report(folder, tmp_path / "r.md", tmp_path / "figures").read_text()
    line = next(x for x in text.splitlines() if x.startswith("**Diverged**"))
    assert "critic concat, estimator nwj, seed 0 at step 7." in line, line
    assert "bilinear" not in line
    # no diverged run: no line
    for r in res["runs"]:
        r["diverged_at"] = None
    (folder / "critics.json").write_text(json.dumps(res))
    text = write_report(folder, tmp_path / "r2.md", tmp_path / "figures").read_text()
    assert "**Diverged**" not in text


def test_reproduction_curves_mark_the_steps_where_a_diverged_seed_left_the_mean():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from contrastive.app.reproduce.plots import _line, mean_curve

    curves = [{"seed": s, "step": t, "bound": float(s + t)} for s in (0, 1, 2) for t in (0, 10)]
    curves.append({"seed": 0, "step": 20, "bound": 20.0})  # seeds 1 and 2 diverged before 20
    steps, mean, std, n = mean_curve(curves, "bound", counts=True)
    assert steps.tolist() == [0, 10, 20] and n.tolist() == [3, 3, 1]
    assert mean.tolist() == [1.0, 11.0, 20.0]
    assert len(mean_curve(curves, "bound")) == 3  # the three-array form is unchanged
    fig, ax = plt.subplots()
    _line(ax, curves, "bound", "I_NCE", "tab:blue")
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0] == "I_NCE (from step 20: 1 of 3 seeds)", labels
    hollow = ax.get_lines()[1]
    assert hollow.get_xdata().tolist() == [20] and hollow.get_markerfacecolor() == "white"
    plt.close(fig)
    fig, ax = plt.subplots()
    _line(ax, curves[:-1], "bound", "I_NCE", "tab:blue")  # every seed at every step
    assert [line.get_label() for line in ax.get_lines()] == ["I_NCE"]
    plt.close(fig)


def test_one_seed_has_no_standard_deviation_in_the_summary_or_the_printed_table(tmp_path):
    """One seed measures no spread: the summary's std is None (empty in the CSV, ``null`` in
    the JSON), the printed table shows a dash, and the report the mean alone."""
    from contrastive.cli import _rows_md

    res = run("noniid", tmp_path, seeds=(0,), **TINY_NONIID)
    row = res["summary"][0]
    assert row["n"] == 1 and row["estimate_std"] is None and row["estimate_mean"] is not None
    table = _rows_md(res["summary"])
    assert "None" not in table and "—" in table
    text = write_report(tmp_path, tmp_path / "r.md", tmp_path / "figures").read_text()
    assert "± 0.0000" not in text
