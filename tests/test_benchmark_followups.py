"""Follow-ups of the benchmark scripts review (tests/test_benchmark_scripts_review.py):

* ``benchmarks/accuracy_calculator.py`` prints each row's peak memory, measured in a process
  of its own (a row that runs after another one in the same process could reuse memory the
  allocator kept, and its resident-set rise would under-count), with a ratio against ours;
* ``benchmarks/embed.py``'s ``bare`` baseline runs the model as ``embed`` does on that device:
  the same autocast dtype (fp16 on CUDA GPUs without native bf16) and the same memory format
  for the inputs and the weights.

The CUDA settings are checked with a faked device capability (no GPU needed); no timing is
asserted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contrastive.embedders import Embedder  # noqa: E402
from contrastive.inference import amp_dtype, channels_last_safe  # noqa: E402


def _load(name: str) -> types.ModuleType:
    """A benchmark script as a module (by path: ``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_followups_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# benchmarks/accuracy_calculator.py


def test_accuracy_calculator_prints_peak_memory_against_ours(monkeypatch, capsys):
    """Each row's peak (as measured for that row) in MB, and as a ratio to ours of the same k;
    the time columns stay what they were (clock values injected)."""
    bench = _load("accuracy_calculator")
    clock = iter([(2.0, 4.0), (6.0, 10.0), (1.0, 1.0), (3.0, 3.0), (30.0, 45.0)])
    peaks_mb = {"ours max_bin_count": 10.0, "pml max_bin_count": 40.0,
                "retrieval_metrics": 5.0, "ours k=None": 100.0, "pml k=None": 250.0}
    measured: list[str] = []

    def fake_timed(fn):
        wall, cpu = next(clock)
        return fn(), wall, cpu

    def fake_row_peak(name: str, x: np.ndarray, y: np.ndarray) -> tuple[int, str]:
        measured.append(name)
        return int(peaks_mb[name] * 2**20), "VmHWM"

    monkeypatch.setattr(bench, "timed", fake_timed)
    monkeypatch.setattr(bench, "row_peak", fake_row_peak, raising=False)
    x, y = bench.make_data(60, 3, 4)
    bench.run_case("memory", x, y, True)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("contender"))
    assert "peak MB" in header and "mem/ours" in header, header
    assert sorted(measured) == sorted(peaks_mb)  # every row measured, each once
    rows = {line[:22].strip(): line[22:] for line in lines
            if line.startswith(("ours", "pml", "retr"))}
    expected = {  # wall/ours, cpu/ours, mem/ours
        "ours max_bin_count": ["1.00x", "1.00x", "1.00x"],
        "pml max_bin_count": ["3.00x", "2.50x", "4.00x"],
        "retrieval_metrics": ["0.50x", "0.25x", "0.50x"],
        "ours k=None": ["1.00x", "1.00x", "1.00x"],
        "pml k=None": ["10.00x", "15.00x", "2.50x"],
    }
    for name, ratios in expected.items():
        assert re.findall(r"\b([0-9.]+x)\b", rows[name]) == ratios, rows[name]
        assert f"{peaks_mb[name]:.1f}" in rows[name].split(), rows[name]


def test_accuracy_calculator_row_peak_runs_each_row_in_a_fresh_process():
    """The real measurement: PML's ``k=None`` ranks the whole reference set (an N x N table of
    distances at least), in a process of its own each time, so a second measurement of the
    same row sees the same rise instead of reusing what the first one left."""
    bench = _load("accuracy_calculator")
    n = 1500
    x, y = bench.make_data(n, 10, 8)
    first, method = bench.row_peak("pml k=None", x, y)
    second, _ = bench.row_peak("pml k=None", x, y)
    assert method in ("VmHWM", "sampled VmRSS")
    assert first >= n * n * 4 and second >= n * n * 4, (first, second)


# --------------------------------------------------------------------------------------------
# benchmarks/embed.py


