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
