"""The compare report: statistics against numpy, the table's formatting, the files and plots."""

from __future__ import annotations

import csv
import json
import math
import struct

import numpy as np
import pytest
from scipy import stats

from contrastive.app.compare_plots import _mean_curve, _spearman
from contrastive.app.compare_report import (
    FIELDS,
    METRICS,
    aggregate,
    format_table,
    write_report,
)

LOSSES = (("infonce", "cosine(t=0.1)"), ("triplet", "negativel2(normalized)"), ("nwj", "cosine"))


def make_records(seeds=(0, 1, 2), steps=40, seed=0):
    """Random run records, interleaved by seed so the loss order must come from first sight."""
    rng = np.random.default_rng(seed)
    out = []
    for s in seeds:
        for loss, critic in LOSSES:
            history = []
            for t in range(steps):
                e = {"step": t, "loss": float(rng.normal(2, 1)), "infonce": float(rng.normal()),
                     "nwj": float(rng.normal())}
                if t % 10 == 0:
                    e["recall_at_1"] = float(rng.uniform())
                history.append(e)
            out.append({
                "loss": loss, "critic": critic, "seed": s, "status": "ok",
                "metrics": {m: float(rng.uniform()) for m in METRICS},
                "readout": {"infonce": float(rng.normal(2)), "nwj": float(rng.normal(1))},
                "train_time_s": float(rng.uniform(1, 30)),
                "history": history,
            })
    return out


def values(records, loss, field):
    """The independent reference: the field's values over the successful cells of one loss."""
    out = []
    for r in records:
        if r["loss"] != loss or r.get("status", "ok") != "ok":
            continue
        if field.startswith("readout_"):
            v = r["readout"].get(field[len("readout_"):])
        elif field == "train_time_s":
            v = r["train_time_s"]
        else:
            v = r["metrics"].get(field)
        if v is not None and math.isfinite(v):
            out.append(v)
    return np.array(out)


@pytest.mark.parametrize("ddof", [0, 1])
def test_aggregate_matches_numpy_mean_and_std(ddof):
    records = make_records()
    rows = aggregate(records, ddof=ddof)
    assert [r["loss"] for r in rows] == [loss for loss, _ in LOSSES]
    assert [r["critic"] for r in rows] == [c for _, c in LOSSES]
    for row in rows:
        assert row["n_seeds"] == 3 and row["seeds"] == [0, 1, 2] and row["n_failed"] == 0
        for f in FIELDS:
            x = values(records, row["loss"], f)
            assert row[f"{f}_mean"] == pytest.approx(np.mean(x), rel=1e-12)
            assert row[f"{f}_std"] == pytest.approx(np.std(x, ddof=ddof), rel=1e-12)


def test_default_std_is_sample_std():
    records = make_records()
    row = aggregate(records)[0]
    x = values(records, "infonce", "map_at_r")
    assert row["map_at_r_std"] == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert row["map_at_r_std"] != pytest.approx(np.std(x, ddof=0), rel=1e-6)


def test_failed_cells_are_excluded_and_reported():
    records = make_records()
    # A failed cell carrying absurd numbers must not move the statistics.
    records.append({"loss": "infonce", "critic": "cosine(t=0.1)", "seed": 7, "status": "failed",
                    "error": "RuntimeError: loss is NaN at step 3",
                    "metrics": {m: 1e6 for m in METRICS}, "train_time_s": 1e6})
    # A cell whose loss only ever failed gets a row with no statistics.
    records.append({"loss": "dv", "seed": 0, "status": "failed", "error": "ValueError: boom"})
    rows = aggregate(records)
    inf = rows[0]
    assert inf["n_seeds"] == 3 and inf["n_failed"] == 1
    assert inf["failed"] == [{"seed": 7, "error": "RuntimeError: loss is NaN at step 3"}]
    x = values(records, "infonce", "recall_at_1")
    assert inf["recall_at_1_mean"] == pytest.approx(np.mean(x), rel=1e-12)
    assert inf["train_time_s_mean"] < 100
    dv = rows[-1]
    assert dv["loss"] == "dv" and dv["n_seeds"] == 0 and dv["n_failed"] == 1
    assert all(math.isnan(dv[f"{f}_mean"]) for f in FIELDS)
    table = format_table(rows)
    dv_line = next(line for line in table.splitlines() if line.startswith("| dv"))
    assert "failed" in dv_line
    assert "Failed cells, left out of the statistics: infonce seed 7, dv seed 0." in table


