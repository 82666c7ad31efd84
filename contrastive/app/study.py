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
* Each trial draws its parameters from a random stream of its own place in the budget (the
  number of completed or running trials ahead of it; :func:`_slot_sampler`), not from one
  stream per process: a resumed run (a new process, a new sampler) draws for its trials what
  an uninterrupted run draws, where a restarted stream repeated the first trials' parameters.
* Running trials record Optuna's RDB heartbeat; a trial whose worker died is failed and redone:
  at once for a process of this machine that no longer exists, after :data:`GRACE_S` without a
  heartbeat for a worker anywhere (``optuna.storages.fail_stale_trials``).
* Workers started together on a new storage create its tables at the same time; the one that
  loses that race (``table ... already exists``, a duplicate schema version) opens the storage
  again (:func:`open_study`), so every worker starts.
* Files: workers that share one output folder each keep their trials' files in a scratch folder
  of their own, ``<root>/<host>-<pid>`` (:func:`worker_scratch`), which holds a heartbeat file
  touched every :data:`HEARTBEAT_S`. A worker removes only its own folder when it is done, and
  the folders of dead workers -- the same rule as for their trials: a process of this machine
  that no longer exists, or no heartbeat for :data:`GRACE_S` -- when it starts and ends; the
  last one out removes ``<root>``. So no worker deletes the files of a trial another one runs,
  and a SIGKILLed worker's files go with the next worker. The ``tmp*`` folders an earlier
  version trained in directly under ``<root>`` (no worker folder, no heartbeat) are removed
  once nothing in them has been written to for :data:`OLD_LAYOUT_GRACE_S`. Other entries of
  ``<root>`` are left.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..checkpoint import pid_alive
from ..errors import UserError

__all__ = ["N_STARTUP", "SAMPLING", "OLD_LAYOUT_GRACE_S", "HEARTBEAT_S", "GRACE_S", "POLL_S",
           "WAIT_S", "BEAT_FILE", "TrialsPending", "open_study", "finished_trials", "run_trials",
           "worker_name", "remove_dead_scratch", "worker_scratch"]

#: Random trials before TPE models the results (fixed, so the study does not depend on N).
N_STARTUP = 4
#: How trials draw their parameters (part of a study's identity): one seeded stream per place
#: in the budget (:func:`_slot_sampler`).
SAMPLING = "tpe-slot-seeded"


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna warns that its heartbeat is experimental and meant for ``Study.optimize``; the
    ask-and-tell loop of :func:`run_trials` records the heartbeats itself (:class:`_Beat`)."""
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
    failed and redone once ``grace_s`` pass without one. Workers that open a new storage at
    once race to create its tables; the losers open it again (:func:`_rdb_storage`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    rdb = _rdb_storage(storage, kwargs, heartbeat_s, grace_s)
    study = optuna.create_study(study_name=name, storage=rdb, sampler=_sampler(seed),
                                direction="maximize", load_if_exists=True)
    study._tune_seed = seed  # the seed of each trial's stream (:func:`_slot_sampler`)
    return study


def _sampler(seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=N_STARTUP,
                                      constant_liar=True)


def _slot_sampler(study, slot: int) -> None:
    """Give ``study`` a TPE sampler seeded for the trial at place ``slot`` of the budget (the
    completed or running trials ahead of it), derived from the study's seed
    (``numpy.random.SeedSequence([seed, slot])``). TPE keeps no state between trials except
    its random stream (the history is read from the storage), so the trial draws the same
    parameters whichever process runs it and however often the study was resumed before it:
    a trial redone after its worker died draws what that one would have. Studies not opened by
    :func:`open_study` keep their sampler."""
    import numpy as np

    seed = getattr(study, "_tune_seed", None)
    if seed is not None:
        study.sampler = _sampler(int(np.random.SeedSequence([seed, slot]).generate_state(1)[0]))


#: How often a worker that lost the race to create a new storage's tables opens it again.
_OPEN_ATTEMPTS = 6


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], heartbeat_s: int, grace_s: int):
    """Optuna's ``RDBStorage`` of ``url``. On a new database, workers started together all create
    its tables and stamp its schema version; the losers fail (``table ... already exists``, a
    duplicate version row) and open it again, finding the winner's tables, after a short pause
    (up to :data:`_OPEN_ATTEMPTS` tries; then the error is raised, e.g. a database that cannot
    be reached)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    attempt = 1
    while True:
        try:
            with _quiet_optuna():
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_s,
                                                  grace_period=grace_s)
        except (OperationalError, IntegrityError):
            if attempt >= _OPEN_ATTEMPTS:
                raise
        time.sleep(0.1 * attempt)
        attempt += 1


def finished_trials(study) -> list:
    """The study's completed trials, by number."""
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                  key=lambda t: t.number)


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
                and not pid_alive(int(worker.get("pid", -1))):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return before - running()


