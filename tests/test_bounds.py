"""The estimators of losses.bounds against closed forms and brute force: at the analytic optimal
critic on correlated Gaussians every lower bound sits below the true MI (within its standard
error) and the upper bounds above; MINE's corrected gradient is the analytic expression; SMILE is
DV for large tau; alpha-InfoNCE is TUBA at alpha = 0 and leave-one-out InfoNCE at alpha = 1; the
Gaussian conditional critic is torch.distributions' log density; the module shells are called
like every loss and MINE's average is checkpointed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from contrastive.conditional import GaussianConditional, gaussian_log_density_matrix
from contrastive.critics import Bilinear
from contrastive.pairs import diagonal_masks
from contrastive.registry import Registry
from evaluation import known_mi as K
from losses import bounds as LB
from losses import estimator_modules as EM
from losses import functional as LF

D = 20


def masks_from_labels(labels):
    """Positives: same label, not the item itself; negatives: another label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool)
    return same & ~eye, ~same


def _batches(mi: float, batch: int, reps: int, seed: int = 0):
    rho = K.rho_from_mi(mi, D)
    g = torch.Generator().manual_seed(seed)
    for _ in range(reps):
        x, y = K.sample_gaussian(batch, D, rho, generator=g, dtype=torch.float64)
        yield x, y, rho


def _mean_se(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


LOWER = {
    "tuba": lambda s, p, q: LB.tuba_bound(s, p, q),
    "mine": lambda s, p, q: LB.mine_bound(s, p, q),
    "smile_inf": lambda s, p, q: LB.smile_bound(s, p, q, math.inf),
    "alpha_0": lambda s, p, q: LB.interpolated_bound(s, p, q, 0.0),
    "alpha_0.5": lambda s, p, q: LB.interpolated_bound(s, p, q, 0.5),
    "alpha_1": lambda s, p, q: LB.interpolated_bound(s, p, q, 1.0),
    "flo": lambda s, p, q: LB.flo_bound(s, p, q, -s.diag()),  # u* = -S* at the log ratio
}
#: tight at the log density ratio (the rest are below it by their own bias)
TIGHT = {"tuba", "mine", "smile_inf", "alpha_0", "flo"}


@pytest.fixture(scope="module")
def at_optimum():
    """Estimates of every bound over 12 independent batches of 128 at MI 2 and 6 nats."""
    out = {}
    for mi in (2.0, 6.0):
        vals = {k: [] for k in [*LOWER, "l1out", "club", "smile_5"]}
        for x, y, rho in _batches(mi, 128, 12, seed=int(mi)):
            s = K.optimal_critic(x, y, rho)
            dens = K.conditional_log_density(x, y, rho)
            p, q = diagonal_masks(128)
            for name, fn in LOWER.items():
                vals[name].append(float(fn(s, p, q)))
            vals["smile_5"].append(float(LB.smile_bound(s, p, q, 5.0)))
            vals["l1out"].append(float(LB.l1out_bound(dens, p, q)))
            vals["club"].append(float(LB.club_bound(dens, p, q)))
        out[mi] = {k: _mean_se(v) for k, v in vals.items()}
        out[mi]["rho"] = K.rho_from_mi(mi, D)
    return out


@pytest.mark.parametrize("mi", [2.0, 6.0])
@pytest.mark.parametrize("name", list(LOWER))
def test_lower_bounds_below_true_mi_at_optimal_critic(at_optimum, mi, name):
    mean, se = at_optimum[mi][name]
    assert mean <= mi + 3 * se
    if name in TIGHT:
        assert mean >= mi - 3 * se
    if name == "alpha_1":  # InfoNCE on 127 candidates: capped at log 127
        assert mean <= math.log(127) and mean < mi - 0.5 * (mi > 5)


def test_alpha_infonce_moves_from_tuba_to_infonce(at_optimum):
    r = at_optimum[6.0]
    assert r["alpha_1"][0] < r["alpha_0.5"][0] < r["alpha_0"][0]
    # and the variance falls with alpha: the spread over batches
    assert r["alpha_1"][1] < r["alpha_0"][1]


@pytest.mark.parametrize("mi", [2.0, 6.0])
def test_upper_bounds_above_true_mi_at_true_conditional(at_optimum, mi):
    mean, se = at_optimum[mi]["l1out"]
    assert mean >= mi - 3 * se
    mean, se = at_optimum[mi]["club"]
    closed = K.club_at_truth(at_optimum[mi]["rho"], D)
    assert abs(mean - closed) < 4 * se + 0.05 * closed
    assert closed > mi and mean > mi + 3 * se


def test_smile_clipping_biases_upward_at_high_mi(at_optimum):
    """Song & Ermon: the clip bounds the variance at the price of a bias that grows with MI."""
    mean, se = at_optimum[2.0]["smile_5"]
    assert abs(mean - 2.0) < 3 * se + 0.05
    mean, se = at_optimum[6.0]["smile_5"]
    assert mean > 6.0 + 3 * se


# --------------------------------------------------------------------------- exact identities


def _small(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, n, generator=g, dtype=dtype) * 2.0
    p, q = diagonal_masks(n)
    return s, p, q


def test_tuba_baselines_and_nwj():
    s, p, q = _small()
    torch.testing.assert_close(LB.tuba_bound(s, p, q, 1.0), LF.nwj_bound(s, p, q))
    b = torch.linspace(-1, 1, 6, dtype=torch.float64)
    # a baseline is a shift of the critic: per anchor (rows) and per candidate (columns)
    torch.testing.assert_close(LB.tuba_bound(s, p, q, b), LB.tuba_bound(s - b[:, None], p, q))
    torch.testing.assert_close(LB.tuba_bound(s, p, q, b[None, :]),
                               LB.tuba_bound(s - b[None, :], p, q))
    brute = 1 + np.mean([s[i, i] - b[i] for i in range(6)]) - np.mean(
        [math.exp(s[i, j] - b[i]) for i in range(6) for j in range(6) if i != j])
    assert float(LB.tuba_bound(s, p, q, b)) == pytest.approx(float(brute), rel=1e-12)
    assert float(LB.tuba(s, p, q)) == -float(LB.tuba_bound(s, p, q))
    with pytest.raises(ValueError, match="log_baseline"):
        LB.tuba_bound(s, p, q, torch.zeros(2, 3))


def test_mine_gradient_is_the_moving_average_expression():
    s, p, q = _small(5, seed=3)
    s.requires_grad_(True)
    old, m = torch.tensor(0.7, dtype=torch.float64), 0.1
    loss, new = LB.mine(s, p, q, old.log(), m)
    loss.backward()
    z = float(torch.exp(s.detach())[q].mean())
    avg = (1 - m) * 0.7 + m * z
    assert float(new) == pytest.approx(math.log(avg), rel=1e-12)
    expect = -p.double() / int(p.sum()) + q.double() * torch.exp(s.detach()) / (int(q.sum()) * avg)
    torch.testing.assert_close(s.grad, expect, rtol=1e-12, atol=1e-14)
    # the value is the DV bound; momentum 1 (or a first call) is DV's own gradient
    assert float(loss.detach()) == pytest.approx(-float(LF.dv_bound(s.detach(), p, q)), rel=1e-12)
    for kwargs in ({"momentum": 1.0, "log_average": old.log()}, {"log_average": None},
                   {"log_average": torch.tensor(math.nan)}):
        s1 = s.detach().clone().requires_grad_(True)
        LB.mine(s1, p, q, **kwargs)[0].backward()
        s2 = s.detach().clone().requires_grad_(True)
        LF.dv(s2, p, q).backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-14)