def test_nan_and_missing_values_are_left_out_per_field():
    records = make_records()
    cells = [r for r in records if r["loss"] == "triplet"]
    cells[0]["readout"]["nwj"] = float("nan")
    del cells[1]["metrics"]["nmi"]
    row = aggregate(records)[1]
    assert row["n_seeds"] == 3
    assert row["n_missing"] == {"readout_nwj": 1, "nmi": 1}
    assert row["readout_nwj_mean"] == pytest.approx(cells[2]["readout"]["nwj"] * 0.5
                                                    + cells[1]["readout"]["nwj"] * 0.5)
    assert row["nmi_mean"] == pytest.approx(np.mean([cells[0]["metrics"]["nmi"],
                                                     cells[2]["metrics"]["nmi"]]))
    assert "triplet: nmi ×1, readout_nwj ×1" in format_table([row])


def _cells(table: str, loss: str) -> dict[str, str]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = next(line for line in lines[2:] if line.strip("| ").startswith(loss + " "))
    return dict(zip(header, [c.strip() for c in row.strip("|").split("|")]))


def test_table_cells_are_mean_pm_std_with_the_documented_precision():
    records = make_records()
    table = format_table(aggregate(records), footnote=False)
    assert "Mean ±" not in table
    lines = table.splitlines()
    assert len(lines) == 2 + len(LOSSES)
    assert len({len(line) for line in lines}) == 1  # padded columns
    for loss, critic in LOSSES:
        cells = _cells(table, loss)
        assert cells["Critic"] == critic

        def pct(f, loss=loss):
            x = values(records, loss, f) * 100
            return f"{np.mean(x):.1f} ± {np.std(x, ddof=1):.1f}"

        def plain(f, d, loss=loss):
            x = values(records, loss, f)
            return f"{np.mean(x):.{d}f} ± {np.std(x, ddof=1):.{d}f}"

        for header, f in [("R@1", "recall_at_1"), ("R@2", "recall_at_2"), ("R@4", "recall_at_4"),
                          ("R@8", "recall_at_8"), ("P@1", "precision_at_1"),
                          ("R-Prec", "r_precision"), ("MAP@R", "map_at_r"), ("NMI", "nmi"),
                          ("Linear probe", "linear_probe"), ("k-NN", "knn_top1")]:
            assert cells[header] == pct(f), header
        assert cells["I_NCE (nats)"] == plain("readout_infonce", 2)
        assert cells["I_NWJ (nats)"] == plain("readout_nwj", 2)
        assert cells["Train time (s)"] == plain("train_time_s", 1)


def test_single_seed_shows_the_mean_alone_and_footnote_says_so():
    records = make_records(seeds=(3,))
    rows = aggregate(records)
    assert math.isnan(rows[0]["recall_at_1_std"])
    table = format_table(rows)
    cells = _cells(table, "infonce")
    assert cells["R@1"] == f"{records[0]['metrics']['recall_at_1'] * 100:.1f}"
    assert "over 1 seed per loss" in table


