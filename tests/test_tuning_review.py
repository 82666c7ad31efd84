"""Review of ``contrastive compare --tune`` (:mod:`contrastive.app.tuning`,
:mod:`contrastive.app.study`) as a researcher who tunes every loss with the same budget and
trusts the final table: a resumed study draws what an uninterrupted one draws, the study's name
holds every setting that decides a trial's value, the search spaces are sampled as declared and
reach the loss, failed trials score as documented, the final cells train with the best trial's
parameters exactly, and the scratch folders of an earlier version are cleaned up.

Tiny budgets; the trainer is replaced by a stand-in where only the tuning mechanics are under
test (``contrastive.app.train.fit``, looked up by the objective at call time)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from contrastive.app.config import ConfigError  # noqa: E402
from contrastive.app.study import (  # noqa: E402
    N_STARTUP,
    _quiet_optuna,
    finished_trials,
    open_study,
    remove_dead_scratch,
    run_trials,
    worker_scratch,
)
from contrastive.app.tuning import (  # noqa: E402
    TuneConfig,
    final_compare_config,
    final_train_config,
    search_space,
    study_name,
    suggest,
    trial_config,
    tune_loss,
)


def tiny(tmp_path, **kw):
    data = {"dataset": "digits", "losses": "triplet", "steps": 3, "trials": 2, "folds": 2,
            "seeds": "0", "output": str(tmp_path / "out"), "progress": False,
            "train": {"dim": 8}}
    data.update(kw)
    return TuneConfig.from_dict(data)


def objective(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    m = trial.suggest_categorical("m", ["a", "b", "c"])
    return -(x - 0.3) ** 2 + (0.1 if m == "b" else 0.0)


def _dead_pid() -> int:
    """The pid of a process of this machine that no longer exists."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


# ------------------------------------------------------------------------------ resuming


def test_a_resumed_study_draws_what_an_uninterrupted_one_draws(tmp_path):
    """A resumed run opens a new sampler seeded with ``tune_seed``; its random stream started
    over, so the first trial after a restart repeated the parameters of trial 0 (a wasted
    trial of the budget, and a study that depends on where it was interrupted). Each trial now
    draws from a stream of its own place in the budget: stopped after 2 trials, or killed in
    the 3rd, the study holds the same parameters and values as one run straight through, on
    both sides of the random start-up trials."""
    n = N_STARTUP + 3
    straight = open_study(f"sqlite:///{tmp_path / 'a.db'}", "s", seed=0)
    run_trials(straight, n, objective)
    want = [(t.params, t.value) for t in finished_trials(straight)]
    assert len({repr(p) for p, _ in want}) == n  # no point drawn twice

    url = f"sqlite:///{tmp_path / 'b.db'}"
    run_trials(open_study(url, "s", seed=0), 2, objective)
    study = open_study(url, "s", seed=0)  # a new process: a new sampler
    with _quiet_optuna():
        killed = study.ask()  # the 3rd trial, left RUNNING by a worker that died
    killed.suggest_float("x", -2.0, 2.0)
    killed.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
    study = open_study(url, "s", seed=0)
    assert run_trials(study, n, objective) == n - 2
    assert study._storage.get_trial(killed._trial_id).state == TrialState.FAIL
    assert [(t.params, t.value) for t in finished_trials(study)] == want


# ------------------------------------------------------------------------------ the study name


def test_the_study_name_follows_the_folder_a_relative_data_dir_names(tmp_path, monkeypatch):
    """The study name held ``data_dir`` as written: the same relative path from two working
    folders (two data sets) resumed one study, mixing trials of both. It now holds the absolute
    folder and a fingerprint of the data, as a cell's key does."""
    from contrastive.app.compare import _DATA_FINGERPRINTS

    sys.path.insert(0, os.path.dirname(__file__))
    from test_compare_review import _digits_dir

    for sub in ("a", "b"):
        _digits_dir(tmp_path / sub / "data", n_per_class=8, shift=0 if sub == "a" else 100)
    kw = {"dataset": "folder", "data_dir": "data", "losses": "infonce", "batch_size": 8,
          "m_per_class": 4}
    monkeypatch.chdir(tmp_path / "a")
    _DATA_FINGERPRINTS.clear()  # as tune's preflight does: the data as they are now
    name_a = study_name(tiny(tmp_path, **kw), "infonce")
    assert study_name(tiny(tmp_path, **{**kw, "data_dir": str(tmp_path / "a" / "data")}),
                      "infonce") == name_a
    monkeypatch.chdir(tmp_path / "b")
    _DATA_FINGERPRINTS.clear()
    assert study_name(tiny(tmp_path, **kw), "infonce") != name_a


