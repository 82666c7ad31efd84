"""Launch a test file's worker as several local ``gloo`` ranks, the way ``torchrun`` would
(its environment variables), for the tests of the distributed paths. A worker is the test file
itself run as a script with the output folder as its argument; each rank writes its results
there for the test to compare with one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before it is bound:
    :func:`launch_ranks` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_once(script: Path, out_dir: Path, world: int, timeout: float) -> tuple[bool, str]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(script), str(out_dir)], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs, failed = [], False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            failed = True
        outputs.append(out)
        failed |= p.returncode != 0
    return failed, "\n".join(f"--- rank {r} ---\n{o[-4000:]}" for r, o in enumerate(outputs))


def launch_ranks(script: str | Path, out_dir: Path, world: int = 2, timeout: float = 180,
                 attempts: int = 3) -> str:
    """Run ``python script out_dir`` as ``world`` ranks (CPU only, one thread each) and return
    their combined output; a port taken between :func:`free_port` and the bind is retried on
    another, any other failure fails the test with every rank's output."""
    for attempt in range(attempts):
        failed, text = _run_once(Path(script), out_dir, world, timeout)
        if not failed:
            return text
        if attempt == attempts - 1 or "address already in use" not in text.lower():
            pytest.fail(f"distributed workers failed:\n{text}")
    raise AssertionError("unreachable")
