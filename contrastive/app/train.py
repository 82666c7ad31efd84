"""The trainer: turns a loss into a trained embedding model.

``fit(config)`` builds the data set, the sampler, the embedder and the loss from a
:class:`~contrastive.app.config.TrainConfig`, trains for a step budget and evaluates on the held-out
split with the ``evaluation`` package. It

* runs on CUDA with autocast when present -- bf16 where the GPU computes it natively, fp16 with
  a gradient scaler (``torch.amp.GradScaler``, checkpointed) on older GPUs (V100, T4), whose
  bf16 is only emulated; the losses compute in float32 regardless -- on CPU
  otherwise, and under ``torchrun`` with DDP: each rank embeds its share of one global
  ``P x m`` batch and the loss sees the whole batch through an all-gather that passes gradients
  back (:func:`contrastive.distributed.all_gather_with_grad`); every rank initialises the
  model and the loss from ``seed``, then ranks ``r > 0`` draw their own random numbers
  (augmentations, dropout, loader workers) from a seed derived from ``(seed, r)``, so that no
  two ranks augment alike; rank 0 draws what a single process draws. BatchNorm layers become
  SyncBatchNorm on CUDA (statistics of the global batch); on the CPU (``gloo``), where
  SyncBatchNorm does not run, each rank normalises its own share of the batch -- not the single
  process's model -- and rank 0 warns once;
* writes an atomic checkpoint (model, loss/critic, optimizer, scheduler, sampler position, RNG
  states, every rank's under DDP) every ``checkpoint_every`` steps; ``resume=True`` continues
  from the last one, each rank from its own RNG state, and ends bit-for-bit where an
  uninterrupted run would (on CPU, ``num_workers=0``);
* logs every ``log_every`` steps to ``log.jsonl`` and ``log.csv`` (loss, learning rate, and the
  I_NCE / I_NWJ readouts of the loss's own score matrix on the training batch), evaluates
  retrieval every ``eval_every`` steps, and at the end adds clustering, a linear probe and a
  weighted k-NN classifier; the result goes to ``result.json`` (and ``result.csv`` / ``result.md``).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import check_own_packages, inference
from .. import checkpoint as ckpt
from .. import distributed as dist_utils
from ..errors import UserError, as_user_error, keywords_as_user_error
from .config import TrainConfig, check_warmup
from .factory import (
    build_embedder,
    build_loss,
    eval_transform,
    lr_lambda,
    make_optimizer,
    train_transform,
)
from .protocol import eval_sets, evaluate_embedder
from .run_folder import RunLog, StopOnSignal, TrainingInterrupted, prepare_output

check_own_packages()  # a user's own losses.py / evaluation/ would shadow ours: say so now

__all__ = ["fit", "TrainingInterrupted", "DivergedError"]


# ------------------------------------------------------------------------------ the loop


class _SkippingBatches:
    """A batch sampler that skips the first ``skip`` batches of the next epoch (resume)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self.sampler):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.sampler)


