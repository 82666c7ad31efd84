"""Embedding models and batched inference: the one embedding interface of docs/architecture.md.

``Embedder`` turns any backbone into a model ``x -> z`` with ``z`` of shape ``[B, dim]``:

    backbone (timm model with ``num_classes=0``, any ``nn.Module``, or an MLP for vectors)
      -> flatten to [B, feature_dim]
      -> head: none | Linear(feature_dim, dim) | Linear-BN-ReLU-Linear (SimCLR projection,
         Chen et al. 2020, arXiv 2002.05709)
      -> optional L2 normalisation of each row (computed in float32)

Batched inference with such a model (``embed``, ``embed_distributed``) is in
:mod:`contrastive.inference`.

Checkpoints are read with :func:`contrastive.checkpoint.safe_load`
(``torch.load(weights_only=True)``, numpy arrays allowed, so a trainer checkpoint that stores
numpy RNG state still loads); nothing is ever downloaded by this module except what ``timm``
itself fetches when ``pretrained=True`` is asked for explicitly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import refused_global, safe_load
from .critics import mlp

__all__ = [
    "Embedder",
    "MLPEncoder",
    "extract_state_dict",
    "load_checkpoint_state",
    "infer_feature_dim",
    "HEADS",
]

HEADS = ("linear", "mlp", None)
_MLP_BACKBONE = "mlp"
_MLP_KWARGS = ("in_dim", "hidden_dim", "out_dim", "layers")


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------


def _check_dim(value: object, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def _check_input_size(value: object) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"input_size must be a positive int H or a pair (H, W), got {value!r}")


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Remove ``prefix`` from every key when *all* keys carry it (``module.`` from DDP /
    DataParallel, ``_orig_mod.`` from ``torch.compile``); otherwise return the keys unchanged."""
    keys = list(state)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def extract_state_dict(obj: object) -> dict[str, Tensor]:
    """The model state dict inside a loaded checkpoint.

    Accepts a raw state dict, or a dict holding it under ``"model"`` (the trainer's format),
    ``"state_dict"`` (Lightning and many others) or ``"model_state_dict"``; strips ``module.``
    (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes."""
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"checkpoint must hold a dict (a state_dict or {{'model': state_dict}}), "
            f"got {type(obj).__name__}"
        )
    state: Mapping[str, Any] = obj
    for key in ("model", "state_dict", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            state = inner
            break
    if not state or not all(isinstance(k, str) for k in state):
        raise ValueError(
            "checkpoint holds no state dict: expected a mapping of parameter names to tensors, "
            "or a dict with one under 'model' or 'state_dict'"
        )
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint state dict has non-tensor entries {bad[:5]}; expected a mapping of "
            "parameter names to tensors (or a dict with one under 'model' or 'state_dict')"
        )
    out = dict(state)
    # DDP(compile(model)) saves "module._orig_mod.*", compile(DDP(model)) "_orig_mod.module.*"
    for prefix in ("module.", "_orig_mod.", "module."):
        out = _strip_prefix(out, prefix)
    return out


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local checkpoint file safely (``weights_only=True``, numpy arrays allowed) on CPU
    and return its model state dict (see ``extract_state_dict``). Never downloads."""
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"weights must be a local file path, got the URL {path!r}; "
                         "download it yourself and pass the local path")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file not found: {path!r} (cwd {os.getcwd()!r}); pass the path of a local "
            "checkpoint (a state_dict or a dict with 'model'/'state_dict'); nothing is downloaded"
        )
    try:
        obj = safe_load(path, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # torch reports every failure as UnpicklingError
            raise ValueError(f"could not read weights file {path!r} as a torch checkpoint "
                             f"(truncated or not a torch.save file?): {exc}") from exc
        what = refused_global(exc) or "a non-tensor object"
        raise ValueError(
            f"weights file {path!r} holds a Python object ({what}) that weights_only loading "
            "refuses, since unpickling it could run code; if you trust the file, load it "
            "yourself with torch.load(path, weights_only=False) and call "
            "embedder.load_weights(state_dict)"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"could not read weights file {path!r} as a torch checkpoint "
                         f"(truncated or not a torch.save file?): {exc}") from exc
    return extract_state_dict(obj)


def _drop_timm_classifier(backbone: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` less the classifier's weight and bias named by a timm backbone's
    ``pretrained_cfg["classifier"]`` when the backbone has no such parameters (built with
    ``num_classes=0``); other keys, and a classifier the backbone does have, are kept."""
    cfg = getattr(backbone, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, (tuple, list)):
        return state
    drop = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    drop -= set(backbone.state_dict())
    return {k: v for k, v in state.items() if k not in drop}


