"""Optuna's storage mechanics behind ``contrastive compare --tune``
(:mod:`contrastive.app.tuning`): opening a seeded TPE study in an RDB storage, and running trials
until a study holds a given number of completed ones, so that a killed run resumes where it
stopped and several workers -- processes or machines sharing one database -- neither lose nor
repeat trials.

* A trial runs only when fewer than ``n_trials`` completed or running trials precede it (trial
  numbers are handed out by the database), so workers stop at exactly ``n_trials``.
* Running trials record Optuna's RDB heartbeat; a trial whose worker died is failed and redone:
  at once for a process of this machine that no longer exists, after :data:`GRACE_S` without a
  heartbeat for a worker anywhere (``optuna.storages.fail_stale_trials``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["N_STARTUP", "HEARTBEAT_S", "GRACE_S", "open_study", "finished_trials", "run_trials"]

#: Random trials before TPE models the results (fixed, so the study does not depend on N).
N_STARTUP = 4


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna warns that its heartbeat is experimental and meant for ``Study.optimize``; the
    ask-and-tell loop of :func:`run_trials` records the heartbeats itself (:class:`_Heartbeat`)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


#: Seconds between a running trial's heartbeats in the study's storage, and how long a trial
#: may go without one before any worker marks it failed (a worker that died on another machine).
HEARTBEAT_S, GRACE_S = 30, 120


def open_study(storage: str, name: str, seed: int, heartbeat_s: int = HEARTBEAT_S,
               grace_s: int = GRACE_S):
    """Create or load the study ``name`` (maximise) in ``storage`` with the seeded TPE sampler.
    SQLite waits up to 60 s for a lock held by another worker. Running trials record a heartbeat
    every ``heartbeat_s`` (Optuna's RDB heartbeat), so a trial whose worker died anywhere is
    failed and redone once ``grace_s`` pass without one."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    with _quiet_optuna():
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs=kwargs,
                                         heartbeat_interval=heartbeat_s, grace_period=grace_s)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=N_STARTUP,
                                         constant_liar=True)
    return optuna.create_study(study_name=name, storage=rdb, sampler=sampler,
                               direction="maximize", load_if_exists=True)


def finished_trials(study) -> list:
    """The study's completed trials, by number."""
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                  key=lambda t: t.number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fail_dead_trials(study) -> int:
    """Mark failed the RUNNING trials whose worker is gone: at once for a process of this
    machine that no longer exists (a killed run), and for any worker after the storage's grace
    period without a heartbeat (``optuna.storages.fail_stale_trials``: a worker that died on
    another machine); returns how many."""
    import optuna
    from optuna.trial import TrialState

    def running() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    before = running()
    with _quiet_optuna():
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") != os.getpid() \
                and not _alive(int(worker.get("pid", -1))):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return before - running()


class _Heartbeat:
    """Records ``trial``'s heartbeat in the study's storage now and every interval until the
    ``with`` block ends (what ``Study.optimize`` does for its own trials)."""

    def __init__(self, study, trial) -> None:
        import threading

        self.storage, self.trial_id = study._storage, trial._trial_id
        self.interval = self.storage.get_heartbeat_interval()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def run_trials(study, n_trials: int, objective: Callable[[Any], float],
               on_trial: Callable[[Any, float], None] | None = None) -> int:
    """Run trials of ``study`` until it holds ``n_trials`` completed ones; returns how many this
    process completed. Before each trial the finished ones are counted, so a resumed run does
    only the remainder; a trial asked for runs only when fewer than ``n_trials`` completed or
    running trials have a lower number (else it is marked failed, ``surplus``), so concurrent
    workers stop at exactly ``n_trials``. An exception in ``objective`` marks its trial failed
    and propagates."""
    from optuna.trial import TrialState

    _fail_dead_trials(study)
    done = 0
    while len(finished_trials(study)) < n_trials:
        with _quiet_optuna():
            trial = study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        ahead = [t for t in study.get_trials(deepcopy=False,
                                             states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            break
        try:
            with _Heartbeat(study, trial):
                value = float(objective(trial))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        done += 1
        if on_trial is not None:
            on_trial(trial, value)
    return done
