"""Distributed helpers: process-group setup under ``torchrun`` and gathers that keep gradients.

Contrastive and metric losses compare every embedding with every other one, so under
DistributedDataParallel (DDP) each rank must see the *global* batch, not only its own share.
:func:`all_gather_with_grad` gives every rank the global batch in rank order and sends the
gradient of the loss back to the rank that produced each row, so that training on W ranks with
a local batch of B equals training one process on the global batch of W * B -- the loss value and,
after DDP's gradient averaging, the parameter gradients (``tests/test_distributed.py`` checks
both to 1e-5 with two ``gloo`` processes).

Every helper is a no-op when no process group is initialised (or the world has one rank), so the
same training code runs unchanged in a single process.

Typical use in a trainer::

    rank, world, local_rank, device = distributed.setup()      # reads torchrun's env vars
    model = model.to(device)
    if world > 1:                                               # DDP needs a process group
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    emb = model(x)
    all_emb, all_labels = distributed.gather_embeddings(emb, labels)
    loss = criterion(all_emb, all_labels)                       # the global-batch loss
    loss.backward()                                             # DDP averages the gradients
    ...
    distributed.cleanup()
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .devices import resolve_device

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main_process",
    "best_device",
    "barrier",
    "setup",
    "cleanup",
    "all_gather_with_grad",
    "all_gather_nograd",
    "gather_embeddings",
    "broadcast_object",
    "all_gather_object",
    "any_rank",
    "reduce_mean",
    "average_gradients",
    "DEFAULT_TIMEOUT_S",
]

#: Collective timeout set by :func:`setup` (seconds): long enough for a rank to wait while
#: another one evaluates a large test set (NCCL's own default, 10 minutes, is not), short enough
#: to end a run whose peer died. ``CONTRASTIVE_DIST_TIMEOUT_S`` overrides it.
DEFAULT_TIMEOUT_S = 3600.0

# A shape is exchanged as [ndim, dtype code, *shape] padded with -1 to a fixed length, so that
# one small all_gather compares shapes of any rank (a collective needs equal sizes on all ranks).
_MAX_DIMS = 16
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)


# --------------------------------------------------------------------------------------------
# process-group state
# --------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when None); 0 when not distributed."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (the default group when None); 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def get_local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` from the environment, 0 when unset."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the rank that logs, evaluates, saves."""
    return get_rank() == 0


