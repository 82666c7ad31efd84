"""The run folder of :func:`~contrastive.app.train.fit`: what an earlier run left there, the
``resume`` / ``overwrite`` rules (a resume with other settings names each differing field), the
signal handling that turns SIGINT / SIGTERM into a checkpoint, and the ``log.jsonl`` /
``log.csv`` files (the CSV header widens when evaluation columns appear)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError
from .config import TrainConfig

__all__ = ["RESUMABLE_FIELDS", "TrainingInterrupted", "StopOnSignal", "run_files",
           "check_same_settings", "prepare_output", "RunLog"]


#: Fields that may differ between a checkpoint and the run that resumes it: where things go,
#: how often they are logged or evaluated, and the machine. Everything else decides the result.
RESUMABLE_FIELDS = frozenset({"output", "resume", "overwrite", "progress", "device",
                              "num_workers", "log_every", "eval_every", "checkpoint_every",
                              "final_probe", "data_dir"})

_RUN_FILES = ("log.jsonl", "log.csv", "result.json", "result.csv", "result.md")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped :func:`fit`; a checkpoint of the current step was written to
    ``checkpoint`` (``None`` on ranks other than 0)."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str) -> None:
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"; checkpoint written to {checkpoint}" if checkpoint else ""
        super().__init__(f"{signal_name} at step {step}{where}")


class StopOnSignal:
    """While active, the first SIGINT / SIGTERM only sets :attr:`received` (the loop writes a
    checkpoint at the end of the current step and stops); a second one interrupts at once.
    Installs nothing outside the main thread (``signal.signal`` is allowed only there)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_files(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (checkpoints, logs, result)."""
    found = [n for n in _RUN_FILES if (out / n).exists()]
    d = out / "checkpoints"
    if d.is_dir():
        found += [f"checkpoints/{f.name}" for f in sorted(d.glob("*.pt"))]
    return found


def check_same_settings(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """:class:`UserError` naming every result-determining field in which ``cfg`` differs from
    the checkpoint's config."""
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_FIELDS and k in saved and saved[k] != now[k]]
    if diff:
        parts = ", ".join(f"{k}={saved[k]!r} there but {now[k]!r} now" for k in diff)
        raise UserError(
            f"cannot resume from {path}: settings differ from the checkpoint's: {parts}; pass "
            "the checkpoint's settings, or --overwrite (overwrite=True) to start over"
        )


def prepare_output(cfg: TrainConfig, out: Path, main: bool) -> dict | None:
    """Apply ``resume`` / ``overwrite`` to the run folder; return the checkpoint to resume from
    (loaded), or None for a fresh start. On the main process (which holds the folder's lock)
    it first deletes the temporary files of atomic writes a crash cut short
    (:func:`~contrastive.checkpoint.remove_stale_temporaries`): each is as large as a
    checkpoint, and every pre-emption during a save would leave one more."""
    last = out / "checkpoints" / "last.pt"
    if main:
        for folder in (out, out / "checkpoints"):
            ckpt.remove_stale_temporaries(folder)
    if cfg.resume is True and not last.is_file():
        raise UserError(
            f"--resume: there is no checkpoint {last} to continue from; check --output, or pass "
            "--resume auto to start fresh when there is none"
        )
    if cfg.resume in (True, "auto") and last.is_file():
        try:
            state = ckpt.load_checkpoint(last, map_location="cpu")
        except ckpt.CheckpointError as exc:
            raise UserError(str(exc)) from exc
        check_same_settings(state.get("config") or {}, cfg, last)
        return state
    existing = run_files(out)
    if cfg.resume == "auto":
        # nothing to continue from: the files of a run stopped before its first checkpoint
        # are replaced by the fresh run
        if cfg.progress and main:
            print(f"resume auto: no checkpoint in {out / 'checkpoints'}; starting fresh",
                  file=sys.stderr)
    elif existing and not cfg.overwrite:
        raise UserError(
            f"output folder {out} already holds a run ({', '.join(existing[:3])}); pass "
            "--resume to continue it, --overwrite to replace it, or another --output"
        )
    if existing and main:
        for name in existing:
            (out / name).unlink(missing_ok=True)
    return None


class RunLog:
    """Append-only JSONL + CSV log on the main process."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"
        self.columns: list[str] | None = None
        if enabled:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        """Drop log lines past the checkpoint we resume from (they will be written again)."""
        import json

        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break
        ckpt.atomic_write_text(self.jsonl, "".join(s + "\n" for s in kept))
        if self.csv.exists():
            self.csv.unlink()
        self.columns = list(dict.fromkeys(k for line in kept for k in json.loads(line)))
        if kept:
            self._rewrite()

    def _csv(self, row: dict) -> None:
        """Append ``row``; a row with a column the header lacks (the evaluation metrics of an
        ``eval_every`` step) rewrites the file from ``log.jsonl`` under the widened header."""
        if self.columns is None and self.csv.exists():
            with self.csv.open() as f:
                self.columns = next(csv.reader(f), None)
        new = [k for k in row if k not in (self.columns or [])]
        if new or not self.csv.exists():
            self.columns = list(self.columns or []) + new
            self._rewrite()
            return
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

    def _rewrite(self) -> None:
        import io
        import json

        rows = [json.loads(s) for s in self.jsonl.read_text().splitlines() if s.strip()] \
            if self.jsonl.exists() else []
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in self.columns])
        ckpt.atomic_write_text(self.csv, buf.getvalue())

    def log(self, row: dict) -> None:
        import json

        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._csv(row)
