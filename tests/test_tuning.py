"""The tuned comparison (:mod:`contrastive.app.tuning`): a seeded study is reproducible, a
SIGKILLed tuning process resumes without repeating its finished trials, two worker processes
share one SQLite study without losing or duplicating trials, and ``tune`` writes its report and
reuses its studies and cells on a second run. Tiny budgets: a few steps of the digits MLP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from contrastive.app.study import (  # noqa: E402
    N_STARTUP,
    _quiet_optuna,
    finished_trials,
    open_study,
    run_trials,
)
from contrastive.app.tuning import (  # noqa: E402
    LR_SPACE,
    TuneConfig,
    search_space,
    study_name,
    trial_config,
    tune,
    tune_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, **kw):
    data = {"losses": "infonce,triplet", "steps": 3, "trials": 1, "folds": 2, "seeds": "0,1",
            "batch_size": 24, "m_per_class": 8, "output": str(tmp_path / "out"),
            "progress": False, "train": {"dim": 8, "eval_every": 0}}
    data.update(kw)
    return TuneConfig.from_dict(data)


def test_default_is_the_generated_benchmark_and_digits_bring_their_batch():
    cfg = TuneConfig.from_dict({})
    assert (cfg.dataset, cfg.backbone, cfg.batch_size, cfg.m_per_class, cfg.trials) == (
        "latent_classes", "mlp", 64, 4, 10)
    digits = TuneConfig.from_dict({"dataset": "digits"})
    assert (digits.batch_size, digits.m_per_class) == (48, 16)  # 3 of a fold's 3 classes
    mine = TuneConfig.from_dict({"dataset": "digits", "batch_size": 32})
    assert (mine.batch_size, mine.m_per_class) == (32, 16)  # what the user set wins


def test_reference_rows_are_the_raw_input_and_the_known_answer(tmp_path):
    from contrastive.app.tuning import reference_rows

    rows = reference_rows(TuneConfig.from_dict({"output": str(tmp_path)}))
    assert rows["(raw input)"]["map_at_r"] == pytest.approx(0.032, abs=0.001)
    assert rows["(true latent)"]["map_at_r"] == pytest.approx(0.722, abs=0.001)
    digits = reference_rows(TuneConfig.from_dict({"dataset": "digits",
                                                  "output": str(tmp_path)}))
    assert list(digits) == ["(raw input)"]  # no known answer for real data
    assert digits["(raw input)"]["map_at_r"] == pytest.approx(0.666, abs=0.001)


def quadratic(trial):
    x = trial.suggest_float("x", -2.0, 2.0)
    m = trial.suggest_categorical("m", ["a", "b"])
    return -(x - 0.3) ** 2 + (0.1 if m == "b" else 0.0)


def test_same_seed_same_study(tmp_path):
    runs = []
    for i in range(2):
        study = open_study(f"sqlite:///{tmp_path / f's{i}.db'}", "study", seed=3)
        assert run_trials(study, N_STARTUP + 2, quadratic) == N_STARTUP + 2
        runs.append([t.params for t in finished_trials(study)])
    assert runs[0] == runs[1]
    other = open_study(f"sqlite:///{tmp_path / 'o.db'}", "study", seed=4)
    run_trials(other, N_STARTUP + 2, quadratic)
    assert [t.params for t in finished_trials(other)] != runs[0]


def test_search_space_and_study_name(tmp_path):
    cfg = tiny(tmp_path)
    space = search_space("triplet")
    assert space["lr"] == LR_SPACE and space["mining"]["choices"] == ["all", "semihard", "hard"]
    assert list(search_space("pml:NTXentLoss")) == ["lr"]
    given = {"temperature": {"low": 0.01, "high": 0.5, "log": True}}
    assert search_space("pml:NTXentLoss", given) == {**given, "lr": LR_SPACE}  # PML enters too
    name = study_name(cfg, "infonce")
    assert name.startswith("infonce-") and name == study_name(tiny(tmp_path, trials=9),
                                                              "infonce")
    assert name != study_name(tiny(tmp_path, steps=4), "infonce")  # another budget: new study
    t = trial_config(cfg, "triplet", {"margin": 0.3, "mining": "hard", "lr": 2e-3}, 1, "x")
    assert (t.loss_kwargs["margin"], t.loss_kwargs["mining"], t.lr) == (0.3, "hard", 2e-3)
    assert (t.train_split, t.eval_split) == ("fold1of2-train", "fold1of2-val")
    with pytest.raises(Exception, match="lr"):
        tiny(tmp_path, train={"lr": 1e-3})


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import contrastive.app.train as train
    from contrastive.app.tuning import TuneConfig, tune_loss

    # Trial 0 trains its 2 folds; the first fold of trial 1 announces itself in a marker file
    # and hangs there, so the parent kills the process at a known point: one trial finished,
    # one running.
    real_fit, calls = train.fit, []

    def fit(config):
        calls.append(1)
        if len(calls) == 3:
            Path(sys.argv[3]).write_text("in trial 1")
            time.sleep(600)
        return real_fit(config)

    train.fit = fit
    cfg = TuneConfig.from_dict({"losses": "infonce", "steps": 3, "trials": int(sys.argv[2]),
                                "folds": 2, "batch_size": 24, "m_per_class": 8,
                                "output": sys.argv[1], "progress": False,
                                "train": {"dim": 8}})
    tune_loss(cfg, "infonce")
""")


