"""The helpers every report and loader shares (issue 12): device choice, JSON cleaning, the
Markdown table, mean and standard deviation, the ``mean ± std`` cell and the safe ``torch.load``.
References: numpy and :mod:`statistics` for the statistics, ``json`` and hand-written expected
text for the rest."""

from __future__ import annotations

import fractions
import json
import math
import pickle
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive.app.results import format_mean_std, markdown_table, mean_std
from contrastive.checkpoint import refused_global, safe_load
from contrastive.devices import resolve_device
from contrastive.jsonsafe import to_jsonable

# --------------------------------------------------------------------------- resolve_device


def test_resolve_device_default_and_explicit():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device() == torch.device(want)
    assert resolve_device(None) == torch.device(want)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_device_rejects_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cuda:1' but torch sees no CUDA GPU; use "
                                         r"device='cpu'"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"--device='cuda'.*use --device='cpu'"):
        resolve_device("cuda", name="--device")


@pytest.mark.parametrize("bad", ["gpu", 3.5, "cuda:x"])
def test_resolve_device_rejects_non_devices(bad):
    with pytest.raises(ValueError, match=r"device must be like 'cpu', 'cuda' or 'cuda:0'"):
        resolve_device(bad)


# --------------------------------------------------------------------------- to_jsonable


def test_to_jsonable_converts_containers_numbers_arrays_and_paths():
    x = {
        1: (1, 2.5),
        "set": {3},
        "np": [np.float32(0.5), np.int64(7), np.bool_(True), np.arange(3).reshape(1, 3)],
        "torch": [torch.tensor(2.5), torch.arange(2), torch.tensor([[1.0], [2.0]])],
        "path": Path("/a/b"),
        "plain": [None, True, "s", 3, 1.25],
    }
    out = to_jsonable(x)
    assert out == {
        "1": [1, 2.5],
        "set": [3],
        "np": [0.5, 7, True, [[0, 1, 2]]],
        "torch": [2.5, [0, 1], [[1.0], [2.0]]],
        "path": "/a/b",
        "plain": [None, True, "s", 3, 1.25],
    }
    assert type(out["np"][1]) is int and type(out["np"][2]) is bool
    assert json.loads(json.dumps(out, allow_nan=False)) == out  # strict JSON as it is


def test_to_jsonable_non_finite_policy():
    x = [math.nan, math.inf, -math.inf, np.float64("nan"), torch.tensor(math.nan), 1.0]
    assert to_jsonable(x) == [None, None, None, None, None, 1.0]
    kept = to_jsonable(x, nan_to_none=False)
    assert [math.isnan(v) for v in kept[:1] + kept[3:5]] == [True, True, True]
    assert kept[1:3] == [math.inf, -math.inf] and kept[5] == 1.0
    assert json.dumps(kept) == "[NaN, Infinity, -Infinity, NaN, NaN, 1.0]"


def test_to_jsonable_unknown_objects_str_or_type_error():
    obj = fractions.Fraction(1, 3)
    assert to_jsonable({"r": obj}) == {"r": "1/3"}
    with pytest.raises(TypeError, match="Fraction is not JSON serialisable"):
        to_jsonable({"r": obj}, strict=True)


# --------------------------------------------------------------------------- markdown_table


def test_markdown_table_plain_and_aligned():
    assert markdown_table(["a", "bb"], [["1", "x"], ["22", "y"]]) == (
        "| a | bb |\n|---|---|\n| 1 | x |\n| 22 | y |"
    )
    assert markdown_table(["name", "v"], [["n", "1.0"]], align="lr") == (
        "| name | v |\n|---|---:|\n| n | 1.0 |"
    )
    assert markdown_table(["h"], []) == "| h |\n|---|"


def test_markdown_table_padded():
    text = markdown_table(["Loss", "R@1"], [["infonce", "9.5"], ["t", "10.25"]], align="lr",
                          pad=True)
    assert text == (
        "| Loss    |   R@1 |\n"
        "|---------|------:|\n"
        "| infonce |   9.5 |\n"
        "| t       | 10.25 |"
    )


def test_markdown_table_errors():
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="align must be one letter"):
        markdown_table(["a", "b"], [], align="lc")


# --------------------------------------------------------------------------- mean_std


@pytest.mark.parametrize("values", [[0.1, 0.7, 0.25], [3.0, 3.0], [1e-3, 2e5, -7.5, 0.0, 4.25]])
def test_mean_std_matches_numpy_and_statistics(values):
    mean, std, n = mean_std(values)
    assert n == len(values)
    assert mean == float(np.mean(values)) and std == float(np.std(values, ddof=1))
    assert mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert std == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
    pmean, pstd, _ = mean_std(values, ddof=0)
    assert pstd == pytest.approx(statistics.pstdev(values), rel=1e-9, abs=1e-12)
    assert pmean == mean


def test_mean_std_non_finite_and_small_samples():
    mean, std, n = mean_std([1.0, math.nan, 3.0, math.inf])
    assert (mean, std, n) == (2.0, pytest.approx(math.sqrt(2.0)), 2)
    mean, std, n = mean_std([1.0, math.nan, 3.0], skip_nonfinite=False)
    assert n == 3 and math.isnan(mean) and math.isnan(std)
    mean, std, n = mean_std([4.0])
    assert (mean, n) == (4.0, 1) and math.isnan(std)
    assert mean_std([4.0], ddof=0) == (4.0, 0.0, 1)
    mean, std, n = mean_std([math.nan])
    assert n == 0 and math.isnan(mean) and math.isnan(std)
    assert mean_std([], ddof=0)[2] == 0


def test_format_mean_std_cell():
    assert format_mean_std(0.91234, 0.0123, ".1f", scale=100.0) == "91.2 ± 1.2"
    assert format_mean_std(0.5, math.nan, ".2f") == "0.50"  # one seed: the mean alone
    assert format_mean_std(0.5, None, ".2f") == "0.50"
    assert format_mean_std(math.nan, 0.1) == "—"
    assert format_mean_std(None, 0.1, missing="n/a") == "n/a"
    assert format_mean_std(123456.0, 7.0, ".2e", ".1e") == "1.23e+05 ± 7.0e+00"
    assert format_mean_std(2, 0.5, lambda v: f"<{v}>") == "<2> ± <0.5>"


# --------------------------------------------------------------------------- safe torch.load


def test_safe_load_allows_numpy_and_names_refused_globals(tmp_path):
    arr = np.arange(4, dtype=np.float32)
    torch.save({"w": torch.ones(2), "arr": arr, "state": np.random.get_state()},
               tmp_path / "np.pt")
    obj = safe_load(tmp_path / "np.pt")
    assert torch.equal(obj["w"], torch.ones(2))
    np.testing.assert_array_equal(obj["arr"], arr)

    torch.save({"r": fractions.Fraction(1, 3)}, tmp_path / "frac.pt")
    with pytest.raises(pickle.UnpicklingError) as info:
        safe_load(tmp_path / "frac.pt")
    assert refused_global(info.value) == "fractions.Fraction"
    assert safe_load(tmp_path / "frac.pt", weights_only=False)["r"] == fractions.Fraction(1, 3)
    assert refused_global(RuntimeError("PytorchStreamReader failed reading zip archive")) is None
