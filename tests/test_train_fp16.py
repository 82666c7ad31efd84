"""The trainer's fp16 path, taken on GPUs without native bf16 (V100, T4): autocast to fp16 with
a gradient scaler whose state is checkpointed. Run here on the CPU, with
``contrastive.inference.amp_dtype`` answering fp16 as it does on such a GPU (CPU autocast and
``torch.amp.GradScaler`` run fp16 too); the bf16 path keeps no scaler state."""

from __future__ import annotations

import math
import os
import signal
import warnings

import pytest
import torch

from contrastive import inference
from contrastive.app.config import TrainConfig
from contrastive.app.run_folder import TrainingInterrupted
from contrastive.app.train import fit


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", backbone="mlp", dim=16, steps=12, batch_size=32,
                m_per_class=4, lr=2e-3, output=str(tmp_path / "run"), progress=False,
                log_every=4, checkpoint_every=4, final_probe=False, seed=0, device="cpu",
                amp=True)
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture
def fp16_gpu(monkeypatch):
    """``amp_dtype`` as on a GPU without native bf16; records the autocast dtype each forward
    pass of the embedder ran under."""
    monkeypatch.setattr(inference, "amp_dtype", lambda device: torch.float16)
    seen: list = []
    original = torch.nn.Module.__call__

    def spy(self, *args, **kwargs):
        if self.__class__.__module__.startswith("contrastive.embedders") and \
                torch.is_autocast_enabled("cpu"):
            seen.append(torch.get_autocast_dtype("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", spy)
    return seen


def test_fp16_autocast_trains_with_a_checkpointed_gradient_scaler(tmp_path, fp16_gpu):
    res = fit(_cfg(tmp_path))
    assert fp16_gpu and set(fp16_gpu) == {torch.float16}  # the forward ran in fp16
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    scaler = state["scaler"]
    assert scaler and scaler["scale"] > 0 and math.isfinite(scaler["scale"])
    assert scaler["_growth_tracker"] >= 0
    assert all(math.isfinite(r["loss"]) for r in res["history"])


def test_fp16_resume_restores_the_scaler_and_ends_where_an_uninterrupted_run_ends(
        tmp_path, fp16_gpu):
    full = fit(_cfg(tmp_path / "a"))
    # a SIGTERM after the 6th step: the run checkpoints there and stops
    calls, update = [], torch.amp.GradScaler.update

    def update_then_signal(self, *a, **k):
        update(self, *a, **k)
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.amp.GradScaler, "update", update_then_signal)
        with pytest.raises(TrainingInterrupted):
            fit(_cfg(tmp_path / "b"))
    cut = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert cut["step"] == 6 and cut["scaler"]
    resumed = fit(_cfg(tmp_path / "b", resume=True))
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert a["scaler"] == b["scaler"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert full["metrics"] == resumed["metrics"]


def test_bf16_and_float32_runs_keep_no_scaler_state(tmp_path):
    fit(_cfg(tmp_path / "bf16"))  # CPU autocast: bf16
    fit(_cfg(tmp_path / "fp32", amp=False))
    for run in ("bf16", "fp32"):
        state = torch.load(tmp_path / run / "run" / "checkpoints" / "last.pt", weights_only=False)
        assert state["scaler"] == {}


def test_fp16_gradients_are_unscaled_before_clipping(tmp_path, fp16_gpu, monkeypatch):
    """``grad_clip`` clips the true gradients: with the loss scaled by 2^16 the clipped norm
    would otherwise be the scaled one's."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = clip(params, max_norm, *a, **k)
        norms.append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    fit(_cfg(tmp_path, grad_clip=1.0, steps=4, checkpoint_every=0))
    finite = [n for n in norms if math.isfinite(n)]
    assert finite and max(finite) < 1e3  # a scaled norm would be ~2^16 times the true one


def test_grad_scaler_on_torch_without_torch_amp_grad_scaler(monkeypatch):
    """torch 2.2 (the oldest the project admits) has only ``torch.cuda.amp.GradScaler``: the
    trainer takes that one, enabled on CUDA only; with ``torch.amp.GradScaler`` it is the
    device's own."""
    from contrastive.app.train import _grad_scaler

    assert _grad_scaler(torch.device("cpu"), True).is_enabled()
    assert not _grad_scaler(torch.device("cpu"), False).is_enabled()
    monkeypatch.delattr(torch.amp, "GradScaler")
    with warnings.catch_warnings():  # newer torch deprecates torch.cuda.amp.GradScaler
        warnings.simplefilter("ignore", FutureWarning)
        old = _grad_scaler(torch.device("cpu"), True)
    assert isinstance(old, torch.cuda.amp.GradScaler) and not old.is_enabled()
