"""Crash-safe checkpoints and result files, and the random-number state a resume needs.

A training run can be killed at any instant (SIGKILL, pre-emption, out-of-memory). Every file
here is written to a temporary file in the target's directory, flushed and ``fsync``-ed, then
moved onto the target with ``os.replace`` (atomic on POSIX and Windows), and finally the
directory entry is ``fsync``-ed. A reader therefore sees either the complete old file or the
complete new one, never a partial write. A crash leaves at most a hidden
``.<name>.<pid>.<random>.tmp`` file beside the target, which :func:`latest_checkpoint` ignores
and :func:`remove_stale_temporaries` deletes (the trainer calls it on its run folder when it
starts, under the folder's lock).

:func:`capture_rng_state` / :func:`restore_rng_state` save and restore the global generators of
Python, NumPy and torch (CPU and every CUDA device) as plain tensors and numbers, so the state
loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .errors import UserError
from .jsonsafe import to_jsonable

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "fsync_directory",
    "load_checkpoint",
    "safe_load",
    "refused_global",
    "capture_rng_state",
    "restore_rng_state",
    "latest_checkpoint",
    "remove_stale_temporaries",
    "pid_alive",
    "folder_lock",
    "FolderInUse",
]

_TMP_SUFFIX = ".tmp"
#: the name of :func:`_atomic_write`'s temporary file: ``.<name>.<pid>.<12 hex digits>.tmp``
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")
#: torch's message when ``weights_only`` loading meets a global outside its allowlist.
_REFUSED_GLOBAL = re.compile(r"unsupported global:\s*(?:GLOBAL\s+)?([\w.]+)", re.I)


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a checkpoint)."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def _as_path(path: str | os.PathLike, name: str = "path") -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (POSIX; a no-op where directories cannot be
    opened, e.g. Windows): after renaming several files into place, as one set, call it
    once."""
    if os.name == "nt":  # pragma: no cover - Windows cannot open a directory
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(f)`` to a temporary file beside ``path``, fsync, rename onto
    ``path``, fsync the directory. On any error the temporary file is removed and ``path`` is
    untouched."""
    target = _as_path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory; pass a file path")
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    # os.open with mode 0o666 lets the umask decide the permissions, as for a plain open()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_directory(directory)
    return target


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a temporary file in the same directory,
    flush + ``os.fsync``, ``os.replace`` onto ``path``, fsync of the directory.

    ``path`` never holds a partial file: after a crash it is the previous checkpoint (or absent).
    Missing parent directories are created. Returns ``path`` as a ``Path``. Call it on one rank
    only (:func:`contrastive.distributed.is_main_process`).
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_save`); for results files."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    Tensors and NumPy scalars/arrays become numbers / lists, paths strings, sets lists
    (:func:`contrastive.jsonsafe.to_jsonable`); NaN and infinities are written as Python's
    ``json`` writes them (``NaN``, ``Infinity``). Anything else JSON cannot encode raises
    ``TypeError`` before ``path`` is touched.
    """
    text = json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def _json_default(o: Any) -> Any:
    """``json.dumps``'s hook for what it cannot encode: tensors and numpy values as numbers or
    lists, paths as strings, sets as lists (NaN kept: written as ``NaN``); anything else a
    ``TypeError``."""
    return to_jsonable(o, nan_to_none=False, strict=True)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list:
    """Globals that numpy arrays need under ``torch.load(weights_only=True)``."""
    core = getattr(np, "_core", None) or np.core
    names: list = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return names


