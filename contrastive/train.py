"""The trainer: turns a loss into a trained embedding model.

``fit(config)`` builds the data set, the sampler, the embedder and the loss from a
:class:`~contrastive.config.TrainConfig`, trains for a step budget and evaluates on the held-out
split with the ``evaluation`` package. It

* runs on CUDA with bf16 autocast when present (the losses compute in float32 regardless), on CPU
  otherwise, and under ``torchrun`` with DDP: each rank embeds its share of one global
  ``P x m`` batch and the loss sees the whole batch through an all-gather that passes gradients
  back (:func:`contrastive.distributed.all_gather_with_grad`);
* writes an atomic checkpoint (model, loss/critic, optimizer, scheduler, sampler position, RNG
  states) every ``checkpoint_every`` steps; ``resume=True`` continues from the last one and ends
  bit-for-bit where an uninterrupted run would (on CPU, ``num_workers=0``);
* logs every ``log_every`` steps to ``log.jsonl`` and ``log.csv`` (loss, learning rate, and the
  I_NCE / I_NWJ readouts of the loss's own score matrix on the training batch), evaluates
  retrieval every ``eval_every`` steps, and at the end adds clustering, a linear probe and a
  weighted k-NN classifier; the result goes to ``result.json``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import check_own_packages
from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import TrainConfig, UserError, as_user_error

check_own_packages()  # a user's own losses.py / evaluation/ would shadow ours: say so now

__all__ = ["fit", "build_loss", "build_embedder", "evaluate_embedder", "TrainConfig",
           "TrainingInterrupted", "DivergedError", "RESUMABLE_FIELDS"]


# ------------------------------------------------------------------------------ building blocks


def build_loss(name: str, loss_kwargs: dict | None = None, critic: str | None = None,
               critic_kwargs: dict | None = None, embedding_dim: int | None = None) -> nn.Module:
    """A loss by registry name, or ``"pml:ClassName"`` for a pytorch-metric-learning loss.

    ``critic`` (a name from :func:`contrastive.critics.available`) replaces the loss's default
    critic; critics that need sizes (bilinear, separable, concat) get ``embedding_dim`` unless
    ``critic_kwargs`` says otherwise.
    """
    import losses

    kwargs = dict(loss_kwargs or {})
    if name.startswith("pml:"):
        if critic is not None:
            raise ValueError("critic= applies to this library's losses only, not to pml: losses")
        return losses.get(name, **kwargs)
    if critic is not None:
        from . import critics

        ckw = dict(critic_kwargs or {})
        key = critic.lower()
        if key == "bilinear":
            ckw.setdefault("dim", embedding_dim)
        elif key in ("separable", "concat", "mlp"):
            ckw.setdefault("in_dim", embedding_dim)
        kwargs["critic"] = critics.get(critic, **ckw)
    return losses.get(name, **kwargs)


def _infer_vector_dim(dataset) -> int:
    x = dataset[0][0]
    return int(torch.as_tensor(np.asarray(x)).numel())


def build_embedder(cfg: TrainConfig, dataset) -> nn.Module:
    """The :class:`~contrastive.embedders.Embedder` the config describes."""
    from .embedders import Embedder

    kwargs = dict(cfg.backbone_kwargs)
    if isinstance(cfg.backbone, nn.Module):
        pass  # a module of the user's: configured before it was passed
    elif cfg.backbone == "mlp":
        kwargs.setdefault("in_dim", _infer_vector_dim(dataset))
    elif getattr(dataset, "kind", "image") == "image":
        x = dataset[0][0]
        if torch.is_tensor(x) and x.dim() == 3:
            kwargs.setdefault("in_chans", int(x.shape[0]))
    dim = cfg.dim if (cfg.head is not None or _is_mlp(cfg.backbone)) else None
    return Embedder(cfg.backbone, dim=dim, head=cfg.head, normalize=cfg.normalize,
                    pretrained=cfg.pretrained, weights=cfg.weights, **kwargs)


def _is_mlp(backbone) -> bool:
    return isinstance(backbone, str) and backbone == "mlp"


def _first_input(dataset):
    return dataset[0][0]


class _ToRGB:
    """PIL images in any mode -> RGB: timm's transforms and ImageNet statistics expect three
    channels (MNIST and other grayscale sets come as mode ``"L"``)."""

    def __call__(self, img):
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


def _train_transform(cfg: TrainConfig, dataset, embedder) -> Any:
    """Augmentation for training: none unless ``augment`` or multi-view training asks for it.

    Vector data gets noise + feature dropout; image tensors (e.g. ``digits_image``) the mild
    small-image preset at their own size; PIL images the small-image preset up to 64 px and
    SimCLR's beyond, at the embedder's input size.
    """
    from torchvision.transforms import v2

    from . import views

    kind = getattr(dataset, "kind", "vector")
    if not (cfg.augment or cfg.views >= 2):
        return _eval_transform(embedder, dataset)
    if kind == "vector":
        return views.vector_augmentation(noise_std=0.1, drop_prob=0.1)
    x = _first_input(dataset)
    if torch.is_tensor(x):
        return views.small_image_augmentation(int(x.shape[-1]))
    size = _image_size(embedder, dataset) or 224
    aug = views.small_image_augmentation(size) if size <= 64 else views.simclr_augmentation(size)
    return v2.Compose([_ToRGB(), aug])


def _image_size(embedder, dataset) -> int | None:
    cfg = getattr(embedder, "data_config", None) or {}
    size = cfg.get("input_size")
    if size is not None:
        return int(size[-1])
    return None


def _eval_transform(embedder, dataset):
    """Vector data and image tensors go in as they are; PIL images get the backbone's timm
    evaluation transform (resize, centre crop, normalise), after conversion to RGB."""
    from torchvision.transforms import v2

    if getattr(dataset, "kind", "vector") == "vector" or torch.is_tensor(_first_input(dataset)):
        return None
    tf = None
    fn = getattr(embedder, "eval_transform", None)
    if fn is not None:
        try:
            tf = fn()
        except Exception:  # non-timm backbones have no data config
            tf = None
    if tf is None:
        tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    return v2.Compose([_ToRGB(), tf])


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


def _lr_lambda(cfg: TrainConfig, total: int):
    warm = cfg.warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "step":  # x0.1 at 2/3 and again at 9/10 of the budget
            return 0.1 ** ((progress >= 2 / 3) + (progress >= 0.9))
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _readout(loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """I_NCE / I_NWJ of the batch under the loss's own critic (a cosine critic, t = 0.1, for
    pytorch-metric-learning losses, which have none)."""
    from losses import InfoNCE

    reader = loss_fn if hasattr(loss_fn, "readout") else InfoNCE(temperature=0.1)
    try:
        return reader.readout(emb.detach(), labels)
    except ValueError:
        return {"infonce": float("nan"), "nwj": float("nan")}


def _call_loss(loss_fn: nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if loss_fn.__class__.__module__.startswith("pytorch_metric_learning"):
        # pml losses do not force float32 under autocast; do it for them.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return loss_fn(emb.float(), labels)
    return loss_fn(emb, labels)


# ------------------------------------------------------------------------------ evaluation


def eval_sets(name: str, root, split: str, transform=None):
    """The query set and the reference set (``None``: query = reference) of an evaluation
    split. In-Shop's ``"test"`` is its query set against its gallery, as in the benchmark."""
    from .datasets import get_dataset

    if name.lower().replace("-", "_") in ("inshop", "in_shop") and split == "test":
        return (get_dataset(name, root=root, split="query", transform=transform),
                get_dataset(name, root=root, split="gallery", transform=transform))
    return get_dataset(name, root=root, split=split, transform=transform), None


