"""Throughput of ``contrastive.inference.embed`` against the bare backbone forward.

For each (model, image size, batch size) the same in-memory images are embedded three ways:

* ``bare``: ``model(x)`` over batches sliced (and moved to the device) beforehand, under
  ``torch.inference_mode`` in eval mode, run as ``embed`` runs the model on that device
  (:func:`bare_settings`: on CUDA its autocast dtype, bf16 or fp16 before Ampere, and
  channels_last inputs and weights where ``embed`` uses them, the weights converted for the
  call and restored, as ``embed`` does; on CPU neither) -- the floor that any pipeline pays;
* ``embed``: ``embed(model, TensorDataset(x, y), batch_size)`` -- the library's path for
  in-memory tensors (batches sliced, no per-sample collation);
* ``embed+DL``: ``embed`` over a generic map-style ``Dataset`` (per-sample ``__getitem__`` and
  default collation through the ``DataLoader`` that ``embed`` builds) -- what a typical image
  data set costs on top of the model.

Overhead % = (bare images/s / embed images/s - 1) * 100 (target: < 10 % on CPU); ratio = embed
images/s / bare images/s. Both ``embed`` paths are checked to return the bare forward's
embeddings and labels, every row in order (a ``RuntimeError`` otherwise). Each timing is
the best of ``--repeats`` runs, interleaved so that background load hits all three alike. On CPU
the clock is by default the main thread's CPU time (``time.thread_time``) with
``torch.set_num_threads(--threads=1)``: all work then runs on that one thread, and the numbers
stay meaningful on a machine shared with other jobs (wall-clock there measures the neighbours).
``--clock wall`` (and more threads) for an idle machine; CUDA always uses synchronised wall time.
Memory, in a separate untimed call: the peak resident set size (RSS) above the level before the
call, sampled every 2 ms from /proc/self/statm by a thread (CPU; torch tensors are not seen by
tracemalloc), or ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/embed.py --quick
    python benchmarks/embed.py --models resnet18 test_resnet --sizes 64 112 --batch-sizes 32 128
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from contrastive.embedders import Embedder  # noqa: E402
from contrastive.inference import _channels_last as weights_channels_last  # noqa: E402
from contrastive.inference import amp_dtype, channels_last_safe, embed  # noqa: E402


class _PlainDataset(Dataset):
    """A map-style data set without the TensorDataset fast path (one item per __getitem__)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


class _PeakRSS:
    """Peak RSS above the starting level, sampled by a background thread (bytes)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> _PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


@dataclass(frozen=True)
class BareSettings:
    """How the model runs: autocast on (``amp``) to ``dtype``, and channels_last inputs and
    4-D weights (``channels_last``)."""

    amp: bool
    dtype: torch.dtype
    channels_last: bool


def bare_settings(model: torch.nn.Module, device: torch.device) -> BareSettings:
    """The settings ``embed``'s defaults (``amp=None``, ``channels_last=None``) resolve to for
    ``model`` on ``device``: on CUDA autocast to :func:`amp_dtype` (bf16 where the GPU computes it
    natively, fp16 before Ampere) and channels_last where :func:`channels_last_safe` holds; on CPU
    neither."""
    cuda = torch.device(device).type == "cuda"
    return BareSettings(amp=cuda, dtype=amp_dtype(device),
                        channels_last=cuda and channels_last_safe(model))


def bare_batches(x: torch.Tensor, batch_size: int, device: torch.device,
                 settings: BareSettings) -> list[torch.Tensor]:
    """``x`` sliced into batches on ``device``, channels_last where ``settings`` says so (as
    ``embed`` lays out each batch it feeds the model)."""
    batches = [x[i:i + batch_size].to(device) for i in range(0, len(x), batch_size)]
    if settings.channels_last:
        batches = [b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b
                   for b in batches]
    return batches


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor], settings: BareSettings,
                 keep: bool = False) -> Callable[[], list[torch.Tensor]]:
    """The bare forward over ``batches``: ``model(b)`` for each, under ``torch.inference_mode``
    and the autocast of ``settings``, with the model's 4-D weights channels_last for the call
    where ``settings`` says so (converted and restored by the helper ``embed`` uses, so the
    conversion is paid alike). The call returns the outputs if ``keep``, else ``[]`` (each one
    freed before the next batch)."""
    device_type = batches[0].device.type if batches else "cpu"

    def run() -> list[torch.Tensor]:
        out = []
        with (weights_channels_last(model, settings.channels_last), torch.inference_mode(),
              torch.autocast(device_type, settings.dtype, enabled=settings.amp)):
            for b in batches:
                z = model(b)
                if keep:
                    out.append(z)
        return out

    return run


def _time(fn, device: torch.device, clock) -> float:
    """Seconds of one call on ``clock``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t0