def safe_load(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> Any:
    """``torch.load(path, map_location, weights_only)``; with ``weights_only=True`` (the default:
    no pickled code can run) numpy arrays and dtypes are allowed too, so a checkpoint that
    stores numpy RNG state or arrays loads. Errors are torch's own: a refused object raises
    ``pickle.UnpicklingError`` (:func:`refused_global` names it); callers word their message."""
    if weights_only and hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def refused_global(exc: BaseException) -> str | None:
    """The dotted name of the global that ``weights_only`` loading refused, read from torch's
    ``UnpicklingError`` message ("Unsupported global: GLOBAL fractions.Fraction ..."), or None
    when the error is something else (a truncated or corrupt file)."""
    found = _REFUSED_GLOBAL.search(str(exc))
    return found.group(1) if found else None


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> dict:
    """Load a checkpoint dict written by :func:`atomic_save` (or ``torch.save``).

    ``weights_only=True`` (the default) refuses arbitrary pickled objects, so loading an
    untrusted file cannot run code; everything this library stores (state dicts, RNG state from
    :func:`capture_rng_state`, numbers, strings) loads that way. Pass ``weights_only=False`` only
    for files you trust that hold other Python objects.

    Raises ``FileNotFoundError`` when ``path`` does not exist and :class:`CheckpointError` (a
    ``ValueError``) naming the path when the file cannot be read or is not a dict -- typically a
    partial write left by a crash of a version that did not write atomically.
    """
    p = _as_path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint {p} does not exist; check the path or the run directory"
        )
    if p.is_dir():
        raise IsADirectoryError(
            f"checkpoint path {p} is a directory; pass the file (e.g. {p / 'last.pt'}) or use "
            "latest_checkpoint(directory)"
        )
    try:
        obj = safe_load(p, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        refused = refused_global(exc)
        if weights_only and refused:
            raise CheckpointError(
                f"checkpoint {p} holds a Python object ({refused}) that "
                "weights_only=True refuses to load, since unpickling it could run code; if you "
                "trust the file, call load_checkpoint(..., weights_only=False)"
            ) from exc
        raise CheckpointError(_corrupt_message(p, exc)) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError,
            IndexError, TypeError, AttributeError) as exc:
        # torch's unpickler raises whatever it meets in a file that is no checkpoint (a text
        # file: IndexError)
        raise CheckpointError(_corrupt_message(p, exc)) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {p} holds a {type(obj).__name__}, not a dict; it was not written by "
            "this library's trainer"
        )
    return obj


def _corrupt_message(p: Path, exc: BaseException) -> str:
    size = p.stat().st_size if p.exists() else 0
    return (
        f"checkpoint {p} ({size} bytes) is corrupt or truncated and cannot be loaded; it may be a "
        "partial write from a crash of an older version that did not save atomically -- delete "
        f"it and resume from an earlier checkpoint. ({type(exc).__name__}: {exc})"
    )


def latest_checkpoint(
    directory: str | os.PathLike, pattern: str = "*.pt", prefer: str | None = "last.pt"
) -> Path | None:
    """The checkpoint to resume from in ``directory``, or None when there is none.

    ``directory / prefer`` wins when it exists (the trainer's rolling ``last.pt``). Otherwise,
    among the files matching ``pattern``, the one whose name carries the largest number (e.g.
    ``step_001200.pt``), ties and unnumbered names broken by modification time. Hidden files --
    including the temporary files of an interrupted atomic write -- are ignored. A missing
    directory gives None (nothing to resume).
    """
    d = _as_path(directory, "directory")
    if not d.exists():
        return None
    if not d.is_dir():
        raise ValueError(f"directory {d} is a file; pass the run directory that holds checkpoints")
    if prefer:
        preferred = d / prefer
        if preferred.is_file():
            return preferred
    candidates = [f for f in d.glob(pattern) if f.is_file() and not f.name.startswith(".")]
    if not candidates:
        return None

    def key(f: Path) -> tuple[int, int, str]:
        numbers = re.findall(r"\d+", f.stem)
        return (int(numbers[-1]) if numbers else -1, f.stat().st_mtime_ns, f.name)

    return max(candidates, key=key)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one of another user's counts; a pid
    below 1, which ``os.kill`` would read as a process group, is none)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists, not ours (or cannot tell: keep its file)
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that atomic writes cut short by a crash (SIGKILL, power loss)
    left in ``directory`` (``.<name>.<pid>.<hex>.tmp``, each as large as the file it was to
    become), except those of a process that is still alive (its write may be in progress);
    return the paths deleted. Other files, and other hidden files, are left alone. Call it while
    holding the folder's lock (:func:`folder_lock`), so no write of this folder is under way."""
    d = _as_path(directory, "directory")
    if not d.is_dir():
        return []
    removed = []
    for f in d.iterdir():
        found = _TMP_NAME.match(f.name)
        if found is None or not f.is_file() or pid_alive(int(found["pid"])):
            continue
        try:
            f.unlink()
        except FileNotFoundError:  # pragma: no cover - removed meanwhile
            continue
        removed.append(f)
    return removed