def test_smile_is_dv_for_large_tau_and_trains_by_js():
    s, p, q = _small(7, seed=4)
    torch.testing.assert_close(LB.smile_bound(s, p, q, 1e6), LF.dv_bound(s, p, q))
    torch.testing.assert_close(LB.smile_bound(s, p, q, math.inf), LB.mine_bound(s, p, q))
    clipped = float(LB.smile_bound(s, p, q, 1.0))
    brute = float(s.diag().mean()) - math.log(float(torch.exp(s.clamp(-1, 1))[q].mean()))
    assert clipped == pytest.approx(brute, rel=1e-12)
    a = s.clone().requires_grad_(True)
    loss = LB.smile(a, p, q, 1.0)
    assert float(loss.detach()) == pytest.approx(-clipped, rel=1e-12)
    loss.backward()
    b = s.clone().requires_grad_(True)
    LF.js(b, p, q).backward()  # Song & Ermon train SMILE's critic with the JS loss
    torch.testing.assert_close(a.grad, b.grad)
    c = s.clone().requires_grad_(True)
    LB.smile(c, p, q, 1e6, gradient="dv").backward()
    d = s.clone().requires_grad_(True)
    LF.dv(d, p, q).backward()
    torch.testing.assert_close(c.grad, d.grad)


def _alpha_brute(s, p, q, alpha, b):
    """The docstring's formula with explicit loops over (i, p) in P and left-out j in Q_i."""
    s = s.tolist()
    n = len(s)
    joint, marg_num, marg_cnt = [], 0.0, 0
    for i in range(n):
        neg = [k for k in range(n) if q[i, k]]
        if not neg:
            continue
        dq = alpha * np.mean([math.exp(s[i][k]) for k in neg]) + (1 - alpha) * math.exp(b[i])
        for k in neg:
            marg_num += math.exp(s[i][k]) / dq
            marg_cnt += 1
        for pp in (k for k in range(n) if p[i, k]):
            terms = []
            for j in neg:
                members = [pp] + [k for k in neg if k != j]
                m = np.mean([math.exp(s[i][k]) for k in members])
                terms.append(s[i][pp] - math.log(alpha * m + (1 - alpha) * math.exp(b[i])))
            joint.append(np.mean(terms))
    return 1 + np.mean(joint) - marg_num / marg_cnt


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_infonce_brute_force_paired_and_labels(alpha):
    s, p, q = _small(6, seed=5)
    b = torch.linspace(-0.5, 0.8, 6, dtype=torch.float64)
    got = float(LB.interpolated_bound(s, p, q, alpha, b))
    assert got == pytest.approx(_alpha_brute(s, p, q, alpha, b.tolist()), rel=1e-10)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    lp, lq = masks_from_labels(labels)
    got = float(LB.interpolated_bound(s, lp, lq, alpha, b))
    assert got == pytest.approx(_alpha_brute(s, lp, lq, alpha, b.tolist()), rel=1e-10)


