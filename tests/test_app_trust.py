"""Trust in the application layer (``contrastive/app``, ``contrastive/cli.py``): what a run
reports is what it did, and a user's mistake is one line.

* Resume: a run interrupted and resumed (the stateful losses too), or a finished run resumed,
  reports the uninterrupted run's model, metrics, history and MI readout; Ctrl-C during the
  final evaluation is an interruption (exit 130), not a finished run.
* Evaluation does not steer training: the periodic evaluation draws nothing from the global
  RNGs, so ``eval_every`` leaves the trained weights as they are.
* The tuned comparison picks the best of exactly ``--trials`` completed trials, waiting for
  other workers' running trials (and giving up with a clear error after a while).
* Config values: booleans are not numbers, YAML 1.1's ``yes``/``no``/``on``/``off`` are not
  booleans; an error inside compare's ``train`` / ``loss_kwargs`` names the key as written.
* One ``error:`` line and exit 2 for a bad device and for a keyword value of the wrong type.
* ``contrastive eval`` of a checkpoint reproduces the run's own metrics: its seed and splits."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time

import pytest
import torch

import contrastive.app.train as train_mod
from contrastive import cli
from contrastive.app.config import ConfigError, TrainConfig
from contrastive.app.run_folder import TrainingInterrupted
from contrastive.app.train import fit
from contrastive.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def _keep_threads():
    """``cli.main`` sets torch's thread count; give the test process its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(out, **kw) -> TrainConfig:
    base = dict(steps=6, dim=16, progress=False, log_every=2, checkpoint_every=0,
                final_probe=False, device="cpu", output=str(out))
    base.update(kw)
    return TrainConfig.from_dict(base)


