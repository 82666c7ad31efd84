"""Several ``contrastive compare --tune`` worker processes on one ``--output`` folder (one
SQLite study, :mod:`contrastive.app.study`; the scratch folders and the final stage of
:mod:`contrastive.app.tuning`): both finish with exit status 0, every trial is recorded once
with its value, the report lists the study's trials, a worker does not delete the scratch
files of another, and a worker SIGKILLed mid-trial leaves a study the next worker completes.

Each worker is a real process running the command line (:func:`contrastive.cli.main`) on a tiny
budget (3 steps of the latent_classes MLP). Marker files order the workers where a test needs
one interleaving, not sleeps: a worker waits for another's marker at a known point of a trial.
"""

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

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--steps", "3", "--folds", "2", "--seeds", "0", "--batch-size", "24",
        "--set", "m_per_class=8", "--set", "train.dim=8", "--no-progress")

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import contrastive.app.train as train
    import contrastive.app.tuning as tuning
    from contrastive.cli import main

    out, role, marks, *argv = sys.argv[1:]
    marks = Path(marks)

    def mark(name):
        (marks / name).write_text(str(os.getpid()))

    def wait_for(test, what):
        deadline = time.monotonic() + 120
        while not test():
            if time.monotonic() > deadline:
                sys.exit(f"worker {role}: gave up waiting for {what}")
            time.sleep(0.05)

    def seen(name):
        return (marks / name).exists()

    # role A: its first trial's first fold waits until B has trained a fold of its own trial.
    # role B: starts once A's trial runs (so B asks the second trial); after its first fold it
    #         waits until A's whole run ended (tuning, clean-up, report) before its second.
    # role killed: trains its first trial, then hangs in the second (a file of it written in its
    #              temporary folder), to be SIGKILLed there.
    # role next: says when its first fold starts.
    # role same: after tuning, waits until the other "same" worker has tuned too, so both
    #            reach the final cells together.
    real_fit, calls = train.fit, []

    def fit(config):
        calls.append(config)
        n = len(calls)
        if role == "A" and n == 1:
            mark("A-trial")
            wait_for(lambda: seen("B-fold0"), "B-fold0")
        if role == "next" and n == 1:
            mark("next-trial")
        if role == "killed" and n == 3:
            Path(config.output, "partial").write_text("a file of the trial")
            mark("killed-trial")
            time.sleep(600)
        res = real_fit(config)
        if role == "B" and n == 1:
            mark("B-fold0")
            wait_for(lambda: seen("A-done"), "A-done")
        return res

    real_tune_loss = tuning.tune_loss

    def tune_loss(cfg, loss, log=None):
        res = real_tune_loss(cfg, loss, log)
        if role == "same" and loss == cfg.losses[-1]:
            mark(f"tuned-{os.getpid()}")
            wait_for(lambda: len(list(marks.glob("tuned-*"))) == 2, "the other worker")
        return res

    train.fit, tuning.tune_loss = fit, tune_loss
    if role == "B":
        wait_for(lambda: seen("A-trial"), "A-trial")
    rc = main(["compare", "--tune", "--output", out, *argv])
    mark(f"{role}-done")
    sys.exit(rc)
