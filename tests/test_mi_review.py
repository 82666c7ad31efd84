"""MI-estimator review: the estimators of losses.bounds against NumPy brute force at scores far
from zero, the Gaussian conditional critic of the upper bounds in float32 against float64, MINE's
moving average over several steps with several positives per row, and the estimator registry's
metadata."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive.conditional import GaussianConditional, gaussian_log_density_matrix
from contrastive.pairs import diagonal_masks
from losses import bounds as LB
from losses import estimator_modules as EM
from losses.registry import ESTIMATORS


def _lme(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return float(m + np.log(np.mean(np.exp(v - m))))


# --------------------------------------------------------------------------- very negative scores


def _far_scores(k: int = 6, seed: int = 0) -> np.ndarray:
    """Scores around -1e35 (finite, far below the old -1e30 mask sentinel), distinct at the
    scale of float64."""
    rng = np.random.default_rng(seed)
    return -1e35 + rng.normal(size=(k, k)) * 1e34


def _numpy_far(S: np.ndarray, alpha_one: bool = False) -> dict[str, float]:
    k = S.shape[0]
    off = ~np.eye(k, dtype=bool)
    diag = np.diag(S)
    out = {
        "dv": float(diag.mean()) - _lme(S[off]),
        "smile_inf": float(diag.mean()) - _lme(S[off]),
        "l1out": float(np.mean([S[i, i] - _lme(S[off[:, i], i]) for i in range(k)])),
        "flo_none": float(np.mean([S[i, i] - _lme(S[i, off[i]]) for i in range(k)])),
    }
    # alpha = 1: InfoNCE on k - 1 candidates, averaged over the left-out negative (the marginal
    # term is exactly 1)
    vals = []
    for i in range(k):
        neg = [j for j in range(k) if j != i]
        for j in neg:
            cand = [i] + [c for c in neg if c != j]
            vals.append(S[i, i] - _lme(S[i, cand]))
    out["alpha1"] = float(np.mean(vals))  # S_ip - logmeanexp: log K + S_ip - logsumexp
    return out


def test_bounds_at_scores_far_below_the_mask_sentinel_match_numpy():
    """The masked log-mean-exps of losses.bounds filled masked entries with -1e30, so for
    finite scores below it (a distance critic, or a diverging one) the mask outweighed every
    real score: DV, SMILE, L1Out, FLO and alpha-InfoNCE were off by ~1e35 (the functional
    core's DV was right). Now the fill is the dtype's most negative number."""
    S = _far_scores()
    ref = _numpy_far(S)
    t = torch.tensor(S, requires_grad=True)
    p, q = diagonal_masks(S.shape[0])
    got = {
        "dv": LB.mine_bound(t, p, q),
        "smile_inf": LB.smile_bound(t, p, q, tau=math.inf),
        "l1out": LB.l1out_bound(t, p, q),
        "flo_none": LB.flo_bound(t, p, q),
        "alpha1": LB.interpolated_bound(t, p, q, alpha=1.0),
    }
    for name, value in got.items():
        assert float(value) == pytest.approx(ref[name], rel=1e-9, abs=1e-6), name
        (grad,) = torch.autograd.grad(value, t)
        assert bool(torch.isfinite(grad).all()), name
    # the per-anchor terms read the same masked log-mean-exps
    for name, fn in (("dv", LB.mine_bound), ("l1out", LB.l1out_bound)):
        assert float(fn(t, p, q, reduction="none").mean()) == pytest.approx(ref[name], rel=1e-9)


def test_mine_and_interpolated_at_far_scores_keep_finite_gradients():
    """MINE's corrected gradient (mean and per-anchor terms) and alpha-InfoNCE in between its
    ends at scores around -1e35: finite values equal to the float64 brute force, finite
    gradients."""
    S = _far_scores(5, seed=3)
    k = S.shape[0]
    off = ~np.eye(k, dtype=bool)
    t = torch.tensor(S, requires_grad=True)
    p, q = diagonal_masks(k)
    for reduction in ("mean", "none"):
        loss, new = LB.mine(t, p, q, torch.tensor(_lme(S[off]), dtype=torch.float64), 0.5,
                             reduction=reduction)
        value = loss.mean()
        assert float(value) == pytest.approx(-(np.diag(S).mean() - _lme(S[off])), rel=1e-9)
        assert float(new) == pytest.approx(_lme(S[off]), rel=1e-9)
        (grad,) = torch.autograd.grad(value, t)
        assert bool(torch.isfinite(grad).all())
        # the corrected gradient at avg' = Z: the softmax over the negatives, -1/k on P
        w = np.where(off, np.exp(S - S[off].max()), 0.0)
        expect = w / w.sum() - np.eye(k) / k
        np.testing.assert_allclose(grad.numpy(), expect, atol=1e-9)
    value = LB.interpolated_bound(t, p, q, alpha=0.5, log_baseline=-1e35)
    assert math.isfinite(float(value))
    (grad,) = torch.autograd.grad(value, t)
    assert bool(torch.isfinite(grad).all())


# --------------------------------------------------------------------------- Gaussian conditional


@pytest.mark.parametrize("log_var, shift", [(-8.0, 10.0), (-10.0, 0.0), (-4.0, 10.0)])
def test_gaussian_log_density_matrix_float32_does_not_cancel(log_var, shift):
    """L_ij was expanded as prec y^2 - 2 mean prec y + prec mean^2 in the input's dtype: in
    float32, for a sharp q (small variance) or data away from 0 (the cubic data), the terms
    cancel and the diagonal -- the positives every upper bound and the NLL read -- was wrong
    by up to 10 nats (log_var -10) or 1.2 nats (log_var -8, |y| ~ 10). Against the float64
    brute force (torch.distributions.Normal); the result keeps the input's dtype."""
    g = torch.Generator().manual_seed(0)
    n, d = 32, 20
    y = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    mean = y + torch.randn(n, d, generator=g, dtype=torch.float64) * math.exp(log_var / 2)
    lv = torch.full((n, d), log_var, dtype=torch.float64)
    mean32, lv32, y32 = mean.float(), lv.float(), y.float()
    brute = torch.distributions.Normal(mean32.double()[:, None, :],
                                       (lv32.double()[:, None, :] / 2).exp()
                                       ).log_prob(y32.double()[None]).sum(-1)
    got = gaussian_log_density_matrix(mean32, lv32, y32)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.diagonal().double().numpy(), brute.diagonal().numpy(),
                               atol=2e-3)
    np.testing.assert_allclose(got.double().numpy(), brute.numpy(), rtol=1e-5, atol=2e-3)