def class_disjoint(train, test) -> bool:
    """Whether two splits share no class (the DML benchmarks' protocol), judged by the data
    sets' original class ids (``.classes``)."""
    a, b = getattr(train, "classes", None), getattr(test, "classes", None)
    if a is None or b is None:
        return False
    return not ({str(c) for c in a} & {str(c) for c in b})


def evaluate_embedder(model: nn.Module, test, train=None, *, reference=None,
                      probe: bool = False, device=None, batch_size: int = 256,
                      progress: bool = False, seed: int = 0,
                      num_workers: int = 0, return_backend: bool = False):
    """Evaluate an embedder on held-out data: a plain dict of numbers, or with
    ``return_backend=True`` ``(metrics, backend)`` where ``backend`` names the k-NN search that
    produced the retrieval metrics (exact or approximate FAISS, torch); ``fit`` and
    ``contrastive eval`` write it next to the metrics.

    * Retrieval (Recall@1/2/4/8, P@1, R-Precision, MAP@R): ``test`` against ``reference``, or
      against itself with each query's own row excluded when ``reference`` is ``None``.
    * With ``probe``: NMI/AMI of k-means on ``test``; a linear probe and a weighted k-NN
      classifier (k = 200, t = 0.07) trained on ``train`` and scored on ``test``. When the
      splits are class-disjoint (CUB, Cars, SOP) a classifier trained on ``train`` cannot
      score ``test``, so both are trained on a stratified half of ``test`` and scored on the
      other half (``probe_protocol`` says which was used).

    Under ``torchrun`` it is a collective that every rank calls: each rank embeds its share of
    every set (:func:`~contrastive.embedders.embed_distributed`), rank 0 computes the metrics
    on the gathered embeddings and every rank returns them.
    """
    from evaluation import clustering_metrics, knn_classifier, linear_probe, retrieval_metrics
    from evaluation.probe import stratified_split

    from .embedders import embed_distributed

    def run(ds):
        return embed_distributed(model, ds, batch_size=batch_size, device=device,
                                 num_workers=num_workers, progress=progress)

    x_te, y_te = run(test)  # every embedding first: it takes every rank
    x_ref = y_ref = train_emb = None
    if reference is not None:
        x_ref, y_ref = run(reference)
    if probe and train is not None and not class_disjoint(train, test):
        train_emb = run(train)
    if not dist_utils.is_main_process():
        got = dist_utils.broadcast_object(None)
        return got if return_backend else got[0]
    out: dict[str, float] = {}
    if reference is None:
        ks = tuple(k for k in (1, 2, 4, 8) if k < len(y_te)) or (1,)
        r = retrieval_metrics(x_te, y_te, ks=ks)
    else:
        ks = tuple(k for k in (1, 2, 4, 8) if k <= len(y_ref)) or (1,)
        r = retrieval_metrics(x_te, y_te, x_ref, y_ref, ks=ks)
    out.update({k: float(v) for k, v in r.items()})
    if probe:
        out.update({k: float(v) for k, v in clustering_metrics(x_te, y_te, seed=seed).items()})
        if train is not None:
            if class_disjoint(train, test):
                a, b = stratified_split(y_te.numpy(), 0.5, seed)
                x_tr, y_tr, x_ev, y_ev = x_te[a], y_te[a], x_te[b], y_te[b]
                out["probe_on_test_halves"] = 1.0
            else:
                (x_tr, y_tr), x_ev, y_ev = train_emb, x_te, y_te
            lp = linear_probe(x_tr, y_tr, x_ev, y_ev, seed=seed, device=device)
            out["linear_probe"] = float(lp["accuracy"])
            kc = knn_classifier(x_tr, y_tr, x_ev, y_ev, k=min(200, len(y_tr)), temperature=0.07)
            out["knn_top1"] = float(kc["top1"])
            out["knn_top5"] = float(kc["top5"])
    got = dist_utils.broadcast_object((out, getattr(r, "backend", "unknown")))
    return got if return_backend else got[0]