def test_the_study_name_tells_an_automatic_gpu_from_the_cpu(tmp_path, monkeypatch):
    """Without ``train.device`` the trials run on the GPU where there is one (autocast, other
    kernels): other values than on the CPU, so another study, as the cells' keys say."""
    import torch

    cfg = tiny(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = study_name(cfg, "triplet")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert study_name(cfg, "triplet") != cpu
    assert study_name(tiny(tmp_path, train={"dim": 8, "device": "cpu"}), "triplet") != \
        study_name(cfg, "triplet")


def test_the_study_name_ignores_what_does_not_decide_a_value(tmp_path):
    """Not the number of trials, the final seeds, the output folder or the storage; a
    ``train`` field written at its default value is the same study."""
    cfg = tiny(tmp_path)
    name = study_name(cfg, "triplet")
    assert name.startswith("triplet-")
    for other in (tiny(tmp_path, trials=7), tiny(tmp_path, seeds="3,4"),
                  tiny(tmp_path, output=str(tmp_path / "elsewhere")),
                  tiny(tmp_path, storage="sqlite:///x.db"),
                  tiny(tmp_path, train={"dim": 8, "num_workers": 0})):
        assert study_name(other, "triplet") == name
    for other in (tiny(tmp_path, steps=4), tiny(tmp_path, tune_seed=1),
                  tiny(tmp_path, fold_seed=1), tiny(tmp_path, folds=3),
                  tiny(tmp_path, train={"dim": 16}),
                  tiny(tmp_path, loss_kwargs={"triplet": {"soft": True}}),
                  tiny(tmp_path, search_spaces={"triplet": {"margin": {"low": 0.1,
                                                                       "high": 0.5}}})):
        assert study_name(other, "triplet") != name


# ------------------------------------------------------------------------------ search spaces


def test_an_int_range_is_sampled_as_ints_and_reaches_the_loss(tmp_path):
    """``{"low", "high", "int": true}`` is an integer range (``suggest_int``); it was sampled as
    a float (``layers=1.73``) since every range went to ``suggest_float``."""
    space = search_space("l1out", {"hidden_dim": {"low": 16, "high": 64, "log": True,
                                                  "int": True},
                                   "layers": {"low": 1, "high": 2, "int": True}})
    study = open_study(f"sqlite:///{tmp_path / 'i.db'}", "i", seed=0)
    seen = []

    def obj(trial):
        seen.append(suggest(trial, space))
        return 0.0

    run_trials(study, N_STARTUP + 2, obj)
    for p in seen:
        assert type(p["hidden_dim"]) is int and 16 <= p["hidden_dim"] <= 64
        assert type(p["layers"]) is int and p["layers"] in (1, 2)
        assert type(p["lr"]) is float
    t = trial_config(tiny(tmp_path, losses="l1out"), "l1out", seen[-1], 0, "x")
    assert t.loss_kwargs["hidden_dim"] == seen[-1]["hidden_dim"]
    assert type(t.loss_kwargs["layers"]) is int


@pytest.mark.parametrize("spec,match", [
    ({"low": 0.0, "high": 1.0, "log": True}, "log"),
    ({"low": 1.0, "high": 0.5}, "low"),
    ({"choices": []}, "choices"),
    ({"low": 0.1, "high": 1.0, "type": "int"}, "type"),
    ({"low": 0.5, "high": 2.5, "int": True}, "int"),
    ({"choices": [[64, 64], [128]]}, "choices"),
])
def test_a_malformed_space_is_refused_before_anything_trains(tmp_path, spec, match):
    """A range Optuna cannot sample (log from 0, low > high, no choices, non-integer bounds of
    an int range, list-valued choices) failed in the first trial after the other losses'
    studies, with Optuna's message; an unknown key (``type: int``) was ignored and the
    parameter sampled as a float. Each is a config error that names the key."""
    with pytest.raises(ConfigError, match=match):
        search_space("triplet", {"margin": spec})


def test_a_space_of_one_value_and_a_pml_loss_without_a_space(tmp_path):
    space = search_space("triplet", {"margin": {"low": 0.2, "high": 0.2, "log": True},
                                     "mining": {"choices": ["hard"]}})
    study = open_study(f"sqlite:///{tmp_path / 'o.db'}", "o", seed=0)
    seen = []
    run_trials(study, N_STARTUP + 1, lambda t: seen.append(suggest(t, space)) or 0.0)
    assert {(p["margin"], p["mining"]) for p in seen} == {(0.2, "hard")}
    assert search_space("pml:TripletMarginLoss") == {"lr": {"low": 1e-5, "high": 1e-2,
                                                            "log": True}}


# ------------------------------------------------------------------------------ trials and best


def _fake_fit(values, calls):
    """A stand-in trainer: the next value of ``values`` per fold (an exception is raised)."""
    def fit(config):
        calls.append(config)
        v = values[min(len(calls) - 1, len(values) - 1)]
        if isinstance(v, BaseException):
            raise v
        return {"metrics": {"map_at_r": v}}
    return fit


def test_diverged_and_nan_folds_score_zero_and_ties_go_to_the_first_trial(tmp_path,
                                                                           monkeypatch):
    import contrastive.app.train as train

    calls = []
    diverged = train.DivergedError("the loss became nan at step 2: training diverged")
    monkeypatch.setattr(train, "fit", _fake_fit([diverged, 0.5, float("nan"), 0.5, 0.25, 0.25,
                                                 0.25, 0.25], calls))
    res = tune_loss(tiny(tmp_path, trials=4), "triplet")
    assert [h["fold_map_at_r"] for h in res["history"]] == [[0.0, 0.5], [0.0, 0.5],
                                                            [0.25, 0.25], [0.25, 0.25]]
    assert res["history"][0]["diverged"].startswith("the loss became nan")
    assert res["best_trial"] == 0 and res["best_value"] == 0.25  # a tie: the first trial
    for c in calls:  # model selection sees folds of the training classes only
        assert c.train_split.startswith("fold") and c.eval_split.startswith("fold")
        assert c.seed == 0  # every trial trains with tune_seed


def test_the_final_cells_train_with_the_best_trials_parameters_exactly(tmp_path, monkeypatch):
    """Ints stay ints, categories unchanged, floats not rounded, the learning rate as tuned;
    the loss is built with them."""
    import contrastive.app.train as train
    from contrastive.app.factory import build_loss

    space = {"layers": {"choices": [1, 2]}, "hidden_dim": {"low": 16, "high": 64, "int": True}}
    cfg = tiny(tmp_path, losses="club", search_spaces={"club": {
        "layers": space["layers"], "hidden_dim": space["hidden_dim"]}})
    monkeypatch.setattr(train, "fit", _fake_fit([0.1, 0.1, 0.3, 0.3], []))
    res = tune_loss(cfg, "club")
    best = res["best_params"]
    assert res["best_trial"] == 1 and best == res["history"][1]["params"]
    ccfg = final_compare_config(cfg, {"club": best})
    tcfg = final_train_config(ccfg, "club", 0, best["lr"])
    assert tcfg.lr == best["lr"] and type(tcfg.lr) is float
    for k in ("layers", "hidden_dim"):
        assert tcfg.loss_kwargs[k] == best[k] and type(tcfg.loss_kwargs[k]) is int
    assert (tcfg.train_split, tcfg.eval_split) == ("train_classes", "test_classes")
    loss = build_loss(tcfg.loss, tcfg.loss_kwargs, embedding_dim=8, num_classes=6)
    assert repr(best["hidden_dim"]) in repr(loss) or \
        any(getattr(m, "out_features", None) == best["hidden_dim"] for m in loss.modules())


# ------------------------------------------------------------------------------ scratch folders


def test_old_layout_scratch_folders_are_removed_once_nothing_touched_them(tmp_path):
    """Before per-worker folders, trials trained in ``scratch/tmp*`` directly; a killed run of
    that version left them there, and nothing removed them (nor, so, ``scratch``). A
    ``tmp*`` folder that nothing has written to for the old-layout grace period goes; a recent
    one (a run of that version may still be writing it) and other entries stay."""
    from contrastive.app.study import OLD_LAYOUT_GRACE_S

    old = time.time() - OLD_LAYOUT_GRACE_S - 100
    stale = tmp_path / "tmpk3j_a9zq"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "log.jsonl").write_text("{}\n")
    for p in (stale / "sub" / "log.jsonl", stale / "sub", stale):
        os.utime(p, (old, old))
    recent = tmp_path / "tmpq8w2e7rt"
    (recent / "sub").mkdir(parents=True)
    (recent / "sub" / "log.jsonl").write_text("{}\n")  # written now, deep inside
    os.utime(recent, (old, old))
    os.utime(recent / "sub", (old, old))
    keep = tmp_path / "notes"
    keep.mkdir()
    os.utime(keep, (old, old))
    removed = remove_dead_scratch(tmp_path, grace_s=100)
    assert [p.name for p in removed] == [stale.name]
    assert not stale.exists() and recent.exists() and keep.exists()
    for p in (recent / "sub" / "log.jsonl",):
        os.utime(p, (old, old))
    with worker_scratch(tmp_path, heartbeat_s=0, grace_s=100):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
