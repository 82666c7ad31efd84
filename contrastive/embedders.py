"""Embedding models and batched inference: the one embedding interface of docs/architecture.md.

``Embedder`` turns any backbone into a model ``x -> z`` with ``z`` of shape ``[B, dim]``:

    backbone (timm model with ``num_classes=0``, any ``nn.Module``, or an MLP for vectors)
      -> flatten to [B, feature_dim]
      -> head: none | Linear(feature_dim, dim) | Linear-BN-ReLU-Linear (SimCLR projection,
         Chen et al. 2020, arXiv 2002.05709)
      -> optional L2 normalisation of each row (computed in float32)

``embed(model, data)`` runs any such model over a data set or loader and returns float32 CPU
embeddings and int64 labels: on CUDA with autocast (bf16 where the GPU computes it natively,
fp16 before Ampere: :func:`amp_dtype`), channels_last inputs for models whose forward is known to
accept them (:func:`channels_last_safe`), and asynchronous copies through two reused pinned
buffers; on CPU in plain float32. Both run under ``torch.inference_mode`` with the model in eval
mode, and restore the model afterwards (train/eval flags, device, memory format).

``embed_distributed(model, data)`` is the same under ``torchrun``: each rank embeds one
contiguous share of the data set (about N / W rows) and the shares are gathered in rank order,
so every rank returns the whole ``[N, dim]`` result, equal to what one process computes.

Checkpoints are read with ``torch.load(weights_only=True)`` (numpy arrays allowed, so a trainer
checkpoint that stores numpy RNG state still loads); nothing is ever downloaded by this module
except what ``timm`` itself fetches when ``pretrained=True`` is asked for explicitly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, TensorDataset

from .critics import mlp

__all__ = [
    "Embedder",
    "MLPEncoder",
    "embed",
    "embed_distributed",
    "shard_bounds",
    "amp_dtype",
    "channels_last_safe",
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


def _numpy_safe_globals() -> list:
    """Globals that numpy arrays need under ``torch.load(weights_only=True)``."""
    core = getattr(np, "_core", None) or np.core
    names: list = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return names


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
    ctx = (torch.serialization.safe_globals(_numpy_safe_globals())
           if hasattr(torch.serialization, "safe_globals") else contextlib.nullcontext())
    try:
        with ctx:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # torch reports every failure as UnpicklingError
            raise ValueError(f"could not read weights file {path!r} as a torch checkpoint "
                             f"(truncated or not a torch.save file?): {exc}") from exc
        found = re.search(r"unsupported global:\s*(?:GLOBAL\s+)?([\w.]+)", str(exc), re.I)
        what = found.group(1) if found else "a non-tensor object"
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


def _dummy_input(module: nn.Module) -> Tensor | None:
    """A 2-sample input that fits ``module``: timm's configured input size for timm models, else
    a shape for its first Linear / Conv layer; None when neither is known."""
    param = next(module.parameters(), None)
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size") and param is not None:
        return torch.randn((2, *cfg["input_size"]), device=param.device, dtype=param.dtype)
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
def _eval_mode(module: nn.Module) -> Iterator[None]:
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
        with torch.no_grad(), _eval_mode(module):
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
            are stripped. Loaded strictly; never downloaded.
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
        timm backbones, with ``in_chans`` / ``img_size`` backbone arguments taken into account;
        None for ``"mlp"`` and non-timm modules."""
        if self._kind == "mlp" or not hasattr(self.backbone, "pretrained_cfg"):
            return None
        from timm.data import resolve_model_data_config

        args: dict[str, Any] = {}
        in_chans = self._kwargs.get("in_chans")
        if in_chans is None:
            in_chans = getattr(self.backbone, "in_chans", None)
        if in_chans is not None:
            args["in_chans"] = int(in_chans)
        img_size = self._input_size or self._kwargs.get("img_size")
        if img_size is not None:
            if isinstance(img_size, int):
                args["img_size"] = img_size
            else:
                h, w = tuple(img_size)
                args["input_size"] = (int(in_chans or 3), int(h), int(w))
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
        return feats.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(self.forward_features(x)).float()
        if self.normalize:
            z = F.normalize(z, dim=1)
        return z

    # -- checkpoints -------------------------------------------------------------------------

    def load_weights(self, weights: str | os.PathLike | Mapping[str, Tensor]) -> Embedder:
        """Load a local checkpoint path (or an in-memory state dict) strictly: an Embedder
        state dict (keys ``backbone.*``/``head.*``) or a backbone-only one."""
        state = (load_checkpoint_state(weights) if isinstance(weights, (str, os.PathLike))
                 else extract_state_dict(weights))
        own = set(self.state_dict())
        if set(state) & own and all(k.split(".", 1)[0] in ("backbone", "head") for k in state):
            target, what = self, "Embedder"
        else:
            target, what = self.backbone, "backbone"
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


