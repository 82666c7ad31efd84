"""Batched inference with any embedding model: ``embed(model, data)`` and, under ``torchrun``,
``embed_distributed(model, data)`` (docs/architecture.md, the embedding interface).

``embed`` runs a model over a data set or loader and returns float32 CPU embeddings and int64
labels: on CUDA with autocast (bf16 where the GPU computes it natively, fp16 before Ampere:
:func:`amp_dtype`), channels_last inputs for models whose forward is known to accept them
(:func:`channels_last_safe`), and asynchronous copies through two reused pinned buffers; on CPU
in plain float32. It runs under ``torch.inference_mode`` with the model in eval mode and restores
the model afterwards (train/eval flags, device, memory format).

``embed_distributed`` is the same under ``torchrun``: each rank embeds one contiguous share of
the data set (about N / W rows, in whole batches) and the shares are gathered in rank order, so
every rank returns the whole ``[N, dim]`` result, bit for bit what one process computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, TensorDataset, default_collate

from .devices import resolve_device
from .embedders import eval_mode
from .validation import check_positive_int

__all__ = ["embed", "embed_distributed", "shard_bounds", "amp_dtype", "channels_last_safe"]


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Argument > the accelerator the model already lives on > CUDA when present > CPU. An
    argument that is no device, or CUDA on a machine without one, is a ValueError naming
    ``device`` (:func:`contrastive.devices.resolve_device`)."""
    if device is not None:
        dev = resolve_device(device)
        if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    for t in _tensors(model):
        if t.device.type != "cpu":
            return t.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tensors(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``model`` to ``device`` for the duration if it is elsewhere, then move it back."""
    devices = {t.device for t in _tensors(model)}
    if not devices or devices == {device}:
        yield
        return
    if len(devices) > 1:
        raise ValueError(f"model is spread over devices {sorted(map(str, devices))}; put it on "
                         "one device, or pass device= matching where it is")
    (original,) = devices
    model.to(device)
    try:
        yield
    finally:
        model.to(original)


@contextlib.contextmanager
def _channels_last(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Store the model's 4-D weights channels_last for the duration; restore exactly those."""
    changed: list[Tensor] = []
    if enabled:
        for t in _tensors(model):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                t.data = t.data.contiguous(memory_format=torch.channels_last)
                changed.append(t)
    try:
        yield
    finally:
        for t in changed:
            t.data = t.data.contiguous()


def _unwrap(model: nn.Module) -> nn.Module:
    """The inner module of DDP / DataParallel: inference needs no collectives, and calling the
    wrapper on one rank only (e.g. evaluation on rank 0) could hang the others."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def amp_dtype(device: str | torch.device) -> torch.dtype:
    """The autocast dtype for ``device``: bfloat16, except on CUDA GPUs that lack native bf16.

    ``torch.cuda.is_bf16_supported()`` also answers True where bf16 is only *emulated* (V100,
    T4: compute capability < 8.0), which runs bf16 matrix products many times slower than fp16
    on the tensor cores; there fp16 is returned. Native bf16 is asked for with
    ``including_emulation=False`` (torch >= 2.3) or, on older torch, read from the compute
    capability (>= 8.0, Ampere and later). CPU autocast uses bf16.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return torch.bfloat16
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation and does not emulate
            native = torch.cuda.get_device_capability(index)[0] >= 8
    return torch.bfloat16 if native else torch.float16


#: Module families whose forwards accept channels_last inputs (they never ``.view()`` a feature
#: map): torch.nn layers, timm and torchvision models, and this package's own modules.
_LAYOUT_SAFE_PREFIXES = ("torch.nn.", "timm.", "torchvision.", "contrastive.")


def channels_last_safe(model: nn.Module) -> bool:
    """Whether ``model`` may be fed channels_last inputs by default: it has a 4-D (conv) weight
    and every submodule comes from torch.nn, timm, torchvision or this package.

    A custom module's forward may call ``x.view(B, -1)`` on a feature map, which fails on a
    channels_last tensor (its strides are not those of a contiguous one); such models keep the
    default contiguous layout unless ``channels_last=True`` is passed explicitly.
    """
    model = _unwrap(model)
    has_4d = any(t.dim() == 4 for t in _tensors(model))
    return has_4d and all(type(m).__module__.startswith(_LAYOUT_SAFE_PREFIXES)
                          for m in model.modules())


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _is_pil(x: object) -> bool:
    """Whether ``x`` is a PIL image (without importing PIL)."""
    return type(x).__module__.split(".", 1)[0] == "PIL"


def _collate(samples: list) -> object:
    """The collate function of the loader :func:`embed` builds over a Dataset: torch's
    ``default_collate``, after turning each sample's input that is a list of numbers into an
    array (``default_collate`` would make one tensor per list position: a transposed batch).
    A PIL image input is a TypeError that names the fix (a transform to tensors)."""
    fixed = []
    for sample in samples:
        if isinstance(sample, (tuple, list)) and len(sample) == 2:
            x, y = sample
            if _is_pil(x):
                raise TypeError(
                    f"embed() got PIL images ({type(x).__name__}) as inputs; give the data set a "
                    "transform that makes tensors, e.g. Embedder.eval_transform() for a timm "
                    "backbone (resize, crop, to tensor, normalise)"
                )
            if isinstance(x, (tuple, list)) and not any(isinstance(v, Tensor) for v in x):
                sample = (np.asarray(x), y)
        fixed.append(sample)
    return default_collate(fixed)


def _inputs_from_columns(x: list | tuple, n: int) -> Tensor:
    """The ``[n, d]`` inputs of a batch that ``default_collate`` made from samples whose input
    is a flat list of ``d`` numbers: ``d`` tensors of ``n`` values, one per list position."""
    if x and all(isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == n for v in x):
        return torch.stack(list(x), dim=1)
    raise TypeError(
        "the inputs of a batch came as a list (default_collate makes one tensor per position "
        "of a sample's input that is a list); return a tensor or numpy array as the input from "
        "the data set's __getitem__"
    )


def _split_batch(batch: object, columns: bool = False) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one batch as tensors; x may come as numpy, y as numpy / list of ints.
    ``columns``: the batch was made by ``default_collate``, so an input that is a list holds one
    tensor per position of the samples' inputs (see ``_inputs_from_columns``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "embed() needs data that yields (x, y) pairs; got a batch of type "
            f"{type(batch).__name__}"
            f"{' with ' + str(len(batch)) + ' items' if isinstance(batch, (tuple, list)) else ''}"
            "; wrap the data set so __getitem__ returns (input, label)"
        )
    x, y = batch
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(np.asarray(y))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                "labels must be integer class ids (ints, or an integer tensor or array); got "
                f"{list(y)[:3] if isinstance(y, (tuple, list)) else type(y).__name__}; map "
                "them to ids in the data set, e.g. with a dict from name to index"
            ) from exc
    if columns and isinstance(x, (tuple, list)):
        x = _inputs_from_columns(x, y.shape[0] if y.dim() == 1 else -1)
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels of a batch must be 1-D with one entry per input; got shape "
                         f"{tuple(y.shape)} for inputs of shape {tuple(x.shape)}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be integer class ids, got non-integer floats")
    return x, y.long().cpu()


