"""SimCLR, the MoCo-style queue and the cross-batch memory against lightly's ``NTXentLoss`` and
pytorch-metric-learning's ``CrossBatchMemory``: time and peak memory.

Rows (one run, the same inputs on both sides, B = 256 by default, d = 128):

* ``simclr``: :func:`losses.self_supervised.simclr` against ``NTXentLoss(t)(out0, out1)``;
* ``queue K``: :class:`losses.memory.NegativeQueue` against ``NTXentLoss(t,
  memory_bank_size=(K, d))``, K = 4096 and 65536, both starting from the same queue; each pass
  also queues the batch's keys, as in training;
* ``xbm K``: :class:`losses.memory.CrossBatchMemory` around SupCon against
  pytorch-metric-learning's ``CrossBatchMemory(SupConLoss(t), d, K)``, both memories filled
  with the same rows first (4 items per class; PML's ``NTXentLoss`` in a memory builds a
  positives x negatives matrix, out of reach at these sizes).

Time: median of ``--repeats`` forward + backward passes (queue update included) after a warm-up,
ours and the reference interleaved. Peak memory: :class:`PeakMemory` of ``benchmarks/losses.py``
(torch.profiler's CPU allocation events; ``torch.cuda.max_memory_allocated`` on CUDA), in a
pass of its own that is not timed. The ``|diff|`` column is ``|ours - reference|`` of the loss
on the row's first input (lightly for ``simclr`` and ``queue``, PML for ``xbm``).

Usage::

    python benchmarks/memory.py                 # B = 256, K = 4096 and 65536
    python benchmarks/memory.py --threads 1       # steadier on a loaded machine
    python benchmarks/memory.py --batch 512 --banks 4096 --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from losses.memory import CrossBatchMemory, NegativeQueue  # noqa: E402
from losses.modules import InfoNCE  # noqa: E402
from losses.self_supervised import simclr  # noqa: E402


def _peak_memory_class():
    """``PeakMemory`` of ``benchmarks/losses.py`` (loaded by path: its module name would shadow
    the ``losses`` package)."""
    spec = importlib.util.spec_from_file_location(
        "bench_losses", os.path.join(os.path.dirname(os.path.abspath(__file__)), "losses.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_losses"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.PeakMemory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _pass(fn, a, b, device) -> float:
    a.grad = b.grad = None
    _sync(device)
    t0 = time.perf_counter()
    fn(a, b).backward()
    _sync(device)
    return time.perf_counter() - t0


def measure(fns: dict, a, b, device, repeats: int, peak_cls) -> dict:
    """``{key: (median ms, peak MiB)}`` of each forward + backward pass in ``fns``.

    Per key: one warm-up pass, then one pass under ``peak_cls`` for the peak memory only (the
    profiler records every operation, which slows that pass), then ``repeats`` timed passes,
    the keys interleaved.
    """
    peaks = {}
    for key, fn in fns.items():
        _pass(fn, a, b, device)
        with peak_cls(device.type) as pm:
            _pass(fn, a, b, device)
        peaks[key] = pm.peak / 2**20
    times: dict = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(_pass(fn, a, b, device))
    return {k: (1e3 * statistics.median(times[k]), peaks[k]) for k in fns}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--banks", type=int, nargs="+", default=[4096, 65536])
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is the steadiest on a shared "
                    "machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightly.loss import NTXentLoss

    device = torch.device(args.device)
    peak_cls = _peak_memory_class()
    g = torch.Generator().manual_seed(0)
    bsz, d, t = args.batch, args.dim, args.temperature
    a = torch.randn(bsz, d, generator=g).to(device).requires_grad_()
    b = torch.randn(bsz, d, generator=g).to(device).requires_grad_()

    rows = []
    ref = NTXentLoss(t).to(device)
    diff = abs(simclr(a, b, t).item() - ref(a, b).item())
    res = measure({"ours": lambda x, y: simclr(x, y, t), "ref": ref}, a, b, device,
                  args.repeats, peak_cls)
    rows.append(("simclr", "NTXentLoss(t)", res, diff))
    for k in args.banks:
        ref = NTXentLoss(t, memory_bank_size=(k, d)).to(device)
        ours = NegativeQueue(size=k, embedding_size=d, temperature=t).to(device)
        ours.memory.embeddings.copy_(ref.memory_bank.bank)
        diff = abs(copy.deepcopy(ours)(a, b).item() - copy.deepcopy(ref)(a, b).item())
        res = measure({"ours": ours, "ref": ref}, a, b, device, args.repeats, peak_cls)
        rows.append((f"queue {k}", f"NTXentLoss(t, memory_bank_size=({k}, {d}))", res, diff))

    labels = (torch.arange(bsz) // 4).to(device)  # 4 per class, the same classes every batch
    for k in args.banks:  # XBM: ours and PML's CrossBatchMemory around SupCon, filled memory
        from pytorch_metric_learning.losses import CrossBatchMemory as PMLMemory
        from pytorch_metric_learning.losses import SupConLoss

        ours = CrossBatchMemory(InfoNCE(t), d, k).to(device)
        ref = PMLMemory(SupConLoss(t), d, k).to(device)
        with torch.no_grad():
            for _ in range(k // bsz):  # fill both memories with the same rows
                x = torch.randn(bsz, d, generator=g).to(device)
                ours(x, labels), ref(x, labels)
        diff = abs(copy.deepcopy(ours)(a, labels).item() - copy.deepcopy(ref)(a, labels).item())
        res = measure({"ours": lambda x, _y, m=ours: m(x, labels),
                       "ref": lambda x, _y, m=ref: m(x, labels)}, a, b, device, args.repeats,
                      peak_cls)
        rows.append((f"xbm {k}", f"PML CrossBatchMemory(SupConLoss(t), {d}, {k})", res, diff))

    print(f"# B = {bsz}, d = {d}, t = {t}, device = {device}, threads = "
          f"{torch.get_num_threads()}, torch {torch.__version__}; forward + backward (+ the "
          f"memory update), median of {args.repeats}; speed-up = ref / ours, mem ratio = "
          "ref peak / ours")
    head = ("case", "reference", "ours ms", "ref ms", "speed-up", "ours MiB", "ref MiB",
            "mem ratio", "|diff|")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, ref_name, res, diff in rows:
        (om, omb), (rm, rmb) = res["ours"], res["ref"]
        print(f"| {name} | {ref_name} | {om:.2f} | {rm:.2f} | {rm / om:.2f}x | {omb:.1f} | "
              f"{rmb:.1f} | {rmb / max(omb, 1e-9):.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