def test_gaussian_conditional_gradients_stay_in_float32_and_match_float64():
    """The module's output and its gradients (to x, y and the parameters) keep float32 and equal
    those of the same module in float64 (gradients through the float64 work)."""
    torch.manual_seed(0)
    q32 = GaussianConditional(4, hidden_dim=8, layers=1)
    q64 = GaussianConditional(4, hidden_dim=8, layers=1).double()
    q64.load_state_dict({k: v.double() for k, v in q32.state_dict().items()})
    x = torch.randn(6, 4, requires_grad=True)
    y = torch.randn(6, 4, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    out32, out64 = q32(x, y), q64(x64, y64)
    assert out32.dtype == torch.float32
    out32.sum().backward()
    out64.sum().backward()
    assert x.grad.dtype == torch.float32 and y.grad.dtype == torch.float32
    np.testing.assert_allclose(out32.detach().numpy(), out64.detach().numpy(), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(x.grad.numpy(), x64.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.grad.numpy(), y64.grad.numpy(), rtol=1e-4, atol=1e-4)
    for (name, p32), p64 in zip(q32.named_parameters(), q64.parameters()):
        assert p32.grad.dtype == torch.float32, name
        np.testing.assert_allclose(p32.grad.numpy(), p64.grad.numpy(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- MINE over steps


def test_mine_module_average_and_gradient_over_steps_with_label_masks():
    """Belghazi et al.'s moving average ``avg <- (1 - m) avg + m mean_Q e^S`` over four steps
    (started at the first batch's Z), with several positives per row; each step's gradient is
    ``-1/n_P`` on P and ``e^S / (n_Q avg')`` on Q, its value -I_DV."""
    torch.manual_seed(0)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    n = lab.numel()
    P = (lab[:, None] == lab[None, :]) & ~torch.eye(n, dtype=torch.bool)
    Q = lab[:, None] != lab[None, :]
    Pn, Qn = P.numpy(), Q.numpy()
    module = EM.MINE(momentum=0.1).double()
    avg = None
    for _ in range(4):
        S = (torch.randn(n, n, dtype=torch.float64) * 2).requires_grad_()
        loss = module.compute(S, P, Q)
        loss.backward()
        s = S.detach().numpy()
        z = float(np.exp(s[Qn]).mean())
        avg = z if avg is None else 0.9 * avg + 0.1 * z
        expect = np.zeros_like(s)
        expect[Pn] -= 1.0 / Pn.sum()
        expect[Qn] += np.exp(s[Qn]) / Qn.sum() / avg
        np.testing.assert_allclose(S.grad.numpy(), expect, rtol=1e-12, atol=1e-14)
        assert float(loss) == pytest.approx(-(s[Pn].mean() - math.log(z)), rel=1e-12)
        assert float(module.log_average) == pytest.approx(math.log(avg), rel=1e-12)


# --------------------------------------------------------------------------- registry metadata


def test_every_estimator_says_whether_it_is_a_lower_or_an_upper_bound():
    kinds = {name: ESTIMATORS.meta(name).get("kind") for name in ESTIMATORS.available()}
    assert set(kinds.values()) <= {"lower", "upper"}, kinds
    assert {"infonce", "nwj", "js", "dv", "tuba", "mine_ma", "smile", "alpha_infonce"} <= set(
        ESTIMATORS.available({"kind": "lower"}))
    assert ESTIMATORS.available({"kind": "upper"}) == ["club", "l1out"]
    assert ESTIMATORS.canonical("mine_corrected") == "mine_ma"  # as in the loss registry


def test_the_benchmark_records_the_critic_sizes_it_ran_with():
    """``config`` says what the critic was built with (Poole et al.'s default sizes with the
    caller's overrides over them), not only the overrides: a reader of results.json can tell a
    256-wide critic from a 64-wide one without the code at hand."""
    from contrastive.app.mi_benchmark import DEFAULT_CRITIC_KWARGS, run

    res = run(("infonce",), critic="separable", dim=2, batch_size=8, levels=(1.0,),
              steps_per_level=2, progress=False, critic_kwargs={"hidden_dim": 16})
    cfg = res["config"]
    assert cfg["critic_kwargs"] == {"hidden_dim": 16}
    assert cfg["critic_settings"] == {**DEFAULT_CRITIC_KWARGS["separable"], "hidden_dim": 16}
    assert cfg["critic_settings"]["layers"] == 2 and cfg["critic_settings"]["out_dim"] == 32
    from contrastive.critics import Bilinear

    res = run(("infonce",), critic=lambda d: Bilinear(d), dim=2, batch_size=8, levels=(1.0,),
              steps_per_level=1, progress=False)
    assert res["config"]["critic_settings"] is None
