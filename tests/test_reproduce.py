"""Tests of the Tschannen et al. (ICLR 2020) reproduction: flows, data, samplers, encoders, the
bound readouts, and every experiment end to end on a tiny budget."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.datasets import load_digits

from contrastive.app.reproduce import EXPERIMENTS, run
from contrastive.app.reproduce.data import (
    MARGINAL_COV,
    NEGATIVE_PAIR_COV,
    TRUE_MI,
    gaussian_kl,
    gaussian_mi,
    load_halves,
    sample_iid,
    sample_noniid,
    split_halves,
)
from contrastive.app.reproduce.encoders import ConvEncoder, conv_out_size, mlp_encoder
from contrastive.app.reproduce.experiments import estimate, make_config, summarise
from contrastive.app.reproduce.flows import Flow
from contrastive.app.reproduce.paper_report import verdict, write_report

# --------------------------------------------------------------------------- flows


def _scrambled_flow(affine: bool, dtype=torch.float64, seed=0, scale: float = 0.3) -> Flow:
    """A flow far from the identity (random coupling weights perturbed by ``scale``)."""
    torch.manual_seed(seed)
    flow = Flow(6, couplings=5, hidden=16, layers=2, affine=affine, init_std=0.5, seed=seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.to(dtype)


@pytest.mark.parametrize("affine", [False, True])
def test_flow_inverts_float64(affine):
    flow = _scrambled_flow(affine)
    x = torch.randn(200, 6, dtype=torch.float64) * 2
    y = flow(x)
    assert (y - x).abs().max() > 0.1  # not the identity
    assert torch.allclose(flow.inverse(y), x, atol=1e-10, rtol=0)
    z = torch.randn(50, 6, dtype=torch.float64)
    assert torch.allclose(flow(flow.inverse(z)), z, atol=1e-10, rtol=0)


@pytest.mark.parametrize("affine", [False, True])
def test_flow_inverts_float32_to_1e5(affine):
    # pixel-like inputs, a flow moved well away from the identity (outputs change by O(1));
    # float32 rounding grows with the intermediate magnitudes, so the heavily scrambled flows
    # of the float64 test are not used here
    flow = _scrambled_flow(affine, torch.float32, scale=0.0)
    x = torch.rand(500, 6)
    y = flow(x)
    assert (y - x[:, :]).abs().max() > 0.1
    assert (flow.inverse(y) - x).abs().max() < 1e-5


@pytest.mark.parametrize("affine", [False, True])
def test_flow_logdet_matches_autograd_jacobian(affine):
    flow = _scrambled_flow(affine)
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = flow.forward_and_logdet(x)
    assert torch.isfinite(logdet).all()
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], x[i])
        sign, ref = torch.linalg.slogdet(jac)
        assert sign != 0  # non-singular: a local bijection
        assert float(logdet[i]) == pytest.approx(float(ref), abs=1e-9)
        if not affine:
            assert float(ref) == pytest.approx(0.0, abs=1e-9)  # volume preserving


def test_flow_is_near_identity_at_init_and_permutations_are_fixed():
    flow = Flow(8, couplings=3, hidden=8, init_std=1e-4, seed=3)
    x = torch.randn(10, 8)
    # with the MLP outputs ~1e-4 the flow is the composed permutation
    perm = torch.arange(8)
    for p in flow.perms:
        perm = perm[p]
    assert torch.allclose(flow(x), x[:, perm], atol=1e-2)
    assert torch.equal(Flow(8, couplings=3, hidden=8, seed=3).perms, flow.perms)
    for p, ip in zip(flow.perms, flow.inverse_perms):
        assert sorted(p.tolist()) == list(range(8))
        assert torch.equal(p[ip], torch.arange(8))


def test_flow_rejects_bad_shapes():
    flow = Flow(8, couplings=2, hidden=4)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        flow(torch.randn(3, 7))
    with pytest.raises(ValueError, match="dim >= 2"):
        Flow(1, couplings=2)


# --------------------------------------------------------------------------- data


def test_digits_halves_rebuild_the_images():
    data = load_halves("digits")
    assert data.x_train.shape[1] == data.y_train.shape[1] == 32 and data.half_shape == (4, 8)
    assert data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert set(data.labels_test.tolist()) == set(range(10))
    # every (top, bottom) pair is one image of scikit-learn's digits, scaled to [0, 1]
    ref = {tuple(np.round(im.ravel() / 16.0, 6)) for im in load_digits().images}
    rebuilt = torch.cat([data.x_test, data.y_test], 1).numpy()
    assert all(tuple(np.round(r, 6)) in ref for r in rebuilt[:50])
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0


def test_split_halves_and_errors():
    img = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    top, bottom = split_halves(img)
    assert torch.equal(top, img[:, :2].reshape(2, 6))
    assert torch.equal(bottom, img[:, 2:].reshape(2, 6))
    with pytest.raises(ValueError, match="even H"):
        split_halves(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="digits' or 'mnist"):
        load_halves("cifar")
    with pytest.raises(ValueError, match="data_dir"):
        load_halves("mnist")


def _write_idx(path, array: np.ndarray, magic: int):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for d in array.shape:
            fh.write(struct.pack(">I", d))
        fh.write(array.astype(np.uint8).tobytes())


def test_mnist_loader_reads_a_local_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), 2049)
    data = load_halves("mnist", tmp_path)
    assert data.x_train.shape == (6, 392) and data.y_test.shape == (4, 392)
    assert data.half_shape == (14, 28)
    assert float(data.x_train.max()) <= 1.0
    with pytest.raises(ValueError, match="MNIST not found"):
        load_halves("mnist", tmp_path / "nowhere")


# --------------------------------------------------------------------------- Gaussians


def test_true_mi_closed_form():
    assert TRUE_MI == pytest.approx(-0.5 * math.log(1 - 0.2**2), rel=1e-12)
    assert TRUE_MI == pytest.approx(0.0204, abs=5e-5)
    assert gaussian_mi([[1.0, 0.0], [0.0, 1.0]]) == 0.0


def test_gaussian_kl_against_monte_carlo():
    rng = np.random.default_rng(0)
    p = multivariate_normal(mean=[0, 0], cov=MARGINAL_COV)
    q = multivariate_normal(mean=[0, 0], cov=NEGATIVE_PAIR_COV)
    s = p.rvs(400_000, random_state=rng)
    mc = float(np.mean(p.logpdf(s) - q.logpdf(s)))
    assert gaussian_kl(MARGINAL_COV, NEGATIVE_PAIR_COV) == pytest.approx(mc, abs=3e-3)
    assert gaussian_kl(MARGINAL_COV, MARGINAL_COV) == pytest.approx(0.0, abs=1e-12)


def test_noniid_sampler_covariances():
    gen = torch.Generator().manual_seed(0)
    b = sample_noniid(20_000, 8, gen, dtype=torch.float64).numpy()  # [batches, 8, 2]
    assert b.shape == (20_000, 8, 2)
    # marginal of one pair: N(0, [[2, 0.4], [0.4, 2]])
    pairs = b.reshape(-1, 2)
    np.testing.assert_allclose(np.cov(pairs.T), MARGINAL_COV, atol=0.05)
    np.testing.assert_allclose(pairs.mean(0), [0, 0], atol=0.03)
    # within a batch, different pairs share Z: Cov(X_i, X_j) = Cov(Y_i, Y_j) = 1,
    # Cov(X_i, Y_j) = -0.5 for i != j; the same pair: Cov(X_i, Y_i) = 0.4
    x0, y0, x1, y1 = b[:, 0, 0], b[:, 0, 1], b[:, 1, 0], b[:, 1, 1]
    assert np.cov(x0, x1)[0, 1] == pytest.approx(1.0, abs=0.06)
    assert np.cov(y0, y1)[0, 1] == pytest.approx(1.0, abs=0.06)
    assert np.cov(x0, y1)[0, 1] == pytest.approx(-0.5, abs=0.06)
    assert np.cov(x0, y0)[0, 1] == pytest.approx(0.4, abs=0.06)
    # the batch mean carries Z: its variance is Var(Z) + Var(e)/B = 1 + 1/8
    assert b[:, :, 0].mean(1).var() == pytest.approx(1.125, abs=0.05)


def test_iid_sampler_has_no_within_batch_correlation():
    gen = torch.Generator().manual_seed(1)
    b = sample_iid(20_000, 8, gen, dtype=torch.float64).numpy()
    np.testing.assert_allclose(np.cov(b.reshape(-1, 2).T), MARGINAL_COV, atol=0.05)
    assert np.cov(b[:, 0, 0], b[:, 1, 1])[0, 1] == pytest.approx(0.0, abs=0.06)
    assert np.cov(b[:, 0, 0], b[:, 1, 0])[0, 1] == pytest.approx(0.0, abs=0.06)


# --------------------------------------------------------------------------- encoders, bounds


@pytest.mark.parametrize("half", [(4, 8), (14, 28)])
def test_conv_encoder_shapes(half):
    enc = ConvEncoder(half)
    out = enc(torch.randn(5, half[0] * half[1]))
    assert out.shape == (5, 100)
    # our size formula agrees with torch's convolution arithmetic
    conv = torch.nn.Conv2d(1, 1, 5, stride=2, padding=2)
    h = conv(torch.zeros(1, 1, *half))
    assert tuple(h.shape[2:]) == (conv_out_size(half[0]), conv_out_size(half[1]))
    with pytest.raises(ValueError, match="flattened halves"):
        enc(torch.randn(5, 7))
    assert mlp_encoder(32)(torch.randn(3, 32)).shape == (3, 100)


def test_estimate_matches_numpy_formulas():
    torch.manual_seed(0)
    s = torch.randn(7, 7, dtype=torch.float64) * 2
    a = s.numpy()
    lse = np.log(np.exp(a).sum(1))
    nce = math.log(7) + np.mean(np.diag(a) - lse)
    off = a[~np.eye(7, dtype=bool)]
    nwj = np.mean(np.diag(a)) - np.exp(-1) * np.mean(np.exp(off))
    assert float(estimate(s, "infonce")) == pytest.approx(nce, abs=1e-10)
    assert float(estimate(s, "nce")) == pytest.approx(nce, abs=1e-10)  # the registry's alias
    assert float(estimate(s, "nwj")) == pytest.approx(nwj, abs=1e-10)
    with pytest.raises(ValueError, match="estimator"):
        estimate(s, "foo")


def test_summarise_against_numpy():
    rows = [{"k": "a", "m": 1.0}, {"k": "a", "m": 3.0}, {"k": "b", "m": 5.0}]
    out = {r["k"]: r for r in summarise(rows, ["k"], ["m"])}
    assert out["a"]["m_mean"] == 2.0 and out["a"]["m_std"] == pytest.approx(np.std([1, 3], ddof=1))
    assert out["b"]["n"] == 1 and out["b"]["m_std"] is None  # one value: no spread was measured


def test_config_overrides_and_errors():
    cfg = make_config("bijective", False, 10, {"couplings": 2})
    assert cfg.steps == 10 and cfg.couplings == 2 and cfg.every() == 1
    paper = make_config("bijective", True, None, {})
    assert (paper.couplings, paper.hidden, paper.steps, paper.lr) == (30, 512, 21000, 1e-4)
    with pytest.raises(ValueError, match="unknown size"):
        make_config("bijective", False, None, {"warmup": 3})
    with pytest.raises(ValueError, match="unknown experiment"):
        run("nope", "/tmp/never")


# --------------------------------------------------------------------------- end to end

TINY = dict(steps=3, evals=1, n_train=160, n_test=96, eval_batches=2, batch_size=32)
TINY_SIZES = {
    "bijective": dict(TINY, couplings=2, hidden=8),
    "adversarial": dict(TINY, couplings=2, hidden=8, warmup=3, inner_steps=2),
    "critics": dict(TINY, encoder_hidden=16, out_dim=8, separable_hidden=8, concat_hidden=8),
    "encoders": dict(TINY, out_dim=8, targets=(0.5,)),
    "noniid": dict(steps=3, evals=1, eval_batches=2, batch_size=16),
}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("reproduce")
    res = {}
    for name in EXPERIMENTS:
        sizes = dict(TINY_SIZES[name])
        steps = sizes.pop("steps")
        res[name] = run(name, out, steps=steps, seeds=(0, 1), progress=False, **sizes)
    return out, res


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_runs_end_to_end(tiny_results, name):
    out, results = tiny_results
    res = results[name]
    for suffix in (".json", ".csv", "_runs.csv", "_curves.csv", ".png"):
        path = out / f"{name}{suffix}"
        assert path.exists() and path.stat().st_size > 0, path
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["experiment"] == name and saved["seeds"] == [0, 1]
    assert saved["wall_time_s"] > 0
    assert len(saved["summary"]) * 2 == len(saved["runs"])  # two seeds per variant
    assert all(r["n"] == 2 for r in saved["summary"])
    assert res["summary"] == saved["summary"]
    word, why = verdict(name, saved)
    assert word in ("reproduces", "partly", "does not reproduce") and "rule" in why


def test_tiny_results_are_sane(tiny_results, one_thread):
    _, r = tiny_results
    for run_ in r["bijective"]["runs"]:
        assert run_["max_recon_error"] < 1e-5  # the flow stays invertible
        assert 0.0 <= run_["accuracy"] <= 1.0
    raw = r["bijective"]["baseline"]["raw_pixels_accuracy"]
    assert len(raw["values"]) == 2 and 0.1 < raw["mean"] <= 1.0
    assert r["adversarial"]["runs"][0]["recon_error_f64"] < 1e-9
    assert {(x["critic"], x["estimator"]) for x in r["critics"]["summary"]} == {
        (c, e) for c in ("bilinear", "separable", "concat") for e in ("infonce", "nwj")
    }
    assert r["noniid"]["baseline"]["true_mi"] == pytest.approx(TRUE_MI)
    # a whole noniid run is deterministic given the seed
    again = run("noniid", r["noniid"]["files"]["json"].rsplit("/", 1)[0] + "/again",
                steps=3, seeds=(0, 1), progress=False, evals=1, eval_batches=2, batch_size=16)
    assert again["runs"] == r["noniid"]["runs"]


def test_report_is_written(tiny_results, tmp_path):
    out, _ = tiny_results
    doc = write_report(out, tmp_path / "docs" / "reproduction.md", tmp_path / "docs" / "figures",
                       notes={"bijective": "NOTE-XYZ", "_overall": "OVERALL-XYZ"})
    text = doc.read_text()
    assert "**Notes.** NOTE-XYZ" in text and "OVERALL-XYZ" in text
    for name in EXPERIMENTS:
        assert f"## {name}" in text
        assert (tmp_path / "docs" / "figures" / f"reproduce_{name}.png").exists()
        assert f"](figures/reproduce_{name}.png)" in text
    assert "**The paper.**" in text and "Verdict" in text
    with pytest.raises(ValueError, match="no experiment results"):
        write_report(tmp_path / "empty", tmp_path / "x.md", tmp_path / "f")


# --------------------------------------------------------------------------- verdict rules
# Hand-made results on each side of every rule: each experiment's verdict must reach all three
# words, each for the reason its rule states (the tiny runs above can land on any of them).

SEEDS = (0, 1)


def _bijective(gain_nce, gain_nwj, bound_rise=0.5):
    runs = [dict(estimator=est, seed=s, raw_accuracy=0.8, accuracy=0.8 + g[s],
                 max_accuracy=0.8 + g[s], bound=1.0 + bound_rise, initial_bound=1.0,
                 max_recon_error=1e-6)
            for est, g in (("nce", gain_nce), ("nwj", gain_nwj)) for s in SEEDS]
    return {"config": {"estimators": ["nce", "nwj"]}, "runs": runs}


def _adversarial(gaps, min_gaps=None):
    min_gaps = gaps if min_gaps is None else min_gaps
    runs = [dict(seed=s, raw_accuracy=0.8, accuracy=0.8 - g, min_accuracy=0.8 - m,
                 max_recon_error=1e-6, recon_error_f64=1e-12)
            for s, g, m in zip(SEEDS, gaps, min_gaps)]
    return {"runs": runs}


def _critics(bounds, accs):
    """``bounds`` / ``accs``: critic -> NWJ value; NCE rows are all equal."""
    rows = []
    for est in ("nce", "nwj"):
        for c in ("bilinear", "separable", "concat"):
            b, a = (bounds[c], accs[c]) if est == "nwj" else (1.0, 0.5)
            rows.append(dict(estimator=est, critic=c, bound_mean=b, accuracy_mean=a,
                             train_bound_mean=b))
    return {"config": {"estimators": ["nce", "nwj"]}, "summary": rows}


def _encoders(bound_conv, bound_mlp, diffs):
    runs = []
    for s, d in zip(SEEDS, diffs):
        runs.append(dict(estimator="nce", target=2.0, encoder="conv", seed=s,
                         train_bound=bound_conv, accuracy=0.7 + d))
        runs.append(dict(estimator="nce", target=2.0, encoder="mlp", seed=s,
                         train_bound=bound_mlp, accuracy=0.7))
    return {"config": {"estimators": ["nce"], "targets": [2.0]}, "runs": runs}


def _noniid(non, non_se, iid, iid_se):
    runs = [dict(estimator=est, sampler=smp, seed=s, estimate=v, estimate_se=se)
            for est in ("nce", "nwj") for s in SEEDS
            for smp, v, se in (("noniid", non, non_se), ("iid", iid, iid_se))]
    return {"baseline": {"true_mi": TRUE_MI}, "config": {"estimators": ["nce", "nwj"]},
            "runs": runs}


VERDICT_CASES = [
    # every estimator beats raw pixels by > 0.01 in every seed and the bound rose
    ("bijective", _bijective((0.05, 0.03), (0.02, 0.04)), "reproduces"),
    ("bijective", _bijective((0.05, 0.03), (0.02, 0.04), bound_rise=-0.1), "partly"),
    ("bijective", _bijective((0.05, 0.03), (-0.02, -0.01)), "partly"),
    ("bijective", _bijective((-0.05, -0.03), (-0.02, 0.0)), "does not reproduce"),
    # the probe falls > 0.05 below raw pixels in every seed
    ("adversarial", _adversarial((0.10, 0.07)), "reproduces"),
    ("adversarial", _adversarial((0.10, 0.03)), "partly"),
    ("adversarial", _adversarial((-0.01, -0.02), (0.08, 0.06)), "partly"),
    ("adversarial", _adversarial((-0.01, -0.02), (0.0, 0.01)), "does not reproduce"),
    # under NWJ concat has the highest bound and the worst probe
    ("critics", _critics({"bilinear": 1.0, "separable": 1.5, "concat": 2.0},
                         {"bilinear": 0.8, "separable": 0.7, "concat": 0.5}), "reproduces"),
    ("critics", _critics({"bilinear": 1.0, "separable": 1.5, "concat": 2.0},
                         {"bilinear": 0.5, "separable": 0.7, "concat": 0.8}), "partly"),
    ("critics", _critics({"bilinear": 1.0, "separable": 2.0, "concat": 1.5},
                         {"bilinear": 0.5, "separable": 0.9, "concat": 0.7}),
     "does not reproduce"),
    # matched bounds (within 0.15 nats of t = 2) and the ConvNet better in every seed
    ("encoders", _encoders(2.05, 1.95, (0.05, 0.02)), "reproduces"),
    ("encoders", _encoders(2.05, 1.95, (-0.05, -0.02)), "partly"),
    ("encoders", _encoders(2.05, 1.95, (0.05, -0.02)), "does not reproduce"),
    ("encoders", _encoders(2.5, 1.95, (0.05, 0.02)), "does not reproduce"),
    # non-i.i.d. above the truth by > 2 SE, i.i.d. not above it by > 2 SE
    ("noniid", _noniid(0.2, 0.01, 0.01, 0.005), "reproduces"),
    ("noniid", _noniid(0.025, 0.01, 0.01, 0.005), "partly"),
    ("noniid", _noniid(0.2, 0.01, 0.2, 0.01), "partly"),
    ("noniid", _noniid(0.01, 0.001, 0.2, 0.001), "does not reproduce"),
]


@pytest.mark.parametrize("name,res,word", VERDICT_CASES,
                         ids=[f"{n}-{w.replace(' ', '_')}-{i}"
                              for i, (n, _, w) in enumerate(VERDICT_CASES)])
def test_verdict_rules(name, res, word):
    got, why = verdict(name, res)
    assert got == word, why
    assert "rule:" in why


def test_every_verdict_reachable_for_every_experiment():
    words = {(n, w) for n, _, w in VERDICT_CASES}
    for name in EXPERIMENTS:
        for w in ("reproduces", "partly", "does not reproduce"):
            assert (name, w) in words, (name, w)