def _readout(loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """I_NCE / I_NWJ of the batch under the loss's own critic (a cosine critic, t = 0.1, for
    pytorch-metric-learning losses, which have none)."""
    from losses import InfoNCE

    reader = loss_fn if hasattr(loss_fn, "readout") else InfoNCE(temperature=0.1)
    try:
        return reader.readout(emb.detach(), labels)
    except ValueError:
        return {"infonce": float("nan"), "nwj": float("nan")}


_LOG_KEYS = ("step", "epoch", "loss", "lr")


def _readout_keys_of(history: list[dict]) -> list[str]:
    """The readout's estimators in the rows of a checkpoint that did not store them (an older
    one): the keys after the log's own of the rows without an evaluation."""
    keys: dict[str, None] = {}
    for row in history:
        if "map_at_r" not in row:
            keys.update(dict.fromkeys(k for k in row if k not in _LOG_KEYS))
    return list(keys)


@contextlib.contextmanager
def _rng_untouched():
    """Restore the global RNGs (Python, NumPy, torch, CUDA) on leaving: whatever the block draws,
    training goes on with the random numbers it would have had without it."""
    state = ckpt.capture_rng_state()
    try:
        yield
    finally:
        ckpt.restore_rng_state(state)


def _name(backbone) -> str:
    return f"<module {type(backbone).__name__}>" if isinstance(backbone, nn.Module) \
        else repr(backbone)


def _call_loss(loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if loss_fn.__class__.__module__.startswith("pytorch_metric_learning"):
        # pml losses do not force float32 under autocast; do it for them.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return loss_fn(emb.float(), labels)
    return loss_fn(emb, labels)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class DivergedError(UserError, FloatingPointError):
    """The loss or the embeddings became non-finite: a setting (usually the learning rate) is
    too aggressive. A user-facing error (one ``error:`` line on the command line)."""


def fit(config: TrainConfig | dict) -> dict[str, Any]:
    """Train an embedder with a loss as ``config`` says; return the result dict (also written to
    ``<output>/result.json``): ``metrics`` (final evaluation), ``readout`` (mean I_NCE / I_NWJ, and
    any further estimator the loss reads out, e.g. an upper bound's own, of the last logged
    training batches), ``history`` (the log rows), ``train_time_s`` (the training steps' time:
    periodic evaluations and checkpoint writes are not counted), ``steps``.

    A loss, embeddings or weights (the model's or the loss's own) that become non-finite stop
    the run with :class:`DivergedError`; a checkpoint is never written with non-finite weights,
    so ``checkpoints/last.pt`` stays the last good one.

    The run folder is locked while the run lasts (a second run into it stops with a
    :class:`UserError`); a folder holding a run needs ``resume`` or ``overwrite`` (see
    :class:`~contrastive.app.config.TrainConfig`). SIGINT / SIGTERM write a checkpoint at the
    current step and raise :class:`TrainingInterrupted`. A custom ``nn.Module`` backbone trains
    and checkpoints its weights; resuming needs the same module passed again.

    Under ``torchrun`` (DDP) the ranks train one model on the global batch; ranks other than 0
    draw their own augmentation random numbers, and a checkpoint keeps every rank's RNG state,
    so a resumed run ends where the uninterrupted one does. BatchNorm layers (the ``"mlp"``
    head, many backbones) become SyncBatchNorm on CUDA. On the CPU (``gloo``), where
    SyncBatchNorm does not run, each rank's BatchNorm normalises that rank's share of the batch
    by its own statistics: the run is then not the single process's on the global batch, and
    rank 0 warns once (a :class:`UserWarning`).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg = cfg.validated()
    owns_group = not dist_utils.is_distributed()  # then fit destroys the group it makes
    # a device that is not one (device=foo) or absent (cuda without a GPU), or a torchrun
    # environment that does not add up: the user's mistake, one line
    rank, world, _local, device = as_user_error("device / process group", dist_utils.setup,
                                                device=cfg.device)
    main = rank == 0
    out = Path(cfg.output)
    with contextlib.ExitStack() as stack:
        if owns_group:
            stack.callback(dist_utils.cleanup)
        if main:
            stack.enter_context(ckpt.folder_lock(out, "contrastive train"))
        state = prepare_output(cfg, out, main)
        stop = stack.enter_context(StopOnSignal())
        return _fit(cfg, state, stop, rank, world, device)


def _check_finite_weights(model: nn.Module, step: int, cfg: TrainConfig,
                          x: torch.Tensor | None = None,
                          loss_fn: nn.Module | None = None) -> None:
    """:class:`DivergedError` when the weights (the model's and, given ``loss_fn``, the loss's
    own: proxies, a learnable critic), or the embeddings of the batch ``x`` under them (in eval
    mode: no state changes), are no longer finite -- before an evaluation would fail on them
    with a less telling message, and before a checkpoint would keep them in place of the last
    good one."""
    params = list(model.parameters()) + (list(loss_fn.parameters()) if loss_fn is not None
                                         else [])
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    if finite and x is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            finite = bool(torch.isfinite(model(x)).all())
        model.train(was_training)
    if not finite:
        raise DivergedError(
            f"the weights became non-finite by step {step}: training diverged; lower lr "
            f"({cfg.lr:g}) or set grad_clip"
        )




def _init_loss_state(loss_fn: nn.Module, dim: int | None, device) -> None:
    """Allocate the memories (:class:`losses.memory.Memory`: XBM, the MoCo queue) that
    ``loss_fn`` would allocate on its first call, sized ``dim``: a queue with ``init="random"``
    starts full of random rows drawn from the global RNG, and under DDP those must be drawn
    before the ranks draw their own random numbers, from the seed every rank shares, so that
    every rank holds the same memory (the gathered batches keep it so). Memories already
    allocated (an ``embedding_size`` given) and ``dim=None`` are left as they are."""
    from losses.memory import Memory

    if dim is None:
        return
    for module in loss_fn.modules():
        if isinstance(module, Memory) and module.embeddings.numel() == 0:
            module._allocate(int(dim), torch.float32, torch.device(device))


def _seed_global(seed: int) -> None:
    """Seed the global RNGs training draws from: torch (CPU and CUDA), NumPy's legacy global
    generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rank_seed(seed: int, rank: int, *more: int) -> int:
    """The seed of rank ``rank``'s random numbers for the run seeded ``seed`` (and ``more``, e.g.
    a step): ``seed`` itself on rank 0 without ``more`` (what a single process uses), else 32
    bits of ``SeedSequence([seed, rank, *more])`` -- unlike ``seed + rank`` it does not repeat
    rank 0's numbers of the run seeded ``seed + 1``."""
    if rank == 0 and not more:
        return seed
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, np.uint32)[0])


