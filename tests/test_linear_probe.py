"""Linear probe vs scikit-learn: the same optimum (weights and accuracy) at the equivalent C, the
paper's protocol equal to a direct scikit-learn pipeline, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from evaluation.probe import (
    _standardizer,
    fit_logistic_regression,
    linear_probe,
    sklearn_C,
    stratified_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic(n=2000, d=64, k=5, sep=0.35, seed=0, n_test=1000):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n + n_test)
    x = (means[y] + rng.normal(size=(n + n_test, d))).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, te = order[:1200], order[1200:]
    return x[tr], y[tr], x[te], y[te]


def _sklearn_accuracy(xtr, ytr, xte, yte, wd, standardize=True):
    k = np.unique(ytr).size
    clf = LogisticRegression(C=sklearn_C(wd, len(ytr), k), tol=1e-7, max_iter=5000)
    model = make_pipeline(StandardScaler(), clf) if standardize else clf
    return model.fit(xtr, ytr).score(xte, yte)


# --------------------------------------------------------------------------- parity with sklearn


@pytest.mark.parametrize("wd", [1e-2, 1e-3])
def test_digits_accuracy_matches_sklearn(digits, wd):
    xtr, ytr, xte, yte = digits
    ours = linear_probe(xtr, ytr, xte, yte, weight_decays=wd, device="cpu")
    ref = _sklearn_accuracy(xtr, ytr, xte, yte, wd)
    assert abs(ours["accuracy"] - ref) <= 0.005
    assert ours["weight_decay"] == wd and ours["val_accuracy"] is None
    assert ours["C"] == pytest.approx(1.0 / (wd * len(ytr)))
    assert ours["protocol"] == "torch" and ours["num_classes"] == 10


@pytest.mark.parametrize("standardize", [True, False])
def test_synthetic_accuracy_matches_sklearn(standardize):
    xtr, ytr, xte, yte = _synthetic()
    wd = 1e-3
    ours = linear_probe(
        xtr, ytr, xte, yte, weight_decays=wd, standardize=standardize, device="cpu"
    )
    ref = _sklearn_accuracy(xtr, ytr, xte, yte, wd, standardize=standardize)
    assert abs(ours["accuracy"] - ref) <= 0.005
    assert 0.5 < ours["accuracy"] < 1.0  # a problem where the probe is not trivially perfect


def test_weights_equal_sklearn_optimum_multinomial():
    """C = 1/(wd n): both solvers reach the same (W, b) of the mean-loss objective."""
    xtr, ytr, _, _ = _synthetic(n=800, d=16, k=4)
    wd = 1e-2
    w, b, _ = fit_logistic_regression(
        torch.from_numpy(xtr).double(), torch.from_numpy(ytr), 4, wd, tol=1e-10
    )
    clf = LogisticRegression(C=sklearn_C(wd, len(ytr), 4), tol=1e-10, max_iter=10000)
    clf.fit(xtr.astype(np.float64), ytr)
    np.testing.assert_allclose(w.numpy(), clf.coef_, rtol=0, atol=1e-5)
    # the softmax is invariant to a common shift of the (unpenalised) intercepts
    np.testing.assert_allclose(
        b.numpy() - b.numpy().mean(), clf.intercept_ - clf.intercept_.mean(), atol=1e-5
    )


def test_weights_equal_sklearn_optimum_binary():
    """Two classes: scikit-learn's one-logit model is our W[1] - W[0] at C = 2/(wd n)."""
    xtr, ytr, _, _ = _synthetic(n=600, d=8, k=2)
    wd = 1e-2
    w, b, _ = fit_logistic_regression(
        torch.from_numpy(xtr).double(), torch.from_numpy(ytr), 2, wd, tol=1e-10
    )
    C = sklearn_C(wd, len(ytr), 2)
    assert C == pytest.approx(2.0 / (wd * len(ytr)))
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(xtr.astype(np.float64), ytr)
    np.testing.assert_allclose((w[1] - w[0]).numpy(), clf.coef_[0], atol=1e-5)
    np.testing.assert_allclose(float(b[1] - b[0]), clf.intercept_[0], atol=1e-5)


def test_sweep_validation_accuracies_match_sklearn_on_the_same_split(digits):
    xtr, ytr, xte, yte = digits
    wds = (1e-1, 1e-2, 1e-3)
    out = linear_probe(xtr, ytr, xte, yte, weight_decays=wds, val_fraction=0.25, seed=3)
    tr, va = stratified_split(ytr, 0.25, seed=3)
    for wd in wds:
        ref = _sklearn_accuracy(xtr[tr], ytr[tr], xtr[va], ytr[va], wd)
        assert abs(out["val_accuracies"][wd] - ref) <= 0.005
    best = max(out["val_accuracies"].values())
    assert out["val_accuracy"] == best == out["val_accuracies"][out["weight_decay"]]
    # ties go to the strongest regularisation
    assert out["weight_decay"] == max(w for w, a in out["val_accuracies"].items() if a == best)
    # and the reported test accuracy is the refit on all of train at the chosen value
    ref = _sklearn_accuracy(xtr, ytr, xte, yte, out["weight_decay"])
    assert abs(out["accuracy"] - ref) <= 0.005


def test_stratified_split():
    y = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 2)
    tr, va = stratified_split(y, 0.2, seed=1)
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, va])), np.arange(y.size))
    assert [int((y[va] == c).sum()) for c in range(4)] == [2, 1, 0, 1]
    tr2, va2 = stratified_split(y, 0.2, seed=1)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=2)[1])


