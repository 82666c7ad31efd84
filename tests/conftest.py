"""Suite-wide settings: with pytest-xdist the suite runs one worker per core, so each worker
(and every subprocess it starts) uses one thread; oversubscribed OpenMP pools slow small CPU
workloads down many times over."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        import torch

        torch.set_num_threads(1)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            pass
