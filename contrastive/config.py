"""Training configuration: one dataclass, loadable from YAML, TOML or JSON.

Every field has a default that trains the embedded default (digits, an MLP encoder, InfoNCE) on
two CPU cores in seconds; a config file only names what differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Everything :func:`contrastive.train.fit` needs.

    Data: ``dataset`` (a name from ``contrastive.datasets.available_datasets()``), ``data_dir``
    (local root for the real data sets), ``views`` (0: supervised batches of ``batch_size //
    m_per_class`` classes x ``m_per_class``; >= 2: self-supervised, that many augmented views per
    instance with instance ids as labels), ``augment`` (training augmentation preset).

    Model: ``backbone`` (a timm model name, or ``"mlp"`` for vector data), ``backbone_kwargs``,
    ``dim`` and ``head`` of the embedding, ``pretrained``/``weights``.

    Loss: ``loss`` (a name from ``losses.available()`` or ``"pml:ClassName"`` for a
    pytorch-metric-learning loss), ``loss_kwargs``, and optionally ``critic`` +
    ``critic_kwargs`` (a name from ``contrastive.critics.available()``) to override the loss's
    default critic.

    Optimisation: ``optimizer`` ("adamw" or "sgd"), ``lr``, ``weight_decay``, ``momentum``,
    ``schedule`` ("cosine", "constant" or "step"), ``warmup_steps``, ``steps`` (or ``epochs``),
    ``grad_clip`` (max global norm, ``None`` for off), ``amp`` (``None``: bf16 autocast on CUDA
    only), ``seed``.

    Bookkeeping: ``output`` directory (``log.jsonl``, ``log.csv``, ``checkpoints/``,
    ``result.json``), ``eval_every``, ``log_every``, ``checkpoint_every`` (steps), ``resume``,
    ``final_probe`` (linear probe + k-NN classifier at the end), ``progress``.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    views: int = 0
    augment: bool = False
    backbone: str = "mlp"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 64
    head: str | None = "linear"
    normalize: bool = False
    pretrained: bool = False
    weights: str | None = None
    loss: str = "infonce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    critic: str | None = None
    critic_kwargs: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    m_per_class: int = 8
    steps: int = 500
    epochs: int | None = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 5.0
    amp: bool | None = None
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    output: str = "runs/train"
    resume: bool = False
    final_probe: bool = True
    device: str | None = None
    num_workers: int = 0
    progress: bool = True

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown}; known keys: {sorted(known)}"
            )
        return cls(**data).validated()

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load ``.yaml``/``.yml``, ``.toml`` or ``.json``."""
        return cls.from_dict(load_mapping(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validated(self) -> TrainConfig:
        """Check ranges; raise ``ValueError`` naming the field."""
        positive = ["batch_size", "m_per_class", "dim", "log_every"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {v!r}")
        if self.epochs is None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise ValueError(f"config field steps must be a positive integer, got {self.steps!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs <= 0):
            raise ValueError(f"config field epochs must be a positive integer, got {self.epochs!r}")
        for name in ["eval_every", "checkpoint_every", "warmup_steps", "num_workers"]:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"config field {name} must be an integer >= 0, got {v!r}")
        if self.views == 1 or self.views < 0:
            raise ValueError(f"config field views must be 0 (supervised) or >= 2, got {self.views}")
        if not (self.lr > 0):
            raise ValueError(f"config field lr must be > 0, got {self.lr!r}")
        if self.optimizer not in ("adamw", "sgd", "adam"):
            raise ValueError(f"config field optimizer must be 'adamw', 'adam' or 'sgd', got "
                             f"{self.optimizer!r}")
        if self.schedule not in ("cosine", "constant", "step"):
            raise ValueError(f"config field schedule must be 'cosine', 'constant' or 'step', got "
                             f"{self.schedule!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"config field grad_clip must be > 0 or null, got {self.grad_clip!r}")
        return self


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON file into a dict (by extension)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {p} must end in .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of field: value")
    return data
