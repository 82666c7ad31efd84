"""The side-by-side comparison: several losses trained under one protocol, judged by the same
evaluation, reported in one table.

Every (loss, seed) cell trains the same encoder on the same data with the same optimiser, batch
composition and step budget (:class:`~contrastive.config.TrainConfig`); only the loss (and its
standard hyper-parameters, :data:`LOSS_DEFAULTS`) changes. Each finished cell is saved as
``cells/<loss>__seed<k>.json``, so an interrupted comparison resumes where it stopped and
finished cells are never run again.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import TrainConfig, load_mapping

#: The embedded default comparison: MI bounds and metric-learning losses.
DEFAULT_LOSSES = ("infonce", "nwj", "js", "dv", "triplet", "npair", "contrastive")

#: Hyper-parameters each loss gets unless the user overrides them: the usual published values
#: (NT-Xent/SupCon temperature 0.1; FaceNet-style margin 0.2 on normalised embeddings; Hadsell
#: margins 0 / 1 on normalised embeddings; plain dot-product N-pair with Sohn's small L2
#: penalty). MI bounds share InfoNCE's cosine critic so the comparison isolates the objective.
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "infonce": {"temperature": 0.1},
    "nwj": {"temperature": 0.1},
    "js": {"temperature": 0.1},
    "dv": {"temperature": 0.1},
    "triplet": {"margin": 0.2, "mining": "all"},
    "npair": {"l2_reg": 0.002},
    "contrastive": {"pos_margin": 0.0, "neg_margin": 1.0},
}


@dataclass
class CompareConfig:
    """What ``contrastive compare`` runs. ``train`` holds any further
    :class:`~contrastive.config.TrainConfig` fields shared by every cell (e.g. ``lr``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    losses: tuple[str, ...] = DEFAULT_LOSSES
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone: str = "mlp"
    critic: str | None = None
    steps: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 64
    output: str = "runs/compare"
    train: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> CompareConfig:
        data = load_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compare config key(s) {unknown}; known: {sorted(known)}")
        for k in ("losses", "seeds"):
            if k in data:
                data[k] = tuple(data[k])
        return cls(**data)


def cell_name(loss: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', loss)}__seed{seed}"


def describe_critic(loss_module) -> str:
    """A short human name for a loss's critic, e.g. ``cosine(t=0.1)``."""
    critic = getattr(loss_module, "critic", None)
    if critic is None:
        dist = getattr(loss_module, "distance", None)
        return f"pml:{type(dist).__name__}" if dist is not None else "-"
    name = type(critic).__name__.lower()
    if hasattr(critic, "temperature"):
        return f"{name}(t={critic.temperature:.3g})"
    if getattr(critic, "normalize", False):
        return f"{name}(normalized)"
    return name


def train_config_for(cfg: CompareConfig, loss: str, seed: int) -> TrainConfig:
    kwargs = dict(LOSS_DEFAULTS.get(loss, {}))
    if cfg.critic is not None:
        kwargs.pop("temperature", None)
    kwargs.update(cfg.loss_kwargs.get(loss, {}))
    base = {
        "dataset": cfg.dataset, "data_dir": cfg.data_dir, "backbone": cfg.backbone,
        "loss": loss, "loss_kwargs": kwargs, "critic": cfg.critic, "steps": cfg.steps,
        "batch_size": cfg.batch_size, "seed": seed, "progress": False, "resume": True,
        "output": str(Path(cfg.output) / "runs" / cell_name(loss, seed)),
        "eval_every": max(cfg.steps // 5, 1), "checkpoint_every": max(cfg.steps // 5, 1),
    }
    base.update(cfg.train)
    return TrainConfig.from_dict(base)


def run_cell(cfg: CompareConfig, loss: str, seed: int) -> dict[str, Any]:
    """Train and evaluate one (loss, seed) cell; failures are recorded, not raised."""
    from .train import build_loss, fit

    tcfg = train_config_for(cfg, loss, seed)
    record: dict[str, Any] = {"loss": loss, "seed": seed}
    try:
        record["critic"] = describe_critic(
            build_loss(tcfg.loss, tcfg.loss_kwargs, tcfg.critic, tcfg.critic_kwargs,
                       embedding_dim=tcfg.dim)
        )
        res = fit(tcfg)
    except (ValueError, FloatingPointError, RuntimeError) as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        return record
    record.update(
        status="ok",
        metrics=res["metrics"],
        readout=res["readout"],
        train_time_s=res["train_time_s"],
        history=res["history"],
    )
    return record


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every (loss, seed) cell not already finished under ``cfg.output``, then write the
    report (``results.json``, ``results.csv``, ``results.md``, PNG plots). Returns
    ``{"records", "rows", "files", "table", "wall_time_s"}``."""
    from tqdm.auto import tqdm

    from losses.registry import canonical

    from . import report

    for loss in cfg.losses:
        if not loss.startswith("pml:"):
            canonical(loss)  # an unknown name fails here, before any cell trains
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed")
    # The config and the data are checked once, by the readers themselves, before any cell
    # trains: a wrong path is one error, not one failed cell per (loss, seed).
    from .datasets import get_dataset
    from .train import eval_sets

    first = train_config_for(cfg, cfg.losses[0], cfg.seeds[0])
    get_dataset(first.dataset, root=first.data_dir, split=first.train_split)
    eval_sets(first.dataset, first.data_dir, first.eval_split)
    out = Path(cfg.output)
    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = []
    todo = [(loss, seed) for loss in cfg.losses for seed in cfg.seeds]
    bar = tqdm(todo, desc="compare", disable=not cfg.progress, dynamic_ncols=True)
    for loss, seed in bar:
        bar.set_postfix(loss=loss, seed=seed)
        path = cells / f"{cell_name(loss, seed)}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
            continue
        record = run_cell(cfg, loss, seed)
        if record.get("status") == "ok":
            ckpt.atomic_write_json(path, record)
        records.append(record)
    wall = time.perf_counter() - t0
    meta = {"config": _jsonable(cfg.__dict__), "wall_time_s": wall, "versions": _versions()}
    files = report.write_report(records, out, meta=meta, title=f"compare on {cfg.dataset}")
    rows = report.aggregate(records)
    return {"records": records, "rows": rows, "files": files,
            "table": report.format_table(rows), "wall_time_s": wall}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _versions() -> dict[str, str]:
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": numpy.__version__, "machine": platform.machine()}
    try:
        import faiss

        out["faiss"] = getattr(faiss, "__version__", "?")
    except ImportError:
        out["faiss"] = "absent"
    return out
