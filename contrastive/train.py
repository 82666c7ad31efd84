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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .config import TrainConfig

__all__ = ["fit", "build_loss", "build_embedder", "evaluate_embedder", "TrainConfig"]


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
        from pytorch_metric_learning import losses as pml_losses

        cls_name = name[4:]
        cls = getattr(pml_losses, cls_name, None)
        if cls is None or not isinstance(cls, type):
            known = sorted(n for n in dir(pml_losses) if n.endswith("Loss"))
            raise ValueError(f"unknown pytorch-metric-learning loss {cls_name!r}; known: {known}")
        if critic is not None:
            raise ValueError("critic= applies to this library's losses only, not to pml: losses")
        return cls(**kwargs)
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
    if cfg.backbone == "mlp":
        kwargs.setdefault("in_dim", _infer_vector_dim(dataset))
    elif getattr(dataset, "kind", "image") == "image":
        x = dataset[0][0]
        if torch.is_tensor(x) and x.dim() == 3:
            kwargs.setdefault("in_chans", int(x.shape[0]))
    dim = cfg.dim if (cfg.head is not None or cfg.backbone == "mlp") else None
    return Embedder(cfg.backbone, dim=dim, head=cfg.head, normalize=cfg.normalize,
                    pretrained=cfg.pretrained, weights=cfg.weights, **kwargs)


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
                      progress: bool = False, seed: int = 0) -> dict[str, float]:
    """Evaluate an embedder on held-out data.

    * Retrieval (Recall@1/2/4/8, P@1, R-Precision, MAP@R): ``test`` against ``reference``, or
      against itself with each query's own row excluded when ``reference`` is ``None``.
    * With ``probe``: NMI/AMI of k-means on ``test``; a linear probe and a weighted k-NN
      classifier (k = 200, t = 0.07) trained on ``train`` and scored on ``test``. When the
      splits are class-disjoint (CUB, Cars, SOP) a classifier trained on ``train`` cannot
      score ``test``, so both are trained on a stratified half of ``test`` and scored on the
      other half (``probe_protocol`` says which was used).
    """
    from evaluation import clustering_metrics, knn_classifier, linear_probe, retrieval_metrics
    from evaluation.probe import stratified_split

    from .embedders import embed

    def run(ds):
        return embed(model, ds, batch_size=batch_size, device=device, progress=progress)

    x_te, y_te = run(test)
    out: dict[str, float] = {}
    if reference is None:
        ks = tuple(k for k in (1, 2, 4, 8) if k < len(y_te)) or (1,)
        r = retrieval_metrics(x_te, y_te, ks=ks)
    else:
        x_ref, y_ref = run(reference)
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
                (x_tr, y_tr), x_ev, y_ev = run(train), x_te, y_te
            lp = linear_probe(x_tr, y_tr, x_ev, y_ev, seed=seed, device=device)
            out["linear_probe"] = float(lp["accuracy"])
            kc = knn_classifier(x_tr, y_tr, x_ev, y_ev, k=min(200, len(y_tr)), temperature=0.07)
            out["knn_top1"] = float(kc["top1"])
            out["knn_top5"] = float(kc["top5"])
    return out


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
        for line in kept:
            self._csv(json.loads(line))

    def _csv(self, row: dict) -> None:
        if self.columns is None:
            if self.csv.exists():
                with self.csv.open() as f:
                    self.columns = next(csv.reader(f), None)
            if not self.columns:
                self.columns = list(row)
                with self.csv.open("w", newline="") as f:
                    csv.writer(f).writerow(self.columns)
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

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


def fit(config: TrainConfig | dict) -> dict[str, Any]:
    """Train an embedder with a loss as ``config`` says; return the result dict (also written to
    ``<output>/result.json``): ``metrics`` (final evaluation), ``readout`` (mean I_NCE / I_NWJ of
    the last logged training batches), ``history`` (the log rows), ``train_time_s``, ``steps``.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg = cfg.validated()
    rank, world, _local, device = dist_utils.setup()
    if cfg.device is not None:
        device = torch.device(cfg.device)
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
        return get_dataset(cfg.dataset, root=cfg.data_dir, split=name, transform=transform)

    base = split(cfg.train_split)  # untransformed: sizes the model and picks the transforms
    model = build_embedder(cfg, base).to(device)
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
    test_ds, ref_ds = eval_sets(cfg.dataset, cfg.data_dir, cfg.eval_split, eval_tf)
    if main:  # only once the data and the model are known to be good
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    sampler = MPerClassSampler(sampler_labels, m=m, batch_size=cfg.batch_size, seed=cfg.seed,
                               num_replicas=world, rank=rank)
    steps_per_epoch = len(sampler)
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs is not None else cfg.steps

    loss_fn = build_loss(cfg.loss, cfg.loss_kwargs, cfg.critic, cfg.critic_kwargs,
                         embedding_dim=getattr(model, "dim", cfg.dim)).to(device)
    optimizer = _optimizer(cfg, list(model.parameters()) + list(loss_fn.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    amp = (device.type == "cuda") if cfg.amp is None else bool(cfg.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Resume.
    step, epoch, batch_in_epoch = 0, 0, 0
    history: list[dict] = []
    train_time = 0.0
    last = ckpt_dir / "last.pt"
    if cfg.resume and last.exists():
        state = ckpt.load_checkpoint(last, map_location="cpu")
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        history = state.get("history", [])
        train_time = state.get("train_time_s", 0.0)
        ckpt.restore_rng_state(state["rng"])

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
        ckpt.atomic_save({
            "model": _unwrap(model).state_dict(),
            "embedder_config": _unwrap(model).config(),
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
    while step < total_steps:
        loader = loader_for(batch_in_epoch)
        t0 = time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            if x.dim() == 4 and device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp
                   else contextlib.nullcontext())
            with ctx:
                emb = ddp_model(x)
            emb_all, y_all = dist_utils.gather_embeddings(emb, y)
            loss = _call_loss(loss_fn, emb_all, y_all)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step}; lower lr ({cfg.lr}) or enable "
                    "grad_clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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
                if eval_due:
                    dist_utils.barrier()
                    if main:
                        row.update(evaluate_embedder(_unwrap(model), test_ds, reference=ref_ds,
                                                     device=device, seed=cfg.seed))
                    model.train()
                history.append(row)
                logger.log(row)
            if batch_in_epoch >= steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                train_time += time.perf_counter() - t0
                t0 = time.perf_counter()
                save()
            if step >= total_steps or batch_in_epoch == 0:
                break
        train_time += time.perf_counter() - t0
    bar.close()

    result: dict[str, Any] = {"steps": step, "train_time_s": train_time, "history": history}
    dist_utils.barrier()
    if main:
        save("last.pt")
        metrics = evaluate_embedder(_unwrap(model), test_ds, train_eval_ds, reference=ref_ds,
                                    probe=cfg.final_probe, device=device, seed=cfg.seed,
                                    progress=cfg.progress)
        result["metrics"] = metrics
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
        raise ValueError(f"{path} is not a checkpoint written by contrastive.train.fit")
    # pretrained=False: the saved weights replace them, and nothing may be downloaded.
    model = Embedder.from_config(state["embedder_config"], pretrained=False)
    model.load_state_dict(state["model"])
    return model
