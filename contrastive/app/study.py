"""Optuna's storage mechanics behind ``contrastive compare --tune``
(:mod:`contrastive.app.tuning`): opening a seeded TPE study in an RDB storage, and running trials
until a study holds a given number of completed ones, so that a killed run resumes where it
stopped and several workers -- processes or machines sharing one database -- neither lose nor
repeat trials.

* A trial runs only when fewer than ``n_trials`` completed or running trials precede it (trial
  numbers are handed out by the database), so workers stop at exactly ``n_trials``. A worker
  whose remaining budget is held by other workers' running trials waits until they finish (or
  are failed as below, and then runs them again itself), so it returns only when ``n_trials``
  trials are complete; it gives up with :class:`TrialsPending` after :data:`WAIT_S` without
  progress.
* Running trials record Optuna's RDB heartbeat; a trial whose worker died is failed and redone:
  at once for a process of this machine that no longer exists, after :data:`GRACE_S` without a
  heartbeat for a worker anywhere (``optuna.storages.fail_stale_trials``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import UserError

__all__ = ["N_STARTUP", "HEARTBEAT_S", "GRACE_S", "POLL_S", "WAIT_S", "TrialsPending",
           "open_study", "finished_trials", "run_trials"]

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

#: Seconds between two looks at the study while other workers' trials hold the rest of the
#: budget, and the longest wait without progress (no trial finished, started or failed) before
#: :func:`run_trials` gives up with :class:`TrialsPending`.
POLL_S, WAIT_S = 2.0, 6 * 3600.0


class TrialsPending(UserError):
    """Other workers' trials still run after :data:`WAIT_S` without progress: the study holds
    fewer completed trials than its budget, and none is picked from an incomplete budget."""


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


def _pending_text(study, running: list, n_trials: int, complete: int, waited: float) -> str:
    names = ", ".join(
        f"#{t.number} (worker {w.get('host', '?')}:{w.get('pid', '?')})"
        for t in running for w in [t.user_attrs.get("worker") or {}])
    grace = getattr(study._storage, "grace_period", None) or GRACE_S
    return (f"study {study.study_name!r}: {complete} of {n_trials} trials complete; waited "
            f"{waited:.0f} s for other workers' running trial(s) {names}; a trial whose worker "
            f"died is failed {grace} s after its last heartbeat and redone; run the command "
            "again once they finish")


def run_trials(study, n_trials: int, objective: Callable[[Any], float],
               on_trial: Callable[[Any, float], None] | None = None, *,
               log: Callable[[str], None] | None = None, poll_s: float = POLL_S,
               wait_s: float = WAIT_S) -> int:
    """Run trials of ``study`` until it holds ``n_trials`` completed ones; returns how many this
    process completed. Before each trial the finished ones are counted, so a resumed run does
    only the remainder; a trial asked for runs only when fewer than ``n_trials`` completed or
    running trials have a lower number (else it is marked failed, ``surplus``), so concurrent
    workers stop at exactly ``n_trials``. While the rest of the budget is held by other
    workers' running trials it waits for them (looking every ``poll_s`` seconds, failing those
    whose worker died: :func:`_fail_dead_trials`, and running their replacements itself), so
    on return the study holds ``n_trials`` completed trials; :class:`TrialsPending` after
    ``wait_s`` seconds without progress (``log`` is told when it starts waiting). An exception
    in ``objective`` marks its trial failed and propagates."""
    from optuna.trial import TrialState

    done = 0
    seen, since = None, 0.0  # what the wait last saw (complete, running), and since when
    while True:
        _fail_dead_trials(study)
        complete = len(finished_trials(study))
        if complete >= n_trials:
            return done
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if complete + len(running) >= n_trials:  # the rest is other workers' trials: wait
            now = time.monotonic()
            state = (complete, tuple(t.number for t in running))
            if state != seen:
                if seen is None and log is not None:
                    log(f"{study.study_name}: {complete}/{n_trials} trials complete; waiting "
                        f"for trial(s) {', '.join(str(n) for n in state[1])} of other workers")
                seen, since = state, now
            elif now - since > wait_s:
                raise TrialsPending(_pending_text(study, running, n_trials, complete,
                                                  now - since))
            time.sleep(poll_s)
            continue
        seen = None
        with _quiet_optuna():
            trial = study.ask()
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        ahead = [t for t in study.get_trials(deepcopy=False,
                                             states=(TrialState.COMPLETE, TrialState.RUNNING))
                 if t.number < trial.number]
        if len(ahead) >= n_trials:  # another worker asked first: wait for the others' trials
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
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
