"""Follow-ups of the compare-report and known-MI reviews, each against an independent
reference: scipy.stats on the same numbers, hand-built table cells, a CommonMark parser
(markdown-it) reading the written Markdown back, and the command line's own result. Synthetic
records and runs of a few steps, no network."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from scipy import stats

from contrastive.app import mi_benchmark as mb
from contrastive.app import mi_family as mf
from contrastive.app.compare_report import (
    FIELDS,
    aggregate_ci,
    ci_column,
    format_table,
    format_tuned_table,
    significance,
    write_report,
    write_tuned_report,
)


def _cells(line: str) -> list[str]:
    """The cells of one GFM table row (pipes escaped as ``\\|`` read back as pipes)."""
    assert line.startswith("|") and line.endswith("|"), line
    return [p.strip().replace("\\|", "|") for p in re.split(r"(?<!\\)\|", line[1:-1])]


def _record(loss: str, critic: str, seed: int, **metrics: float) -> dict:
    return {"loss": loss, "critic": critic, "seed": seed, "status": "ok", "metrics": metrics}


def _failed(loss: str, seed: int, error: str, critic: str = "cos") -> dict:
    return {"loss": loss, "critic": critic, "seed": seed, "status": "failed", "error": error}


# -- 1. significance per (loss, critic) ---------------------------------------------------------

# the same loss with two critics: "dot" is clearly the best, "cosine" clearly worse
PER_SEED = {
    ("infonce", "dot"): [0.80, 0.82, 0.81, 0.83],
    ("infonce", "cosine"): [0.50, 0.53, 0.49, 0.52],
    ("nwj", "cosine"): [0.79, 0.83, 0.80, 0.82],
}


def _sig_records() -> list[dict]:
    return [_record(loss, critic, s, map_at_r=v)
            for (loss, critic), xs in PER_SEED.items() for s, v in enumerate(xs)]


def test_significance_keeps_each_critic_of_a_loss():
    records = _sig_records()
    res = significance(records, "map_at_r")
    # one entry per (loss, critic) row: the loss name alone when it has one critic, else with
    # its critic (the label of the plots)
    label = {("infonce", "dot"): "infonce [dot]", ("infonce", "cosine"): "infonce [cosine]",
             ("nwj", "cosine"): "nwj"}
    assert res["best"] == "infonce [dot]"
    assert set(res["p_values"]) == set(label.values())
    best = PER_SEED[("infonce", "dot")]
    for key, xs in PER_SEED.items():
        if key != ("infonce", "dot"):
            ref = stats.ttest_rel(best, xs).pvalue
            assert res["p_values"][label[key]] == pytest.approx(ref, rel=1e-10), key
    # Holm over the two tests: cosine is rejected, nwj is not
    p_cos = stats.ttest_rel(best, PER_SEED[("infonce", "cosine")]).pvalue
    p_nwj = stats.ttest_rel(best, PER_SEED[("nwj", "cosine")]).pvalue
    assert p_cos <= 0.05 / 2 and p_nwj > 0.05
    assert res["indistinguishable"] == ["infonce [dot]", "nwj"]

    # the table's `*` follows the (loss, critic) rows
    rows = aggregate_ci(records)
    lines = format_tuned_table(rows, {}, {"map_at_r": res}).splitlines()[2:]
    names = {(r["loss"], r["critic"]): _cells(line)[0] for r, line in zip(rows, lines)}
    assert names == {("infonce", "dot"): "infonce [dot] *",
                     ("infonce", "cosine"): "infonce [cosine]", ("nwj", "cosine"): "nwj *"}


def test_significance_of_one_critic_per_loss_is_keyed_by_loss():
    # the files of a run with one critic per loss keep their loss-name keys
    records = [_record(loss, "cos", s, map_at_r=v)
               for loss, xs in (("a", [0.7, 0.72, 0.71]), ("b", [0.5, 0.6, 0.55]))
               for s, v in enumerate(xs)]
    res = significance(records, "map_at_r")
    assert res["best"] == "a" and set(res["p_values"]) == {"a", "b"}
    assert res["p_values"]["b"] == pytest.approx(
        stats.ttest_rel([0.7, 0.72, 0.71], [0.5, 0.6, 0.55]).pvalue, rel=1e-10)


# -- 2. the interval columns are named after the confidence -----------------------------------


def test_aggregate_ci_names_its_columns_after_the_confidence():
    xs = {"a": [0.70, 0.72, 0.65, 0.74], "b": [0.2, 0.9, 0.5, 0.4]}
    records = [_record(loss, "cos", s, map_at_r=v) for loss, v_ in xs.items()
               for s, v in enumerate(v_)]
    for confidence, suffix in ((0.9, "ci90"), (0.99, "ci99"), (0.95, "ci95")):
        rows = aggregate_ci(records, confidence=confidence)
        for row in rows:
            x = np.asarray(xs[row["loss"]])
            lo, hi = stats.t.interval(confidence, x.size - 1, loc=x.mean(), scale=stats.sem(x))
            assert row[f"map_at_r_{suffix}"] == pytest.approx((hi - lo) / 2, rel=1e-12)
            assert row["map_at_r_ci_low"] == pytest.approx(lo, rel=1e-12)
            assert row["map_at_r_ci_high"] == pytest.approx(hi, rel=1e-12)
            # no column claims a confidence that was not used
            others = {k for k in row if re.fullmatch(r".*_ci\d[\d.]*", k)}
            assert others == {f"{f}_{suffix}" for f in FIELDS}, confidence
    assert ci_column(0.999) == "ci99.9" and ci_column(0.95) == "ci95"
    for bad in (0.0, 1.0, 95, True, math.nan):
        with pytest.raises(ValueError, match="confidence must be a number in"):
            aggregate_ci(records, confidence=bad)


# -- 3. the tuned table and its report ----------------------------------------------------------


def test_tuned_table_says_how_many_cells_of_a_loss_failed():
    records = [_record("nce", "cos", s, map_at_r=0.5 + s / 10) for s in range(2)]
    records.append(_failed("nce", 2, "out of memory"))
    records += [_record("dv", "cos", s, map_at_r=0.4) for s in range(3)]
    rows = aggregate_ci(records)
    plain = [_cells(line)[0] for line in format_table(rows, footnote=False).splitlines()[2:]]
    tuned = [_cells(line)[0] for line in format_tuned_table(rows, {}).splitlines()[2:]]
    assert plain == ["nce (1 failed)", "dv"]  # the plain table's rule, as the reference
    assert tuned == plain


def _failed_items(md: str) -> list[str]:
    """The items of the "Failed cells" list as CommonMark reads them: each item's inline code
    span and the text after it."""
    markdown_it = pytest.importorskip("markdown_it")  # a CommonMark parser, via rich

    tokens = markdown_it.MarkdownIt("commonmark").parse(md)
    start = next(i for i, t in enumerate(tokens) if t.type == "inline"
                 and t.content == "Failed cells")
    items = []
    for t in tokens[start + 1:]:
        if t.type == "heading_open":
            break
        if t.type == "inline":
            items.append(t)
    return items


def _write(kind: str, records: list[dict], path) -> str:
    if kind == "tuned":
        paths = write_tuned_report(records, {}, path, plots=False)
    else:
        paths = write_report(records, path, plots=False)
    return paths["markdown"].read_text()


@pytest.mark.parametrize("kind", ["plain", "tuned"])
def test_failed_cells_cut_long_messages_with_an_ellipsis(tmp_path, kind):
    error = " ".join(f"word{i}" for i in range(100))  # 589 characters
    records = [_record("nce", "cos", 0, map_at_r=0.5), _failed("nce", 1, error)]
    items = _failed_items(_write(kind, records, tmp_path))
    assert len(items) == 1
    text = "".join(c.content for c in items[0].children if c.type == "text")
    assert text == " seed 1: " + error[:297] + "..."


@pytest.mark.parametrize("kind", ["plain", "tuned"])
def test_a_backtick_in_a_loss_name_stays_in_its_code_span(tmp_path, kind):
    names = ["a`b", "``x", "y`", " padded ", "two\nlines"]
    records = [_record("ok", "cos", 0, map_at_r=0.5)]
    records += [_failed(n, 0, "boom") for n in names]
    items = _failed_items(_write(kind, records, tmp_path))
    spans = [[c.content for c in t.children if c.type == "code_inline"] for t in items]
    assert spans == [[n] for n in names[:-1]] + [["two lines"]]  # a code span is one line


def test_tuned_report_into_a_file_is_a_value_error_naming_it(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    records = [_record("nce", "cos", 0, map_at_r=0.5)]
    with pytest.raises(ValueError, match=re.escape(str(target))):
        write_tuned_report(records, {}, target, plots=False)
    with pytest.raises(ValueError, match=re.escape(str(target))):  # the plain report's rule
        write_report(records, target, plots=False)


# -- 4. the Python API takes the names the command line takes -------------------------------

TINY = {"dim": 2, "batch_size": 8, "levels": (1.0,), "steps_per_level": 3, "seed": 0}


@pytest.mark.parametrize("names", ["flo", "smile_1", "infonce,smile_5"])
def test_run_accepts_the_names_of_the_command_line(tmp_path, main, names):
    rc, _, err = main("mi-bench", "--estimators", names, "--dim", "2", "--batch-size", "8",
                      "--levels", "1", "--steps-per-level", "3", "--seed", "0",
                      "--output", str(tmp_path / "cli"), "--no-progress")
    assert rc == 0, err
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    for given in (names, tuple(names.split(","))):
        api = mb.run(estimators=given, progress=False, **TINY)
        assert api["config"]["estimators"] == cli["config"]["estimators"]
        for name, values in cli["estimates"].items():
            np.testing.assert_allclose(api["estimates"][name], values, rtol=1e-6)


def test_check_arguments_accepts_what_run_accepts():
    est, _ = mb.check_arguments(estimators=("FLO", "smile_1"), **TINY)
    assert list(est) == ["flo", "smile_1"]
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        mb.check_arguments(estimators=("flo", "nope"), **TINY)


# -- 5. the family's data sets and critics are labelled distinctly --------------------------

FAMILY_TINY = {"estimators": ("infonce",), "budget": "quick", "dim": 2, "batch_size": 8,
               "levels": (1,), "steps_per_level": 2, "progress": False}


@pytest.mark.parametrize("transforms",
                         [("gaussian", None), ("cubic", "cubic"), "gaussian,gaussian"])
def test_run_family_refuses_two_runs_with_one_data_label(transforms):
    with pytest.raises(ValueError, match="transforms.*gaussian|transforms.*cubic"):
        mf.run_family(critics=("bilinear",), transforms=transforms, **FAMILY_TINY)


def test_run_family_refuses_a_critic_twice():
    with pytest.raises(ValueError, match="critics.*bilinear"):
        mf.run_family(critics=("bilinear", "bilinear"), transforms=("gaussian",), **FAMILY_TINY)


def test_run_family_table_has_a_row_per_run():
    # the reference: every (estimator, data, critic) of the runs is a row of its own
    res = mf.run_family(critics=("bilinear", "separable"), transforms=(None, "cubic"),
                        **FAMILY_TINY)
    runs = {("infonce", r["config"]["transform"] or "gaussian", r["config"]["critic"])
            for r in res["runs"]}
    lines = mf.family_table(res).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| estimator"))
    rows = {tuple(_cells(line)[:3]) for line in lines[start + 2:] if line.startswith("|")}
    assert len(runs) == len(res["runs"]) == 4
    assert rows == runs


def test_plot_titles_name_the_interval_of_the_rows_they_draw():
    """The plots' titles name the error bars they draw: a 90% interval (``aggregate_ci``'s
    ``ci90`` rows) is not called "std"; an unknown ``err`` is a ValueError naming it."""
    from contrastive.app.compare_plots import plot_map_probe, plot_mi_vs_accuracy
    from contrastive.app.compare_report import aggregate_ci

    records = [{"loss": loss, "critic": "dot", "seed": s, "map_at_r": 0.5 + 0.01 * s + k,
                "linear_probe": 0.6 + 0.02 * s, "readout_infonce": 1.0 + 0.1 * s,
                "readout_nwj": 2.0 - 0.1 * s}
               for k, loss in ((0.0, "infonce"), (0.1, "triplet")) for s in range(3)]
    rows = aggregate_ci(records, confidence=0.9)
    fig = plot_map_probe(rows, records, err="ci90")
    assert "90% t-interval" in fig.axes[0].get_title()
    fig = plot_mi_vs_accuracy(rows, records, err="ci90")
    assert "90% t-interval" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="err must be 'std' or a confidence interval"):
        plot_map_probe(rows, records, err="sem")