def test_write_report_files_parse_and_agree_with_numpy(tmp_path):
    records = make_records()
    records.append({"loss": "nwj", "critic": "cosine", "seed": 9, "status": "failed",
                    "error": "RuntimeError: diverged\n  at step 5"})
    records[0]["readout"]["nwj"] = float("nan")
    meta = {"config": {"steps": 40, "batch_size": 64}, "wall_time_s": 12.5,
            "versions": {"torch": "x"}}
    paths = write_report(records, tmp_path / "run", title="test run", meta=meta)
    assert set(paths) == {"json", "csv", "markdown", "map_probe", "mi_vs_accuracy", "curves"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "run"
    # No temporary files are left behind.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        p.name for p in paths.values())

    def no_nan(name):
        raise AssertionError(f"results.json contains {name}; it must be strict JSON")

    data = json.loads(paths["json"].read_text(), parse_constant=no_nan)
    assert data["title"] == "test run" and data["ddof"] == 1 and data["meta"] == meta
    assert len(data["records"]) == len(records)
    assert data["records"][0]["readout"]["nwj"] is None  # NaN -> null
    assert data["records"][-1]["error"].startswith("RuntimeError")
    assert [r["loss"] for r in data["aggregate"]] == ["infonce", "triplet", "nwj"]

    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["loss"] for r in rows] == ["infonce", "triplet", "nwj"]
    assert rows[2]["n_seeds"] == "3" and rows[2]["n_failed"] == "1"
    for row in rows:
        for f in FIELDS:
            x = values(records, row["loss"], f)
            assert float(row[f"{f}_mean"]) == pytest.approx(np.mean(x), rel=1e-12)
            assert float(row[f"{f}_std"]) == pytest.approx(np.std(x, ddof=1), rel=1e-12)

    md = paths["markdown"].read_text()
    assert md.startswith("# test run\n")
    assert format_table(aggregate(records)) in md
    assert "- `nwj` seed 9: RuntimeError: diverged at step 5" in md
    for name in ("map_probe.png", "mi_vs_accuracy.png", "curves.png"):
        assert f"]({name})" in md


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_pngs_are_valid_and_not_blank(tmp_path):
    import matplotlib.image as mpimg

    paths = write_report(make_records(), tmp_path)
    for kind in ("map_probe", "mi_vs_accuracy", "curves"):
        (w, h), nbytes = _png_size(paths[kind])
        assert w >= 500 and h >= 300 and nbytes > 15_000, (kind, w, h, nbytes)
        img = mpimg.imread(paths[kind])
        assert img.shape[:2] == (h, w)
        # Non-trivial content: a good share of the pixels are not background white.
        assert (img[..., :3].min(axis=2) < 0.9).mean() > 0.01, kind


def test_report_with_only_failed_cells_and_no_history_still_writes_everything(tmp_path):
    records = [{"loss": "dv", "seed": 0, "status": "failed", "error": "x"},
               {"loss": "dv", "seed": 1, "status": "failed"}]
    paths = write_report(records, tmp_path)
    for kind in ("map_probe", "mi_vs_accuracy", "curves"):
        _png_size(paths[kind])
    assert "failed" in paths["markdown"].read_text()
    # plots=False writes the three result files only
    paths = write_report(make_records(), tmp_path / "noplots", plots=False)
    assert set(paths) == {"json", "csv", "markdown"}
    assert not list((tmp_path / "noplots").glob("*.png"))


def test_rewriting_a_report_replaces_the_files(tmp_path):
    write_report(make_records(seed=1), tmp_path, plots=False)
    records = make_records(seed=2)
    paths = write_report(records, tmp_path, plots=False)
    data = json.loads(paths["json"].read_text())
    assert data["records"][0]["metrics"] == records[0]["metrics"]


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(TypeError, match="records must be a list"):
        aggregate({"loss": "infonce", "seed": 0})
    with pytest.raises(TypeError, match=r"records\[1\] must be a dict"):
        aggregate([{"loss": "a", "seed": 0}, "b"])
    with pytest.raises(ValueError, match=r"records\[0\] has no 'loss' or 'seed'"):
        aggregate([{"seed": 0}])
    with pytest.raises(ValueError, match="repeats the cell loss='a'"):
        aggregate([{"loss": "a", "seed": 0}, {"loss": "a", "seed": 0}])
    with pytest.raises(ValueError, match="status"):
        aggregate([{"loss": "a", "seed": 0, "status": "done"}])
    with pytest.raises(ValueError, match="ddof"):
        aggregate(make_records(), ddof=2)
    with pytest.raises(ValueError, match="records is empty"):
        write_report([], tmp_path)
    with pytest.raises(TypeError, match="meta must be a dict"):
        write_report(make_records(), tmp_path, meta=["x"])
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="output_dir .* is not a folder"):
        write_report(make_records(), f)


def test_mean_curve_is_the_mean_over_seeds_at_each_step():
    h1 = [{"step": 0, "loss": 1.0, "recall_at_1": 0.2}, {"step": 1, "loss": 3.0},
          {"step": 2, "loss": float("nan")}]
    h2 = [{"step": 0, "loss": 2.0, "recall_at_1": 0.4}, {"step": 1, "loss": 5.0},
          {"step": 2, "loss": 7.0}]
    steps, y = _mean_curve([h1, h2], "loss")
    np.testing.assert_array_equal(steps, [0, 1, 2])
    np.testing.assert_allclose(y, [1.5, 4.0, 7.0])
    steps, y = _mean_curve([h1, h2], "recall_at_1")
    np.testing.assert_array_equal(steps, [0])
    np.testing.assert_allclose(y, [0.3])


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=9).astype(float)  # with ties
    y = rng.normal(size=9)
    assert _spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(_spearman(x[:2], y[:2]))


