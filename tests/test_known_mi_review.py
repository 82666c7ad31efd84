"""Review of the known-MI data (``evaluation.known_mi``), the benchmark run
(``contrastive.app.mi_benchmark``) and the family run (``contrastive.app.mi_family``) against
independent references: scipy.stats' Gaussian log densities, the closed form
``I = -(d/2) log(1 - rho^2)``, large Monte-Carlo means of the bounds at the optimal critic
(Poole et al., ICML 2019), numpy on the recorded estimates, and the files written next to each
other."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from contrastive import cli
from contrastive.app import mi_benchmark as mb
from contrastive.app import mi_family as mf
from contrastive.pairs import diagonal_masks
from evaluation import known_mi as km
from losses import functional as LF

pytestmark = pytest.mark.usefixtures("one_thread")


def _scipy_scores(x: torch.Tensor, y: torch.Tensor, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """``log p(y_j | x_i)`` and ``log p(y_j | x_i) - log p(y_j)`` from scipy, in float64."""
    xs, ys = x.double().numpy(), y.double().numpy()
    d = xs.shape[1]
    cov = (1.0 - rho * rho) * np.eye(d)
    cond = np.array([multivariate_normal(rho * xi, cov).logpdf(ys) for xi in xs]).reshape(
        len(xs), len(ys))
    marg = multivariate_normal(np.zeros(d), np.eye(d)).logpdf(ys).reshape(1, len(ys))
    return cond, cond - marg


# --------------------------------------------------------------------------- closed forms


def test_closed_forms_against_references():
    """mi_from_rho against scipy's Gaussian entropies, rho_from_mi its inverse, the optimal
    critic and the conditional against scipy in float64, the cubic transform keeps the MI."""
    rho, d = 0.6, 3
    h_y = multivariate_normal(np.zeros(d), np.eye(d)).entropy()
    h_y_x = multivariate_normal(np.zeros(d), (1 - rho * rho) * np.eye(d)).entropy()
    assert km.mi_from_rho(rho, d) == pytest.approx(h_y - h_y_x, rel=1e-12)
    assert km.rho_from_mi(km.mi_from_rho(rho, d), d) == pytest.approx(rho, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    x, y = km.sample_gaussian(6, d, rho, generator=g, dtype=torch.float64)
    cond, ratio = _scipy_scores(x, y, rho)
    np.testing.assert_allclose(km.optimal_critic(x, y, rho).numpy(), ratio, rtol=1e-12,
                               atol=1e-10)
    np.testing.assert_allclose(km.conditional_log_density(x, y, rho).numpy(), cond,
                               rtol=1e-12, atol=1e-10)
    # y -> y^3 is a bijection: a plug-in estimate of I(x_1; y_1^3) on a rank (copula) basis
    # is that of I(x_1; y_1) exactly, since ranks are invariant under monotone maps
    _, y1 = km.sample_gaussian(500, 1, rho, generator=g, dtype=torch.float64)
    assert torch.equal(torch.argsort(km.cubic(y1)[:, 0]), torch.argsort(y1[:, 0]))


def test_bounds_at_the_optimal_critic_monte_carlo():
    """Poole et al. (2019): I_NCE at the optimal critic is below min(I, log B) and approaches it;
    I_NWJ at ``1 + log p(y|x)/p(y)`` is unbiased. 200 batches of 64, d = 20."""
    d, b = 20, 64
    pos, neg = diagonal_masks(b)
    for mi in (2.0, 8.0):
        rho = km.rho_from_mi(mi, d)
        g = torch.Generator().manual_seed(int(mi))
        nce, nwj = [], []
        for _ in range(200):
            x, y = km.sample_gaussian(b, d, rho, generator=g, dtype=torch.float64)
            s = km.optimal_critic(x, y, rho)
            nce.append(float(LF.infonce_bound(s, pos, neg)))
            nwj.append(float(LF.nwj_bound(s + 1.0, pos, neg)))
        cap = min(mi, math.log(b))
        assert max(nce) <= math.log(b) + 1e-12
        assert np.mean(nce) < cap and np.mean(nce) > cap - 1.2
        if mi == 2.0:  # NWJ's variance grows like e^I: checked where 200 batches pin it down
            se = np.std(nwj) / math.sqrt(len(nwj))
            assert abs(np.mean(nwj) - mi) < 4 * se and se < 0.05


def test_optimal_critic_float32_matches_scipy_at_high_mi_per_dimension():
    """The scores of float32 data, where ``1 - rho^2`` is small (d = 2, 10 nats; d = 1, 12
    nats): ``||y - rho x||^2`` expanded as ``||y||^2 - 2 rho x.y + rho^2 ||x||^2`` cancels
    catastrophically, a diagonal error of 0.03 nats at 10 nats and of thousands at 12."""
    for d, mi in ((2, 10.0), (1, 12.0)):
        rho = km.rho_from_mi(mi, d)
        g = torch.Generator().manual_seed(0)
        x, y = km.sample_gaussian(16, d, rho, generator=g)
        cond, ratio = _scipy_scores(x, y, rho)
        s = km.optimal_critic(x, y, rho)
        assert s.dtype == torch.float32
        np.testing.assert_allclose(s.double().numpy(), ratio, rtol=1e-4, atol=2e-3)
        np.testing.assert_allclose(km.conditional_log_density(x, y, rho).double().numpy(), cond,
                                   rtol=1e-4, atol=2e-3)


def test_mi_too_large_for_dim_is_an_error_naming_it():
    """rho_from_mi(40, 1) rounds to rho = 1.0 (1 - rho^2 = e^-80 is below float64's spacing at
    1): it must say so, naming mi and dim, and the benchmark must refuse such a level before
    training instead of crashing at its first step with ``rho must be in (-1, 1)``."""
    assert km.rho_from_mi(18.0, 1) < 1.0
    assert km.mi_from_rho(km.rho_from_mi(18.0, 1), 1) == pytest.approx(18.0, rel=1e-2)
    with pytest.raises(ValueError, match="dim"):
        km.rho_from_mi(40.0, 1)
    with pytest.raises(ValueError, match="levels"):
        mb.check_arguments(critic="bilinear", dim=1, levels=(2, 40), steps_per_level=1)
    with pytest.raises(ValueError, match="levels"):
        mb.run(estimators=("dv",), critic="bilinear", dim=1, batch_size=8, levels=(2, 40),
               steps_per_level=1, progress=False)


def test_mi_too_large_for_dim_is_a_user_error_on_the_command_line(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["mi-bench", "--dim", "1", "--levels", "2,40", "--critic", "bilinear",
                       "--steps-per-level", "1", "--estimators", "dv", "--output", str(tmp_path),
                       "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "levels" in err


def test_staircase_checks_its_arguments():
    np.testing.assert_array_equal(km.staircase([2, 4], 3), np.repeat([2.0, 4.0], 3))
    for bad in (2.5, -1, 0, True):
        with pytest.raises(ValueError, match="steps_per_level"):
            km.staircase([2, 4], bad)
    for levels in ([2, math.nan], [-1.0], []):
        with pytest.raises(ValueError, match="levels"):
            km.staircase(levels, 3)


def test_numpy_integers_are_integers():
    """Sizes taken from a NumPy array (``np.int64``) are rejected with the contradictory
    ``dim must be a positive integer, got np.int64(3)``."""
    assert km.mi_from_rho(0.5, np.int64(3)) == pytest.approx(-1.5 * math.log(0.75))
    assert km.rho_from_mi(2.0, np.int64(20)) == km.rho_from_mi(2.0, 20)
    a = km.sample_gaussian(np.int64(4), np.int64(2), 0.3,
                           generator=torch.Generator().manual_seed(1))
    b = km.sample_gaussian(4, 2, 0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    kw = dict(estimators=("dv",), critic="bilinear", levels=(1,), progress=False)
    r1 = mb.run(dim=np.int64(3), batch_size=np.int64(8), steps_per_level=np.int64(2),
                seed=np.int64(1), **kw)
    r2 = mb.run(dim=3, batch_size=8, steps_per_level=2, seed=1, **kw)
    assert r1["estimates"] == r2["estimates"] and r1["config"]["dim"] == 3
    json.dumps(r1["config"])


# --------------------------------------------------------------------------- the run


def test_seed_reproduces_the_data_and_the_estimates():
    kw = dict(critic="bilinear", dim=3, batch_size=8, levels=(1, 2), steps_per_level=3,
              progress=False)
    a = mb.run(estimators=("infonce", "nwj"), seed=4, **kw)
    b = mb.run(estimators=("nwj",), seed=4, **kw)
    c = mb.run(estimators=("nwj",), seed=5, **kw)
    assert a["estimates"]["nwj"] == b["estimates"]["nwj"] != c["estimates"]["nwj"]


def test_critic_without_parameters_named_in_estimator_critics():
    """``estimator_critics={"dv": "dot"}`` was reported as ``critic 'bilinear' has no trainable
    parameters`` (the other critic) and only once the run had started."""
    kw = dict(estimators=("dv",), critic="bilinear", estimator_critics={"dv": "dot"}, dim=3,
              batch_size=8, levels=(1,), steps_per_level=1)
    for fn in (mb.check_arguments, lambda **k: mb.run(progress=False, **k)):
        with pytest.raises(ValueError, match=r"estimator_critics\['dv'\].*'dot'"):
            fn(**kw)


def test_an_estimator_named_true_does_not_crash_the_progress_bar():
    """``bar.set_postfix(true=..., **{name: ...})``: an estimator named ``true`` was a
    ``TypeError`` (a keyword given twice)."""
    res = mb.run(estimators={"true": (LF.dv, LF.dv_bound)}, critic="bilinear", dim=3,
                 batch_size=8, levels=(1,), steps_per_level=2, progress=True)
    assert len(res["estimates"]["true"]) == 2


def _diverging(tmp_path):
    def bad_loss(scores, pos, neg):
        return scores.sum() * math.inf

    return mb.run(estimators={"broken": (bad_loss, LF.dv_bound), "dv": (LF.dv, LF.dv_bound)},
                  critic="bilinear", dim=3, batch_size=8, levels=(1.25, 2), steps_per_level=4,
                  progress=False, output=tmp_path)


def test_summary_and_files_agree_with_numpy(tmp_path):
    """bias, variance (population) and MSE per level over the last half, against numpy on the
    recorded estimates; the CSV, JSON and Markdown carry the same numbers."""
    res = _diverging(tmp_path)
    est = np.asarray(res["estimates"]["dv"])
    with open(res["files"]["csv"]) as f:
        rows = [r for r in csv.DictReader(f) if r["estimator"] == "dv"]
    np.testing.assert_array_equal([float(r["estimate"]) for r in rows], est)
    saved = json.loads(open(res["files"]["json"]).read())
    assert saved["estimates"]["dv"] == est.tolist()
    assert saved["estimates"]["broken"] == [None] * 8
    md = open(res["files"]["markdown"]).read()
    for row in res["summary"]:
        if row["estimator"] != "dv":
            continue
        level = row["true_mi"]
        seg = est[row["level"] * 4 + 2:(row["level"] + 1) * 4]
        assert row["mean"] == pytest.approx(seg.mean(), abs=1e-12)
        assert row["variance"] == pytest.approx(np.var(seg), abs=1e-12)
        assert row["mse"] == pytest.approx(np.mean((seg - level) ** 2), abs=1e-12)
        if level == 2.0:
            assert f"| dv | 2.0 | {seg.mean():.3f} | {seg.mean() - level:+.3f} |" in md


def test_markdown_true_mi_is_the_json_level(tmp_path):
    """A level of 1.25 nats was printed ``1.2`` in results.md (``:.1f``) while the JSON and CSV
    hold 1.25."""
    res = _diverging(tmp_path)
    md = open(res["files"]["markdown"]).read()
    assert "| dv | 1.25 |" in md and "| dv | 2.0 |" in md


def test_tables_from_the_saved_json(tmp_path):
    """The JSON holds a non-finite statistic as null: re-rendering the table from results.json
    (or family.json) crashed with ``TypeError: must be real number, not NoneType``."""
    res = _diverging(tmp_path / "one")
    saved = json.loads(open(res["files"]["json"]).read())
    assert mb.markdown_table(saved) == open(res["files"]["markdown"]).read()

    def bad_loss(scores, pos, neg):
        return scores.sum() * math.inf

    fam = mf.run_family(estimators=("infonce",), critics=("bilinear",), transforms=("gaussian",),
                        budget="quick", dim=3, batch_size=8, levels=(1,), steps_per_level=2,
                        progress=False)
    fam["summary"][0].update(mean=math.nan, bias=math.nan, variance=math.nan, mse=math.nan,
                             nonfinite=1)
    files = mf.write_family(fam, tmp_path / "fam")
    saved = json.loads(open(files["json"]).read())
    assert mf.family_table(saved) == open(files["markdown"]).read()


def test_run_family_takes_comma_separated_critics_and_data():
    """``estimators`` takes ``"a,b"``; ``critics="bilinear"`` and ``transforms="cubic"`` were
    iterated letter by letter (``transform ... got 'c'``)."""
    res = mf.run_family(estimators="infonce", critics="bilinear", transforms="cubic",
                        budget="quick", dim=3, batch_size=8, levels=(1,), steps_per_level=2,
                        progress=False)
    assert [(r["config"]["critic"], r["config"]["transform"]) for r in res["runs"]] == [
        ("bilinear", "cubic")]
    assert res["config"]["critics"] == ["bilinear"] and res["config"]["transforms"] == ["cubic"]


def test_upper_bound_keeps_its_conditional_critic_when_another_estimator_gets_one():
    """``estimator_critics={"tuba": ...}`` dropped CLUB's default Gaussian conditional: CLUB then
    read a bilinear critic's unnormalised scores as ``log q(y|x)``. CLUB's estimates must not
    depend on which critic another estimator was given (same seed: same data and init)."""
    kw = dict(critic="bilinear", dim=3, batch_size=8, levels=(1,), steps_per_level=3,
              progress=False)
    alone = mb.run(estimators=mb.family_estimators(("club",)), **kw)
    mixed = mb.run(estimators=mb.family_estimators(("tuba", "club")),
                   estimator_critics={"tuba": "separable"}, **kw)
    assert mixed["config"]["estimator_critics"] == {"tuba": "separable",
                                                    "club": "gaussian_conditional"}
    np.testing.assert_allclose(mixed["estimates"]["club"], alone["estimates"]["club"], rtol=1e-6)