def _memory(fn, device: torch.device) -> float:
    """Peak memory (MB) of one call above the level before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _PeakRSS() as mem:
        fn()
    return mem.delta_mb


def bench_one(name: str, size: int, batch_size: int, n: int, repeats: int,
              device: torch.device, clock) -> dict:
    kwargs = {"img_size": size} if "vit" in name else {}
    model = Embedder(name, dim=128, **kwargs).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    settings = bare_settings(model, device)
    xb = bare_batches(x, batch_size, device, settings)
    tds, pds = TensorDataset(x, y), _PlainDataset(x, y)
    ways = {
        "bare": bare_forward(model, xb, settings),
        "embed": lambda: embed(model, tds, batch_size=batch_size, device=device, progress=False),
        "embed+DL": lambda: embed(model, pds, batch_size=batch_size, device=device,
                                  progress=False),
    }
    for fn in ways.values():  # warm-up: allocator, oneDNN primitive cache, cudnn autotune
        fn()
    mem = {k: _memory(fn, device) for k, fn in ways.items()}
    best = dict.fromkeys(ways, float("inf"))
    for _ in range(repeats):
        for k, fn in ways.items():
            best[k] = min(best[k], _time(fn, device, clock))
    _check_same_rows(model, xb, y, {"embed": tds, "embed+DL": pds}, batch_size, device,
                     settings)
    return {k: (n / best[k], mem[k]) for k in ways}


def _check_same_rows(model: torch.nn.Module, xb: list[torch.Tensor], y: torch.Tensor,
                     datasets: dict[str, Dataset], batch_size: int, device: torch.device,
                     settings: BareSettings) -> None:
    """Raise ``RuntimeError`` unless each ``embed`` path returns, for every row and in order,
    the embeddings and labels of the bare forward (the rows the table's images/s stand for)."""
    amp = settings.amp
    ref = torch.cat([z.float().cpu() for z in bare_forward(model, xb, settings, keep=True)()])
    for way, ds in datasets.items():
        emb, labels = embed(model, ds, batch_size=batch_size, device=device, progress=False)
        if emb.shape != ref.shape or not torch.equal(labels.cpu(), y):
            raise RuntimeError(f"{way}: embed returned {tuple(emb.shape)} rows / labels that are "
                               f"not the bare forward's {tuple(ref.shape)}")
        err = (emb.float().cpu() - ref).abs().max().item()
        if not err <= (2e-2 if amp else 1e-5):
            raise RuntimeError(f"{way}: embed != bare forward (max |diff| {err:.2e})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "test_resnet", "test_vit"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 112])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128, 256])
    p.add_argument("-n", "--num-images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="CPU: main-thread CPU time (default; needs --threads 1) or wall time")
    p.add_argument("--quick", action="store_true",
                   help="resnet18 + test_resnet + test_vit, 64x64, batch 32 and 128, 256 images")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.sizes = ["resnet18", "test_resnet", "test_vit"], [64]
        args.batch_sizes, args.num_images = [32, 128], 256
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" or args.clock == "wall":
        clock, clock_kind = time.perf_counter, "wall"
    else:
        if args.threads != 1:
            p.error("--clock cpu measures the main thread only; use --threads 1 or --clock wall")
        clock, clock_kind = time.thread_time, "main-thread CPU time"
    mem_kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                else "peak RSS delta, sampled thread")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"images={args.num_images} repeats={args.repeats} (best of)\nclock: {clock_kind}; "
          f"memory: {mem_kind}")
    head = (f"{'model':<12}{'size':>5}{'batch':>6} | {'bare img/s':>10} {'embed img/s':>11} "
            f"{'ratio':>6} {'overhead':>9} | {'embed+DL img/s':>14} {'ratio':>6} "
            f"{'overhead':>9} | {'mem bare/embed/DL MB':>21}")
    print(head)
    print("-" * len(head))
    for name in args.models:
        for size in args.sizes:
            for bs in args.batch_sizes:
                r = bench_one(name, size, bs, args.num_images, args.repeats, device, clock)
                b, e, d = r["bare"][0], r["embed"][0], r["embed+DL"][0]
                mem = "/".join(f"{r[k][1]:.0f}" for k in ("bare", "embed", "embed+DL"))
                print(f"{name:<12}{size:>5}{bs:>6} | {b:>10.0f} {e:>11.0f} {e / b:>6.3f} "
                      f"{(b / e - 1) * 100:>8.1f}% | {d:>14.0f} {d / b:>6.3f} "
                      f"{(b / d - 1) * 100:>8.1f}% | {mem:>21}", flush=True)


if __name__ == "__main__":
    main()