def _fake_cuda(monkeypatch, major: int) -> None:
    """A CUDA device of compute capability ``major``.0 as ``amp_dtype`` asks for it (native bf16
    from Ampere, 8.0, on; emulated only before)."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())


class _ViewNet(torch.nn.Module):
    """A custom forward that flattens a feature map (not channels_last safe)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return z.view(z.shape[0], -1)


@pytest.mark.parametrize("major, dtype", [(7, torch.float16), (8, torch.bfloat16)])
def test_embed_bare_settings_are_embeds_on_cuda(monkeypatch, major, dtype):
    """On a faked CUDA device the baseline autocasts to embed's dtype (fp16 before Ampere) and
    uses channels_last inputs and weights exactly where embed does; on CPU, neither."""
    bench = _load("embed")
    _fake_cuda(monkeypatch, major)
    cuda = torch.device("cuda")
    assert amp_dtype(cuda) == dtype  # the fake is what embed sees
    model = Embedder("test_resnet", dim=8)
    assert channels_last_safe(model)
    s = bench.bare_settings(model, cuda)
    assert (s.amp, s.dtype, s.channels_last) == (True, dtype, True)
    s = bench.bare_settings(_ViewNet(), torch.device("cuda:0"))
    assert (s.amp, s.dtype, s.channels_last) == (True, dtype, False)
    s = bench.bare_settings(model, torch.device("cpu"))
    assert (s.amp, s.channels_last) == (False, False)


class _Recorder:
    """Forward pre-hook noting what a convolution sees: autocast on and its dtype, the input's
    and the weight's memory format."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        self.seen: set[tuple] = set()
        conv.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        cl = torch.channels_last
        self.seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                       args[0].is_contiguous(memory_format=cl),
                       module.weight.is_contiguous(memory_format=cl)))


def test_embed_bare_forward_runs_the_model_as_embed_does():
    """With the settings embed would use (here forced on, on the CPU: bf16 autocast and
    channels_last), the bare loop and ``embed`` run the convolutions in the same state, and the
    weights are left as they were; with fp16 the bare loop autocasts to fp16."""
    bench = _load("embed")
    model = Embedder("test_resnet", dim=8).eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(6, 3, 32, 32)
    on = bench.BareSettings(amp=True, dtype=torch.bfloat16, channels_last=True)
    rec = _Recorder(conv)
    bench.bare_forward(model, bench.bare_batches(x, 4, torch.device("cpu"), on), on)()
    bare_seen, rec.seen = rec.seen, set()
    bench.embed(model, TensorDataset(x, torch.zeros(6)), batch_size=4, device="cpu",
                progress=False, amp=True, channels_last=True)
    assert bare_seen == rec.seen == {(True, torch.bfloat16, True, True)}
    assert conv.weight.is_contiguous()  # restored after the call

    rec.seen = set()
    fp16 = bench.BareSettings(amp=True, dtype=torch.float16, channels_last=False)
    bench.bare_forward(model, bench.bare_batches(x, 4, torch.device("cpu"), fp16), fp16)()
    assert rec.seen == {(True, torch.float16, False, False)}


def test_embed_bench_one_builds_its_baseline_from_the_device_settings(monkeypatch):
    """``bench_one`` asks :func:`bare_settings` for the model on the row's device and runs both
    the timed baseline and the sanity check's reference with what it returns."""
    bench = _load("embed")
    asked: list[tuple] = []
    used: list = []
    real_settings, real_forward = bench.bare_settings, bench.bare_forward

    def spy_settings(model: torch.nn.Module, device: torch.device):
        asked.append((type(model).__name__, torch.device(device)))
        return real_settings(model, device)

    def spy_forward(model, batches, settings, keep=False):
        used.append(settings)
        return real_forward(model, batches, settings, keep)

    monkeypatch.setattr(bench, "bare_settings", spy_settings)
    monkeypatch.setattr(bench, "bare_forward", spy_forward)
    bench.bench_one("test_resnet", 32, 4, 8, 1, torch.device("cpu"), bench.time.thread_time)
    assert asked == [("Embedder", torch.device("cpu"))]
    assert len(used) == 2 and set(used) == {bench.BareSettings(False, torch.bfloat16, False)}