# ------------------------------------------------------------------------------ logging


class _Logger:
    """Append-only JSONL + CSV log on the main process."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"
        self.columns: list[str] | None = None
        if enabled:
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        """Drop log lines past the checkpoint we resume from (they will be written again)."""
        import json

        if not self.jsonl.exists():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break
        ckpt.atomic_write_text(self.jsonl, "".join(s + "\n" for s in kept))
        if self.csv.exists():
            self.csv.unlink()
        self.columns = list(dict.fromkeys(k for line in kept for k in json.loads(line)))
        if kept:
            self._rewrite()

    def _csv(self, row: dict) -> None:
        """Append ``row``; a row with a column the header lacks (the evaluation metrics of an
        ``eval_every`` step) rewrites the file from ``log.jsonl`` under the widened header."""
        if self.columns is None and self.csv.exists():
            with self.csv.open() as f:
                self.columns = next(csv.reader(f), None)
        new = [k for k in row if k not in (self.columns or [])]
        if new or not self.csv.exists():
            self.columns = list(self.columns or []) + new
            self._rewrite()
            return
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

    def _rewrite(self) -> None:
        import io
        import json

        rows = [json.loads(s) for s in self.jsonl.read_text().splitlines() if s.strip()] \
            if self.jsonl.exists() else []
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in self.columns])
        ckpt.atomic_write_text(self.csv, buf.getvalue())

    def log(self, row: dict) -> None:
        import json

        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._csv(row)


# ------------------------------------------------------------------------------ the loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


#: Fields that may differ between a checkpoint and the run that resumes it: where things go,
#: how often they are logged or evaluated, and the machine. Everything else decides the result.
RESUMABLE_FIELDS = frozenset({"output", "resume", "overwrite", "progress", "device",
                              "num_workers", "log_every", "eval_every", "checkpoint_every",
                              "final_probe", "data_dir"})

_RUN_FILES = ("log.jsonl", "log.csv", "result.json")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped :func:`fit`; a checkpoint of the current step was written to
    ``checkpoint`` (``None`` on ranks other than 0)."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str) -> None:
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"; checkpoint written to {checkpoint}" if checkpoint else ""
        super().__init__(f"{signal_name} at step {step}{where}")


class DivergedError(UserError, FloatingPointError):
    """The loss or the embeddings became non-finite: a setting (usually the learning rate) is
    too aggressive. A user-facing error (one ``error:`` line on the command line)."""


class _StopOnSignal:
    """While active, the first SIGINT / SIGTERM only sets :attr:`received` (the loop writes a
    checkpoint at the end of the current step and stops); a second one interrupts at once.
    Installs nothing outside the main thread (``signal.signal`` is allowed only there)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _run_in(out: Path) -> list[str]:
    """The files of an earlier run in ``out`` (checkpoints, logs, result)."""
    found = [n for n in _RUN_FILES if (out / n).exists()]
    d = out / "checkpoints"
    if d.is_dir():
        found += [f"checkpoints/{f.name}" for f in sorted(d.glob("*.pt"))]
    return found