def _interrupt_then_resume(cfg: TrainConfig, at: int, monkeypatch) -> dict:
    """``fit(cfg)`` stopped by a real SIGINT right after optimizer step ``at`` (the trainer
    writes a checkpoint at that step), then ``fit(cfg, resume=True)``."""
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step)
        with pytest.raises(TrainingInterrupted) as info:
            fit(cfg)
    assert info.value.step == at
    assert load_checkpoint(cfg.output + "/checkpoints/last.pt")["step"] == at
    return fit(cfg.replace(resume=True))


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("loss", ["xbm", "proxy_anchor"])
def test_stateful_losses_resume_bit_for_bit_through_fit(tmp_path, monkeypatch, loss):
    """Cross-batch memory buffers (xbm) and proxies in their own optimiser group
    (proxy_anchor), with augmentation: interrupted at step 3 and resumed, the model, the loss
    state and the metrics equal the uninterrupted run's."""
    kw = dict(loss=loss, augment=True)
    ref = fit(_cfg(tmp_path / "ref", **kw))
    res = _interrupt_then_resume(_cfg(tmp_path / "cut", **kw), 3, monkeypatch)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert _same_state(a["model"], b["model"])
    assert _same_state(a["loss"], b["loss"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert res["metrics"] == ref["metrics"]
    assert [r["loss"] for r in res["history"]] == [r["loss"] for r in ref["history"]]


def test_resume_reproduces_the_readout_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """result.json's readout (the mean of the last 5 logged rows) is rebuilt from the history
    a resumed run restores, not only from the rows it logs itself."""
    ref = fit(_cfg(tmp_path / "ref"))
    res = _interrupt_then_resume(_cfg(tmp_path / "cut"), 5, monkeypatch)
    assert res["metrics"] == ref["metrics"]  # the model is the same ...
    assert res["history"] == ref["history"]
    # ... but result.json's readout is the mean of the last 5 logged rows: [2, 4, 6] there,
    # only [6] after a resume from step 5
    saved = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert saved["readout"] == ref["readout"]


def test_resume_of_an_older_checkpoint_rebuilds_the_readout_keys(tmp_path, monkeypatch):
    """A checkpoint written before the readout's estimators were stored in it: they are read
    off the restored history (the rows without an evaluation)."""
    real = train_mod.ckpt.atomic_save

    def save_without_keys(state, path):
        state = {k: v for k, v in state.items() if k != "readout_keys"}
        return real(state, path)

    ref = fit(_cfg(tmp_path / "ref", loss="club", eval_every=4))
    assert "club" in ref["readout"]
    monkeypatch.setattr(train_mod.ckpt, "atomic_save", save_without_keys)
    first = fit(_cfg(tmp_path / "old", loss="club", eval_every=4))
    assert "readout_keys" not in load_checkpoint(tmp_path / "old" / "checkpoints" / "last.pt")
    again = fit(_cfg(tmp_path / "old", loss="club", eval_every=4, resume=True))
    assert again["readout"] == first["readout"] == ref["readout"]


def test_resuming_a_finished_run_keeps_its_readout(tmp_path):
    """`train --resume` of a finished run (or a compare cell killed during its final
    evaluation) rewrites result.json with the readout it had, not NaN."""
    first = fit(_cfg(tmp_path / "run"))
    assert all(math.isfinite(v) for v in first["readout"].values())
    again = fit(_cfg(tmp_path / "run", resume=True))
    assert again["metrics"] == first["metrics"]
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["readout"] == first["readout"]


def test_periodic_evaluation_does_not_change_training(tmp_path):
    """eval_every (which may change on resume) leaves the augmentations, and so the trained
    weights, as they are."""
    fit(_cfg(tmp_path / "quiet", steps=4, augment=True, eval_every=0))
    fit(_cfg(tmp_path / "evals", steps=4, augment=True, eval_every=2))
    a = load_checkpoint(tmp_path / "quiet" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "evals" / "checkpoints" / "last.pt")["model"]
    assert _same_state(a, b)


def test_the_trainer_shields_training_from_what_an_evaluation_draws(tmp_path, monkeypatch):
    """Whatever a periodic evaluation draws from the global RNGs (torch, NumPy, Python), the
    trainer restores them: the weights equal those of a run without evaluations."""
    import random

    import numpy as np

    real = train_mod.evaluate_embedder

    def greedy(*args, **kwargs):
        torch.rand(3), np.random.rand(3), random.random()
        return real(*args, **kwargs)

    fit(_cfg(tmp_path / "quiet", steps=4, augment=True, eval_every=0))
    monkeypatch.setattr(train_mod, "evaluate_embedder", greedy)
    fit(_cfg(tmp_path / "evals", steps=4, augment=True, eval_every=2))
    a = load_checkpoint(tmp_path / "quiet" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "evals" / "checkpoints" / "last.pt")["model"]
    assert _same_state(a, b)


class _Pairs(torch.utils.data.Dataset):
    """A plain Dataset (not a TensorDataset): embedded through a DataLoader."""

    def __init__(self, n: int = 40, d: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, d, generator=g), torch.arange(n) % 4

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_evaluation_draws_nothing_from_the_global_rng():
    """Embedding a Dataset (the loader's base seed) and the retrieval evaluation leave torch's
    global generator where it was."""
    from contrastive.app.protocol import evaluate_embedder
    from contrastive.inference import embed

    model = torch.nn.Linear(8, 4)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    embed(model, _Pairs(), batch_size=16, device="cpu", progress=False)
    evaluate_embedder(model, _Pairs(), device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_signal_during_the_final_evaluation_is_an_interruption(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the final evaluation: exit 130 and no result.json (not a finished run);
    `--resume` then repeats the evaluation only and reports the uninterrupted run's result."""
    real = train_mod.evaluate_embedder

    def evaluate(*args, **kwargs):
        if kwargs.get("return_backend"):  # the final evaluation
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    argv = ["train", "--steps", "4", "--set", "dim=16", "--set", "final_probe=false",
            "--set", "log_every=2", "--no-progress", "--output"]
    code, _ = _main([*argv, str(tmp_path / "ref")], capsys)
    assert code == 0
    with monkeypatch.context() as m:
        m.setattr(train_mod, "evaluate_embedder", evaluate)
        code, lines = _main([*argv, str(tmp_path / "cut")], capsys)
    assert code == 130, lines
    assert "at step 4" in lines[0] and "--resume" in lines[-1]
    assert not (tmp_path / "cut" / "result.json").exists()
    code, _ = _main([*argv, str(tmp_path / "cut"), "--resume"], capsys)
    assert code == 0
    ref, res = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("ref", "cut"))
    assert res["metrics"] == ref["metrics"] and res["readout"] == ref["readout"]
    assert res["history"] == ref["history"]


def test_a_signal_while_the_last_checkpoint_is_written_skips_the_evaluation(tmp_path,
                                                                          monkeypatch):
    """SIGINT while the end-of-run checkpoint is written: interrupted at once (the checkpoint
    is complete), the final evaluation is left to the resume."""
    real_save, real_eval = train_mod.ckpt.atomic_save, train_mod.evaluate_embedder
    finals = []

    def save(state, path):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(state, path)

    def evaluate(*args, **kwargs):
        finals.append(bool(kwargs.get("return_backend")))
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate_embedder", evaluate)
    with monkeypatch.context() as m:
        m.setattr(train_mod.ckpt, "atomic_save", save)
        with pytest.raises(TrainingInterrupted) as info:
            fit(_cfg(tmp_path / "run", steps=4))
    assert info.value.step == 4 and finals == []
    assert not (tmp_path / "run" / "result.json").exists()
    res = fit(_cfg(tmp_path / "run", steps=4, resume=True))
    assert finals == [True] and math.isfinite(res["readout"]["infonce"])


# ------------------------------------------------------------------------------ tuning


def test_tune_loss_uses_the_whole_budget_when_another_worker_holds_a_trial(tmp_path,
                                                                           monkeypatch):
    """The rest of the budget is another live worker's running trial: tune_loss waits for it
    and picks the best of all --trials trials (here the other worker's)."""
    import optuna

    from contrastive.app.study import _quiet_optuna, open_study
    from contrastive.app.tuning import TuneConfig, storage_url, study_name, tune_loss

    cfg = TuneConfig.from_dict({"losses": "infonce", "steps": 3, "trials": 2, "folds": 2,
                                "batch_size": 24, "m_per_class": 8, "output": str(tmp_path),
                                "progress": False, "train": {"dim": 8}})
    monkeypatch.setattr(train_mod, "fit", lambda tcfg: {"metrics": {"map_at_r": 0.5}})
    url, name = storage_url(cfg), study_name(cfg, "infonce")
    study = open_study(url, name, cfg.tune_seed)
    with _quiet_optuna():  # another live worker of this machine holds trial 0
        other = study.ask()
    other.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getppid()})
    study._storage.record_heartbeat(other._trial_id)

    def finish_other():  # ... and finishes it two seconds later
        time.sleep(2)
        optuna.load_study(study_name=name, storage=url).tell(other.number, 0.9)

    worker = threading.Thread(target=finish_other)
    worker.start()
    try:
        res = tune_loss(cfg, "infonce")
    finally:
        worker.join()
    assert res["n_trials"] == cfg.trials, res["history"]
    assert res["best_value"] == 0.9


def _tune_cfg(tmp_path, trials: int):
    from contrastive.app.tuning import TuneConfig

    return TuneConfig.from_dict({"losses": "infonce", "steps": 3, "trials": trials, "folds": 2,
                                 "batch_size": 24, "m_per_class": 8, "output": str(tmp_path),
                                 "progress": False, "train": {"dim": 8}})


def _held_trial(cfg, pid: int):
    """Trial 0 of the infonce study, RUNNING for a worker ``pid`` of this machine."""
    from contrastive.app.study import _quiet_optuna, open_study
    from contrastive.app.tuning import storage_url, study_name

    url, name = storage_url(cfg), study_name(cfg, "infonce")
    study = open_study(url, name, cfg.tune_seed)
    with _quiet_optuna():
        trial = study.ask()
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": pid})
    study._storage.record_heartbeat(trial._trial_id)
    return url, name, study, trial


def test_tune_loss_with_one_trial_waits_for_the_other_workers_trial(tmp_path, monkeypatch):
    """trials=1 and another worker holds it: no max() of nothing, the other worker's value."""
    import optuna

    from contrastive.app.tuning import tune_loss

    cfg = _tune_cfg(tmp_path, 1)
    monkeypatch.setattr(train_mod, "fit", lambda tcfg: {"metrics": {"map_at_r": 0.5}})
    url, name, _, other = _held_trial(cfg, os.getppid())
    worker = threading.Timer(1.0, lambda: optuna.load_study(
        study_name=name, storage=url).tell(other.number, 0.7))
    worker.start()
    try:
        res = tune_loss(cfg, "infonce")
    finally:
        worker.join()
    assert res["n_trials"] == 1 and res["ran_now"] == 0 and res["best_value"] == 0.7


def test_run_trials_gives_up_on_a_trial_that_never_finishes(tmp_path):
    """Another live worker's trial that makes no progress: a clear error naming it after
    wait_s, never a best of fewer trials."""
    from contrastive.app.study import TrialsPending, finished_trials, run_trials

    cfg = _tune_cfg(tmp_path, 2)
    _, _, study, other = _held_trial(cfg, os.getppid())
    said = []
    with pytest.raises(TrialsPending, match=r"1 of 2 trials complete.*#0 \(worker"):
        run_trials(study, 2, lambda trial: 0.5, log=said.append, poll_s=0.05, wait_s=0.3)
    assert len(finished_trials(study)) == 1 and "waiting for trial(s) 0" in said[0]


def test_run_trials_redoes_the_trial_of_a_dead_worker_while_waiting(tmp_path):
    """The waited-for trial's worker (a process of this machine) dies: its trial is failed and
    this worker runs the budget's last trial itself."""
    import subprocess
    import sys

    from contrastive.app.study import finished_trials, run_trials

    cfg = _tune_cfg(tmp_path, 2)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _, _, study, other = _held_trial(cfg, child.pid)
        threading.Timer(0.5, lambda: (child.kill(), child.wait())).start()  # dies, reaped
        ran = run_trials(study, 2, lambda trial: 0.5, poll_s=0.05, wait_s=30)
    finally:
        child.kill()
        child.wait()
    assert ran == 2 and [t.number for t in finished_trials(study)] == [1, 2]


# ------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("key", ["steps", "lr", "seed"])
def test_a_boolean_for_a_number_field_is_refused(key):
    """pydantic would read true as 1 (``steps: true`` trains one step)."""
    with pytest.raises(ConfigError, match=f"'{key}'.*not a boolean"):
        TrainConfig.from_dict({key: True})


def test_a_boolean_in_a_number_list_or_another_config_is_refused():
    from contrastive.app.compare import CompareConfig
    from contrastive.app.tuning import TuneConfig

    with pytest.raises(ConfigError, match="'seeds'.*not a boolean"):
        CompareConfig.from_dict({"seeds": [True]})
    with pytest.raises(ConfigError, match="'trials'.*not a boolean"):
        TuneConfig.from_dict({"trials": True})
    assert TrainConfig.from_dict({"steps": 1.0, "lr": 1}).steps == 1  # numbers still are


def test_yes_is_not_a_boolean_on_the_command_line():
    """The config documents "yes" as an error for a boolean; PyYAML (YAML 1.1) read it as true."""
    args = cli.build_parser().parse_args(["train", "--set", "amp=yes"])
    with pytest.raises(ConfigError, match="'amp' in --set: got 'yes', expected true or false"):
        cli._train_config(args)
    for word in ("no", "on", "off", "Yes"):
        args = cli.build_parser().parse_args(["train", "--set", f"augment={word}"])
        with pytest.raises(ConfigError, match="'augment'"):
            cli._train_config(args)
    args = cli.build_parser().parse_args(["train", "--set", "amp=true", "--set", "augment=False",
                                          "--set", "dataset='on'"])
    cfg_data = cli._apply_sets({}, args.set)
    assert cfg_data == {"amp": True, "augment": False, "dataset": "on"}
    assert type(cfg_data["dataset"]) is str


def test_a_float_without_a_dot_is_a_number_on_the_command_line_and_in_files(tmp_path):
    """YAML 1.1 (PyYAML) reads ``3e-4`` as text, so a loss keyword written that way reached the
    loss as a string; YAML 1.2 reads it as a float, and so do we."""
    from contrastive.app.config import load_mapping

    args = cli.build_parser().parse_args(
        ["train", "--set", "loss_kwargs.temperature=5e-2", "--set", "lr=3e-4",
         "--set", "dataset=1e3x"])
    data = cli._apply_sets({}, args.set)
    assert data == {"loss_kwargs": {"temperature": 0.05}, "lr": 3e-4, "dataset": "1e3x"}
    assert cli._train_config(args).loss_kwargs["temperature"] == 0.05
    p = tmp_path / "c.yaml"
    p.write_text("lr: 3E-4\nloss_kwargs: {temperature: 1e-1}\nsteps: 12\nname: '2e5'\n")
    assert load_mapping(p) == {"lr": 3e-4, "loss_kwargs": {"temperature": 0.1}, "steps": 12,
                               "name": "2e5"}


def test_yes_is_not_a_boolean_in_a_config_file(tmp_path):
    from contrastive.app.config import load_mapping

    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\namp: yes\n")
    with pytest.raises(ConfigError, match=r"'amp' in .*c\.yaml: got 'yes'"):
        TrainConfig.from_file(p)
    p.write_text("train:\n  augment: off\n")
    with pytest.raises(ConfigError, match="'train.augment'"):
        load_mapping(p)
    p.write_text('amp: true\naugment: false\nfinal_probe: "false"\ndataset: "on"\n')
    assert load_mapping(p) == {"amp": True, "augment": False, "final_probe": "false",
                               "dataset": "on"}


def test_compare_train_value_error_names_the_train_key():
    """An error in a cell's config names the key as the comparison's config has it."""
    from contrastive.app.compare import CompareConfig, train_config_for

    cfg = CompareConfig.from_dict({"losses": "infonce", "seeds": "0",
                                   "train": {"lr": "abc"}}, source="c.yaml")
    with pytest.raises(ConfigError) as info:
        train_config_for(cfg, "infonce", 0)
    assert info.value.field == "train.lr"
    assert "config field 'train.lr' in c.yaml: got 'abc'" in str(info.value)
    with pytest.raises(ConfigError, match=r"'train.lr' in c.yaml"):  # as compare() checks it
        train_config_for(cfg.validated(), "infonce", 0)
    cfg = CompareConfig.from_dict({"losses": "infonce", "seeds": "0",
                                   "loss_kwargs": {"infonce": {"temprature": 0.1}}})
    with pytest.raises(ConfigError, match=r"'loss_kwargs.infonce.temprature'.*'temperature'"):
        train_config_for(cfg, "infonce", 0)


def test_compare_set_train_value_is_one_error_line_naming_the_key(tmp_path, capsys):
    code, lines = _main(["compare", "--losses", "infonce", "--seeds", "0", "--steps", "1",
                         "--set", "train.lr=abc", "--output", str(tmp_path / "c"),
                         "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "'train.lr' in --set" in lines[0]


def _main(args, capsys):
    code = cli.main(list(args))
    err = capsys.readouterr().err
    return code, [s for s in err.strip().splitlines() if s.strip()]


@pytest.mark.parametrize("device", ["foo"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_bad_device_is_one_error_line(tmp_path, capsys, device):
    """A device that is not one, or CUDA without a GPU: one error line, exit 2."""
    code, lines = _main(["train", "--steps", "1", "--set", f"device={device}", "--output",
                         str(tmp_path / "d"), "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1 and "device" in lines[0]


@pytest.mark.parametrize("setting", ["loss_kwargs.temperature=abc", "backbone_kwargs.foo=1"])
def test_a_wrong_keyword_value_is_one_error_line(tmp_path, capsys, setting):
    code, lines = _main(["train", "--steps", "1", "--set", setting, "--output",
                         str(tmp_path / "k"), "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1
    assert setting.split("=")[0] in lines[0], lines  # the key as the user wrote it


def test_a_wrong_keyword_value_in_compare_is_one_error_line(tmp_path, capsys):
    """The comparison's preflight builds every loss before anything trains: the same line."""
    code, lines = _main(["compare", "--losses", "infonce", "--seeds", "0", "--steps", "1",
                         "--set", "loss_kwargs.infonce.temperature=abc", "--output",
                         str(tmp_path / "c"), "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "loss_kwargs.infonce.temperature='abc'" in lines[0], lines


def test_keywords_as_user_error_names_the_keywords_and_keeps_internal_errors():
    from contrastive.errors import UserError, keywords_as_user_error

    def build(**kw):
        raise TypeError("'<=' not supported between instances of 'str' and 'int'")

    with pytest.raises(UserError, match=r"loss 'x': '<=' .*loss_kwargs.margin='a'"):
        keywords_as_user_error("loss 'x'", {"loss_kwargs": {"margin": "a"}}, build, margin="a")
    with pytest.raises(TypeError):  # no keyword of the user's: an internal error
        keywords_as_user_error("loss 'x'", {"loss_kwargs": {}}, build)


# ------------------------------------------------------------------------------ eval


def test_eval_reproduces_a_seeded_runs_metrics(tmp_path, capsys):
    """eval seeds the clustering and the probe with the run's seed (and says so)."""
    out = tmp_path / "t"
    code, _ = _main(["train", "--steps", "10", "--seed", "3", "--output", str(out),
                     "--set", "final_probe=true", "--set", "dim=16", "--no-progress"], capsys)
    assert code == 0
    trained = json.loads((out / "result.json").read_text())["metrics"]
    code, _ = _main(["eval", str(out / "checkpoints" / "last.pt"), "--output",
                     str(tmp_path / "e"), "--no-progress"], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    ev = saved["metrics"]
    for key in ("map_at_r", "nmi", "ami", "linear_probe", "knn_top1"):
        assert ev[key] == pytest.approx(trained[key], abs=1e-6), key
    assert (saved["seed"], saved["split"], saved["train_split"]) == (3, "test", "train")


def test_eval_uses_the_runs_splits_unless_told_otherwise(tmp_path, capsys):
    """A class-disjoint run is evaluated on its own test classes (probe on their halves), as
    it reported; --split / --train-split / --seed still override."""
    out = tmp_path / "t"
    code, _ = _main(["train", "--steps", "6", "--seed", "2", "--output", str(out), "--set",
                     "train_split=train_classes", "--set", "eval_split=test_classes", "--set",
                     "batch_size=48", "--set", "m_per_class=16", "--set", "dim=16",
                     "--no-progress"], capsys)
    assert code == 0
    trained = json.loads((out / "result.json").read_text())["metrics"]
    last = str(out / "checkpoints" / "last.pt")
    code, _ = _main(["eval", last, "--output", str(tmp_path / "e"), "--no-progress"], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert (saved["seed"], saved["split"], saved["train_split"]) == (2, "test_classes",
                                                                     "train_classes")
    assert saved["metrics"]["probe_on_test_halves"] == 1.0
    for key in ("map_at_r", "nmi", "ami", "linear_probe", "knn_top1"):
        assert saved["metrics"][key] == pytest.approx(trained[key], abs=1e-6), key
    code, _ = _main(["eval", last, "--split", "test", "--train-split", "train", "--seed", "5",
                     "--output", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 0
    saved = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert (saved["seed"], saved["split"], saved["train_split"]) == (5, "test", "train")



def test_evaluation_searches_on_the_device_it_was_given(monkeypatch):
    """``evaluate_embedder(device=...)`` passes the device to the retrieval and the k-NN
    classifier searches, so ``contrastive eval --device cpu`` on a GPU machine searches on
    the CPU (``None`` left them to pick a GPU)."""
    import evaluation
    from contrastive.app.protocol import evaluate_embedder

    seen = {}
    real_r, real_k = evaluation.retrieval_metrics, evaluation.knn_classifier

    def retrieval(*a, **kw):
        seen["retrieval"] = kw.get("device")
        return real_r(*a, **kw)

    def knn(*a, **kw):
        seen["knn"] = kw.get("device")
        return real_k(*a, **kw)

    monkeypatch.setattr(evaluation, "retrieval_metrics", retrieval)
    monkeypatch.setattr(evaluation, "knn_classifier", knn)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 4
    data = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(6, 3)
    out = evaluate_embedder(model, data, data, probe=True, device="cpu")
    assert seen == {"retrieval": "cpu", "knn": "cpu"}
    assert 0.0 <= out["precision_at_1"] <= 1.0