def test_alpha_infonce_ends():
    s, p, q = _small(8, seed=6)
    # alpha = 0: TUBA with the per-anchor baseline, NWJ at b = 1
    torch.testing.assert_close(LB.interpolated_bound(s, p, q, 0.0, 1.0), LF.nwj_bound(s, p, q))
    b = torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(LB.interpolated_bound(s, p, q, 0.0, b), LB.tuba_bound(s, p, q, b))
    # alpha = 1: InfoNCE of the batch without anchor j and candidate j, averaged over j
    keep = [torch.arange(8) != j for j in range(8)]
    loo = torch.stack([LF.infonce_bound(s[k][:, k], *diagonal_masks(7)) for k in keep]).mean()
    torch.testing.assert_close(LB.interpolated_bound(s, p, q, 1.0, 123.0), loo)
    # large scores stay finite (no cancellation in the leave-one-out sums)
    big = s * 40
    v = LB.interpolated_bound(big.requires_grad_(True), p, q, 0.5)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(big.grad).all()


def test_flo():
    s, p, q = _small(6, seed=7)
    inner = torch.logsumexp(s.masked_fill(p, -math.inf), 1) - math.log(5) - s.diag()
    u = torch.randn(6, dtype=torch.float64)
    brute = (1 - u - torch.exp(inner - u)).mean()
    torch.testing.assert_close(LB.flo_bound(s, p, q, u), brute)
    torch.testing.assert_close(LB.flo_bound(s, p, q, torch.diag(u)), brute)
    # the optimal shadow gives -mean inner (also what shadow=None plugs in), and is a maximum
    torch.testing.assert_close(LB.flo_bound(s, p, q, inner), -inner.mean())
    torch.testing.assert_close(LB.flo_bound(s, p, q), -inner.mean())
    uu = inner.clone().requires_grad_(True)
    LB.flo_bound(s, p, q, uu).backward()
    torch.testing.assert_close(uu.grad, torch.zeros(6, dtype=torch.float64))
    assert float(LB.flo(s, p, q, u)) == -float(brute)


def test_upper_bounds_brute_force():
    s, p, q = _small(6, seed=8)
    n = 6
    l1 = np.mean([s[i, i] - math.log(np.mean([math.exp(s[k, i]) for k in range(n) if k != i]))
                  for i in range(n)])
    assert float(LB.l1out_bound(s, p, q)) == pytest.approx(float(l1), rel=1e-12)
    club = float(s.diag().mean()) - float(s[q].mean())
    assert float(LB.club_bound(s, p, q)) == pytest.approx(club, rel=1e-12)
    assert float(LB.conditional_nll(s, p, q)) == pytest.approx(-float(s.diag().mean()))