def best_device() -> torch.device:
    """``cuda`` (the current CUDA device) when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _backend(group: Any = None) -> str:
    return str(dist.get_backend(group)).lower()


def _comm_device(group: Any = None) -> torch.device:
    """The device collectives of ``group`` need their tensors on (CUDA for NCCL, else CPU)."""
    if _backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(group: Any = None) -> None:
    """Wait until every rank of ``group`` reaches this point; no-op when not distributed."""
    if not is_distributed():
        return
    if _backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(
                f"environment variable {name} is not set; launch with torchrun "
                f"(e.g. `torchrun --nproc_per_node=2 train.py`) or set {name} yourself"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _timeout(timeout_s: float | None) -> datetime.timedelta:
    if timeout_s is None:
        raw = os.environ.get("CONTRASTIVE_DIST_TIMEOUT_S", "").strip()
        try:
            timeout_s = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(
                f"environment variable CONTRASTIVE_DIST_TIMEOUT_S must be a number of seconds, "
                f"got {raw!r}"
            ) from None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    return datetime.timedelta(seconds=float(timeout_s))


def _requested_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    return dev


def setup(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float | None = None,
) -> tuple[int, int, int, torch.device]:
    """Initialise the default process group from torchrun's environment variables.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and, through ``init_method="env://"``,
    ``MASTER_ADDR`` / ``MASTER_PORT``). When ``WORLD_SIZE`` is unset or 1 nothing is initialised
    and ``(0, 1, 0, device)`` is returned (``device`` as asked, else :func:`best_device`).

    Otherwise the device and the backend follow ``device``:

    * ``None``: CUDA when available, else the CPU;
    * ``"cpu"``: the CPU and ``gloo``, also on a machine with GPUs (NCCL cannot carry CPU
      tensors);
    * ``"cuda"``: GPU ``LOCAL_RANK`` and ``nccl`` -- one GPU per rank. ``"cuda:N"`` is accepted
      only when ``N == LOCAL_RANK``: a fixed index would put every rank on the same GPU.

    ``backend`` overrides the choice (``"gloo"`` works with either device, ``"nccl"`` needs
    CUDA). On CUDA the current device is set to ``cuda:LOCAL_RANK``; when ``LOCAL_RANK`` is
    unset it defaults to ``RANK`` modulo the number of visible GPUs. Collectives time out after
    ``timeout_s`` seconds (default :data:`DEFAULT_TIMEOUT_S`, or ``CONTRASTIVE_DIST_TIMEOUT_S``).
    Calling it again after a successful set-up returns the same values without re-initialising
    (``device="cpu"`` then needs a group that carries CPU tensors: not ``nccl``).

    Returns ``(rank, world_size, local_rank, device)``.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'nccl' or 'gloo', got {backend!r}")
    want = _requested_device(device)
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        if want is not None and want.type == "cpu":
            if world > 1 and _backend() == "nccl":
                # the gathers of a CPU training step would fail inside NCCL, which carries
                # CUDA tensors only
                raise ValueError(
                    "device='cpu' but the process group was initialised with the 'nccl' "
                    "backend, which cannot carry CPU tensors; initialise it for the CPU "
                    "(distributed.setup(device='cpu') picks 'gloo') or pass device='cuda'"
                )
            return rank, world, local_rank, want
        return rank, world, local_rank, best_device()

    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world}")
    if world == 1:
        if want is not None and want.type == "cuda" and want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        return 0, 1, 0, want if want is not None else best_device()
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={world} asks for distributed training but this torch build has no "
            "torch.distributed support"
        )
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK must be in [0, {world}), got {rank}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(
                f"environment variable {name} is not set; torchrun sets it, otherwise export "
                "MASTER_ADDR (e.g. 127.0.0.1) and MASTER_PORT (a free port) on every rank"
            )
    timeout = _timeout(timeout_s)
    cuda = torch.cuda.is_available() and (want is None or want.type == "cuda")
    n_gpu = torch.cuda.device_count() if cuda else 0
    local_rank = _env_int("LOCAL_RANK", rank % n_gpu if n_gpu else 0)
    if want is not None and want.type == "cuda" and want.index not in (None, local_rank):
        raise ValueError(
            f"device={str(device)!r} under torchrun with {world} ranks would put rank {rank} on "
            f"GPU {want.index} instead of its own GPU {local_rank}; pass device='cuda' (each "
            "rank then uses cuda:LOCAL_RANK)"
        )
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    backend = backend.lower()
    if backend == "nccl" and not cuda:
        raise ValueError(
            "backend 'nccl' needs CUDA tensors, but "
            + ("device='cpu' was asked for" if torch.cuda.is_available()
               else "CUDA is not available")
            + "; use backend='gloo'"
        )

    dev = torch.device("cpu")
    if cuda:
        if not 0 <= local_rank < n_gpu:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {n_gpu} CUDA device(s) are visible; start at "
                "most one process per GPU (torchrun --nproc_per_node) or fix CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world, local_rank, dev


def cleanup() -> None:
    """Destroy the default process group if one is initialised (safe to call always)."""
    if is_distributed():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# gathers
# --------------------------------------------------------------------------------------------
def _encode_shape(x: Tensor) -> list[int]:
    if x.dim() == 0:
        raise ValueError("cannot gather a 0-d tensor: gathered tensors need a batch dimension")
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"cannot gather tensors with more than {_MAX_DIMS} dimensions")
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else -2
    return [x.dim(), code, *x.shape] + [-1] * (_MAX_DIMS - x.dim())