def _restore_rng(state: dict, rank: int, seed: int) -> None:
    """Restore rank ``rank``'s global RNG states from a checkpoint: its own (``rng_ranks``,
    written under DDP), else rank 0's (``rng``; a single-process checkpoint) -- reseeded from
    ``(seed, rank, step)`` on a rank the checkpoint has no state of (an older checkpoint, or a
    run resumed on more ranks), which must not repeat rank 0's numbers."""
    per_rank = state.get("rng_ranks")
    if per_rank is not None and rank < len(per_rank):
        ckpt.restore_rng_state(per_rank[rank])
        return
    ckpt.restore_rng_state(state["rng"])
    if rank > 0:
        _seed_global(_rank_seed(seed, rank, int(state["step"])))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               and not isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _sync_batchnorm(model: nn.Module, world: int, device: torch.device,
                    main: bool) -> nn.Module:
    """The model DDP trains on ``world`` ranks: under DDP a BatchNorm layer normalises each
    rank's share of the batch by that share's statistics, which is not the single process's
    model of the global batch. On CUDA its BatchNorm layers become ``SyncBatchNorm`` (statistics
    all-reduced over the ranks in each training forward pass; the same parameter and buffer
    objects, so the optimizer and the checkpoints keep them; timm's ``BatchNormAct2d`` keeps its
    activation). SyncBatchNorm runs on CUDA only: on the CPU (``gloo``) the layers stay per-rank
    and rank 0 warns once. One process (``world == 1``): the model as it is."""
    if world == 1 or not _has_batchnorm(model):
        return model
    if device.type == "cuda":
        # timm's norm + activation layers need timm's converter (torch's would drop the
        # activation); a model holding one has imported timm.layers already
        norm_act = getattr(sys.modules.get("timm.layers"), "BatchNormAct2d", None)
        if norm_act is not None and any(isinstance(m, norm_act) for m in model.modules()):
            from timm.layers import convert_sync_batchnorm

            return convert_sync_batchnorm(model)
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if main:
        warnings.warn(
            f"DDP on {device.type} ({world} ranks): the model's BatchNorm layers normalise each "
            "rank's share of the batch by its own statistics (SyncBatchNorm needs CUDA), so "
            "training differs from one process on the global batch; use CUDA, one process, or "
            "a head without BatchNorm (head='linear')",
            UserWarning, stacklevel=4,  # the caller of fit
        )
    return model