def _tensor_batches(ds: TensorDataset, batch_size: int, pin: bool) -> Iterator[tuple[Tensor,
                                                                                     Tensor]]:
    """Fast path for an in-memory ``TensorDataset(x, y)``: contiguous slices, no per-sample
    indexing or collation (which costs more than a small model's forward on CPU)."""
    x_all, y_all = ds.tensors
    for start in range(0, len(ds), batch_size):
        x, y = x_all[start:start + batch_size], y_all[start:start + batch_size]
        if pin and x.device.type == "cpu":
            x = x.pin_memory()
        yield x, y


def _batches(data: Dataset | DataLoader | Iterable, batch_size: int, num_workers: int,
             pin: bool) -> tuple[Iterable, int | None]:
    """An iterable of batches and the number of samples (None when unknown)."""
    if isinstance(data, DataLoader):
        n = None  # the sample count, for the progress bar, when the loader's batching is standard
        bs = data.batch_sampler
        if type(bs) is BatchSampler and not bs.drop_last and hasattr(bs.sampler, "__len__"):
            n = len(bs.sampler)  # type: ignore[arg-type]
        return data, n
    if isinstance(data, TensorDataset) and len(data.tensors) == 2 and num_workers == 0:
        return _tensor_batches(data, batch_size, pin), len(data)
    if isinstance(data, Dataset):
        # A private generator: starting the loader draws its workers' base seed from it, which
        # from the global RNG would shift the random numbers of whatever runs next (a trainer's
        # augmentations after a periodic evaluation).
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=pin, persistent_workers=False, collate_fn=_collate,
                            generator=torch.Generator().manual_seed(0))
        n = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
        return loader, n
    raise TypeError(f"data must be a torch Dataset of (x, y) pairs or a DataLoader, "
                    f"got {type(data).__name__}")


