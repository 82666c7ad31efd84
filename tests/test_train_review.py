"""Review of the trainer, its checkpoints and its run configuration, from the side of someone who
trains retrieval embedders with it: a diverging step must never overwrite the last good
checkpoint nor end as a "finished" run; values out of range are refused up front with the key
named; settings that contradict each other are refused; a run folder does not keep the
temporary files of writes a crash cut short; ``train_time_s`` measures training.

Every run here is a few steps of the MLP embedder on the embedded digits, on the CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from contrastive.app import train as train_mod
from contrastive.app.config import ConfigError, TrainConfig, UserError
from contrastive.app.train import DivergedError, fit
from contrastive.checkpoint import atomic_save, load_checkpoint


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(dataset="digits", backbone="mlp", dim=16, steps=6, batch_size=32, m_per_class=4,
                output=str(tmp_path / "run"), progress=False, log_every=1, checkpoint_every=2,
                final_probe=False, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig.from_dict(base)


class _NaNGradAt(nn.Module):
    """A linear backbone whose output is finite at every step but whose gradient is NaN on
    its ``bad``-th training forward pass (``0 * sqrt(h - h)``: the value 0, the gradient
    ``0 * inf``) -- what an overflow in a backward pass looks like to the trainer."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(64, 24)
        self.bad, self.calls = bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.bad:
                return h + 0.0 * torch.sqrt(h - h)
        return h


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values()
               if torch.is_tensor(v) and v.is_floating_point())


# ------------------------------------------------------------------------------ divergence


