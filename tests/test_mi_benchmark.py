"""Known-MI benchmark: closed forms (MI <-> rho, the optimal critic against Gaussian log densities),
every bound evaluated at the optimal critic lands on the true MI within sampling error, and a tiny
run writes its JSON/CSV/Markdown/PNG with estimates that move toward the truth."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from contrastive.app import mi_benchmark as mb
from contrastive.critics import Bilinear, Concat, Separable
from contrastive.pairs import diagonal_masks
from losses import functional as LF

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(mi, batch, dim=20, seed=0):
    rho = mb.rho_from_mi(mi, dim)
    g = torch.Generator().manual_seed(seed)
    x, y = mb.sample_gaussian(batch, dim, rho, generator=g, dtype=torch.float64)
    pos, neg = diagonal_masks(batch)
    return x, y, rho, mb.optimal_critic(x, y, rho), pos, neg


def _sampling_sd(scores):
    """Standard error of the diagonal mean, the dominant noise of every bound at the optimum."""
    return float(scores.diag().std() / math.sqrt(scores.shape[0]))


# --------------------------------------------------------------------------- closed forms


def test_mi_rho_known_values_and_inverse():
    assert mb.mi_from_rho(0.5, 1) == pytest.approx(-0.5 * math.log(0.75))
    assert mb.mi_from_rho(0.0, 20) == 0.0
    for dim in (1, 20, 128):
        for mi in (0.01, 2.0, 10.0):
            rho = mb.rho_from_mi(mi, dim)
            assert 0 <= rho < 1
            # 1 - rho^2 ~ exp(-2 mi / dim) loses digits as rho -> 1 (dim 1, 10 nats: 2e-9)
            assert mb.mi_from_rho(rho, dim) == pytest.approx(mi, rel=1e-7)
    with pytest.raises(ValueError, match="rho"):
        mb.mi_from_rho(1.0, 3)
    with pytest.raises(ValueError, match="mi"):
        mb.rho_from_mi(-1.0, 3)
    with pytest.raises(ValueError, match="dim"):
        mb.rho_from_mi(1.0, 0)


def test_sample_gaussian_correlation_and_determinism():
    g = torch.Generator().manual_seed(1)
    x, y = mb.sample_gaussian(20000, 3, 0.6, generator=g)
    assert x.shape == y.shape == (20000, 3) and x.dtype == torch.float32
    corr = np.corrcoef(x.numpy().T, y.numpy().T)
    np.testing.assert_allclose(np.diag(corr[:3, 3:]), 0.6, atol=0.02)
    np.testing.assert_allclose(y.var(0).numpy(), 1.0, atol=0.05)
    a = mb.sample_gaussian(5, 2, 0.3, generator=torch.Generator().manual_seed(7))
    b = mb.sample_gaussian(5, 2, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="batch_size"):
        mb.sample_gaussian(0, 2, 0.3)
    with pytest.raises(ValueError, match="rho"):
        mb.sample_gaussian(4, 2, -1.0)


def test_optimal_critic_is_the_gaussian_log_density_ratio():
    x, y, rho, scores, _, _ = _pairs(3.0, 16, dim=5)
    cond = Normal(rho * x[:, None, :], math.sqrt(1 - rho * rho))  # p(y_j | x_i) per pair
    ref = cond.log_prob(y[None, :, :]).sum(-1) - Normal(0.0, 1.0).log_prob(y).sum(-1)[None, :]
    torch.testing.assert_close(scores, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="same dimension"):
        mb.optimal_critic(x, y[:, :3], rho)


# --------------------------------------------------------------------------- bounds at the optimum


def test_nwj_at_optimal_critic_plus_one_is_the_true_mi():
    _, _, _, scores, pos, neg = _pairs(2.0, 2048)
    est = float(LF.nwj_bound(scores + 1.0, pos, neg))
    assert abs(est - 2.0) < 4 * _sampling_sd(scores)


@pytest.mark.parametrize("bound", ["js_bound", "dv_bound"])
def test_js_and_dv_at_optimal_log_ratio_are_the_true_mi(bound):
    _, _, _, scores, pos, neg = _pairs(2.0, 2048, seed=1)
    est = float(getattr(LF, bound)(scores, pos, neg))
    assert abs(est - 2.0) < 4 * _sampling_sd(scores)


def test_infonce_at_optimal_critic():
    # small MI, big K: just below the MI (its bias is -E log mean_j p(y_j|x_i)/p(y_j) ~ 0)
    _, _, _, scores, pos, neg = _pairs(0.5, 4096, seed=2)
    est = float(LF.infonce_bound(scores, pos, neg))
    assert est <= math.log(4096)
    assert 0.5 - 4 * _sampling_sd(scores) - 0.02 < est < 0.5 + 4 * _sampling_sd(scores)
    # large MI, small K: saturates just below log K, never above
    _, _, _, scores, pos, neg = _pairs(10.0, 64, seed=3)
    est = float(LF.infonce_bound(scores, pos, neg))
    assert math.log(64) - 0.1 < est <= math.log(64)


# --------------------------------------------------------------------------- wiring


def test_resolve_estimators():
    est = mb.resolve_estimators(("infonce", "NWJ"))
    assert list(est) == ["infonce", "nwj"]
    assert est["infonce"] == (LF.infonce, LF.infonce_bound)
    assert est["nwj"] == (LF.nwj, LF.nwj_bound)
    assert mb.resolve_estimators("dv") == {"dv": (LF.dv, LF.dv_bound)}
    custom = {"mine": (LF.dv, LF.dv_bound)}
    assert mb.resolve_estimators(custom) == custom
    with pytest.raises(ValueError, match="unknown estimator"):
        mb.resolve_estimators(("bogus",))
    with pytest.raises(TypeError, match="loss_fn, bound_fn"):
        mb.resolve_estimators({"x": LF.dv})
    with pytest.raises(ValueError, match="empty"):
        mb.resolve_estimators(())


def test_make_critic():
    x, y = torch.randn(7, 20), torch.randn(7, 20)
    sep = mb.make_critic("separable", 20)
    assert isinstance(sep, Separable) and sep(x, y).shape == (7, 7)
    assert sep.g[0].out_features == 256 and sep.g[-1].out_features == 32
    assert isinstance(mb.make_critic("concat", 20, hidden_dim=8), Concat)
    assert isinstance(mb.make_critic("bilinear", 20), Bilinear)
    assert isinstance(mb.make_critic(lambda d: Bilinear(d, init="random"), 20), Bilinear)
    with pytest.raises(ValueError, match="unknown critic"):
        mb.make_critic("nope", 20)
    with pytest.raises(TypeError, match="nn.Module"):
        mb.make_critic(lambda d: d, 20)


def test_ema():
    np.testing.assert_allclose(mb.ema([1.0, 1.0, 1.0]), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(mb.ema([0.0, 1.0, 1.0], 0.5), [0.0, 0.5, 0.75])
    np.testing.assert_allclose(mb.ema([math.nan, 2.0, math.inf, 4.0], 0.5), [math.nan, 2, 2, 3])


# --------------------------------------------------------------------------- a tiny run


def test_run_tiny_writes_files_and_learns(tmp_path):
    steps = 60
    res = mb.run(
        estimators=("infonce", "dv"),
        critic="separable",
        critic_kwargs={"hidden_dim": 64, "out_dim": 16, "layers": 1},
        dim=4,
        batch_size=32,
        levels=(2, 4),
        steps_per_level=steps,
        lr=3e-3,
        progress=False,
        output=tmp_path,
    )
    true = np.array(res["true_mi"])
    np.testing.assert_array_equal(true, [2.0] * steps + [4.0] * steps)
    assert res["log_batch_size"] == pytest.approx(math.log(32))
    for name in ("infonce", "dv"):
        e = np.array(res["estimates"][name])
        assert e.shape == (2 * steps,) and np.isfinite(e).all()
        # training moves the estimate from ~0 at init toward the truth on level 2
        assert e[steps - 10 : steps].mean() > e[:5].mean() + 0.3
        assert e[steps - 10 : steps].mean() < 2.0 + 0.5
    assert res["estimates"]["infonce"] != res["estimates"]["dv"]

    files = res["files"]
    data = json.loads(open(files["json"]).read())
    assert data["config"]["levels"] == [2.0, 4.0] and data["estimates"]["dv"][0] is not None
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * steps and set(rows[0]) == {"estimator", "step", "true_mi",
                                                            "estimate"}
    # the summary equals a recomputation from the CSV: last half of each level
    dv = np.array([float(r["estimate"]) for r in rows if r["estimator"] == "dv"])
    summary = {(r["estimator"], r["level"]): r for r in res["summary"]}
    seg = dv[steps + steps // 2 : 2 * steps]
    assert summary[("dv", 1)]["mean"] == pytest.approx(seg.mean())
    assert summary[("dv", 1)]["variance"] == pytest.approx(seg.var())
    assert summary[("dv", 1)]["bias"] == pytest.approx(seg.mean() - 4.0)
    md = open(files["markdown"]).read()
    assert ("| estimator | true MI (nats) | mean estimate (nats) | bias (nats) | variance (nats²) "
            "| MSE (nats²) |") in md
    assert md.count("\n| dv |") == 2
    with open(files["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_custom_estimator_and_nonfinite_steps_are_skipped():
    calls = []

    def bad_loss(scores, pos, neg):
        calls.append(1)
        return scores.sum() * math.inf

    res = mb.run(
        estimators={"broken": (bad_loss, LF.dv_bound)},
        critic="bilinear",
        dim=3,
        batch_size=8,
        levels=(1,),
        steps_per_level=5,
        progress=False,
    )
    assert len(calls) == 5 and res["skipped_steps"] == {"broken": 5}
    assert all(math.isnan(v) for v in res["estimates"]["broken"])
    assert math.isnan(res["summary"][0]["mean"]) and res["summary"][0]["nonfinite"] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 0}, "dim"),
        ({"batch_size": 1}, "batch_size"),
        ({"levels": ()}, "levels"),
        ({"levels": (2, -1)}, "levels"),
        ({"steps_per_level": 0}, "steps_per_level"),
        ({"lr": 0}, "lr"),
        ({"critic": "dot"}, "no trainable parameters"),
        ({"estimators": ("bogus",)}, "unknown estimator"),
    ],
)
def test_run_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mb.run(**{"steps_per_level": 1, "progress": False, **kwargs})


def test_run_config_records_data_and_per_estimator_critics():
    res = mb.run(estimators=("infonce",), critic="bilinear", dim=3, batch_size=8, levels=(1,),
                 steps_per_level=2, progress=False)
    assert res["config"]["transform"] is None and res["config"]["estimator_critics"] == {}
    res = mb.run(estimators=mb.family_estimators(("tuba", "l1out")), critic="bilinear", dim=3,
                 batch_size=8, levels=(1,), steps_per_level=2, progress=False,
                 estimator_critics={"l1out": mb.gaussian_conditional})
    assert res["config"]["estimator_critics"] == {"l1out": "gaussian_conditional"}
    assert np.isfinite(res["estimates"]["l1out"]).all()