def _timm_input_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` a timm model takes; None for other modules.

    timm keeps the *pretrained* input size in ``pretrained_cfg`` whatever ``in_chans`` /
    ``img_size`` the model was built with, so the channels are read from the model (its
    ``in_chans`` attribute, else its first Conv2d) and the size from its patch grid
    (``patch_embed.img_size``, for the models that fix one), the configured ones otherwise."""
    cfg = getattr(module, "pretrained_cfg", None)
    if not isinstance(cfg, Mapping) or not cfg.get("input_size"):
        return None
    chans, height, width = (int(v) for v in cfg["input_size"])
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    chans = _positive_int_attr(module, "in_chans") or (
        conv.in_channels if conv is not None else chans)
    grid = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if isinstance(grid, int) and not isinstance(grid, bool):
        height = width = grid
    elif isinstance(grid, (tuple, list)) and len(grid) == 2:
        height, width = (int(v) for v in grid)
    return chans, height, width


def _dummy_input(module: nn.Module) -> Tensor | None:
    """A 2-sample input that fits ``module``: the input a timm model takes
    (``_timm_input_shape``), else a shape for its first Linear / Conv layer; None when neither
    is known."""
    param = next(module.parameters(), None)
    shape = _timm_input_shape(module)
    if shape is not None and param is not None:
        return torch.randn((2, *shape), device=param.device, dtype=param.dtype)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            shape: tuple[int, ...] = (2, m.in_features)
        elif isinstance(m, nn.Conv1d):
            shape = (2, m.in_channels, 64)
        elif isinstance(m, nn.Conv2d):
            shape = (2, m.in_channels, 64, 64)
        elif isinstance(m, nn.Conv3d):
            shape = (2, m.in_channels, 16, 32, 32)
        else:
            continue
        w = m.weight
        return torch.randn(shape, device=w.device, dtype=w.dtype)
    return None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards (so a frozen
    sub-backbone that was in eval inside a training model stays in eval)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _positive_int_attr(module: nn.Module, name: str) -> int | None:
    v = getattr(module, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def infer_feature_dim(module: nn.Module) -> int:
    """Feature size of a backbone. Without a classifier (no ``num_classes`` attribute, or 0 as
    for timm's ``num_classes=0``) it is timm's pooled pre-logits width ``head_hidden_size``
    (which differs from ``num_features`` for e.g. MobileNetV3) or ``num_features``; otherwise
    the flattened output size of a dry forward on a 2-sample input (timm's input size, or shaped
    for the first Linear/Conv layer) in eval mode without grad, training flags restored."""
    if not _positive_int_attr(module, "num_classes"):
        nf = _positive_int_attr(module, "head_hidden_size") or _positive_int_attr(
            module, "num_features")
        if nf is not None:
            return nf
    x = _dummy_input(module)
    hint = "pass feature_dim=<size of the backbone's output per sample>"
    if x is None:
        raise ValueError(
            f"cannot infer the feature size of backbone {type(module).__name__}: it has no "
            f"num_features attribute and no Linear/Conv layer to shape a dry-run input; {hint}"
        )
    try:
        with torch.no_grad(), eval_mode(module):
            out = module(x)
    except Exception as exc:
        raise ValueError(
            f"cannot infer the feature size of backbone {type(module).__name__}: a dry forward "
            f"on an input of shape {tuple(x.shape)} failed ({exc}); {hint}"
        ) from exc
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise ValueError(
            f"backbone {type(module).__name__} must return a tensor [B, ...]; the dry forward "
            f"gave {type(out).__name__}"
            f"{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}"
        )
    return int(math.prod(out.shape[1:]))


def _adapt_stats(stats: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean/std for ``in_chans`` channels from a 3-channel pretrained config: the
    average channel repeated (timm's own adaptation of the first conv sums the RGB filters)."""
    stats = tuple(float(s) for s in stats)
    if len(stats) == in_chans:
        return stats
    avg = sum(stats) / len(stats)
    return (avg,) * in_chans


def _jsonable(value: Any, key: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except TypeError as exc:
        raise TypeError(
            f"Embedder.config(): argument {key}={value!r} is not JSON-serialisable; pass plain "
            "numbers/strings/lists to the constructor so a checkpoint can rebuild the model"
        ) from exc
    return value


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class MLPEncoder(nn.Module):
    """Encoder for vector data: flatten each sample to ``in_dim`` numbers, then ``layers`` hidden
    layers of width ``hidden_dim`` with ReLU and a final linear map to ``out_dim`` (defaults to
    ``hidden_dim``). ``num_features = out_dim`` (timm's convention), so it plugs into
    ``Embedder`` like a timm backbone. 8x8 digit images work directly with ``in_dim=64``."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int | None = None,
                 layers: int = 2) -> None:
        super().__init__()
        _check_dim(in_dim, "in_dim", allow_none=False)
        _check_dim(hidden_dim, "hidden_dim", allow_none=False)
        _check_dim(out_dim, "out_dim")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be an integer >= 0, got {layers!r}")
        self.in_dim = in_dim
        self.num_features = out_dim if out_dim is not None else hidden_dim
        self.net = mlp(in_dim, hidden_dim, self.num_features, layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"MLPEncoder expects {self.in_dim} numbers per sample, got input of shape "
                f"{tuple(x.shape)}; set in_dim to the flattened sample size"
            )
        return self.net(x)


def _projection_head(kind: str | None, feature_dim: int, dim: int | None,
                     hidden_dim: int | None) -> nn.Module:
    if kind is None:
        return nn.Identity()
    assert dim is not None
    if kind == "linear":
        return nn.Linear(feature_dim, dim)
    hidden = hidden_dim or feature_dim
    return nn.Sequential(
        nn.Linear(feature_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, dim),
    )


class Embedder(nn.Module):
    """``x -> normalize(head(flatten(backbone(x))))``, shape ``[B, dim]``, float32.

    Args:
        backbone: a timm model name (built with ``timm.create_model(name,
            pretrained=pretrained, num_classes=0, **backbone_kwargs)``; e.g. ``in_chans=1,
            img_size=64``), ``"mlp"`` for vector data (``MLPEncoder``; kwargs ``in_dim``
            (required), ``hidden_dim=256``, ``out_dim``, ``layers=2``), or any ``nn.Module``
            returning ``[B, ...]`` (flattened to ``[B, feature_dim]``).
        dim: output size. With ``head=None`` it must be None or the feature size (for
            ``"mlp"`` it sets the encoder's ``out_dim``); ``dim=None`` keeps the features.
        head: ``"linear"`` (Linear(feature_dim, dim)), ``"mlp"`` (Linear-BN-ReLU-Linear with
            ``head_hidden_dim`` units, default feature_dim: SimCLR's projection) or None.
        normalize: L2-normalise each output row (in float32).
        pretrained: ask timm for pretrained weights (timm may download them; off by default).
        weights: path to a local checkpoint: a state dict of this Embedder or of its backbone
            alone, or a dict with it under ``"model"``/``"state_dict"``; ``module.`` prefixes
            are stripped; a timm classification checkpoint's classifier keys are dropped when
            the backbone has none (``num_classes=0``). Otherwise loaded strictly; never
            downloaded.
        feature_dim: the backbone's output size for an ``nn.Module`` backbone (else inferred:
            see ``infer_feature_dim``); for names it must agree with timm's if given.
        head_hidden_dim: hidden width of the ``"mlp"`` head.
        input_size: image size ``H`` or ``(H, W)`` for ``data_config`` / ``eval_transform()``
            only (convnets take any size but timm's ``img_size`` argument exists only for
            models that need it, e.g. ViTs); default: ``img_size`` if given, else timm's.

    ``data_config`` / ``eval_transform()`` come from timm for timm backbones (including timm
    models passed as modules); for ``"mlp"`` and other modules they are ``None``: such data is
    expected to arrive as tensors already.
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        dim: int | None = 128,
        head: str | None = "linear",
        normalize: bool = True,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        feature_dim: int | None = None,
        head_hidden_dim: int | None = None,
        input_size: int | tuple[int, int] | list[int] | None = None,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of 'linear', 'mlp' or None, got {head!r}")
        _check_dim(dim, "dim")
        _check_dim(feature_dim, "feature_dim")
        _check_dim(head_hidden_dim, "head_hidden_dim")
        self._input_size = _check_input_size(input_size)
        if head is not None and dim is None:
            raise ValueError(f"head={head!r} projects to dim features: pass dim=<int> "
                             "(or head=None to keep the backbone features)")
        self._kind: str
        self._name: str | None = None
        self._kwargs = dict(backbone_kwargs)

        if isinstance(backbone, nn.Module):
            if backbone_kwargs:
                raise TypeError(
                    f"backbone keyword arguments {sorted(backbone_kwargs)} only apply to timm "
                    "model names and 'mlp'; configure the nn.Module before passing it"
                )
            if pretrained:
                raise ValueError("pretrained=True only applies to timm model names; load the "
                                 "module's weights yourself or pass weights=<path>")
            self._kind = "module"
            self.backbone = backbone
            feat = feature_dim if feature_dim is not None else infer_feature_dim(backbone)
        elif backbone == _MLP_BACKBONE:
            unknown = sorted(set(backbone_kwargs) - set(_MLP_KWARGS))
            if unknown:
                raise TypeError(f"unknown arguments {unknown} for backbone 'mlp'; "
                                f"it takes {list(_MLP_KWARGS)}")
            if "in_dim" not in backbone_kwargs:
                raise ValueError("backbone 'mlp' needs in_dim=<numbers per sample>, "
                                 "e.g. Embedder('mlp', in_dim=64)")
            if pretrained:
                raise ValueError("pretrained=True only applies to timm model names, not 'mlp'")
            kw = dict(backbone_kwargs)
            if head is None and dim is not None:
                if kw.get("out_dim", dim) != dim:
                    raise ValueError(f"head=None: dim={dim} and out_dim={kw['out_dim']} "
                                     "disagree; pass only one of them")
                kw["out_dim"] = dim
            self._kind = "mlp"
            self._name = _MLP_BACKBONE
            self.backbone = MLPEncoder(**kw)
            # the config records every MLP argument so from_config rebuilds the same shapes
            self._kwargs = {"in_dim": self.backbone.in_dim,
                            "hidden_dim": kw.get("hidden_dim", 256),
                            "out_dim": self.backbone.num_features,
                            "layers": kw.get("layers", 2)}
            feat = self.backbone.num_features
        elif isinstance(backbone, str):
            import timm

            if not timm.is_model(backbone):
                raise ValueError(
                    f"backbone {backbone!r} is not a timm model name; list names with "
                    f"timm.list_models('*{backbone.split('_')[0]}*'), or pass 'mlp' or an "
                    "nn.Module"
                )
            self._kind = "timm"
            self._name = backbone
            self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0,
                                              **backbone_kwargs)
            feat = infer_feature_dim(self.backbone)
        else:
            raise TypeError(f"backbone must be a timm model name, 'mlp' or an nn.Module, "
                            f"got {type(backbone).__name__}")

        if feature_dim is not None and feature_dim != feat and self._kind != "module":
            raise ValueError(f"feature_dim={feature_dim} but backbone {self._name!r} gives "
                             f"{feat} features; drop feature_dim")
        if head is None and dim is not None and dim != feat:
            raise ValueError(
                f"head=None keeps the backbone's {feat} features but dim={dim}; pass dim=None "
                f"(or dim={feat}), or head='linear'/'mlp' to project to {dim}"
            )
        self._feature_dim = feat
        self._dim = dim if dim is not None else feat
        self._head_kind = head
        self._head_hidden = head_hidden_dim
        self.normalize = bool(normalize)
        self._pretrained = bool(pretrained)
        self.head = _projection_head(head, feat, self._dim, head_hidden_dim)
        if weights is not None:
            self.load_weights(weights)

    # -- properties --------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Size of the output embedding."""
        return self._dim

    @property
    def feature_dim(self) -> int:
        """Size of the (flattened) backbone features, before the head."""
        return self._feature_dim

    @property
    def data_config(self) -> dict[str, Any] | None:
        """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) for
        timm backbones, for the model as built: its channels and patch grid (``in_chans`` /
        ``img_size``), or ``input_size``; None for ``"mlp"`` and non-timm modules."""
        if self._kind == "mlp" or not hasattr(self.backbone, "pretrained_cfg"):
            return None
        from timm.data import resolve_model_data_config

        # timm's resolver uses in_chans only together with an image size, and knows only the
        # pretrained size: the whole input_size is given, from the model as built
        shape = _timm_input_shape(self.backbone)
        in_chans, height, width = shape if shape is not None else (3, 224, 224)
        if self._kwargs.get("in_chans") is not None:
            in_chans = int(self._kwargs["in_chans"])
        img_size = self._input_size or self._kwargs.get("img_size")
        if isinstance(img_size, int):
            height = width = img_size
        elif img_size is not None:
            height, width = (int(v) for v in img_size)
        args = {"input_size": (in_chans, height, width)}
        cfg = dict(resolve_model_data_config(self.backbone, args=args))
        chans = cfg["input_size"][0]
        cfg["mean"] = _adapt_stats(cfg["mean"], chans)
        cfg["std"] = _adapt_stats(cfg["std"], chans)
        return cfg

    def eval_transform(self) -> Callable | None:
        """timm's evaluation transform for PIL images (resize, center crop to ``input_size``,
        to tensor, normalise); None when there is no data config (``"mlp"``, plain modules)."""
        cfg = self.data_config
        if cfg is None:
            return None
        from timm.data import create_transform

        return create_transform(**cfg, is_training=False)

    # -- forward -----------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone features flattened to ``[B, feature_dim]`` (no head, no normalisation)."""
        feats = self.backbone(x)
        if not isinstance(feats, Tensor):
            raise TypeError(f"backbone returned {type(feats).__name__}; it must return a tensor "
                            "[B, ...] (wrap it to pick the feature tensor)")
        feats = feats.flatten(1)
        if feats.shape[1] != self._feature_dim:
            raise ValueError(
                f"backbone {self._name or type(self.backbone).__name__!r} gives "
                f"{feats.shape[1]} features per sample for inputs of shape {tuple(x.shape)}, but "
                f"feature_dim is {self._feature_dim} (the size the head and dim were built for); "
                "keep the backbone's global pooling (timm's global_pool='' returns the whole "
                "feature map), or pass the right feature_dim= with an nn.Module backbone"
            )
        return feats

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.forward_features(x)).float()
        if self.normalize:
            z = F.normalize(z, dim=1)
        return z

    # -- checkpoints -------------------------------------------------------------------------

    def load_weights(self, weights: str | os.PathLike | Mapping[str, Tensor]) -> Embedder:
        """Load a local checkpoint path (or an in-memory state dict) strictly: an Embedder
        state dict (keys ``backbone.*``/``head.*``) or a backbone-only one. A timm
        classification checkpoint loads into a backbone built without a classifier
        (``num_classes=0``): the classifier's own keys (timm's ``pretrained_cfg["classifier"]``)
        are dropped, as timm does; any other missing or unexpected key is an error."""
        state = (load_checkpoint_state(weights) if isinstance(weights, (str, os.PathLike))
                 else extract_state_dict(weights))
        own = set(self.state_dict())
        if set(state) & own and all(k.split(".", 1)[0] in ("backbone", "head") for k in state):
            target, what = self, "Embedder"
        else:
            target, what = self.backbone, "backbone"
            state = _drop_timm_classifier(self.backbone, state)
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"weights do not fit this {what} ({self._name or type(self.backbone).__name__}, "
                f"dim={self.dim}, head={self._head_kind!r}): {exc}"
            ) from exc
        return self

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``Embedder.from_config(cfg)`` rebuilds the model
        (without weights: load the state dict afterwards, or pass ``weights=``)."""
        if self._kind == "module":
            raise TypeError(
                "an Embedder over a custom nn.Module backbone has no serialisable config; "
                "rebuild the module in code and load_state_dict(), or use a timm name / 'mlp'"
            )
        cfg: dict[str, Any] = {
            "backbone": self._name,
            "dim": self._dim if self._head_kind is not None else None,
            "head": self._head_kind,
            "normalize": self.normalize,
            "pretrained": self._pretrained,
            "head_hidden_dim": self._head_hidden,
            "input_size": _jsonable(self._input_size, "input_size"),
        }
        for key, value in self._kwargs.items():
            cfg[key] = _jsonable(value, key)
        return cfg

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> Embedder:
        """Rebuild from ``config()``; ``overrides`` replace entries (e.g. ``pretrained=False,
        weights='ckpt.pt'`` to restore a trained model without fetching timm weights)."""
        if not isinstance(cfg, Mapping) or "backbone" not in cfg:
            raise TypeError("cfg must be the dict from Embedder.config() (with a 'backbone' key)")
        return cls(**{**cfg, **overrides})

    def extra_repr(self) -> str:
        return (f"backbone={self._name or type(self.backbone).__name__!r}, "
                f"feature_dim={self.feature_dim}, dim={self.dim}, head={self._head_kind!r}, "
                f"normalize={self.normalize}")
