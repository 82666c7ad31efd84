"""Suite-wide settings: every test process (and every subprocess a test starts, through the
environment) uses one CPU thread.

The suite's workloads are small (an MLP on 8x8 digits, matrices of a few hundred rows), so extra
threads buy nothing and cost a lot on a shared machine: with pytest-xdist running one worker per
core, or other jobs holding a core, oversubscribed OpenMP pools spin-wait and slow such work down
many times over (a 25 s file took 480 s with two intra-op threads on a busy 2-core box). Tests
that exercise multi-threaded code paths set their thread count themselves and restore it.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one BLAS/OpenMP thread for a whole module, restored afterwards (for
    modules whose code under test may change the thread count, e.g. a command's ``--threads``
    default): use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture
def main(capsys):
    """``main(*args) -> (exit status, stdout, stderr)``: the command line in-process (the same
    dispatch and exit codes as the console script, without its seconds of imports per call);
    ``--help`` and argparse errors leave through ``SystemExit``, whose code is the exit
    status."""
    import torch

    from contrastive import cli

    threads = torch.get_num_threads()

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = cli.main(list(args))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return rc, out, err

    return call
