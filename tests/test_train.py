"""The trainer: a short training on digits improves retrieval, a run killed with SIGKILL and
resumed ends exactly where an uninterrupted run ends, configs load from files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from contrastive.config import TrainConfig, load_mapping
from contrastive.train import build_embedder, build_loss, evaluate_embedder, fit, load_embedder

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", backbone="mlp", dim=32, steps=120, batch_size=64,
                m_per_class=8, lr=2e-3, output=str(tmp_path / "run"), progress=False,
                log_every=10, checkpoint_every=0, final_probe=False, seed=0)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_training_improves_retrieval_over_untrained(tmp_path):
    from contrastive.datasets import get_dataset

    cfg = _cfg(tmp_path)
    torch.manual_seed(cfg.seed)
    train = get_dataset("digits", split="train")
    test = get_dataset("digits", split="test")
    untrained = evaluate_embedder(build_embedder(cfg, train), test)
    res = fit(cfg)
    trained = res["metrics"]
    assert trained["map_at_r"] > untrained["map_at_r"] + 0.05, (untrained, trained)
    assert trained["precision_at_1"] >= untrained["precision_at_1"]
    # the log and the result file are written, with the MI readouts of the training batches
    rows = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 121, 10))
    assert all(r["infonce"] == r["infonce"] for r in rows)  # not NaN
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "run" / "log.csv").read_text().startswith("step,")
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["metrics"]["map_at_r"] == pytest.approx(trained["map_at_r"])


def test_final_probe_and_checkpoint_reload(tmp_path):
    cfg = _cfg(tmp_path, steps=30, final_probe=True, checkpoint_every=10)
    res = fit(cfg)
    m = res["metrics"]
    for key in ("nmi", "ami", "linear_probe", "knn_top1", "recall_at_8"):
        assert 0.0 <= m[key] <= 1.0
    assert m["linear_probe"] > 0.5  # 10 digit classes: far above chance (0.1)
    model = load_embedder(tmp_path / "run" / "checkpoints" / "last.pt")
    from contrastive.datasets import get_dataset

    again = evaluate_embedder(model, get_dataset("digits", split="test"))
    assert again["map_at_r"] == pytest.approx(m["map_at_r"], abs=1e-6)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, json
    import torch
    from contrastive.config import TrainConfig
    from contrastive.train import fit

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    kill_at = int(sys.argv[2])
    if kill_at > 0:
        real_step = torch.optim.AdamW.step
        calls = {"n": 0}

        def step(self, *a, **k):
            out = real_step(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        torch.optim.AdamW.step = step
    fit(cfg)
    """
)


def _run(cfg: TrainConfig, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(kill_at)],
        env=env, capture_output=True, text=True, timeout=300,
    )


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    common = dict(steps=90, checkpoint_every=20, log_every=5, eval_every=30,
                  augment=True, final_probe=False)
    ref_cfg = _cfg(tmp_path / "ref", **common)
    cfg = _cfg(tmp_path / "killed", **common)
    ref = _run(ref_cfg, 0)
    assert ref.returncode == 0, ref.stderr
    killed = _run(cfg, 47)  # between the checkpoints at steps 40 and 60
    assert killed.returncode == -9, killed.stderr
    out = Path(cfg.output)
    assert not (out / "result.json").exists()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 40
    resumed = _run(cfg.replace(resume=True), 0)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((Path(ref_cfg.output) / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert a["readout"] == b["readout"]
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    la = (Path(ref_cfg.output) / "log.jsonl").read_text()
    lb = (out / "log.jsonl").read_text()
    assert la == lb
    ma = torch.load(Path(ref_cfg.output) / "checkpoints" / "last.pt", weights_only=False)
    mb = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    for k in ma["model"]:
        assert torch.equal(ma["model"][k], mb["model"][k]), k


def test_pml_loss_by_name_and_critic_override(tmp_path):
    loss = build_loss("pml:NTXentLoss", {"temperature": 0.1})
    assert type(loss).__name__ == "NTXentLoss"
    with pytest.raises(ValueError, match="unknown pytorch-metric-learning loss"):
        build_loss("pml:NoSuchLoss")
    bil = build_loss("infonce", {}, critic="bilinear", embedding_dim=16)
    assert tuple(bil.critic.weight.shape) == (16, 16)
    res = fit(_cfg(tmp_path, loss="pml:TripletMarginLoss", loss_kwargs={"margin": 0.1},
                   steps=20))
    assert res["metrics"]["recall_at_1"] > 0.5
    res = fit(_cfg(tmp_path / "bil", loss="nwj", critic="bilinear", steps=20))
    assert res["steps"] == 20


def test_multiview_self_supervised(tmp_path):
    res = fit(_cfg(tmp_path, views=2, steps=20, batch_size=32))
    assert res["steps"] == 20 and res["metrics"]["recall_at_1"] > 0.3


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_config_files(tmp_path, suffix):
    p = tmp_path / f"c{suffix}"
    if suffix == ".yaml":
        p.write_text("loss: triplet\nloss_kwargs:\n  margin: 0.3\nsteps: 7\n")
    elif suffix == ".toml":
        p.write_text('loss = "triplet"\nsteps = 7\n[loss_kwargs]\nmargin = 0.3\n')
    else:
        p.write_text('{"loss": "triplet", "steps": 7, "loss_kwargs": {"margin": 0.3}}')
    cfg = TrainConfig.from_file(p)
    assert cfg.loss == "triplet" and cfg.steps == 7
    assert load_mapping(p)["loss_kwargs"] == {"margin": 0.3}


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict({"lossy": "x"})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ValueError, match="views"):
        TrainConfig.from_dict({"views": 1})
    with pytest.raises(FileNotFoundError):
        TrainConfig.from_file(tmp_path / "missing.yaml")


def test_eval_steps_are_logged_even_between_log_steps(tmp_path):
    res = fit(_cfg(tmp_path, steps=60, log_every=20, eval_every=25))
    steps = [r["step"] for r in res["history"]]
    assert steps == [20, 25, 40, 50, 60]
    evaluated = [r["step"] for r in res["history"] if "recall_at_1" in r]
    assert evaluated == [25, 50]


def test_lr_schedules():
    from contrastive.train import _lr_lambda

    step = _lr_lambda(TrainConfig(schedule="step", steps=90), 90)
    assert [step(s) for s in (0, 59, 60, 80, 81)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cos = _lr_lambda(TrainConfig(schedule="cosine", steps=100, warmup_steps=10), 100)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-12)