# --------------------------------------------------------------------------------------------
# random-number state
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The global RNG state of Python ``random``, NumPy's legacy global generator, torch's CPU
    generator and every CUDA device's generator (when CUDA is available).

    Stored as tensors, ints, floats and tuples only, so a checkpoint holding it loads with
    ``weights_only=True``. NumPy ``Generator`` objects and ``torch.Generator`` instances the
    program created itself are not global and are not captured: keep their seeds (or states) in
    the checkpoint yourself.
    """
    py_version, py_internal, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": (py_version, tuple(py_internal), py_gauss),
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured; missing entries are left alone.

    CUDA states are restored when CUDA is available; if the number of devices differs from the
    captured run, the common devices are restored and a warning says so.
    """
    if not isinstance(state, dict):
        raise TypeError(
            f"state must be the dict returned by capture_rng_state(), got {type(state).__name__}"
        )
    unknown = set(state) - {"python", "numpy", "torch", "cuda"}
    if unknown:
        raise ValueError(
            f"state has unknown keys {sorted(unknown)}; pass the dict from capture_rng_state()"
        )
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        key = s["key"]
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        np.random.set_state(
            (
                s["bit_generator"],
                key.astype(np.uint32),
                int(s["pos"]),
                int(s["has_gauss"]),
                float(s["cached_gaussian"]),
            )
        )
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and state["cuda"] is not None and torch.cuda.is_available():
        saved = list(state["cuda"])
        n = torch.cuda.device_count()
        if len(saved) != n:
            warnings.warn(
                f"the checkpoint has CUDA RNG states for {len(saved)} device(s) but {n} are "
                f"visible; restoring the first {min(n, len(saved))}",
                stacklevel=2,
            )
        for i in range(min(n, len(saved))):
            torch.cuda.set_rng_state(torch.as_tensor(saved[i], dtype=torch.uint8).cpu(), i)


# --------------------------------------------------------------------------------------------
# one run per folder
# --------------------------------------------------------------------------------------------
_LOCK_NAME = ".lock"
_OWNER_NAME = ".lock.owner"


class FolderInUse(UserError):  # a UserError: the command line prints it as one line
    """Another run holds the folder's lock."""


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "a run") -> Iterator[Path]:
    """Hold an exclusive lock (``filelock``, an OS file lock on ``<folder>/.lock``) while the
    block runs, so that two runs never write into one folder at once. A second run does not
    wait: it stops at once with :class:`FolderInUse` naming the holder's pid and command. The
    OS drops the lock when its process dies, so a crash never leaves the folder locked."""
    from filelock import FileLock, Timeout

    d = _as_path(folder, "folder")
    if d.exists() and not d.is_dir():
        raise UserError(f"output {d} exists and is not a folder; pick another path")
    d.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(d / _LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = ""
        try:
            info = json.loads((d / _OWNER_NAME).read_text())
            owner = f" (pid {info.get('pid')}: {info.get('what')})"
        except (OSError, ValueError):
            pass
        raise FolderInUse(
            f"output folder {d} is in use by another run{owner}; wait for it to finish or pass "
            "another --output"
        ) from None
    try:
        atomic_write_json(d / _OWNER_NAME, {"pid": os.getpid(), "what": what})
        yield d
    finally:
        try:
            (d / _OWNER_NAME).unlink()
        except FileNotFoundError:
            pass
        lock.release()