# --------------------------------------------------------------------------------------------
# batched inference
# --------------------------------------------------------------------------------------------


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Argument > the accelerator the model already lives on > CUDA when present > CPU."""
    if device is not None:
        dev = torch.device(device)
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


def _split_batch(batch: object) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one batch as tensors; x may come as numpy, y as numpy / list of ints."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "embed() needs data that yields (x, y) pairs; got a batch of type "
            f"{type(batch).__name__}"
            f"{' with ' + str(len(batch)) + ' items' if isinstance(batch, (tuple, list)) else ''}"
            "; wrap the data set so __getitem__ returns (input, label)"
        )
    x, y = batch
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
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
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=pin, persistent_workers=False)
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
) -> tuple[Tensor, Tensor]:
    """Embed a whole data set: ``(embeddings float32 [N, dim] on CPU, labels int64 [N] on CPU)``.

    ``data`` is a Dataset of ``(x, y)`` pairs (batched here with ``batch_size`` and
    ``num_workers``, in order) or a DataLoader (used as is). The model runs on ``device``, by
    default the accelerator it already lives on, else CUDA when present, else CPU; it is moved
    there for the call and back afterwards. On CUDA: bf16 autocast (``amp``, default on; fp16
    where bf16 is unsupported), channels_last 4-D inputs and weights (``channels_last``, default
    on), pinned host memory and non-blocking copies both ways. On CPU both default off. Runs
    under ``torch.inference_mode`` with every submodule in eval mode; each submodule's
    train/eval flag, the device and the weights' memory format are restored afterwards.
    DDP / DataParallel wrappers are unwrapped (no collectives). Returned tensors are ordinary
    (not inference) tensors, usable in autograd (e.g. a linear probe).

    Defaults on CUDA: ``amp=None`` autocasts to :func:`amp_dtype` (bf16 on Ampere and later,
    fp16 on older GPUs, whose bf16 is emulated); ``channels_last=None`` is on only where
    :func:`channels_last_safe` holds (models built from torch.nn / timm / torchvision modules),
    since a custom forward that ``.view()``-s a feature map fails on channels_last tensors.
    Outputs come back through two reused pinned buffers (see ``_HostStager``), so no pinned
    memory the size of the result stays cached after the call.

    This embeds everything in the calling process, also under ``torchrun``; to split the work
    over the ranks use :func:`embed_distributed`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
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
    in_dtype = _float_dtype(model)

    from tqdm.auto import tqdm

    chunks: list[Tensor] = []
    labels: list[Tensor] = []
    stager = _HostStager() if cuda else None
    bar = tqdm(total=n, desc="embed", unit="img", disable=not progress, dynamic_ncols=True)
    with _eval_mode(model), _on_device(model, dev), _channels_last(model, channels_last):
        try:
            for batch in batches:
                x, y = _split_batch(batch)
                if x.is_floating_point() and x.dtype != in_dtype:
                    x = x.to(in_dtype)
                x = x.to(dev, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
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
    return torch.cat(chunks), torch.cat(labels)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n`` rows are split into ``world``
    contiguous shards: ``start = rank * n // world``; sizes differ by at most one."""
    return rank * n // world, (rank + 1) * n // world


def _shard(data: Dataset | DataLoader, start: int, stop: int) -> Dataset | DataLoader:
    """Rows ``[start, stop)`` of a data set (a loader: the same loader over those rows)."""
    from torch.utils.data import SequentialSampler, Subset

    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler) or data.batch_size is None:
            raise ValueError(
                "embed_distributed needs data in a fixed order: pass the Dataset itself, or a "
                "DataLoader with shuffle=False and a batch_size (not a custom sampler)"
            )
        return DataLoader(_shard(data.dataset, start, stop), batch_size=data.batch_size,
                          shuffle=False, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                          drop_last=False)
    if isinstance(data, TensorDataset):
        return TensorDataset(*(t[start:stop] for t in data.tensors))
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, range(start, stop))
    raise TypeError(f"data must be a torch Dataset of (x, y) pairs with a length, or a "
                    f"DataLoader over one, got {type(data).__name__}")


def _length(data: Dataset | DataLoader) -> int:
    ds = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(ds, "__len__"):
        raise TypeError(f"embed_distributed needs a data set with a length, got "
                        f"{type(ds).__name__}")
    return len(ds)  # type: ignore[arg-type]


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
) -> tuple[Tensor, Tensor]:
    """:func:`embed` with the data split over the ranks of a process group.

    Rank ``r`` of ``W`` embeds rows ``[r N / W, (r + 1) N / W)`` (:func:`shard_bounds`), and the
    shards are gathered in rank order with :func:`contrastive.distributed.all_gather_nograd`, so
    every rank returns the whole ``(embeddings [N, dim], labels [N])``, in the data set's
    order -- the same rows one process gets from ``embed(model, data)``, up to float rounding
    of a different batching. Each rank does ``1 / W`` of the forward passes; the gather moves
    ``N x dim`` floats to every rank (through the GPU under NCCL).

    It is a collective: every rank must call it with the same data. Without a process group, or
    with one rank, it is exactly :func:`embed`. A rank whose shard is empty (``N < W``) runs the
    model on one row to learn the output width and contributes no rows. The progress bar shows
    on rank 0 only.
    """
    from . import distributed as D

    world = D.get_world_size(group)
    if world == 1:
        return embed(model, data, batch_size=batch_size, device=device, num_workers=num_workers,
                     progress=progress, amp=amp, channels_last=channels_last)
    rank = D.get_rank(group)
    n = _length(data)
    if n == 0:
        raise ValueError("embed_distributed() got an empty data set; nothing to embed")
    start, stop = shard_bounds(n, rank, world)
    empty = start == stop
    part = _shard(data, 0, 1) if empty else _shard(data, start, stop)
    z, y = embed(model, part, batch_size=batch_size, device=device, num_workers=num_workers,
                 progress=progress and rank == 0, amp=amp, channels_last=channels_last)
    if empty:
        z, y = z[:0], y[:0]
    return D.all_gather_nograd(z, group), D.all_gather_nograd(y, group)