class _Beat:
    """Calls ``beat`` now and every ``interval`` seconds in a daemon thread until the ``with``
    block ends (nothing when ``interval`` is 0 or None): a running trial's heartbeat in the
    study's storage, as ``Study.optimize`` records it for its own trials, or a worker's in its
    scratch folder."""

    def __init__(self, beat: Callable[[], None], interval: float | None) -> None:
        import threading

        self.beat, self.interval = beat, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> _Beat:
        if self.interval:
            self.beat()
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def _trial_beat(study, trial) -> _Beat:
    """``trial``'s heartbeat in the study's storage, every interval the storage was opened with."""
    storage = study._storage
    return _Beat(functools.partial(storage.record_heartbeat, trial._trial_id),
                 storage.get_heartbeat_interval())


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
        _slot_sampler(study, len(ahead))  # before the objective suggests anything
        try:
            with _trial_beat(study, trial):
                value = float(objective(trial))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, value)
        done += 1
        if on_trial is not None:
            on_trial(trial, value)


# ------------------------------------------------------------------------------ worker files

#: The file in a worker's scratch folder whose modification time is its heartbeat.
BEAT_FILE = ".heartbeat"


def worker_name() -> str:
    """``<host>-<pid>``: this process as a worker (the host and pid of its trials' ``"worker"``
    attribute), the name of its scratch folder."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _worker_of(name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a scratch folder's name, None for a name :func:`worker_name` does not
    make."""
    host, sep, pid = name.rpartition("-")
    return (host, int(pid)) if sep and host and pid.isdigit() else None


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # the folder is gone: nothing left to keep alive
        path.touch()


def _is_dead(folder: Path, grace_s: float) -> bool:
    """Whether ``folder`` is the scratch folder of a dead worker: one of this machine whose
    process no longer exists, or one (of any machine) whose heartbeat file -- or, before its
    first beat, the folder -- is older than ``grace_s`` seconds. Never this process's own."""
    worker = _worker_of(folder.name)
    if worker is None or not folder.is_dir():
        return False
    host, pid = worker
    if host == socket.gethostname():
        if pid == os.getpid():
            return False
        if not pid_alive(pid):
            return True
    try:
        last = max(p.stat().st_mtime for p in (folder, folder / BEAT_FILE) if p.exists())
    except (OSError, ValueError):  # removed meanwhile
        return False
    return time.time() - last > grace_s


#: How long nothing in an earlier version's ``<root>/tmp*`` trial folder may have been written
#: to before it is removed (:func:`_is_old_leftover`; that version wrote no heartbeat, so the
#: newest file time in the folder stands for one, with a wide margin over a fold's log rows).
OLD_LAYOUT_GRACE_S = 3600.0
#: The names ``tempfile.mkdtemp`` gives: ``tmp`` and 8 characters of its alphabet.
_OLD_TMP = re.compile(r"^tmp[a-z0-9_]{8}$")


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of ``folder`` and everything under it (links not
    followed)."""
    newest = folder.lstat().st_mtime
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(base, name)).st_mtime)
    return newest


def _is_old_leftover(folder: Path, grace_s: float) -> bool:
    """Whether ``folder`` is a trial folder of the earlier layout (``<root>/tmpXXXXXXXX``, a
    ``tempfile`` name directly under the scratch root, before workers had folders of their
    own) that nothing has written to for ``max(grace_s, OLD_LAYOUT_GRACE_S)`` seconds: left by a
    killed run of that version (a live one writes its log rows into it)."""
    if not _OLD_TMP.match(folder.name) or folder.is_symlink() or not folder.is_dir():
        return False
    try:
        last = _newest_mtime(folder)
    except OSError:  # removed meanwhile
        return False
    return time.time() - last > max(grace_s, OLD_LAYOUT_GRACE_S)


def remove_dead_scratch(root: Path, grace_s: float = GRACE_S) -> list[Path]:
    """Remove the scratch folders of dead workers under ``root`` (:func:`_is_dead`) and the
    earlier version's leftover trial folders (:func:`_is_old_leftover`); returns them. Other
    entries are left alone."""
    removed = []
    if root.is_dir():
        for folder in sorted(root.iterdir()):
            if _is_dead(folder, grace_s) or _is_old_leftover(folder, grace_s):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


@contextlib.contextmanager
def worker_scratch(root: Path, heartbeat_s: float = HEARTBEAT_S,
                   grace_s: float = GRACE_S) -> Iterator[Path]:
    """This worker's scratch folder ``root/<host>-<pid>`` (:func:`worker_name`), created on
    entry, its heartbeat file touched every ``heartbeat_s`` seconds while the block runs, and
    removed on exit; the folders of dead workers (:func:`remove_dead_scratch`) are removed on
    entry and exit, and ``root`` on exit when nothing is left in it. Other workers' live
    folders are never touched, so workers may share ``root``; one block at a time per
    process."""
    mine = root / worker_name()
    mine.mkdir(parents=True, exist_ok=True)
    remove_dead_scratch(root, grace_s)
    try:
        with _Beat(functools.partial(_touch, mine / BEAT_FILE), heartbeat_s):
            yield mine
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        remove_dead_scratch(root, grace_s)
        with contextlib.suppress(OSError):  # another worker's folder is still there
            root.rmdir()