def _gather_sizes(x: Tensor, group: Any) -> list[int]:
    """All ranks' batch sizes (dim 0), after checking that the other dims and dtype agree.

    Every rank learns every rank's shape, so a mismatch raises the same error on all ranks
    instead of hanging one of them in the next collective.
    """
    world = dist.get_world_size(group)
    mine = torch.tensor(_encode_shape(x), dtype=torch.int64, device=_comm_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    shapes = [tuple(r[2 : 2 + r[0]]) for r in rows]
    dtypes = [_DTYPES[r[1]] if r[1] >= 0 else "other" for r in rows]
    if len({s[1:] for s in shapes}) > 1 or len({r[0] for r in rows}) > 1:
        listing = ", ".join(f"rank {i}: {list(s)}" for i, s in enumerate(shapes))
        raise ValueError(
            "all_gather needs the same shape on every rank except the batch dimension (dim 0), "
            f"got {listing}; make every rank's model produce the same embedding size"
        )
    if len({r[1] for r in rows}) > 1:
        listing = ", ".join(f"rank {i}: {d}" for i, d in enumerate(dtypes))
        raise ValueError(
            f"all_gather needs the same dtype on every rank, got {listing}; cast before gathering"
        )
    return [s[0] for s in shapes]


def _gather(x: Tensor, sizes: Sequence[int], group: Any) -> Tensor:
    """Concatenate every rank's ``x`` in rank order (dim 0); pads to the largest batch when the
    batch sizes differ and trims afterwards."""
    world = len(sizes)
    x = x.contiguous()
    largest = max(sizes)
    if x.shape[0] != largest:
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        x = padded
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; all_reduce(SUM) of the gradient and this rank's slice backward."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # a private contiguous copy: all_reduce works in place
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def all_gather_with_grad(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order, passing gradients back.

    Returns ``[sum_r B_r, ...]`` on every rank (``[W * B, ...]`` with equal batches); row block
    ``r`` is rank ``r``'s tensor. The trailing dimensions and the dtype must agree on all ranks;
    the batch sizes may differ (the sizes are gathered first, and every rank raises the same
    ``ValueError`` on a mismatch rather than hanging). With one rank, or no process group,
    ``x`` itself is returned.

    It is a collective: every rank must call it, and run backward through it, the same number
    of times in the same order (the backward pass issues one all_reduce). With DDP that holds
    when every rank computes its loss from the gathered tensor, as in the usual training step.

    **Backward.** The incoming gradient ``G_s = dL_s/dX`` (``X`` the gathered tensor, ``L_s``
    the loss computed on rank ``s``) is all-reduced with SUM and rank ``r`` keeps its own rows:
    ``g_r = sum_s dL_s/dx_r``, i.e. the gradient of the *sum* of the per-rank losses with respect
    to this rank's tensor ``x_r`` -- the terms that reach ``x_r`` through the copies of it that
    the other ranks hold.

    **Why this is right with DDP.** Let ``L_tot = sum_s L_s``. Rank ``r``'s parameter gradient
    is ``g_r dx_r/dtheta`` (only ``x_r`` depends on this rank's forward pass), and DDP averages
    over the ``W`` ranks::

        (1/W) sum_r (sum_s dL_s/dx_r) dx_r/dtheta = (1/W) dL_tot/dtheta = d(mean_s L_s)/dtheta.

    In the usual case every rank computes the same global-batch loss ``L`` (``L_s = L``), so the
    mean is ``L`` and the averaged gradient is exactly the single-process gradient of ``L`` on
    the global batch, while each rank also reports the true value of ``L``. (Each rank's own
    gradient before averaging is ``W`` times its share, ``W dL/dx_r``; DDP's ``1/W`` cancels
    it.) The same holds when each rank computes a partial loss, e.g. its local anchors against
    the gathered candidates: the result is the gradient of the mean of the per-rank losses,
    including the terms where ``x_r`` serves as a candidate for other ranks' anchors.

    **Contrast with a gather without gradient.** pytorch-metric-learning's
    ``DistributedLossWrapper`` gathers the other ranks' embeddings *without* gradient and puts
    this rank's (differentiable) embeddings first, so each rank sees a different order. Then only
    ``dL/dx_r`` reaches rank ``r``, and DDP's average gives ``(1/W) dL/dtheta``; pml multiplies
    the loss by ``W`` to undo that, so the reported loss is ``W`` times the true one. In its
    ``efficient=True`` mode (local anchors against all candidates) the terms where ``x_r`` is a
    candidate for another rank's anchors are lost altogether, which changes the direction of the
    gradient, not only its scale. Gathering with gradient, as lightly and solo-learn do, needs
    no loss rescaling and is exact in both forms (docs/architecture.md, Distributed training).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed() or dist.get_world_size(group) == 1:
        return x
    sizes = tuple(_gather_sizes(x, group))
    return _AllGatherWithGrad.apply(x, sizes, dist.get_rank(group), group)


def all_gather_nograd(x: Tensor, group: Any = None) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order, without gradient.

    For labels, instance ids, masks and metrics: any dtype (integer, bool and floating), batch
    sizes may differ between ranks. Under NCCL, CPU tensors are moved to the current CUDA device
    for the collective and the result comes back on ``x``'s device. Returns ``x`` unchanged
    with one rank or no process group.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed() or dist.get_world_size(group) == 1:
        return x
    with torch.no_grad():
        home, dtype = x.device, x.dtype
        y = x.detach()
        if dtype == torch.bool:  # not every backend reduces/gathers bool
            y = y.to(torch.uint8)
        comm = _comm_device(group)
        if comm.type == "cuda" and y.device.type != "cuda":
            y = y.to(comm)
        out = _gather(y, _gather_sizes(y, group), group)
        return out.to(device=home, dtype=dtype)


def gather_embeddings(
    embeddings: Tensor, labels: Tensor | None = None, group: Any = None
) -> tuple[Tensor, Tensor | None]:
    """Global batch for a loss: ``(all_gather_with_grad(embeddings), all_gather_nograd(labels))``.

    Both come back in rank order, so row ``i`` of the embeddings and entry ``i`` of the labels
    belong together on every rank. ``labels`` may be None (paired views with diagonal
    positives) or anything ``torch.as_tensor`` accepts; they are moved to the embeddings'
    device. With one rank the inputs are returned unchanged.
    """
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if labels is not None:
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() == 0 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have one entry per embedding row ({embeddings.shape[0]}), got "
                f"shape {tuple(labels.shape)}"
            )
    if not is_distributed() or dist.get_world_size(group) == 1:
        return embeddings, labels
    all_emb = all_gather_with_grad(embeddings, group)
    all_labels = None
    if labels is not None:
        all_labels = all_gather_nograd(labels.to(embeddings.device), group)
    return all_emb, all_labels


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Return rank ``src``'s picklable ``obj`` on every rank (e.g. a config, a run directory or a
    resume decision); returns ``obj`` when not distributed."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    device = _comm_device(group) if _backend(group) == "nccl" else None
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (e.g. each rank's RNG state
    for a checkpoint); ``[obj]`` when not distributed. A collective: every rank must call it."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    # under NCCL the objects travel through the current CUDA device, which setup() sets
    dist.all_gather_object(out, obj, group=group)
    return out


def any_rank(flag: bool, group: Any = None) -> bool:
    """Whether ``flag`` is true on at least one rank, on every rank (one small all_reduce): a
    decision every rank must take together, such as stopping at this step because one rank got
    a signal. ``bool(flag)`` when not distributed. A collective: every rank must call it."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def reduce_mean(x: Tensor | float, group: Any = None) -> Tensor:
    """Mean of ``x`` over the ranks, detached, for logging (every rank gets the result).

    Returns a detached float tensor on ``x``'s device (a CPU tensor for a Python number);
    ``x`` as such a tensor when not distributed.
    """
    if isinstance(x, Tensor):
        t, home = x.detach(), x.device
    else:
        t, home = torch.as_tensor(float(x)), torch.device("cpu")
    if not t.is_floating_point():
        t = t.double()
    if not is_distributed() or dist.get_world_size(group) == 1:
        return t
    t = t.to(_comm_device(group)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return (t / dist.get_world_size(group)).to(home)


def average_gradients(params: Iterable[torch.nn.Parameter], group: Any = None) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks (in place; one all_reduce).

    For parameters outside the DDP-wrapped model, such as a learnable critic or a loss's
    temperature or proxies: DDP averages only the gradients of the module it wraps. When every
    rank computes the same global-batch loss (the gathered embeddings of
    :func:`all_gather_with_grad`) these gradients agree up to rounding already, but
    nondeterministic CUDA kernels (atomics in ``index_add``, ``scatter``) and per-rank partial
    losses make them differ, and the copies of the parameters would drift apart step by step.
    Parameters without a gradient are skipped; every rank must have the same parameters with a
    gradient. A no-op when not distributed.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not is_distributed() or dist.get_world_size(group) == 1:
        return
    comm = _comm_device(group)
    flat = torch.cat([g.detach().reshape(-1).to(device=comm, dtype=torch.float64) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g).to(device=g.device, dtype=g.dtype))
        offset += n