def test_errors_name_the_argument():
    s, p, q = _small(4)
    with pytest.raises(ValueError, match="no positive"):
        LB.tuba_bound(s, torch.zeros_like(p), q)
    with pytest.raises(ValueError, match="alpha"):
        LB.interpolated_bound(s, p, q, 1.5)
    with pytest.raises(ValueError, match="tau"):
        LB.smile_bound(s, p, q, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        LB.mine(s, p, q, momentum=0.0)
    with pytest.raises(ValueError, match="shadow"):
        LB.flo_bound(s, p, q, torch.zeros(3))


# --------------------------------------------------------------------------- critics and data


def test_gaussian_conditional_is_the_normal_log_density():
    torch.manual_seed(0)
    crit = GaussianConditional(3, 2, hidden_dim=8, layers=1).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    mean, log_var = crit.moments(x)
    ref = Normal(mean[:, None, :], (0.5 * log_var).exp()[:, None, :]).log_prob(y[None]).sum(-1)
    torch.testing.assert_close(crit(x, y), ref)
    torch.testing.assert_close(gaussian_log_density_matrix(mean, log_var, y), ref)
    assert float(log_var.detach().abs().max()) <= crit.max_log_var


def test_known_mi_conditional_cubic_and_club_closed_form():
    x, y, rho = next(_batches(3.0, 9, 1))
    ref = Normal(rho * x[:, None, :], math.sqrt(1 - rho * rho)).log_prob(y[None]).sum(-1)
    torch.testing.assert_close(K.conditional_log_density(x, y, rho), ref)
    torch.testing.assert_close(K.conditional_log_density(x, y, rho) - K.optimal_critic(x, y, rho),
                               Normal(0.0, 1.0).log_prob(y).sum(-1)[None, :].expand(9, 9))
    torch.testing.assert_close(K.cubic(y), y ** 3)
    assert K.club_at_truth(0.0, 5) == 0.0
    # closed form against a large Monte Carlo average
    g = torch.Generator().manual_seed(0)
    x, y = K.sample_gaussian(2000, 2, 0.8, generator=g, dtype=torch.float64)
    dens = K.conditional_log_density(x, y, 0.8)
    p, q = diagonal_masks(2000)
    assert float(LB.club_bound(dens, p, q)) == pytest.approx(K.club_at_truth(0.8, 2), rel=0.05)


# --------------------------------------------------------------------------- module shells


def test_modules_are_their_functions_on_the_critic_scores():
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    crit = Bilinear(4, init="random")
    s = crit(x, y)
    p, q = diagonal_masks(8)
    cases = [
        (EM.TUBA(critic=crit, log_baseline=0.5), LB.tuba(s, p, q, 0.5)),
        (EM.SMILE(critic=crit, tau=1.0), LB.smile(s, p, q, 1.0)),
        (EM.AlphaInfoNCE(critic=crit, alpha=0.2), LB.interpolated(s, p, q, 0.2)),
        (EM.MINE(critic=crit), -LF.dv_bound(s, p, q)),
    ]
    for module, expect in cases:
        torch.testing.assert_close(module(x, ref_emb=y, paired=True), expect)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    lp, lq = masks_from_labels(labels)
    torch.testing.assert_close(EM.TUBA(critic=crit)(x, labels), LB.tuba(crit(x, x), lp, lq))
    with pytest.raises(ValueError, match="reduction"):  # "none" / "sum": test_estimator_losses
        EM.TUBA(reduction="median")


def test_mine_module_average_is_state_and_checkpointed():
    torch.manual_seed(2)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    m = EM.MINE(critic=Bilinear(4, init="random"), momentum=0.5)
    assert "log_average" in m.state_dict() and math.isnan(float(m.log_average))
    m(x, ref_emb=y, paired=True)
    first = float(m.log_average)
    s = m.critic(x, y).detach()
    p, q = diagonal_masks(8)
    assert first == pytest.approx(float(torch.exp(s)[q].mean().log()), rel=1e-6)
    m(x * 2, ref_emb=y, paired=True)
    z2 = float(torch.exp(m.critic(x * 2, y).detach())[q].mean())
    assert float(m.log_average) == pytest.approx(math.log(0.5 * math.exp(first) + 0.5 * z2),
                                                 rel=1e-6)
    restored = EM.MINE(critic=Bilinear(4), momentum=0.5)
    restored.load_state_dict(m.state_dict())
    assert float(restored.log_average) == float(m.log_average)
    with torch.no_grad():  # a readout does not move the average
        m(x, ref_emb=y, paired=True)
    assert float(m.log_average) == float(restored.log_average)


def test_registration_in_a_fresh_registry():
    reg: Registry = Registry("loss")
    meta = {"family": "mi", "supervision": ("labels", "views"), "critic": True,
            "critic_replaces": ("temperature",),
            "search_space": {"alpha": {"low": 0.0, "high": 1.0, "log": False}}}
    reg.register("alpha_infonce", EM.AlphaInfoNCE, aliases=("interpolated",),
                 defaults={"temperature": 0.1, "alpha": 0.5}, meta=meta)
    loss = reg.create("interpolated")
    assert isinstance(loss, EM.AlphaInfoNCE) and loss.alpha == 0.5
    assert reg.available({"family": "mi"}) == ["alpha_infonce"]
    est: Registry = Registry("MI estimator")
    est.register("club", lambda: (LB.conditional_nll, LB.club_bound),
                 meta={"critic": "conditional", "kind": "upper"})
    loss_fn, bound_fn = est.get("club").factory()
    assert bound_fn is LB.club_bound and est.meta("club")["kind"] == "upper"