def _child(out, trials, marker):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(trials), str(marker)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkilled_tuning_resumes_without_repeating_trials(tmp_path):
    cfg = TuneConfig.from_dict({"losses": "infonce", "steps": 3, "trials": 3, "folds": 2,
                                "batch_size": 24, "m_per_class": 8,
                                "output": str(tmp_path), "progress": False,
                                "train": {"dim": 8}})
    storage, name = f"sqlite:///{tmp_path / 'tuning.db'}", study_name(cfg, "infonce")
    marker = tmp_path / "in_trial_1"
    proc = _child(tmp_path, 3, marker)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.1)
    assert marker.exists(), proc.stdout.read().decode()[-2000:] if proc.poll() is not None else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    study = optuna.load_study(study_name=name, storage=storage)
    before = {t.number: (t.params, t.value) for t in finished_trials(study)}
    assert list(before) == [0]  # killed inside trial 1: trial 0 finished, nothing after it
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.COMPLETE, TrialState.RUNNING]  # left running by the kill

    assert tune_loss(cfg, "infonce")["ran_now"] == 2  # rerun: the remainder
    study = optuna.load_study(study_name=name, storage=storage)
    done = finished_trials(study)
    assert len(done) == 3  # exactly the budget: the remainder ran, nothing twice
    numbers = [t.number for t in done]
    assert len(set(numbers)) == len(numbers)
    for n, (params, value) in before.items():  # the finished trials were kept as they were
        kept = next(t for t in done if t.number == n)
        assert (kept.params, kept.value) == (params, value)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states  # the killed trial was marked failed


def test_a_worker_that_died_on_another_machine_is_failed_after_its_grace_period(tmp_path):
    """A RUNNING trial of a remote worker (another host, so its process cannot be looked up)
    stops beating; once the grace period passes without a heartbeat, the next worker marks it
    failed and the study still reaches exactly its budget. A live trial with a recent
    heartbeat is left alone."""
    storage = f"sqlite:///{tmp_path / 'hb.db'}"
    study = open_study(storage, "hb", seed=0, heartbeat_s=1, grace_s=2)
    with _quiet_optuna():  # asking outside Study.optimize, as the library's loop does
        dead = study.ask()
    dead.set_user_attr("worker", {"host": "another-machine", "pid": 1})
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(0.5)
    assert run_trials(study, 0, quadratic) == 0  # inside its grace period: left running
    assert study._storage.get_trial(dead._trial_id).state == TrialState.RUNNING
    time.sleep(2.5)
    assert run_trials(study, 3, quadratic) == 3
    assert study._storage.get_trial(dead._trial_id).state == TrialState.FAIL
    assert len(finished_trials(study)) == 3
    stale = study._storage._get_stale_trial_ids(study._study_id)
    assert stale == []  # every trial this worker ran beat and finished


WORKER = textwrap.dedent("""
    import sys, time
    from contrastive.app.study import open_study, run_trials
    study = open_study(sys.argv[1], "shared", seed=int(sys.argv[2]))
    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        time.sleep(0.15)
        return x
    print(run_trials(study, 10, objective))
""")


def test_two_workers_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    open_study(storage, "shared", seed=0)  # create the tables once, before the race
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, storage, str(i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-1500:] for o in outs]
    counts = [int(o[0].decode().split()[-1]) for o in outs]
    study = optuna.load_study(study_name="shared", storage=storage)
    done = finished_trials(study)
    assert len(done) == 10 and sum(counts) == 10  # none lost, none run twice
    assert len({t.number for t in done}) == 10
    assert len({t.params["x"] for t in done}) == 10
    workers = {t.user_attrs["worker"]["pid"] for t in done}
    assert len(workers) == 2 and all(c > 0 for c in counts)  # both did work


def test_tune_end_to_end_and_second_run_reuses_everything(tmp_path):
    cfg = tiny(tmp_path)
    res = tune(cfg)
    assert res["failed"] == []
    assert {k: v["n_trials"] for k, v in res["tuning"].items()} == {"infonce": 1, "triplet": 1}
    out = Path(cfg.output)
    for name in ("results.json", "results.csv", "results.md", "map_probe.png",
                 "tuning_history.png", "mi_vs_accuracy.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["significance"]["map_at_r"]["test"] == "paired t-test over seeds"
    rec = payload["records"][0]
    best = res["tuning"][rec["loss"]]["best_params"]
    assert rec["config"]["lr"] == pytest.approx(best["lr"])  # the final cell uses the tuned lr
    assert (rec["config"]["train_split"], rec["config"]["eval_split"]) == ("train_classes",
                                                                           "test_classes")
    assert "Val MAP@R" in res["table"] and "lr=" in res["table"]
    again = tune(cfg)
    assert all(v["ran_now"] == 0 for v in again["tuning"].values())
    assert [r["metrics"] for r in again["records"]] == [r["metrics"] for r in res["records"]]
