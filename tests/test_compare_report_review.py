"""Review of the compare report (tables, files, plots, statistics) against independent
references: hand-parsed Markdown, Holm's procedure written as adjusted p-values, scipy.stats,
and the arrays read back from the matplotlib Axes. Synthetic per-seed records, no training."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from contrastive.app.compare_plots import plot_curves, plot_map_probe
from contrastive.app.compare_report import aggregate, format_table, format_tuned_table
from contrastive.app.statistics import holm, indistinguishable_from_best


def _cells(line: str) -> list[str]:
    """The cells of one GFM table row: split on pipes not escaped by a backslash, ``\\|`` read
    back as a literal pipe (GitHub-flavoured Markdown's rule for a pipe inside a cell)."""
    assert line.startswith("|") and line.endswith("|"), line
    parts = re.split(r"(?<!\\)\|", line[1:-1])
    return [p.strip().replace("\\|", "|") for p in parts]


def _record(loss: str, critic: str, seed: int, **metrics: float) -> dict:
    return {"loss": loss, "critic": critic, "seed": seed, "status": "ok", "metrics": metrics}


def _holm_reference(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm (1979) as adjusted p-values over the ``m`` hypotheses that were tested:
    ``p_adj_(i) = max_{j <= i} min(1, (m - j) p_(j))``, reject where ``p_adj <= alpha``."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = p.size
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m, dtype=bool)
    out[order] = adj <= alpha
    return out.tolist()


# -- Markdown tables --------------------------------------------------------------------------


def test_a_pipe_or_newline_in_a_name_keeps_the_table_intact():
    records = [_record("nce|v2", "cos|t", s, map_at_r=0.5 + s / 10) for s in range(3)]
    records += [_record("two\nlines", "dot", s, map_at_r=0.4) for s in range(3)]
    rows = aggregate(records)
    lines = format_table(rows, footnote=False).splitlines()
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row
    ncol = len(_cells(lines[0]))
    assert all(len(_cells(line)) == ncol for line in lines)
    assert _cells(lines[2])[:2] == ["nce|v2", "cos|t"]
    assert _cells(lines[2])[8] == f"{100 * np.mean([.5, .6, .7]):.1f} ± " \
                                  f"{100 * np.std([.5, .6, .7], ddof=1):.1f}"
    assert _cells(lines[3])[0] == "two lines"

    tuned = format_tuned_table(rows, {"nce|v2": {"best_value": 0.5}}).splitlines()
    assert len(tuned) == 2 + len(rows)
    assert all(len(_cells(line)) == len(_cells(tuned[0])) for line in tuned)
    assert _cells(tuned[2])[:2] == ["nce|v2", "50.0"]


# -- one seed ---------------------------------------------------------------------------------


def test_one_seed_shows_the_mean_alone_with_either_ddof():
    # the footnote says "a single seed shows the mean alone"; with ddof=0 np.std of one value is
    # 0.0, which is not a measured spread
    records = [_record("solo", "cos", 0, map_at_r=0.4321)]
    for ddof in (0, 1):
        text = format_table(aggregate(records, ddof=ddof), ddof=ddof)
        row = _cells(text.splitlines()[2])
        assert row[8] == "43.2", (ddof, row[8])
        assert "a single seed shows the mean alone" in text


# -- Holm over the tests that were made -------------------------------------------------------


def test_holm_counts_only_the_tests_that_were_made():
    # a NaN p-value is no test: it must not tighten the thresholds of the others
    assert holm([0.03, math.nan]) == _holm_reference([0.03], 0.05) + [False] == [True, False]
    assert holm([0.02, 0.04, math.nan, math.nan]) == _holm_reference([0.02, 0.04], 0.05) + [
        False, False]


def test_a_loss_whose_cells_all_failed_does_not_change_the_indistinguishable_set():
    a = [0.70, 0.72, 0.71, 0.73]
    b = [0.60, 0.70, 0.61, 0.69]  # noisy, p just above 0.05
    c = [x - d for x, d in zip(a, [0.05, 0.015, 0.03, 0.04])]  # p about 0.02
    p_b = stats.ttest_rel(a, b).pvalue
    p_c = stats.ttest_rel(a, c).pvalue
    assert 0.05 / 3 < p_c <= 0.05 / 2 and p_b > 0.05  # the case where m = 2 and m = 3 differ
    reject = _holm_reference([p_b, p_c], 0.05)
    expected = ["a"] + [k for k, r in zip(("b", "c"), reject) if not r]
    assert expected == ["a", "b"]
    per_seed = {k: dict(enumerate(v)) for k, v in (("a", a), ("b", b), ("c", c))}
    assert indistinguishable_from_best(per_seed)["indistinguishable"] == expected
    per_seed["dead"] = {}  # every cell of this loss failed: no values, no test
    res = indistinguishable_from_best(per_seed)
    assert res["indistinguishable"] == expected
    assert res["p_values"]["c"] == pytest.approx(p_c, rel=1e-10)


# -- plots ------------------------------------------------------------------------------------


def test_map_probe_draws_no_bar_for_a_missing_metric():
    # linear_probe was never measured: a bar at 0 % would read as "accuracy 0"
    records = [_record("nce", "cos", s, map_at_r=0.5 + s / 100) for s in range(3)]
    rows = aggregate(records)
    ax = plot_map_probe(rows, records).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 2
    assert heights[0] == pytest.approx(100 * np.mean([0.5, 0.51, 0.52]))
    assert math.isnan(heights[1]), heights[1]
    texts = [t.get_text() for t in ax.texts]
    assert f"{100 * np.mean([0.5, 0.51, 0.52]):.1f}" in texts


def test_curves_title_names_the_smoothing_window_in_steps():
    # logged every 10 steps (the trainer's default log_every), 200 rows: a window of 3 rows
    # averages 30 training steps, not 3
    history = [{"step": 10 * (i + 1), "loss": float(i % 7), "infonce": float(i)}
               for i in range(200)]
    records = [{**_record("nce", "cos", 0), "history": history}]
    fig = plot_curves(aggregate(records), records)
    top = fig.axes[0]
    window = 200 // 60
    x, y = top.lines[0].get_data()
    ref = np.convolve(np.arange(200.0), np.ones(window) / window, mode="valid")
    np.testing.assert_allclose(y[window - 1:], ref)
    assert f"moving avg of {10 * window} steps" in top.get_title(), top.get_title()


def test_map_probe_value_labels_stay_on_the_axes_with_wide_intervals():
    # 2-3 seeds with a large spread: t_(0.975, n-1) s / sqrt(n) reaches far past 100 %; every
    # bar's own number must still be on the plot (it was drawn at mean + half width + 1)
    from contrastive.app.compare_report import aggregate_ci

    per_loss = {"a": [0.70, 0.72, 0.71], "b": [0.2, 0.9, 0.5], "c": [0.1, 0.95]}
    records = [_record(loss, "cos", s, map_at_r=x, linear_probe=x)
               for loss, xs in per_loss.items() for s, x in enumerate(xs)]
    rows = aggregate_ci(records)
    ax = plot_map_probe(rows, records, err="ci95").axes[0]
    low, high = ax.get_ylim()
    shown = {t.get_text(): t.get_position()[1] for t in ax.texts}
    for loss, xs in per_loss.items():
        x = np.asarray(xs)
        lo, hi = stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=stats.sem(x))
        row = next(r for r in rows if r["loss"] == loss)
        assert row["map_at_r_ci95"] == pytest.approx((hi - lo) / 2, rel=1e-12)
        label = f"{100 * x.mean():.1f}"
        assert label in shown, (label, shown)
        assert low <= shown[label] <= high, (label, shown[label], (low, high))