def _compare_settings(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """:class:`UserError` naming every result-determining field in which ``cfg`` differs from
    the checkpoint's config."""
    now = cfg.to_dict()
    diff = [k for k in now if k not in RESUMABLE_FIELDS and k in saved and saved[k] != now[k]]
    if diff:
        parts = ", ".join(f"{k}={saved[k]!r} there but {now[k]!r} now" for k in diff)
        raise UserError(
            f"cannot resume from {path}: settings differ from the checkpoint's: {parts}; pass "
            "the checkpoint's settings, or --overwrite (overwrite=True) to start over"
        )


def _prepare_output(cfg: TrainConfig, out: Path, main: bool) -> dict | None:
    """Apply ``resume`` / ``overwrite`` to the run folder; return the checkpoint to resume from
    (loaded), or None for a fresh start."""
    last = out / "checkpoints" / "last.pt"
    if cfg.resume is True and not last.is_file():
        raise UserError(
            f"--resume: there is no checkpoint {last} to continue from; check --output, or pass "
            "--resume auto to start fresh when there is none"
        )
    if cfg.resume in (True, "auto") and last.is_file():
        try:
            state = ckpt.load_checkpoint(last, map_location="cpu")
        except ckpt.CheckpointError as exc:
            raise UserError(str(exc)) from exc
        _compare_settings(state.get("config") or {}, cfg, last)
        return state
    existing = _run_in(out)
    if cfg.resume == "auto":
        # nothing to continue from: the files of a run stopped before its first checkpoint
        # are replaced by the fresh run
        if cfg.progress and main:
            print(f"resume auto: no checkpoint in {out / 'checkpoints'}; starting fresh",
                  file=sys.stderr)
    elif existing and not cfg.overwrite:
        raise UserError(
            f"output folder {out} already holds a run ({', '.join(existing[:3])}); pass "
            "--resume to continue it, --overwrite to replace it, or another --output"
        )
    if existing and main:
        for name in existing:
            (out / name).unlink(missing_ok=True)
    return None


def fit(config: TrainConfig | dict) -> dict[str, Any]:
    """Train an embedder with a loss as ``config`` says; return the result dict (also written to
    ``<output>/result.json``): ``metrics`` (final evaluation), ``readout`` (mean I_NCE / I_NWJ of
    the last logged training batches), ``history`` (the log rows), ``train_time_s``, ``steps``.

    The run folder is locked while the run lasts (a second run into it stops with a
    :class:`UserError`); a folder holding a run needs ``resume`` or ``overwrite`` (see
    :class:`~contrastive.config.TrainConfig`). SIGINT / SIGTERM write a checkpoint at the
    current step and raise :class:`TrainingInterrupted`. A custom ``nn.Module`` backbone trains
    and checkpoints its weights; resuming needs the same module passed again.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg = cfg.validated()
    owns_group = not dist_utils.is_distributed()  # then fit destroys the group it makes
    rank, world, _local, device = dist_utils.setup(device=cfg.device)
    main = rank == 0
    out = Path(cfg.output)
    with contextlib.ExitStack() as stack:
        if owns_group:
            stack.callback(dist_utils.cleanup)
        if main:
            stack.enter_context(ckpt.folder_lock(out, "contrastive train"))
        state = _prepare_output(cfg, out, main)
        stop = stack.enter_context(_StopOnSignal())
        return _fit(cfg, state, stop, rank, world, device)


def _check_finite_weights(model: nn.Module, step: int, cfg: TrainConfig,
                          x: torch.Tensor | None = None) -> None:
    """:class:`DivergedError` when the weights, or the embeddings of the batch ``x`` under them
    (in eval mode: no state changes), are no longer finite -- before an evaluation would fail
    on them with a less telling message."""
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
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




def _fit(cfg: TrainConfig, state: dict | None, stop: _StopOnSignal, rank: int, world: int,
         device) -> dict[str, Any]:
    main = rank == 0
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    import random as _random

    _random.seed(cfg.seed)

    # Data and model. The embedder is built before the data transforms that depend on it.
    from .datasets import get_dataset
    from .samplers import MPerClassSampler
    from .views import MultiView, collate_views

    def split(name: str, transform=None):
        return as_user_error(f"data set {cfg.dataset!r}", get_dataset, cfg.dataset,
                             root=cfg.data_dir, split=name, transform=transform)

    base = split(cfg.train_split)  # untransformed: sizes the model and picks the transforms
    model = as_user_error("backbone", build_embedder, cfg, base).to(device)
    eval_tf = _eval_transform(model, base)
    train_tf = _train_transform(cfg, base, model)
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

    loss_fn = as_user_error(f"loss {cfg.loss!r}", build_loss, cfg.loss, cfg.loss_kwargs,
                            cfg.critic, cfg.critic_kwargs,
                            embedding_dim=getattr(model, "dim", cfg.dim)).to(device)
    if main:  # only once the data, the batches, the model and the loss are known to be good
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    optimizer = _optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    custom = isinstance(cfg.backbone, nn.Module)

    # Resume.
    step, epoch, batch_in_epoch = 0, 0, 0
    history: list[dict] = []
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
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history = state.get("history", [])
        train_time = state.get("train_time_s", 0.0)
        ckpt.restore_rng_state(state["rng"])
        del state

    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    logger = _Logger(out, main, step)

    def loader_for(skip: int):
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            train_ds, batch_sampler=_SkippingBatches(sampler, skip), collate_fn=collate,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
            # A private generator: creating the loader iterator must not draw from the global
            # RNG, or a resumed run would see different augmentations than an uninterrupted one.
            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        )

    def save(name: str = "last.pt") -> None:
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
            "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "rng": ckpt.capture_rng_state(),
            "history": history, "train_time_s": train_time,
            "config": cfg.to_dict(),
        }, ckpt_dir / name)

    bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and main),
               desc=f"{cfg.loss}", dynamic_ncols=True)
    model.train()
    recent: list[dict] = []
    from .embedders import channels_last_safe

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
            ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp
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
            loss.backward()
            dist_utils.average_gradients(loss_fn.parameters())  # DDP averages only the model's
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    list(model.parameters()) + list(loss_fn.parameters()), cfg.grad_clip
                )
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            bar.update(1)
            eval_due = bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != total_steps
            if step % cfg.log_every == 0 or step == total_steps or eval_due:
                row = {"step": step, "epoch": epoch, "loss": float(loss.detach()),
                       "lr": optimizer.param_groups[0]["lr"]}
                row.update(_readout(loss_fn, emb_all.float(), y_all))
                recent = (recent + [row])[-5:]
                bar.set_postfix(loss=f"{row['loss']:.4f}", nce=f"{row['infonce']:.2f}")
                if eval_due:  # on every rank: each embeds its share of the test set
                    _check_finite_weights(_unwrap(model), step, cfg, x)
                    row.update(evaluate_embedder(_unwrap(model), test_ds, reference=ref_ds,
                                                 device=device, seed=cfg.seed,
                                                 num_workers=cfg.num_workers))
                    model.train()
                history.append(row)
                logger.log(row)
            if batch_in_epoch >= steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
            if due or stop.received:
                train_time += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
            if stop.received:
                bar.close()
                raise TrainingInterrupted(step, last if main else None, stop.received)
            if step >= total_steps or batch_in_epoch == 0:
                break
        train_time += time.perf_counter() - t0
    bar.close()
    _check_finite_weights(_unwrap(model), step, cfg, x)

    result: dict[str, Any] = {"steps": step, "train_time_s": train_time, "history": history}
    save("last.pt")  # on rank 0
    metrics, backend = evaluate_embedder(_unwrap(model), test_ds, train_eval_ds,
                                         reference=ref_ds, return_backend=True,
                                         probe=cfg.final_probe, device=device, seed=cfg.seed,
                                         progress=cfg.progress and main,
                                         num_workers=cfg.num_workers)
    if main:
        result["metrics"] = metrics
        result["eval_backend"] = backend
        result["readout"] = {
            k: float(np.nanmean([r[k] for r in recent])) if recent else float("nan")
            for k in ("infonce", "nwj")
        }
        result["config"] = cfg.to_dict()
        ckpt.atomic_write_json(out / "result.json", result)
    dist_utils.barrier()
    return result


def load_embedder(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild the embedder saved in a trainer checkpoint."""
    from .embedders import Embedder

    state = ckpt.load_checkpoint(path, map_location=map_location)
    if "embedder_config" not in state or "model" not in state:
        raise UserError(f"{path} is not a checkpoint written by contrastive.train.fit")
    if state["embedder_config"] is None:
        raise UserError(
            f"{path} holds a custom nn.Module backbone ({state.get('custom_backbone')}), whose "
            "code is not in the checkpoint: build Embedder(<the same module>, dim=..., "
            "head=...) in Python and load_state_dict(load_checkpoint(path)['model'])"
        )
    # pretrained=False: the saved weights replace them, and nothing may be downloaded.
    model = Embedder.from_config(state["embedder_config"], pretrained=False)
    model.load_state_dict(state["model"])
    return model