""")


def _worker(out: Path, role: str, marks: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(out), role, str(marks), *args,
                             *TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(*procs: subprocess.Popen) -> list[str]:
    """Wait for the workers; every one must exit with status 0."""
    outs = [p.communicate(timeout=150)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [o[-2500:] for o in outs]
    return outs


def _studies(out: Path) -> dict[str, list]:
    """Every trial of every study in ``<out>/tuning.db``, by loss."""
    storage = f"sqlite:///{out / 'tuning.db'}"
    found = {}
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        found[summary.study_name.rsplit("-", 1)[0]] = study.get_trials(deepcopy=False)
    return found


def _check_report(out: Path, studies: dict[str, list], n_trials: int) -> None:
    """The report's tuning history is the first ``n_trials`` completed trials of each study,
    each once with its value; no worker left a scratch folder behind."""
    tuning = json.loads((out / "results.json").read_text())["tuning"]
    assert set(tuning) == set(studies)
    for loss, trials in studies.items():
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                      key=lambda t: t.number)[:n_trials]
        assert len(done) == n_trials
        history = [(h["number"], h["value"]) for h in tuning[loss]["history"]]
        assert history == [(t.number, t.value) for t in done]
    scratch = out / "tuning" / "scratch"
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())


def test_two_workers_on_one_output_both_finish(tmp_path):
    """Two identical workers started together on a new output share its study: both open the
    new storage (one loses the race to create its tables), each trial runs once, and both
    reach the final cells at the same time; the second one waits for the first's final stage
    (then reuses its cells) instead of stopping with "folder in use"."""
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    procs = [_worker(out, "same", marks, "--losses", "infonce", "--trials", "2")
             for _ in range(2)]
    _finish(*procs)
    studies = _studies(out)
    assert set(studies) == {"infonce"}
    for trials in studies.values():  # none failed or lost (a surplus ask is failed at once)
        assert [t.number for t in trials if t.state == TrialState.COMPLETE] == [0, 1]
        assert all(t.user_attrs.get("surplus") for t in trials
                   if t.state != TrialState.COMPLETE)
    workers = {t.user_attrs["worker"]["pid"] for ts in studies.values() for t in ts}
    assert workers <= {p.pid for p in procs}
    _check_report(out, studies, 2)
    assert len(list((out / "cells").glob("*.json"))) == 1  # one per loss and seed


def test_a_worker_finishing_first_keeps_the_others_scratch(tmp_path):
    """Worker A (1 trial) finishes its whole run -- tuning, clean-up, final cells, report --
    between the two folds of worker B's trial (B asks 2 trials of the same study): B's second
    fold still has its scratch folder, its trial is recorded, and B's report lists both."""
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    a = _worker(out, "A", marks, "--losses", "infonce", "--trials", "1")
    b = _worker(out, "B", marks, "--losses", "infonce", "--trials", "2")
    _finish(a, b)
    trials = _studies(out)["infonce"]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["worker"]["pid"] for t in trials] == [a.pid, b.pid]
    assert all(len(t.user_attrs["fold_map_at_r"]) == 2 for t in trials)
    _check_report(out, {"infonce": trials}, 2)


def test_a_worker_killed_mid_trial_is_redone_by_the_other(tmp_path):
    """A worker SIGKILLed inside its second trial leaves it RUNNING and its scratch folder
    behind; the worker that shares the output fails that trial (its process is gone), runs a
    replacement, keeps the killed worker's finished trial, and removes the dead one's scratch."""
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    killed = _worker(out, "killed", marks, "--losses", "infonce", "--trials", "3")
    deadline = time.monotonic() + 120
    while not (marks / "killed-trial").exists():
        assert killed.poll() is None and time.monotonic() < deadline, \
            killed.communicate()[0][-2500:] if killed.poll() is not None else "timeout"
        time.sleep(0.05)
    nxt = _worker(out, "next", marks, "--losses", "infonce", "--trials", "3")
    while not (marks / "next-trial").exists():
        assert nxt.poll() is None and time.monotonic() < deadline, "next worker did not start"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)  # reaped: its pid no longer exists
    assert killed.returncode == -signal.SIGKILL
    assert list((out / "tuning" / "scratch").rglob("partial"))  # left by the killed trial
    _finish(nxt)
    trials = _studies(out)["infonce"]
    states = {t.number: t.state for t in trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.COMPLETE,
                      3: TrialState.COMPLETE}
    pids = {t.number: t.user_attrs["worker"]["pid"] for t in trials}
    assert pids == {0: killed.pid, 1: killed.pid, 2: nxt.pid, 3: nxt.pid}
    _check_report(out, {"infonce": trials}, 3)


def test_only_dead_workers_scratch_is_removed(tmp_path):
    """:func:`~contrastive.app.study.remove_dead_scratch`: a folder of a process of this machine
    that no longer exists goes at once, any worker's once its heartbeat is older than the grace
    period; live workers' folders and other entries stay."""
    import socket

    from contrastive.app.study import BEAT_FILE, remove_dead_scratch, worker_scratch

    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = {"dead": f"{host}-{gone.pid}", "live": f"{host}-{os.getppid()}",
             "remote": "another-machine-7", "stale": "another-machine-8", "other": "tmpabc"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / BEAT_FILE).touch()
    old = time.time() - 1000
    os.utime(tmp_path / names["stale"] / BEAT_FILE, (old, old))
    os.utime(tmp_path / names["stale"], (old, old))
    removed = remove_dead_scratch(tmp_path, grace_s=100)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["stale"]])
    with worker_scratch(tmp_path, heartbeat_s=1, grace_s=100) as mine:
        assert (mine / BEAT_FILE).is_file() and mine.parent == tmp_path
    assert not mine.exists()  # its own folder goes; the others' stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["remote"], names["other"]])
