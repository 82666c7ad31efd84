"""Builders of a training run: the loss (a registry name or ``pml:ClassName``, with a critic
sized to the embedding), the embedder, the data transforms, the optimiser and its learning-rate
schedule, and the embedder of a saved checkpoint. Pure construction: nothing here trains."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..errors import UserError
from .config import TrainConfig

__all__ = ["build_loss", "build_embedder", "train_transform", "eval_transform", "make_optimizer",
           "lr_lambda", "load_embedder"]


def build_loss(name: str, loss_kwargs: dict | None = None, critic: str | None = None,
               critic_kwargs: dict | None = None, embedding_dim: int | None = None,
               num_classes: int | None = None) -> nn.Module:
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
        from .. import critics

        kwargs["critic"] = critics.create(critic, embedding_dim, **dict(critic_kwargs or {}))
    needs = losses.LOSSES.meta(name).get("needs", ())
    sizes = {"num_classes": num_classes, "embedding_size": embedding_dim}
    for key in needs:  # proxy losses: one proxy per training class, of the embedding's size
        if key not in kwargs:
            if sizes.get(key) is None:
                raise ValueError(f"loss {name!r} needs {key}; pass it in loss_kwargs")
            kwargs[key] = sizes[key]
    return losses.get(name, **kwargs)


def _infer_vector_dim(dataset) -> int:
    x = dataset[0][0]
    return int(np.asarray(x).size)  # a PIL image's array is read-only: no tensor of it


def build_embedder(cfg: TrainConfig, dataset) -> nn.Module:
    """The :class:`~contrastive.embedders.Embedder` the config describes."""
    from ..embedders import Embedder

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


def train_transform(cfg: TrainConfig, dataset, embedder) -> Any:
    """Augmentation for training: none unless ``augment`` or multi-view training asks for it.

    Vector data gets noise + feature dropout; image tensors (e.g. ``digits_image``) the mild
    small-image preset at their own size; PIL images the small-image preset up to 64 px and
    SimCLR's beyond, at the embedder's input size.
    """
    from torchvision.transforms import v2

    from .. import views

    kind = getattr(dataset, "kind", "vector")
    if not (cfg.augment or cfg.views >= 2):
        return eval_transform(embedder, dataset)
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


def eval_transform(embedder, dataset):
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


def lr_lambda(cfg: TrainConfig, total: int):
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


class _PmlProxies:
    """A pytorch-metric-learning loss seen as :func:`losses.proxies.param_groups` sees ours:
    every parameter of a PML loss is a proxy (``ProxyAnchorLoss.proxies``, ``ArcFaceLoss.W``)
    or a learnable margin (``MarginLoss.beta``)."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def proxy_parameters(self) -> list[nn.Parameter]:
        return list(self.loss.parameters())


def make_optimizer(cfg: TrainConfig, params, loss_fn: nn.Module | None = None,
                   ) -> torch.optim.Optimizer:
    """The optimiser of ``params``; a loss's proxies (and a margin loss's learnable boundary)
    get their own group at ``cfg.proxy_lr`` (default 100 x ``lr``: proxy losses need a larger
    rate, Kim et al. 2020), a ``pml:`` loss's parameters too (they are its proxies or its
    margin). Without such parameters it is one group, as before."""
    from losses.proxies import param_groups

    proxy_lr = cfg.proxy_lr if cfg.proxy_lr is not None else 100.0 * cfg.lr
    if loss_fn is not None and type(loss_fn).__module__.startswith("pytorch_metric_learning"):
        loss_fn = _PmlProxies(loss_fn)
    params = param_groups(params, loss_fn, cfg.lr, proxy_lr)
    if len(params) == 1:
        params = params[0]["params"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_embedder(path: str | Path, map_location: str = "cpu") -> nn.Module:
    """Rebuild the embedder saved in a trainer checkpoint."""
    from ..embedders import Embedder

    state = ckpt.load_checkpoint(path, map_location=map_location)
    if "embedder_config" not in state or "model" not in state:
        raise UserError(f"{path} is not a checkpoint written by contrastive.app.train.fit")
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
