"""``compare`` in this process: a cell that fails while training is reported (stderr, the
table, ``failed``) while the others go on; finished cells with the same settings are reused
and only the failed one is trained again."""

from __future__ import annotations

import json

import contrastive.app.train as train_mod
from contrastive.app.compare import CompareConfig, compare


def test_a_failing_cell_is_reported_and_retried_alone(tmp_path, monkeypatch, capsys):
    cfg = CompareConfig.from_dict({"losses": "infonce", "seeds": "0,1", "steps": 2,
                                   "output": str(tmp_path / "c"), "progress": False,
                                   "train": {"final_probe": False, "dim": 16}})
    real_fit = train_mod.fit
    trained = []

    def flaky(tcfg):
        trained.append(tcfg.seed)
        if tcfg.seed == 1:
            raise RuntimeError("simulated failure in the middle of training")
        return real_fit(tcfg)

    monkeypatch.setattr(train_mod, "fit", flaky)
    res = compare(cfg)
    assert res["failed"] == [("infonce", 1, "RuntimeError: simulated failure in the middle of "
                                            "training")]
    assert "cell infonce seed 1 failed: RuntimeError: simulated failure" in capsys.readouterr().err
    assert "| infonce (1 failed) |" in res["table"]
    assert "Failed cells, left out of the statistics: infonce seed 1." in res["table"]
    cells = sorted((tmp_path / "c" / "cells").glob("*.json"))
    assert [json.loads(c.read_text())["seed"] for c in cells] == [0]  # failures are not cached
    stamp = cells[0].stat().st_mtime_ns

    monkeypatch.setattr(train_mod, "fit", lambda tcfg: (trained.append(tcfg.seed),
                                                        real_fit(tcfg))[1])
    again = compare(cfg)
    assert trained == [0, 1, 1] and again["failed"] == []  # only the failed cell ran again
    assert cells[0].stat().st_mtime_ns == stamp
    assert [r["status"] for r in again["records"]] == ["ok", "ok"]
    assert again["records"][0]["metrics"] == res["records"][0]["metrics"]


def test_train_overrides_change_one_cell_only():
    from contrastive.app.compare import cell_key, train_config_for

    cfg = CompareConfig.from_dict({"losses": "infonce,triplet", "seeds": "0", "steps": 2,
                                   "output": "unused", "progress": False})
    plain = train_config_for(cfg, "infonce", 0)
    assert train_config_for(cfg, "infonce", 0, train_overrides={}).output == plain.output
    tuned = train_config_for(cfg, "infonce", 0, train_overrides={"lr": 3e-3})
    assert tuned.lr == 3e-3 and plain.lr == 1e-3
    assert cell_key(tuned) != cell_key(plain) and tuned.output != plain.output


def test_the_cell_key_has_what_changes_a_result_and_only_that(monkeypatch):
    """``num_workers`` changes nothing without random transforms (it stays out of the key, so
    caches survive a change of it), but with ``augment`` or multi-view batches each worker
    draws from its own stream: it is in the key then. ``device=None`` becomes a GPU where there
    is one, which is not a CPU cell's result; without one the key stays what it was."""
    import torch

    from contrastive.app.compare import cell_key, resolved_cell_config
    from contrastive.app.config import TrainConfig

    base = {"loss": "infonce", "steps": 2, "output": "unused", "progress": False}
    plain = TrainConfig.from_dict(base)
    assert cell_key(plain) == cell_key(TrainConfig.from_dict({**base, "num_workers": 2}))
    for random_views in ({"augment": True}, {"views": 2}):
        a = TrainConfig.from_dict({**base, **random_views})
        b = TrainConfig.from_dict({**base, **random_views, "num_workers": 2})
        assert cell_key(a) != cell_key(b)
    assert "device" in resolved_cell_config(plain)  # None, as every key had it so far
    assert resolved_cell_config(plain)["device"] is None
    cpu_key = cell_key(plain)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cell_key(plain) != cpu_key
    assert cell_key(TrainConfig.from_dict({**base, "device": "cpu"})) != cell_key(plain)