class _HostStager:
    """Device -> host copies of the batch outputs through two reused pinned buffers.

    A copy into pinned memory can run asynchronously; allocating a fresh pinned tensor per batch
    would leave the whole result in torch's pinned-memory cache after the call (it keeps freed
    pinned blocks for reuse and never returns them). Here batch ``i`` is copied into buffer
    ``i % 2`` with ``non_blocking=True`` and an event is recorded; before buffer ``i % 2`` is
    reused (or at ``finish``) its event is awaited and its rows are copied into ordinary memory.
    So the forward of batch ``i + 1`` overlaps the copy of batch ``i``, and the pinned memory held
    is two batches of outputs whatever N is.
    """

    def __init__(self) -> None:
        self.buffers: list[Tensor | None] = [None, None]
        self.pending: list[tuple[Any, int] | None] = [None, None]
        self.out: list[Tensor] = []
        self.turn = 0

    def _drain(self, slot: int) -> None:
        job = self.pending[slot]
        if job is not None:
            event, rows = job
            event.synchronize()
            buf = self.buffers[slot]
            assert buf is not None
            self.out.append(buf[:rows].clone())
            self.pending[slot] = None

    def put(self, z: Tensor) -> None:
        slot, self.turn = self.turn, 1 - self.turn
        self._drain(slot)
        buf = self.buffers[slot]
        if buf is None or buf.shape[0] < z.shape[0] or buf.shape[1:] != z.shape[1:]:
            buf = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
            self.buffers[slot] = buf
        buf[: z.shape[0]].copy_(z, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(z.device))
        self.pending[slot] = (event, int(z.shape[0]))

    def finish(self) -> list[Tensor]:
        for slot in (self.turn, 1 - self.turn):  # the older copy first
            self._drain(slot)
        self.buffers = [None, None]
        return self.out