def test_a_failed_cell_without_a_critic_joins_its_loss_row():
    records = [
        {"loss": "dv", "seed": 0, "status": "failed", "error": "could not build"},
        *make_records(seeds=(0, 1)),
        {"loss": "dv", "critic": "cosine", "seed": 1, "status": "ok",
         "metrics": {"map_at_r": 0.5}},
    ]
    rows = aggregate(records)
    assert [(r["loss"], r["critic"]) for r in rows] == [("dv", "cosine"), *LOSSES]
    assert rows[0]["n_seeds"] == 1 and rows[0]["n_failed"] == 1
    assert rows[0]["map_at_r_mean"] == 0.5


# -- the tuned report (compare --tune) ------------------------------------------------------------


def test_aggregate_ci_matches_scipy_t_interval():
    from contrastive.app.compare_report import aggregate_ci

    records = make_records(seeds=(0, 1, 2, 3))
    for row in aggregate_ci(records):
        for f in ("map_at_r", "linear_probe", "readout_infonce"):
            x = values(records, row["loss"], f)
            lo, hi = stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=stats.sem(x))
            assert row[f"{f}_ci_low"] == pytest.approx(lo, rel=1e-12)
            assert row[f"{f}_ci_high"] == pytest.approx(hi, rel=1e-12)
            assert row[f"{f}_ci95"] == pytest.approx((hi - lo) / 2, rel=1e-12)
            assert row[f"{f}_std"] == pytest.approx(x.std(ddof=1), rel=1e-12)


def test_significance_is_the_paired_test_on_common_seeds():
    from contrastive.app.compare_report import significance

    records = make_records(seeds=(0, 1, 2, 3))
    res = significance(records, "map_at_r")
    means = {loss: values(records, loss, "map_at_r").mean() for loss, _ in LOSSES}
    assert res["best"] == max(means, key=means.get)
    for loss, _ in LOSSES:
        if loss == res["best"]:
            continue
        ref = stats.ttest_rel(values(records, res["best"], "map_at_r"),
                              values(records, loss, "map_at_r")).pvalue
        assert res["p_values"][loss] == pytest.approx(ref, rel=1e-10)


def test_write_tuned_report(tmp_path):
    from contrastive.app.compare_report import write_tuned_report

    records = make_records(seeds=(0, 1, 2))
    tuning = {loss: {"best_value": 0.5 + i / 10, "n_trials": 3,
                     "best_params": {"lr": 1e-3 * (i + 1), "temperature": 0.1},
                     "history": [{"number": n, "value": 0.4 + n / 20} for n in range(3)]}
              for i, (loss, _) in enumerate(LOSSES)}
    paths = write_tuned_report(records, tuning, tmp_path, meta={"budget": "3 trials"})
    for kind in ("json", "csv", "markdown", "map_probe", "tuning_history", "mi_vs_accuracy",
                 "curves"):
        assert paths[kind].stat().st_size > 0
    for kind in ("map_probe", "tuning_history", "mi_vs_accuracy", "curves"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(paths["json"].read_text())
    assert set(payload["tuning"]) == {loss for loss, _ in LOSSES}
    rows = list(csv.DictReader(paths["csv"].open()))
    x = values(records, "infonce", "map_at_r")
    lo, _ = stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=stats.sem(x))
    assert float(rows[0]["map_at_r_ci_low"]) == pytest.approx(lo, rel=1e-12)
    assert json.loads(rows[0]["best_params"]) == {"lr": 1e-3, "temperature": 0.1}
    md = paths["markdown"].read_text()
    half = (x.mean() - lo) * 100
    assert f"{100 * x.mean():.1f} ± {half:.1f}" in md  # mean ± half width of the interval
    assert "Budget, the same for every loss: 3 trials." in md
    assert "paired t-test" in md and "lr=0.001, temperature=0.1" in md