def test_nan_gradient_keeps_the_last_good_checkpoint(tmp_path):
    """Step 4's gradient is NaN (its loss is finite): the step-4 checkpoint must not be written
    with NaN weights over the good step-2 one -- resuming from it could never recover."""
    cfg = _cfg(tmp_path, backbone=_NaNGradAt(bad=4), steps=8, checkpoint_every=2)
    with pytest.raises(DivergedError, match="non-finite.*step 4.*lower lr"):
        fit(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert _all_finite(state["model"]) and _all_finite(state["loss"])


def test_nan_proxy_gradient_on_the_last_step_is_not_a_finished_run(tmp_path, monkeypatch):
    """Proxy-Anchor, no gradient clipping: a NaN gradient reaching only the proxies on the last
    step leaves the model finite, so the evaluation would look fine -- but the run's checkpoint
    would hold NaN proxies. The trainer must call that a divergence, not a result."""
    real_build = train_mod.build_loss
    calls = {"n": 0}

    def build(*a, **k):
        loss = real_build(*a, **k)
        proxies = next(iter(loss.proxy_parameters()))

        def hook(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return torch.full_like(grad, math.nan) if calls["n"] == 4 else grad

        proxies.register_hook(hook)
        return loss

    monkeypatch.setattr(train_mod, "build_loss", build)
    cfg = _cfg(tmp_path, loss="proxy_anchor", steps=4, checkpoint_every=2, grad_clip=None)
    with pytest.raises(DivergedError, match="non-finite.*step 4"):
        fit(cfg)
    assert calls["n"] == 4
    assert not (tmp_path / "run" / "result.json").exists()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 2 and _all_finite(state["loss"])


# ------------------------------------------------------------------------------ config ranges


def test_seed_beyond_numpy_range_is_a_config_error():
    """NumPy's global seed takes 32 bits: seed 2**32 used to pass the config and stop ``fit``
    with NumPy's traceback. It is refused with the key named; 2**32 - 1 is accepted."""
    with pytest.raises(ConfigError, match="'seed'.*4294967296.*less than 4294967296"):
        TrainConfig.from_dict({"seed": 2**32})
    assert TrainConfig.from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1


@pytest.mark.parametrize("key", ["lr", "proxy_lr", "weight_decay"])
def test_infinite_rates_are_config_errors(key):
    """``lr: inf`` passed the config (``> 0``) and diverged at step 1."""
    with pytest.raises(ConfigError, match=f"'{key}'.*finite"):
        TrainConfig.from_dict({key: "inf"})


def test_warmup_longer_than_the_run_is_refused(tmp_path):
    """A warm-up as long as the run never reaches ``lr`` and never applies the schedule: refused,
    naming both fields (steps known from the config, epochs once the batches are counted)."""
    with pytest.raises(ConfigError, match="'warmup_steps'.*500.*fewer than.*steps.*100"):
        TrainConfig.from_dict({"steps": 100, "warmup_steps": 500})
    assert TrainConfig.from_dict({"steps": 100, "warmup_steps": 99}).warmup_steps == 99
    # 640 = 10 classes x 64: one batch an epoch, so 3 epochs are 3 steps
    cfg = _cfg(tmp_path, batch_size=640, m_per_class=64, epochs=3, warmup_steps=5,
               steps=TrainConfig().steps)  # steps at its default: epochs decides
    with pytest.raises(ConfigError, match="'warmup_steps'.*5.*fewer than.*3 steps"):
        fit(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_and_overwrite_together_are_refused():
    """``--resume --overwrite`` silently resumed; the two contradict each other."""
    with pytest.raises(ConfigError, match="'overwrite'.*resume"):
        TrainConfig.from_dict({"resume": True, "overwrite": True})
    with pytest.raises(ConfigError, match="'overwrite'.*resume"):
        TrainConfig.from_dict({"resume": "auto", "overwrite": True})
    assert TrainConfig.from_dict({"resume": False, "overwrite": True}).overwrite is True


def test_paths_and_devices_from_python(tmp_path):
    """``output=tmp_path / "run"`` (a ``Path``) and ``device=torch.device("cpu")`` are what a
    Python caller writes; they were refused as "not a valid string"."""
    cfg = TrainConfig.from_dict({"output": tmp_path / "run", "data_dir": tmp_path,
                                 "device": torch.device("cpu")})
    assert cfg.output == str(tmp_path / "run") and cfg.data_dir == str(tmp_path)
    assert cfg.device == "cpu"
    assert TrainConfig(output=tmp_path / "x").validated().output == str(tmp_path / "x")
    with pytest.raises(ConfigError, match="'output'"):
        TrainConfig.from_dict({"output": 3})


# ------------------------------------------------------------------------------ run folder


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path):
    """SIGKILL during an atomic write leaves ``.last.pt.<pid>.<hex>.tmp`` (a whole checkpoint's
    size) beside the target; nothing removed them, so every pre-emption during a save left one
    more. The run that next holds the folder's lock removes them (and nothing else)."""
    cfg = _cfg(tmp_path, steps=4)
    fit(cfg)
    ck = tmp_path / "run" / "checkpoints"
    dead = _dead_pid()
    stale = [ck / f".last.pt.{dead}.0123456789ab.tmp",
             tmp_path / "run" / f".result.json.{dead}.abcdefabcdef.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    kept = [ck / ".notes.tmp",  # not a name the atomic writes use
            ck / f".last.pt.{os.getppid()}.0123456789ab.tmp"]  # a live writer's
    for p in kept:
        p.write_text("x")
    res = fit(cfg.replace(resume=True))
    assert res["steps"] == 4
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in kept] == [True, True]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    fit(cfg.replace(overwrite=True))
    assert [p.exists() for p in stale] == [False, False]


def test_resume_with_an_optimizer_state_of_other_groups_is_a_user_error(tmp_path):
    """A checkpoint whose optimizer has another set of parameter groups (a proxy loss saved
    before the proxies got their own learning-rate group) stopped with torch's bare
    ``ValueError``; it is a :class:`UserError` naming the checkpoint and the way out."""
    cfg = _cfg(tmp_path, loss="proxy_anchor", steps=2)
    fit(cfg)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    groups = state["optimizer"]["param_groups"]
    merged = dict(groups[0], params=[i for g in groups for i in g["params"]])
    state["optimizer"]["param_groups"] = [merged]
    atomic_save(state, path)
    with pytest.raises(UserError, match=r"cannot resume from .*last\.pt.*optimizer.*--overwrite"):
        fit(cfg.replace(resume=True))


# ------------------------------------------------------------------------------ bookkeeping


def test_train_time_excludes_periodic_evaluation_and_checkpoints(tmp_path, monkeypatch):
    """``train_time_s`` (the comparison's "Train time" column) counted every ``eval_every``
    evaluation and every checkpoint write as training."""
    real_eval, real_save = train_mod.evaluate_embedder, train_mod.ckpt.atomic_save

    def slow_eval(*a, **k):
        time.sleep(0.4)
        return real_eval(*a, **k)

    def slow_save(*a, **k):
        time.sleep(0.4)
        return real_save(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate_embedder", slow_eval)
    monkeypatch.setattr(train_mod.ckpt, "atomic_save", slow_save)
    t0 = time.perf_counter()
    res = fit(_cfg(tmp_path, steps=4, eval_every=1, checkpoint_every=1))
    wall = time.perf_counter() - t0
    # 3 evaluations + 4 checkpoints sleep 2.8 s; 4 steps of the MLP take well under 0.5 s
    assert wall > 2.8
    assert res["train_time_s"] < 0.5, res["train_time_s"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train_time_s"] < 0.5


# ------------------------------------------------------------------------------ optimizer


def test_pml_proxy_losses_get_the_proxy_learning_rate():
    """``proxy_lr`` (default 100 x ``lr``) is documented for "a loss's proxies or learnable
    margin"; ``loss: pml:ProxyAnchorLoss`` trained its proxies at ``lr`` (100 x slower than
    ``proxy_anchor``'s) because only this library's losses name their proxies."""
    from contrastive.app.factory import build_loss, make_optimizer

    cfg = TrainConfig.from_dict({"lr": 2e-3})
    model = nn.Linear(4, 16)
    for name, kwargs, ours in [("pml:ProxyAnchorLoss", {"num_classes": 10, "embedding_size": 16},
                                "proxy_anchor"),
                               ("pml:ArcFaceLoss", {"num_classes": 10, "embedding_size": 16},
                                "arcface")]:
        loss = build_loss(name, kwargs)
        opt = make_optimizer(cfg, list(model.parameters()) + list(loss.parameters()), loss)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3, 0.2]), name
        assert [len(g["params"]) for g in opt.param_groups] == [2, 1], name
        assert opt.param_groups[1]["params"][0] is next(iter(loss.parameters()))
        mine = build_loss(ours, embedding_dim=16, num_classes=10)
        same = make_optimizer(cfg, list(model.parameters()) + list(mine.parameters()), mine)
        assert [g["lr"] for g in same.param_groups] == [g["lr"] for g in opt.param_groups]
    loss = build_loss("pml:NTXentLoss")  # no parameters: one group
    opt = make_optimizer(cfg, list(model.parameters()) + list(loss.parameters()), loss)
    assert [g["lr"] for g in opt.param_groups] == [2e-3]


def test_a_finished_run_writes_its_result_as_json_csv_and_markdown(tmp_path):
    """``result.csv`` holds the numbers of ``result.json`` (steps, time, final metrics, the
    readout) in one row, ``result.md`` the same as a table (rates in %), with the search
    behind the retrieval metrics; ``--overwrite`` replaces all three."""
    import csv
    import json

    cfg = _cfg(tmp_path, final_probe=True)
    fit(cfg)
    out = Path(cfg.output)
    res = json.loads((out / "result.json").read_text())
    (row,) = list(csv.DictReader((out / "result.csv").open()))
    assert int(row["steps"]) == res["steps"] == 6
    assert float(row["train_time_s"]) == res["train_time_s"]
    for k, v in res["metrics"].items():
        assert float(row[k]) == v, k
    for k, v in res["readout"].items():
        assert float(row[f"readout_{k}"]) == pytest.approx(v, nan_ok=True)
    md = (out / "result.md").read_text()
    assert f"| map_at_r | {100 * res['metrics']['map_at_r']:.2f} % |" in md
    assert f"| num_queries | {res['metrics']['num_queries']:g} |" in md
    assert f"Retrieval search: {res['eval_backend']}." in md
    (out / "result.md").write_text("stale")
    fit(_cfg(tmp_path, final_probe=True, overwrite=True))
    assert (out / "result.md").read_text() != "stale"