def embed(
    model: nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    amp: bool | None = None,
    channels_last: bool | None = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embed a whole data set: ``(embeddings float32 [N, dim] on CPU, labels int64 [N] on CPU)``.

    ``data`` is a Dataset of ``(x, y)`` pairs (batched here with ``batch_size`` and
    ``num_workers``, in order; ``x`` a tensor, a numpy array or a list of numbers, ``y`` an
    integer class id; PIL images need a transform to tensors) or a DataLoader (used as is).
    The model runs on ``device``, by default the accelerator it already lives on, else CUDA
    when present, else CPU; it is moved there for the call and back afterwards. On CUDA: bf16
    autocast (``amp``, default on; fp16 where bf16 is unsupported), channels_last 4-D inputs and
    weights (``channels_last``, default on), pinned host memory and non-blocking copies both
    ways. On CPU both default off. Runs under ``torch.inference_mode`` with every submodule in
    eval mode; each submodule's train/eval flag, the device and the weights' memory format are
    restored afterwards.
    DDP / DataParallel wrappers are unwrapped (no collectives). Returned tensors are ordinary
    (not inference) tensors, usable in autograd (e.g. a linear probe).

    Defaults on CUDA: ``amp=None`` autocasts to :func:`amp_dtype` (bf16 on Ampere and later,
    fp16 on older GPUs, whose bf16 is emulated); ``channels_last=None`` is on only where
    :func:`channels_last_safe` holds (models built from torch.nn / timm / torchvision modules),
    since a custom forward that ``.view()``-s a feature map fails on channels_last tensors.
    Outputs come back through two reused pinned buffers (see ``_HostStager``), so no pinned
    memory the size of the result stays cached after the call.

    ``check_finite`` (default on): embeddings with NaN or Inf raise a ``ValueError`` naming the
    rows (and ``amp=False`` as the fix under fp16 autocast, which overflows above 65504);
    ``False`` returns them as they are.

    This embeds everything in the calling process, also under ``torchrun``; to split the work
    over the ranks use :func:`embed_distributed`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    model = _unwrap(model)
    dev = _resolve_device(model, device)
    cuda = dev.type == "cuda"
    amp = cuda if amp is None else bool(amp)
    if channels_last is None:
        channels_last = cuda and channels_last_safe(model)
    channels_last = bool(channels_last)
    cast_dtype = amp_dtype(dev) if amp else torch.bfloat16
    batches, n = _batches(data, batch_size, num_workers, pin=cuda)
    caller = (data.tensors[0].untyped_storage().data_ptr()
              if isinstance(data, TensorDataset) and data.tensors else None)
    # a caller's loader with torch's default_collate: a list input is one tensor per position
    columns = isinstance(data, DataLoader) and data.collate_fn is default_collate
    in_dtype = _float_dtype(model)

    from tqdm.auto import tqdm

    chunks: list[Tensor] = []
    labels: list[Tensor] = []
    stager = _HostStager() if cuda else None
    bar = tqdm(total=n, desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    with eval_mode(model), _on_device(model, dev), _channels_last(model, channels_last):
        try:
            for batch in batches:
                x, y = _split_batch(batch, columns)
                if x.is_floating_point() and x.dtype != in_dtype:
                    x = x.to(in_dtype)
                x = x.to(dev, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                if caller is not None and x.untyped_storage().data_ptr() == caller:
                    # a slice of the caller's tensor (the TensorDataset fast path with no
                    # copy on the way): a model that works on its input in place (x.sub_(mean))
                    # must not change the caller's data, as it could not through a DataLoader
                    x = x.clone()
                with torch.inference_mode(), torch.autocast(dev.type, dtype=cast_dtype,
                                                            enabled=amp):
                    z = model(x)
                if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
                    shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
                    raise ValueError(f"model must map a batch of {x.shape[0]} inputs to "
                                     f"[{x.shape[0]}, dim]; got {shape}")
                with torch.inference_mode():
                    z = z.float()
                    if stager is not None:  # async device->host copy, see _HostStager
                        stager.put(z)
                    else:
                        chunks.append(z.cpu())
                labels.append(y)
                bar.update(int(x.shape[0]))
            if stager is not None:
                with torch.inference_mode():
                    chunks = stager.finish()
        finally:
            bar.close()
    if not chunks:
        raise ValueError("embed() got an empty data set; nothing to embed")
    # concatenated outside inference mode, so the results are ordinary tensors
    out = torch.cat(chunks)
    if check_finite:
        _check_finite_output(out, amp and cast_dtype == torch.float16)
    return out, torch.cat(labels)


def _check_finite_output(z: Tensor, fp16: bool) -> None:
    """Raise a ``ValueError`` naming the rows when the embeddings hold NaN or Inf (one pass on
    the host copy; nothing downstream should see them silently). Under fp16 autocast -- GPUs
    without bf16 -- activations above 65504 overflow to Inf, which normalisation turns into
    NaN: the message then names ``amp=False`` as the fix."""
    ok = torch.isfinite(z).all(dim=1)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero().flatten()
    hint = ("fp16 autocast overflows above 65504: pass amp=False (float32) to embed"
            if fp16 else "check the model's weights and the inputs of those rows")
    raise ValueError(f"embed() produced NaN or Inf in {bad.numel()} of {z.shape[0]} rows "
                     f"(first: {bad[:5].tolist()}); {hint}")


def shard_bounds(n: int, rank: int, world: int, batch_size: int = 1) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n`` rows, read in batches of
    ``batch_size`` (the last one partial), are split into ``world`` contiguous shards of whole
    batches: rank ``r`` gets batches ``[r b // world, (r + 1) b // world)`` of the ``b =
    ceil(n / batch_size)``, so shard sizes differ by at most one batch (a rank gets no rows
    when ``b < world``). With ``batch_size=1``: ``start = rank * n // world``.

    Whole batches make each rank run exactly the batches one process runs over the same rows:
    a matrix product's float rounding depends on the rows it is given together, so a shard
    boundary inside a batch would change the embeddings in the last bits."""
    batches = -(-n // batch_size)
    start, stop = rank * batches // world, (rank + 1) * batches // world
    return min(start * batch_size, n), min(stop * batch_size, n)


# The DataLoader options a shard's loader takes over from the caller's loader as they are: how
# its workers start (worker_init_fn, multiprocessing_context), live (persistent_workers) and
# deliver (prefetch_factor, timeout, in_order); they are consistent with num_workers, forwarded
# too, since the caller's loader was built with them. (in_order: torch >= 2.6.)
_FORWARDED_LOADER_OPTIONS = ("timeout", "worker_init_fn", "multiprocessing_context",
                             "prefetch_factor", "persistent_workers", "pin_memory_device",
                             "in_order")


def _loader_options(loader: DataLoader) -> dict[str, Any]:
    """The options of ``loader`` a shard's loader forwards (see ``_FORWARDED_LOADER_OPTIONS``)."""
    options = {name: getattr(loader, name) for name in _FORWARDED_LOADER_OPTIONS
               if hasattr(loader, name)}
    if not options.get("pin_memory_device"):
        options.pop("pin_memory_device", None)  # the default: torch warns when it is passed
    return options


def _shard(data: Dataset | DataLoader, start: int, stop: int) -> Dataset | DataLoader:
    """Rows ``[start, stop)`` of a data set (a loader: the same loader over those rows -- its
    batch size, workers, collate_fn, pinning, generator and the options of
    ``_FORWARDED_LOADER_OPTIONS``; never ``drop_last``, which :func:`embed_distributed` applies
    to the whole data set before sharding it)."""
    from torch.utils.data import Subset

    if isinstance(data, DataLoader):
        _check_fixed_order(data)
        return DataLoader(_shard(data.dataset, start, stop), batch_size=data.batch_size,
                          shuffle=False, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                          drop_last=False,  # applied to the whole data set (see _length)
                          # its own generator, or a private one (see _batches)
                          generator=data.generator or torch.Generator().manual_seed(0),
                          **_loader_options(data))
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[start:stop] for t in data.tensors))
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, range(start, stop))
    raise TypeError(f"data must be a torch Dataset of (x, y) pairs with a length, or a "
                    f"DataLoader over one, got {type(data).__name__}")


def _check_fixed_order(loader: DataLoader) -> None:
    from torch.utils.data import SequentialSampler

    if not isinstance(loader.sampler, SequentialSampler) or loader.batch_size is None:
        raise ValueError(
            "embed_distributed needs data in a fixed order: pass the Dataset itself, or a "
            "DataLoader with shuffle=False and a batch_size (not a custom sampler)"
        )


def _length(data: Dataset | DataLoader) -> int:
    """The number of rows :func:`embed` returns for ``data``: the data set's length, less the
    last partial batch when ``data`` is a DataLoader with ``drop_last=True``."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(ds, "__len__"):
        raise TypeError(f"embed_distributed needs a data set with a length, got "
                        f"{type(ds).__name__}")
    n = len(ds)  # type: ignore[arg-type]
    if isinstance(data, DataLoader) and data.drop_last:
        _check_fixed_order(data)  # a batch_size, the batches in order
        n -= n % data.batch_size  # type: ignore[operator]
    return n


def embed_distributed(
    model: nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    amp: bool | None = None,
    channels_last: bool | None = None,
    group: Any = None,
    check_finite: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`embed` with the data split over the ranks of a process group.

    Rank ``r`` of ``W`` embeds the ``r``-th of ``W`` contiguous shards of whole batches
    (``batch_size``, or a DataLoader's own; :func:`shard_bounds`: about ``N / W`` rows, sizes
    differing by at most one batch), and the shards are gathered in rank order with
    :func:`contrastive.distributed.all_gather_nograd`, so every rank returns the whole
    ``(embeddings [N, dim], labels [N])``, in the data set's order -- what one process gets
    from ``embed(model, data)``, bit for bit (each rank runs exactly the batches one process
    runs over its rows, for a model whose rows do not depend on each other). A DataLoader is
    rebuilt over each rank's rows with its own options (batch size, workers and their
    ``worker_init_fn``, ``multiprocessing_context``, ``persistent_workers``,
    ``prefetch_factor``, ``timeout``, collate_fn, pinning, generator); with ``drop_last=True``
    only its first ``(N // batch_size) * batch_size`` rows are split, the rows ``embed``
    returns for it. Each rank does about ``1 / W`` of the forward passes; the gather moves
    ``N x dim`` floats to every rank (through the GPU under NCCL).

    It is a collective: every rank must call it with the same data. Without a process group, or
    with one rank, it is exactly :func:`embed`. A rank whose shard is empty (fewer batches than
    ranks) runs the model on one row to learn the output width and contributes no rows. The
    progress bar shows on rank 0 only. ``check_finite`` is :func:`embed`'s, applied to the
    gathered result, so every rank raises the same error (a rank raising alone would leave the
    others waiting in the gather).
    """
    from . import distributed as D

    world = D.get_world_size(group)
    if world == 1:
        return embed(model, data, batch_size=batch_size, device=device, num_workers=num_workers,
                     progress=progress, amp=amp, channels_last=channels_last,
                     check_finite=check_finite)
    batch_size = check_positive_int(batch_size, "batch_size")
    rank = D.get_rank(group)
    n = _length(data)
    if n == 0:
        # as embed() says for the same data (a loader dropping its only, partial batch too)
        raise ValueError("embed_distributed() got an empty data set; nothing to embed")
    # whole batches of the ones embed() reads (a loader's own batch size), so that every rank
    # runs the single process's batches and the result is embed()'s bit for bit
    per_batch = data.batch_size if isinstance(data, DataLoader) else batch_size
    start, stop = shard_bounds(n, rank, world, per_batch or 1)
    empty = start == stop
    part = _shard(data, 0, 1) if empty else _shard(data, start, stop)
    z, y = embed(model, part, batch_size=batch_size, device=device, num_workers=num_workers,
                 progress=progress and rank == 0, amp=amp, channels_last=channels_last,
                 check_finite=False)
    if empty:
        z, y = z[:0], y[:0]
    z, y = D.all_gather_nograd(z, group), D.all_gather_nograd(y, group)
    if check_finite:
        dev = _resolve_device(_unwrap(model), device)
        fp16 = dev.type == "cuda" and (amp is None or bool(amp)) and amp_dtype(dev) == torch.float16
        _check_finite_output(z, fp16)
    return z, y
