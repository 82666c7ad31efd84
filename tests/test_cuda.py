"""Tests that mean CUDA: the trainer's and ``embed``'s CUDA paths, the CUDA search backends, and
``torchrun`` with ``device="cpu"`` on a machine with a GPU. All are marked ``cuda`` and skipped
without a CUDA device; ``make gpu-check`` runs them (``pytest -m cuda``). The tests that mean the
CPU pin it (``device="cpu"``, or ``CUDA_VISIBLE_DEVICES=""`` for subprocesses)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

def _config(**kw):
    """A TrainConfig; imported here, not at the top, so that a missing pydantic (a wheel on the
    bare GPU machine) skips the tests that need it instead of failing the whole collection
    (which would also lose the other CUDA test files of the same pytest run)."""
    pytest.importorskip("pydantic")
    from contrastive.app.config import TrainConfig

    return TrainConfig.from_dict(kw)


def _child_env(hide_gpus: bool) -> dict[str, str]:
    """The environment of a rank: the repository in front of the caller's PYTHONPATH, which
    ``make gpu-check`` points at the unpacked wheels (runs/gpu_check/site); test_train_ddp's
    launcher replaces PYTHONPATH with the repository alone."""
    old = os.environ.get("PYTHONPATH")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([old] if old else [])))
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _launch(cfg, world: int, hide_gpus: bool = True) -> None:
    """test_train_ddp's launcher with :func:`_child_env` (imported here: it needs pydantic)."""
    import test_train_ddp as ddp

    ddp._launch(cfg, world, hide_gpus, base=_child_env(hide_gpus))


COMMON = dict(dataset="digits", backbone="mlp", dim=16, batch_size=32, m_per_class=4, steps=12,
              log_every=4, eval_every=6, checkpoint_every=0, final_probe=False, progress=False,
              lr=0.05, grad_clip=1.0, optimizer="sgd")


def test_cuda_fit_autocast_trains_like_the_cpu(tmp_path):
    """The trainer on CUDA (bf16 autocast, evaluation through embed on the GPU) follows the
    float32 CPU run: the same losses to bf16 accuracy, and close final metrics."""
    pytest.importorskip("pydantic")
    from contrastive.app.train import fit

    torch.cuda.reset_peak_memory_stats()
    gpu = fit(_config(**dict(COMMON, output=str(tmp_path / "gpu"), device="cuda")))
    assert torch.cuda.max_memory_allocated() > 0  # it did run on the GPU
    cpu = fit(_config(**dict(COMMON, output=str(tmp_path / "cpu"), device="cpu")))
    assert gpu["steps"] == cpu["steps"] == 12
    for g, c in zip(gpu["history"], cpu["history"]):
        assert math.isfinite(g["loss"])
        assert abs(g["loss"] - c["loss"]) < 0.05 * abs(c["loss"]) + 0.02
    for key in ("precision_at_1", "map_at_r"):
        assert abs(gpu["metrics"][key] - cpu["metrics"][key]) < 0.03, key


def test_cuda_fit_fp16_with_a_gradient_scaler_trains_like_the_cpu(tmp_path, monkeypatch):
    """The path a GPU without native bf16 (V100, T4) takes, forced on this one: fp16 autocast
    with ``torch.amp.GradScaler`` (CUDA's own scaler kernels), its state checkpointed; the
    losses follow the float32 CPU run to fp16 accuracy."""
    pytest.importorskip("pydantic")
    from contrastive import inference
    from contrastive.app.train import fit

    monkeypatch.setattr(inference, "amp_dtype", lambda device: torch.float16)
    gpu = fit(_config(**dict(COMMON, output=str(tmp_path / "gpu"), device="cuda",
                             checkpoint_every=4)))
    cpu = fit(_config(**dict(COMMON, output=str(tmp_path / "cpu"), device="cpu")))
    # looser than bf16's: the scaler may skip a first step whose scaled gradients overflow
    for g, c in zip(gpu["history"], cpu["history"]):
        assert math.isfinite(g["loss"])
        assert abs(g["loss"] - c["loss"]) < 0.1 * abs(c["loss"]) + 0.05
    state = torch.load(tmp_path / "gpu" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)
    assert state["scaler"] and math.isfinite(state["scaler"]["scale"])


def test_cuda_search_backends_and_blocks_agree_with_the_cpu():
    from evaluation.retrieval import retrieval_metrics
    from evaluation.search import knn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=g)
    y = torch.arange(3000) % 30
    s_cpu, i_cpu = knn(x, None, k=10, exclude_self=True, device="cpu", backend="torch")
    s_gpu, i_gpu = knn(x, None, k=10, exclude_self=True, device="cuda", backend="torch")
    s_blk, i_blk = knn(x, None, k=10, exclude_self=True, device="cuda", backend="torch",
                       block_size=7)  # many query blocks on the GPU
    assert (i_gpu == i_blk).all()
    assert (i_gpu == i_cpu).mean() > 0.999  # float32 rounding may swap near-ties
    torch.testing.assert_close(torch.as_tensor(s_gpu), torch.as_tensor(s_cpu), atol=1e-5,
                               rtol=0)
    m_cpu = retrieval_metrics(x, y, device="cpu")
    m_gpu = retrieval_metrics(x, y, device="cuda", backend="torch")
    for key in ("precision_at_1", "r_precision", "map_at_r"):
        assert m_gpu[key] == pytest.approx(m_cpu[key], abs=1e-3)


def test_cuda_torchrun_with_device_cpu_uses_gloo_on_a_gpu_machine(tmp_path):
    """Two ranks with ``device="cpu"`` while the GPU stays visible: setup must pick gloo (NCCL
    cannot carry CPU tensors) and the run must equal the single process."""
    cfg = dict(COMMON, device="cpu")
    _launch(_config(**dict(cfg, output=str(tmp_path / "one"))), 1, hide_gpus=False)
    _launch(_config(**dict(cfg, output=str(tmp_path / "two"))), 2, hide_gpus=False)
    a = json.loads((tmp_path / "one" / "result.json").read_text())
    b = json.loads((tmp_path / "two" / "result.json").read_text())
    for x, y in zip(a["history"], b["history"]):
        assert abs(x["loss"] - y["loss"]) < 1e-5
    assert abs(a["metrics"]["map_at_r"] - b["metrics"]["map_at_r"]) < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_cuda_two_gpu_nccl_fit_equals_one_gpu(tmp_path):
    cfg = dict(COMMON, device="cuda", amp=False)  # float32: the comparison is about NCCL
    _launch(_config(**dict(cfg, output=str(tmp_path / "one"))), 1, hide_gpus=False)
    _launch(_config(**dict(cfg, output=str(tmp_path / "two"))), 2, hide_gpus=False)
    a = json.loads((tmp_path / "one" / "result.json").read_text())
    b = json.loads((tmp_path / "two" / "result.json").read_text())
    for x, y in zip(a["history"], b["history"]):
        assert abs(x["loss"] - y["loss"]) < 1e-4
    assert abs(a["metrics"]["map_at_r"] - b["metrics"]["map_at_r"]) < 1e-3
