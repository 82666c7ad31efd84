"""``fit``'s run folders from Python: an existing run is refused without ``resume`` /
``overwrite``, ``resume`` needs a checkpoint with the same settings, a custom ``nn.Module``
backbone trains, checkpoints and resumes, ``log.csv`` carries the evaluation columns, a busy
folder is refused."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from contrastive.app.config import TrainConfig, UserError
from contrastive.app.factory import load_embedder
from contrastive.app.train import fit
from contrastive.checkpoint import FolderInUse, folder_lock, load_checkpoint


def _cfg(tmp_path, **kw):
    base = dict(steps=6, dim=16, output=str(tmp_path / "run"), progress=False, log_every=2,
                checkpoint_every=3, final_probe=False)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_existing_run_resume_and_overwrite(tmp_path):
    cfg = _cfg(tmp_path)
    first = fit(cfg)
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(ck)["step"] == 6
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        fit(cfg.replace(steps=3))
    assert load_checkpoint(ck)["step"] == 6  # untouched
    with pytest.raises(UserError, match=r"settings differ.*steps=6 there but 9 now, "
                                        r"lr=0\.001 there but 0\.002 now"):
        fit(cfg.replace(steps=9, lr=2e-3, resume=True))
    # logging and evaluation cadence may change on resume; the finished run is re-evaluated
    again = fit(cfg.replace(resume=True, log_every=3, eval_every=2))
    assert again["metrics"] == pytest.approx(first["metrics"])
    with pytest.raises(UserError, match="no checkpoint .* --resume auto"):
        fit(cfg.replace(output=str(tmp_path / "empty"), resume=True))
    fresh = fit(cfg.replace(output=str(tmp_path / "auto"), resume="auto"))
    assert fresh["steps"] == 6
    short = fit(cfg.replace(steps=3, overwrite=True))
    assert short["steps"] == 3 and load_checkpoint(ck)["step"] == 3
    rows = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # the old run's log went with it


def test_busy_folder_is_refused(tmp_path):
    with folder_lock(tmp_path / "run", "another test run"):
        with pytest.raises(FolderInUse, match=r"in use by another run \(pid \d+: another test"):
            fit(_cfg(tmp_path))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_log_csv_has_the_evaluation_columns(tmp_path):
    fit(_cfg(tmp_path, eval_every=3, log_every=2))
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 3, 4, 6]
    jsonl = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "recall_at_1" in rows[0] and "map_at_r" in rows[0]
    assert rows[0]["recall_at_1"] == ""
    assert float(rows[1]["recall_at_1"]) == pytest.approx(jsonl[1]["recall_at_1"])
    assert float(rows[1]["map_at_r"]) == pytest.approx(jsonl[1]["map_at_r"])


def _module():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24))


def test_custom_module_backbone_trains_checkpoints_and_resumes(tmp_path):
    cfg = _cfg(tmp_path, backbone=_module(), steps=4, checkpoint_every=2)
    res = fit(cfg)
    assert res["steps"] == 4 and res["metrics"]["recall_at_1"] > 0.3
    ck = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(ck)
    assert state["custom_backbone"] == "Sequential" and state["embedder_config"] is None
    assert state["config"]["backbone"] == "<module Sequential>"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 4
    with pytest.raises(UserError, match="custom nn.Module backbone .*load_state_dict"):
        load_embedder(ck)
    # resuming with the same module continues; with another backbone it names the field
    again = fit(cfg.replace(backbone=_module(), resume=True))
    assert again["metrics"] == pytest.approx(res["metrics"])
    with pytest.raises(UserError, match=r"backbone='<module Sequential>' there but 'mlp' now"):
        fit(cfg.replace(backbone="mlp", resume=True))