def test_unseen_test_classes_count_as_errors():
    xtr, ytr, xte, yte = _synthetic(n=600, d=16, k=4)
    yte = yte.copy()
    yte[:50] = 7  # a class the probe never saw
    ours = linear_probe(xtr, ytr, xte, yte, weight_decays=1e-2)
    ref = _sklearn_accuracy(xtr, ytr, xte, yte, 1e-2)
    assert abs(ours["accuracy"] - ref) <= 0.005
    assert ours["accuracy"] <= 1 - 50 / len(yte)


def test_torch_and_numpy_inputs_agree():
    xtr, ytr, xte, yte = _synthetic(n=500, d=16, k=3)
    a = linear_probe(xtr, ytr, xte, yte, weight_decays=1e-3)
    b = linear_probe(
        torch.from_numpy(xtr).requires_grad_(True), torch.from_numpy(ytr),
        torch.from_numpy(xte), torch.from_numpy(yte).float(), weight_decays=1e-3,
    )
    assert a["accuracy"] == b["accuracy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():  # pragma: no cover - run where a GPU exists
    xtr, ytr, xte, yte = _synthetic()
    cpu = linear_probe(xtr, ytr, xte, yte, weight_decays=1e-3, device="cpu")
    gpu = linear_probe(xtr, ytr, xte, yte, weight_decays=1e-3)
    assert gpu["device"].startswith("cuda")
    assert abs(cpu["accuracy"] - gpu["accuracy"]) <= 0.005


# --------------------------------------------------------------------------- the paper's protocol


def test_tschannen2020_equals_direct_sklearn_pipeline(digits):
    xtr, ytr, xte, yte = digits
    out = linear_probe(xtr, ytr, xte, yte, protocol="tschannen2020", seed=0)
    ref = make_pipeline(
        MinMaxScaler(),
        LogisticRegression(solver="saga", C=10.0, tol=0.1, max_iter=1000, random_state=0),
    ).fit(xtr, ytr)
    assert out["accuracy"] == ref.score(xte, yte)
    assert out["protocol"] == "tschannen2020" and out["C"] == 10.0
    assert out["weight_decay"] is None and out["val_accuracy"] is None


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"protocol": "sgd"}, "protocol"),
        ({"weight_decays": -1.0}, "weight_decays"),
        ({"weight_decays": ()}, "weight_decays"),
        ({"weight_decays": "big"}, "weight_decays"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0}, "tol"),
        ({"dtype": torch.float16}, "dtype"),
        ({"weight_decays": (1e-2, 1e-3), "val_fraction": 1.0}, "val_fraction"),
        ({"protocol": "tschannen2020", "weight_decays": 1e-3}, "tschannen2020"),
    ],
)
def test_bad_arguments(kwargs, match):
    xtr, ytr, xte, yte = _synthetic(n=100, d=4, k=3, n_test=20)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_probe(xtr, ytr, xte, yte, **kwargs)


def test_bad_arrays():
    xtr, ytr, xte, yte = _synthetic(n=100, d=4, k=3, n_test=20)
    with pytest.raises(ValueError, match="train_x"):
        linear_probe(xtr[:, 0], ytr, xte, yte)
    with pytest.raises(ValueError, match="test_x"):
        linear_probe(xtr, ytr, xte[:, :3], yte)
    with pytest.raises(ValueError, match="train_y"):
        linear_probe(xtr, ytr[:-1], xte, yte)
    bad = xtr.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(bad, ytr, xte, yte)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(xtr[:0], ytr[:0], xte, yte)
    with pytest.raises(ValueError, match="integer"):
        linear_probe(xtr, ytr + 0.5, xte, yte)
    with pytest.raises(ValueError, match="single class"):
        linear_probe(xtr, np.zeros_like(ytr), xte, yte)
    with pytest.raises(ValueError, match="validation split"):
        linear_probe(xtr[:3], np.arange(3), xte, yte, weight_decays=(1e-2, 1e-3))
    with pytest.raises(ValueError, match="weight_decay"):
        sklearn_C(-1.0, 10)
    assert sklearn_C(0.0, 10) == float("inf")


@pytest.mark.parametrize("block_elems", [1 << 24, 7 * 5])  # one block / blocks of 7 rows
def test_closed_form_gradient_equals_autograd(monkeypatch, block_elems):
    import evaluation.probe as lp
    monkeypatch.setattr(lp, "_BLOCK_ELEMS", block_elems)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (30,), generator=g)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * 0.3 * (w * w).sum()
    ref.backward()
    loss, gw, gb = lp.softmax_regression_loss_grad(x, y, w.detach(), b.detach(), 0.3)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)
    assert lp._accuracy(x, y, w.detach(), b.detach()) == pytest.approx(
        float(((x @ w.T + b).argmax(1) == y).double().mean())
    )


def test_standardizer_equals_sklearn_standard_scaler():
    """The probe standardises like scikit-learn's StandardScaler (population std, ddof=0);
    a constant feature keeps scale 1 instead of dividing by zero."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 5)) * np.array([1.0, 10.0, 0.1, 3.0, 1.0])
    x[:, 4] = 2.5  # constant feature
    mean, std = _standardizer(torch.from_numpy(x))
    ref = StandardScaler().fit(x)
    np.testing.assert_allclose(mean.numpy(), ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), ref.scale_, rtol=1e-12)
    np.testing.assert_allclose(
        ((torch.from_numpy(x) - mean) / std).numpy(), ref.transform(x), rtol=1e-10, atol=1e-12
    )
