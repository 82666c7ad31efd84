"""Atomic checkpoints and result files, load errors, and RNG capture/restore."""

from __future__ import annotations

import fractions
import io
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]
_REAL_SAVE = torch.save


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model = {"weight": torch.randn(64, 32, generator=g), "bias": torch.randn(64, generator=g)}
    return {"step": seed, "model": model, "optimizer": {"lr": 0.1, "state": {0: model["bias"]}}}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k])
    assert a["optimizer"]["lr"] == b["optimizer"]["lr"]
    assert torch.equal(a["optimizer"]["state"][0], b["optimizer"]["state"][0])


def _half_then_fail(obj, f, *args, **kwargs):
    """A torch.save that dies half-way: writes half of the real bytes, then raises."""
    buf = io.BytesIO()
    _REAL_SAVE(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    if isinstance(f, str | os.PathLike):
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
    else:
        f.write(data[: len(data) // 2])
        f.flush()
    raise OSError(28, "No space left on device (simulated)")


# --------------------------------------------------------------------------------------------
# atomic_save
# --------------------------------------------------------------------------------------------
def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "runs" / "a" / "last.pt"  # parents are created
    out = atomic_save(_state(1), str(path))
    assert out == path and path.is_file()
    _assert_state_equal(load_checkpoint(path), _state(1))
    atomic_save(_state(2), path)  # overwrite
    _assert_state_equal(load_checkpoint(path), _state(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp files left


def test_crash_during_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    monkeypatch.setattr(torch, "save", _half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        atomic_save(_state(2), path)
    _assert_state_equal(load_checkpoint(path), _state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # temp file removed
    # with no previous checkpoint a crash leaves nothing at all at the target
    fresh = tmp_path / "fresh.pt"
    with pytest.raises(OSError, match="simulated"):
        atomic_save(_state(3), fresh)
    assert not fresh.exists()


def test_plain_save_crash_leaves_a_corrupt_file(tmp_path, monkeypatch):
    """The control for the test above: the same crash with a plain torch.save to the target
    destroys the old checkpoint, and load_checkpoint says so clearly."""
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    monkeypatch.setattr(torch, "save", _half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        torch.save(_state(2), path)
    with pytest.raises(CheckpointError, match="partial write") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_sigkill_during_save_keeps_old_checkpoint(tmp_path):
    """A process killed (SIGKILL, no clean-up) half-way through atomic_save: the target keeps
    the old checkpoint; the orphaned temp file is hidden and latest_checkpoint skips it."""
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    script = textwrap.dedent(
        f"""
        import io, os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from contrastive.checkpoint import atomic_save
        real = torch.save
        def dying_save(obj, f):
            buf = io.BytesIO(); real(obj, buf); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_save({{"step": 2, "big": torch.zeros(100_000)}}, {str(path)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    _assert_state_equal(load_checkpoint(path), _state(1))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")
    assert leftovers[0].endswith(".tmp")
    assert latest_checkpoint(tmp_path, prefer=None) == path


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_new_files_follow_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.txt", "x")
        atomic_save({"a": 1}, tmp_path / "c.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


def test_atomic_save_bad_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_save({}, tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        atomic_save({}, 3)


# --------------------------------------------------------------------------------------------
# load_checkpoint errors
# --------------------------------------------------------------------------------------------
def test_load_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(IsADirectoryError, match="latest_checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_load_corrupt(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    buf = io.BytesIO()
    torch.save(_state(1), buf)
    data = {"empty": b"", "garbage": b"not a checkpoint" * 10, "truncated": buf.getvalue()[:-100]}
    path.write_bytes(data[kind])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "partial write" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_non_dict_and_untrusted_objects(tmp_path):
    atomic_save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a dict"):
        load_checkpoint(tmp_path / "list.pt")
    atomic_save({"ratio": fractions.Fraction(1, 3)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"\(fractions.Fraction\).*weights_only=False"):
        load_checkpoint(tmp_path / "obj.pt")
    assert load_checkpoint(tmp_path / "obj.pt", weights_only=False)["ratio"] == fractions.Fraction(
        1, 3
    )


# --------------------------------------------------------------------------------------------
# text / JSON
# --------------------------------------------------------------------------------------------
def test_atomic_write_text_and_json(tmp_path, monkeypatch):
    t = atomic_write_text(tmp_path / "notes.txt", "héllo\n")
    assert t.read_text(encoding="utf-8") == "héllo\n"
    results = {
        "recall@1": torch.tensor(0.75),
        "curve": torch.tensor([1.0, 2.0]),
        "n": np.int64(3),
        "arr": np.array([0.5]),
        "dir": tmp_path,
    }
    j = atomic_write_json(tmp_path / "results.json", results)
    assert json.loads(j.read_text()) == {
        "recall@1": 0.75,
        "curve": [1.0, 2.0],
        "n": 3,
        "arr": [0.5],
        "dir": str(tmp_path),
    }
    assert j.read_text().endswith("}\n")
    # an object JSON cannot encode fails before the old file is touched
    before = j.read_text()
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic_write_json(j, {"bad": object()})
    assert j.read_text() == before

    # a crash between writing and renaming leaves the old text
    def boom(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(t, "new")
    monkeypatch.undo()
    assert t.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "results.json"]
    with pytest.raises(TypeError, match="text must be a str"):
        atomic_write_text(t, b"bytes")


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------
def _draws() -> tuple:
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached Gaussian in Python's and NumPy's state
    np.random.randn()
    state = capture_rng_state()
    first = _draws()
    assert _draws() != first  # the control: without restoring, the draws move on
    restore_rng_state(state)
    assert _draws() == first

    # through a checkpoint file, loaded with weights_only=True, after reseeding everything
    atomic_save({"rng": state}, tmp_path / "rng.pt")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == first


def test_rng_partial_and_bad_state():
    torch.manual_seed(0)
    state = {"torch": capture_rng_state()["torch"]}
    a = torch.rand(2)
    restore_rng_state(state)
    assert torch.equal(torch.rand(2), a)
    with pytest.raises(TypeError, match="capture_rng_state"):
        restore_rng_state([1, 2])
    with pytest.raises(ValueError, match="unknown keys"):
        restore_rng_state({"jax": 1})


def test_cuda_rng_states_restore_the_common_devices(monkeypatch):
    """The CUDA branch with torch.cuda mocked: states are restored per device, and a different
    device count restores the common ones with a warning. Without CUDA the entry is ignored."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.setdefault(i, s))
    states = [torch.full((4,), 7, dtype=torch.uint8), torch.full((4,), 9, dtype=torch.uint8)]
    with pytest.warns(UserWarning, match="CUDA RNG states for 2 device"):
        restore_rng_state({"cuda": states})
    assert list(restored) == [0] and torch.equal(restored[0], states[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored.clear()
    restore_rng_state({"cuda": states})
    assert restored == {}


# --------------------------------------------------------------------------------------------
# latest_checkpoint
# --------------------------------------------------------------------------------------------
def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 10, 9):  # numeric, not lexicographic, order
        atomic_save({"step": step}, tmp_path / f"step_{step}.pt")
    (tmp_path / ".step_99.pt").write_bytes(b"half")  # hidden: an interrupted write
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10.pt"
    atomic_save({"step": 11}, tmp_path / "last.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "last.pt"
    assert latest_checkpoint(tmp_path, pattern="step_*.pt", prefer=None) == tmp_path / "step_10.pt"
    with pytest.raises(ValueError, match="is a file"):
        latest_checkpoint(tmp_path / "notes.txt")


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n", b"PK\x03\x04junk",
                                     b"\x00" * 64])
def test_a_file_that_is_no_checkpoint_is_a_checkpoint_error_naming_it(tmp_path, content):
    """A text file, a bare pickle, a broken zip or zeros: the caller gets CheckpointError (a
    ValueError) naming the file, never torch's unpickler's own IndexError or TypeError."""
    from contrastive.checkpoint import CheckpointError, load_checkpoint

    p = tmp_path / "log.csv"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="log.csv"):
        load_checkpoint(p)