def _grad_scaler(device: torch.device, enabled: bool):
    """``torch.amp.GradScaler`` for ``device`` (torch >= 2.3); on older torch, which has only
    ``torch.cuda.amp.GradScaler``, that one, disabled off CUDA (a disabled scaler passes the
    loss and the optimizer step through unchanged)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device.type == "cuda")


def _fit(cfg: TrainConfig, state: dict | None, stop: StopOnSignal, rank: int, world: int,
         device) -> dict[str, Any]:
    main = rank == 0
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"

    _seed_global(cfg.seed)  # every rank: the same data splits and initial weights

    # Data and model. The embedder is built before the data transforms that depend on it.
    from ..datasets import get_dataset
    from ..samplers import MPerClassSampler
    from ..views import MultiView, collate_views

    def split(name: str, transform=None):
        return as_user_error(f"data set {cfg.dataset!r}", get_dataset, cfg.dataset,
                             root=cfg.data_dir, split=name, transform=transform)

    base = split(cfg.train_split)  # untransformed: sizes the model and picks the transforms
    model = keywords_as_user_error(f"backbone {_name(cfg.backbone)}",
                                   {"backbone_kwargs": cfg.backbone_kwargs}, build_embedder,
                                   cfg, base).to(device)
    eval_tf = eval_transform(model, base)
    train_tf = train_transform(cfg, base, model)
    if cfg.views >= 2:
        train_ds = MultiView(base, train_tf, n_views=cfg.views)
        sampler_labels = np.arange(len(base))
        m, collate = 1, collate_views
    else:
        train_ds = split(cfg.train_split, train_tf)
        sampler_labels = np.asarray(train_ds.labels)
        m, collate = cfg.m_per_class, None
    train_eval_ds = split(cfg.train_split, eval_tf)
    test_ds, ref_ds = as_user_error(f"data set {cfg.dataset!r}", eval_sets, cfg.dataset,
                                     cfg.data_dir, cfg.eval_split, eval_tf)
    sampler = as_user_error(f"batches of {cfg.dataset!r} (batch_size, m_per_class)",
                            MPerClassSampler, sampler_labels, m=m, batch_size=cfg.batch_size,
                            seed=cfg.seed, num_replicas=world, rank=rank)
    steps_per_epoch = len(sampler)
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs is not None else cfg.steps
    if cfg.epochs is not None:  # (with steps= the config has checked it)
        check_warmup(cfg.warmup_steps, total_steps,
                     f"epochs={cfg.epochs} x {steps_per_epoch} batches")

    loss_fn = keywords_as_user_error(
        f"loss {cfg.loss!r}", {"loss_kwargs": cfg.loss_kwargs, "critic_kwargs": cfg.critic_kwargs},
        build_loss, cfg.loss, cfg.loss_kwargs, cfg.critic, cfg.critic_kwargs,
        embedding_dim=getattr(model, "dim", cfg.dim),
        num_classes=int(np.max(sampler_labels)) + 1).to(device)
    # the loss's state that its first call would draw (the MoCo queue's random rows) is drawn
    # now, from the seed every rank shares: drawn in the loop, after ranks > 0 reseed below,
    # each rank would start from its own queue and the ranks would train on different losses
    _init_loss_state(loss_fn, getattr(model, "dim", cfg.dim), device)
    if rank > 0:
        # The model and the loss are initialised alike on every rank (DDP broadcasts only the
        # model's parameters); from here each rank draws its own random numbers (augmentations,
        # dropout), rank 0 those of one process. A resumed run restores them below.
        _seed_global(_rank_seed(cfg.seed, rank))
    model = _sync_batchnorm(model, world, device, main)  # before the optimizer is built
    if main:  # only once the data, the batches, the model and the loss are known to be good
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()),
                               loss_fn)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    cast = inference.amp_dtype(device) if amp else None
    # fp16's range loses small gradients (and its 65504 maximum large ones): scale the loss,
    # unscale before clipping, skip the steps whose gradients overflowed (GradScaler's own
    # dynamics); bf16 has float32's range and needs none of it
    scaler = _grad_scaler(device, enabled=cast == torch.float16)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    custom = isinstance(cfg.backbone, nn.Module)

    # Resume.
    step, epoch, batch_in_epoch = 0, 0, 0
    history: list[dict] = []
    readout_keys: dict[str, None] = {}  # the readout's estimators, in their order
    train_time = 0.0
    last = ckpt_dir / "last.pt"
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            loss_fn.load_state_dict(state["loss"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise UserError(
                f"cannot resume from {last}: its weights do not fit the model these settings "
                f"build ({first[1].strip() if len(first) > 1 else first[0]}); pass the same "
                "backbone (the same nn.Module for a custom one), or --overwrite"
            ) from exc
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):  # a run checkpointed under fp16 autocast
                scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(
                f"cannot resume from {last}: its optimizer state does not fit the optimizer "
                f"these settings build ({exc}); it was written by another version of this "
                "library or with other parameters; pass --overwrite to start over"
            ) from exc
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history = state.get("history", [])
        # the readout of result.json averages the last logged rows, the restored ones included
        readout_keys = dict.fromkeys(state["readout_keys"] if "readout_keys" in state
                                     else _readout_keys_of(history))
        train_time = state.get("train_time_s", 0.0)
        _restore_rng(state, rank, cfg.seed)  # this rank's own
        del state

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger = RunLog(out, main, step)

    def loader_for(skip: int):
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            train_ds, batch_sampler=_SkippingBatches(sampler, skip), collate_fn=collate,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
            # A private generator: creating the loader iterator must not draw from the global
            # RNG, or a resumed run would see different augmentations than an uninterrupted one.
            # Its seed has the rank in it: each rank's workers augment their own way.
            generator=torch.Generator().manual_seed(
                _rank_seed(cfg.seed * 100_003 + epoch, rank)),
        )

    def save(name: str = "last.pt") -> None:
        # a diverged step must not replace the last good checkpoint (resuming from it could
        # never recover): DivergedError instead, on every rank (their weights are the same)
        _check_finite_weights(_unwrap(model), step, cfg, loss_fn=loss_fn)
        rng = ckpt.capture_rng_state()
        # under DDP every rank's (a collective: every rank saves at the same step)
        rng_ranks = dist_utils.all_gather_object(rng) if world > 1 else None
        if not main:
            return
        inner = _unwrap(model)
        ckpt.atomic_save({
            "model": inner.state_dict(),
            # a custom nn.Module cannot be rebuilt from a dict: its weights are kept, and
            # resuming or reloading needs the same module passed again
            "embedder_config": None if custom else inner.config(),
            "custom_backbone": type(cfg.backbone).__qualname__ if custom else None,
            "loss": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),  # empty unless fp16 autocast scales the loss
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "rng": rng,  # rank 0's: all a single-process run has
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            "history": history, "readout_keys": list(readout_keys), "train_time_s": train_time,
            "config": cfg.to_dict(),
        }, ckpt_dir / name)

    def stopped() -> bool:
        """Whether a rank got SIGINT / SIGTERM: every rank stops (and checkpoints) at the same
        step, also when the signal reached only some (one small all_reduce under DDP)."""
        return dist_utils.any_rank(stop.received is not None)

    def interrupted() -> TrainingInterrupted:
        return TrainingInterrupted(step, last if main else None,
                                   stop.received or "a signal to another rank")

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and main),
               desc=f"{cfg.loss}", dynamic_ncols=True)
    model.train()
    from ..inference import channels_last_safe

    to_channels_last = device.type == "cuda" and channels_last_safe(model)  # no custom .view()
    x = None  # the last training batch (none when a finished run is resumed)
    while step < total_steps:
        loader = loader_for(batch_in_epoch)
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            if x.dim() == 4 and to_channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = (torch.autocast(device_type=device.type, dtype=cast) if amp
                   else contextlib.nullcontext())
            with ctx:
                emb = ddp_model(x)
            emb_all, y_all = dist_utils.gather_embeddings(emb, y)
            if not bool(torch.isfinite(emb_all).all()):
                raise DivergedError(
                    f"the embeddings became non-finite at step {step}: training diverged; lower "
                    f"lr ({cfg.lr:g}) or set grad_clip"
                )
            loss = _call_loss(loss_fn, emb_all, y_all)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"the loss became {loss.item()} at step {step}: training diverged; lower lr "
                    f"({cfg.lr:g}) or set grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # loss.backward() unless fp16 autocast
            dist_utils.average_gradients(loss_fn.parameters())  # DDP averages only the model's
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(
                    list(model.parameters()) + list(loss_fn.parameters()), cfg.grad_clip
                )
            scaler.step(optimizer)  # skipped (fp16) when a gradient overflowed
            scaler.update()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            bar.update(1)
            eval_due = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != total_steps
            if step % cfg.log_every == 0 or step == total_steps or eval_due:
                row = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                       "lr": optimizer.param_groups[0]["lr"]}
                read = _readout(loss_fn, emb_all.float(), y_all)
                readout_keys.update(dict.fromkeys(read))
                row.update(read)
                bar.set_postfix(loss=f"{row['loss']:.4f}", nce=f"{row['infonce']:.2f}")
                if eval_due:  # on every rank: each embeds its share of the test set
                    t_eval = time.perf_counter()
                    _check_finite_weights(_unwrap(model), step, cfg, x)
                    with _rng_untouched():  # eval_every must not change the trained model
                        row.update(evaluate_embedder(_unwrap(model), test_ds, reference=ref_ds,
                                                     device=device, seed=cfg.seed,
                                                     num_workers=cfg.num_workers))
                    model.train()
                    t0 += time.perf_counter() - t_eval  # train_time_s is training only
                history.append(row)
                logger.log(row)
            if batch_in_epoch >= steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            stopping = stopped()
            if due or stopping:
                train_time += time.perf_counter() - t0
                save()
                t0 = time.perf_counter()  # the write is not training time
            if stopping:
                bar.close()
                raise interrupted()
            if step >= total_steps or batch_in_epoch == 0:
                break
        train_time += time.perf_counter() - t0
    bar.close()
    _check_finite_weights(_unwrap(model), step, cfg, x, loss_fn)

    result: dict[str, Any] = {"steps": step, "train_time_s": train_time, "history": history}
    save("last.pt")  # on rank 0
    if stopped():  # a signal while the checkpoint was written: stop before the evaluation
        raise interrupted()
    metrics, backend = evaluate_embedder(_unwrap(model), test_ds, train_eval_ds,
                                         reference=ref_ds, return_backend=True,
                                         probe=cfg.final_probe, device=device, seed=cfg.seed,
                                         progress=cfg.progress and main,
                                         num_workers=cfg.num_workers)
    if stopped():  # SIGINT / SIGTERM during the final evaluation: not a finished run; the
        # checkpoint of the last step is written, resuming it repeats only the evaluation
        raise interrupted()
    if main:
        result["metrics"] = metrics
        result["eval_backend"] = backend
        recent = history[-5:]  # the last logged rows (a resumed run's restored ones too)
        result["readout"] = {  # every estimator the loss reads out (an upper bound's own)
            k: float(np.nanmean([r.get(k, np.nan) for r in recent])) if recent else float("nan")
            for k in {"infonce": None, "nwj": None, **readout_keys}
        }
        result["config"] = cfg.to_dict()
        ckpt.atomic_write_json(out / "result.json", result)
        _write_result_tables(out, result)
    dist_utils.barrier()
    return result


def _write_result_tables(out: Path, result: Mapping[str, Any]) -> None:
    """``result.csv`` (one row: steps, training time, the final metrics and the readout, as
    numbers) and ``result.md`` (the same as a two-column Markdown table, rates in %, with the
    search that produced the retrieval metrics), next to ``result.json``."""
    from .results import metrics_csv, metrics_markdown

    row = {"steps": result["steps"], "train_time_s": result["train_time_s"],
           **result.get("metrics", {}),
           **{f"readout_{k}": v for k, v in result.get("readout", {}).items()}}
    ckpt.atomic_write_text(out / "result.csv", metrics_csv(row))
    ckpt.atomic_write_text(out / "result.md",
                           metrics_markdown(row, result.get("eval_backend", "unknown")))
