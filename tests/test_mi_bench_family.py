"""The estimator family of the known-MI benchmark: the new estimators resolve by name with fresh
state, the cubic data is the cube of the Gaussian pairs, the upper bounds get the conditional
critic, and a tiny family run (and ``contrastive mi-bench --quick``) writes a table whose cells
are the statistics of the recorded estimates."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive import cli
from contrastive.app import mi_benchmark as mb
from contrastive.app import mi_family as mf
from contrastive.conditional import GaussianConditional
from contrastive.critics import Bilinear
from evaluation.known_mi import rho_from_mi, sample_gaussian
from losses import bounds as LB
from losses import functional as LF

pytestmark = pytest.mark.usefixtures("one_thread")


def test_family_estimators_resolve_with_fresh_state():
    est = mb.family_estimators(("NCE", "tuba", "club", "mine_ma"))
    assert list(est) == ["infonce", "tuba", "club", "mine_ma"]
    assert est["infonce"] == (LF.infonce, LF.infonce_bound)
    assert est["tuba"] == (LB.tuba, LB.tuba_bound)
    assert est["club"] == (LB.conditional_nll, LB.club_bound)
    again = mb.family_estimators("mine_ma")["mine_ma"]
    assert again[0].__self__ is not est["mine_ma"][0].__self__  # a new moving average
    assert list(mb.family_estimators()) == list(mb.FAMILY)
    s = torch.randn(5, 5)
    p = torch.eye(5, dtype=torch.bool)
    smile_loss, smile_bound = mb.family_estimators("smile_1")["smile_1"]
    assert float(smile_bound(s, p, ~p)) == float(LB.smile_bound(s, p, ~p, 1.0))
    assert mb.family_estimators("flo")["flo"] == (LB.flo, LB.flo_bound)
    with pytest.raises(ValueError, match="unknown estimator 'flow'"):
        mb.family_estimators("flow")


def test_flo_runs_with_its_shadow_head_and_starts_as_tuba():
    """FLO's critic is wrapped with its shadow head (``u = h([x; y; S_ii]) - S_ii``, ``h``'s last
    layer zero at the start, so ``u = -S_ii``): its first estimate is then exactly TUBA's
    (``b = 0``) on the same critic initialisation and batch; afterwards the two differ."""
    res = mb.run(mb.family_estimators(("tuba", "flo")), "bilinear", dim=4, batch_size=16,
                 levels=(1.0,), steps_per_level=5, lr=1e-2, progress=False)
    tuba, flo = res["estimates"]["tuba"], res["estimates"]["flo"]
    assert np.isfinite(flo).all()
    assert flo[0] == pytest.approx(tuba[0], rel=1e-5)  # float32: e^{S_ij - S_ii} e^{S_ii}
    assert flo[-1] != pytest.approx(tuba[-1], rel=1e-3)
    wrapped = mb.ShadowCritic(Bilinear(4), 4)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    s, u = wrapped(x, y)
    eye = torch.eye(8, dtype=torch.bool)
    assert torch.allclose(u[eye], -s.diagonal())  # the zero-started head: u = -S_ii
    assert float(LB.flo_bound(s, eye, ~eye, u)) == pytest.approx(
        float(LB.tuba_bound(s, eye, ~eye)), rel=1e-5)


class _Recorder(nn.Module):
    """A bilinear critic that keeps the y it was shown."""

    def __init__(self, dim):
        super().__init__()
        self.inner = Bilinear(dim)
        self.seen = []

    def forward(self, x, y):
        self.seen.append(y.clone())
        return self.inner(x, y)


def test_cubic_data_and_the_conditional_critic_of_the_upper_bounds():
    made = {}

    def factory(dim):
        made["critic"] = _Recorder(dim)
        return made["critic"]

    res = mb.run(estimators=mb.family_estimators(("dv", "club")), critic=factory, dim=3,
                 batch_size=8, levels=(2,), steps_per_level=2, progress=False,
                 transform="cubic", seed=5)
    gen = torch.Generator().manual_seed(5)
    _, y = sample_gaussian(8, 3, rho_from_mi(2.0, 3), generator=gen)
    torch.testing.assert_close(made["critic"].seen[0], y ** 3)
    assert res["config"]["transform"] == "cubic"
    assert res["config"]["estimator_critics"] == {"club": "gaussian_conditional"}
    # CLUB's estimate is its bound on the conditional's scores (finite, a number per step)
    assert np.isfinite(res["estimates"]["club"]).all()
    with pytest.raises(ValueError, match="transform"):
        mb.run(estimators=("dv",), transform="square", steps_per_level=1, progress=False)
    with pytest.raises(ValueError, match="estimator_critics"):
        mb.run(estimators=("dv",), estimator_critics={"nwj": "bilinear"}, steps_per_level=1,
               progress=False)


def test_gaussian_conditional_fits_the_gaussian_conditional():
    """Trained by the NLL on pairs with rho = 0.8, its mean map approaches rho x."""
    torch.manual_seed(0)
    crit = GaussianConditional(2, hidden_dim=16, layers=1)
    opt = torch.optim.Adam(crit.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    p = torch.eye(128, dtype=torch.bool)
    for _ in range(300):
        x, y = sample_gaussian(128, 2, 0.8, generator=g)
        opt.zero_grad()
        LB.conditional_nll(crit(x, y), p, ~p).backward()
        opt.step()
    x = torch.linspace(-1.5, 1.5, 7)[:, None].repeat(1, 2)
    mean, log_var = crit.moments(x)
    torch.testing.assert_close(mean, 0.8 * x, atol=0.15, rtol=0)
    torch.testing.assert_close(log_var.exp(), torch.full_like(x, 0.36), atol=0.1, rtol=0)


def test_run_family_tiny(tmp_path):
    res = mf.run_family(estimators=("infonce", "tuba", "l1out"), critics=("bilinear",),
                        transforms=("gaussian", "cubic"), budget="quick", dim=3, batch_size=16,
                        levels=(1, 2), steps_per_level=6, progress=False, output=tmp_path)
    # bilinear x 2 data sets for the lower bounds, the conditional x 2 for the upper
    assert [(r["config"]["critic"], r["config"]["transform"]) for r in res["runs"]] == [
        ("bilinear", "gaussian"), ("bilinear", "cubic"),
        ("gaussian_conditional", "gaussian"), ("gaussian_conditional", "cubic")]
    assert len(res["summary"]) == (2 + 1) * 2 * 2
    md = (tmp_path / "family.md").read_text()
    assert md == mf.family_table(res)
    with open(tmp_path / "family_summary.csv") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if (r["estimator"], r["data"], r["level"]) == ("infonce", "cubic",
                                                                               "1"))
    est = np.asarray(res["runs"][1]["estimates"]["infonce"])[6 + 3:12]
    assert np.isfinite(est).all()
    assert float(row["mean"]) == pytest.approx(est.mean())
    assert float(row["variance"]) == pytest.approx(est.var())
    cell = f"{est.mean() - 2:+.2f} / {est.var():.2f} / {(est.mean() - 2) ** 2 + est.var():.2f}"
    assert "| infonce | cubic | bilinear | " in md and cell in md
    saved = json.loads((tmp_path / "family.json").read_text())
    assert saved["config"]["estimators"] == ["infonce", "tuba", "l1out"]
    for d in ("gaussian", "cubic"):
        with open(tmp_path / f"family_{d}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="budget"):
        mf.run_family(budget="huge")
    with pytest.raises(ValueError, match="unknown critic"):
        mf.run_family(critics=("nope",), steps_per_level=1, progress=False)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in-process: (exit status, stdout, stderr)."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    try:
        rc = cli.main(list(args))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return rc, out, err


def test_mi_bench_quick_command(tmp_path, capsys):
    def main(*args):
        return _main(capsys, *args)

    rc, out, err = main("mi-bench", "--quick", "--steps-per-level", "4", "--levels", "2",
                        "--critic", "bilinear", "--data", "cubic", "--estimators",
                        "nwj,smile_5,club", "--dim", "3", "--output", str(tmp_path),
                        "--no-progress")
    assert rc == 0, err
    assert "| nwj | cubic | bilinear |" in out and "| club | cubic | gaussian_conditional |" in out
    assert json.loads((tmp_path / "family.json").read_text())["config"]["budget"] == "quick"
    rc, _, err = main("mi-bench", "--quick", "--critic", "bogus", "--no-progress")
    assert rc == 2 and err.strip().startswith("error: ") and "critic" in err
    rc, out, err = main("mi-bench", "--estimators", "tuba,club", "--steps-per-level", "2",
                        "--levels", "2", "--dim", "3", "--output", str(tmp_path / "one"),
                        "--no-progress")
    assert rc == 0, err
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    assert saved["config"]["estimators"] == ["tuba", "club"]
    assert saved["config"]["estimator_critics"] == {"club": "gaussian_conditional"}
    assert not math.isnan(saved["estimates"]["club"][0])
