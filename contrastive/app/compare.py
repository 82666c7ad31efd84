"""The side-by-side comparison: several losses trained under one protocol, judged by the same
evaluation, reported in one table.

Every (loss, seed) cell trains the same encoder on the same data with the same optimiser, batch
composition and step budget (:class:`~contrastive.app.config.TrainConfig`); only the loss (and its
standard hyper-parameters, :func:`loss_defaults`) changes.

A finished cell is reused only when everything that decides its result is the same. Each cell is
keyed by :func:`cell_key`, a hash of its resolved config (the loss and its keywords completed
with the constructor's defaults, the critic and its keywords, backbone, embedding size, data set
and splits -- a ``data_dir`` as the absolute folder it names and a fingerprint of the data it
holds (:func:`data_fingerprint`) --, steps, batch, optimiser, schedule, seed, ..., and the
library version): it is saved
as ``cells/<loss>__seed<k>__<key>.json`` and trains (with its checkpoints) under
``runs/<loss>__seed<k>__<key>/``. An interrupted comparison resumes where it stopped; a run with
other settings into the same folder trains its own cells and never reports another run's
numbers. The output folder is locked while a comparison runs in it
(:func:`contrastive.checkpoint.folder_lock`).

Problems that are the same for every cell (an unknown loss or keyword, ``pml:`` with a critic,
a batch that cannot hold ``m_per_class`` items of two or more classes, a missing data path) are
one :class:`~contrastive.app.config.UserError` before anything trains. A cell that fails while it
trains is reported (on stderr as it happens, in the table and in ``results.json``) and the
others go on; the result's ``failed`` list names it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError, as_user_error, keywords_as_user_error
from ..jsonsafe import to_jsonable
from .config import (
    Bool,
    ConfigError,
    IntList,
    PosInt,
    TextList,
    TrainConfig,
    closest,
    load_mapping,
    resolved_kwargs,
    validate_fields,
)

#: The embedded default comparison: MI bounds and metric-learning losses.
DEFAULT_LOSSES = ("infonce", "nwj", "js", "dv", "triplet", "npair", "contrastive")

def loss_defaults(loss: str, critic: bool = False) -> dict[str, Any]:
    """The keywords a cell of ``loss`` starts from: the defaults registered with the loss
    (:mod:`losses.registry`, looked up through its aliases; the usual published values, and the
    MI bounds share InfoNCE's cosine critic at t = 0.1 so the comparison isolates the objective);
    none for a ``pml:`` loss. With a ``critic`` the temperature is the critic's, not the loss's."""
    from losses.registry import LOSSES, defaults

    if loss.startswith("pml:") or loss not in LOSSES:  # an unknown name fails in its check
        return {}
    return defaults(loss, critic=critic)


#: TrainConfig fields that do not change a cell's result (where it is written, how it is shown).
#: ``num_workers`` does once the training transforms draw random numbers (``augment``, or
#: ``views >= 2``): each loader worker draws from its own seeded stream, the main process from
#: the global one; :func:`resolved_cell_config` keys it then.
NOT_IN_KEY = frozenset({"output", "progress", "resume", "overwrite", "num_workers"})


#: The comparison's own fields that are also :class:`TrainConfig` fields: the cells take them
#: from the top level, never from ``train`` (where they would replace what the report shows).
_TOP_LEVEL = ("dataset", "data_dir", "backbone", "critic", "critic_kwargs", "loss_kwargs",
              "steps", "batch_size")


@dataclass
class CompareConfig:
    """What ``contrastive compare`` runs. ``train`` holds any further
    :class:`~contrastive.app.config.TrainConfig` fields shared by every cell (e.g. ``lr``);
    ``loss_kwargs`` maps a loss name to keywords that replace its :func:`loss_defaults`.
    ``losses`` and ``seeds`` take a list or a comma string, each name or seed once;
    ``critic_kwargs`` go with a ``critic``. ``train`` may not hold a field of this class
    (``train.steps`` would replace the ``steps`` the report shows)."""

    __pydantic_config__ = TrainConfig.__pydantic_config__

    dataset: str = "digits"
    data_dir: str | None = None
    losses: TextList = DEFAULT_LOSSES
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone: str = "mlp"
    critic: str | None = None
    critic_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: PosInt = 1000
    seeds: IntList = (0, 1, 2)
    batch_size: PosInt = 64
    output: str = "runs/compare"
    train: dict[str, Any] = field(default_factory=dict)
    progress: Bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> CompareConfig:
        """Build from a mapping, checked against the field types (:class:`ConfigError`)."""
        cfg = validate_fields(cls, data, source=source)
        if not cfg.losses:
            raise UserError("config field 'losses': got an empty list, expected loss names")
        if not cfg.seeds:
            raise UserError("config field 'seeds': got an empty list, expected seeds")
        for name in ("losses", "seeds"):  # a repeat would run one cell and report fewer
            values = list(getattr(cfg, name))
            repeated = sorted({v for v in values if values.count(v) > 1}, key=values.index)
            if repeated:
                raise ConfigError(name, getattr(cfg, name),
                                  f"each {name[:-1]} once (repeated: "
                                  f"{', '.join(map(str, repeated))})", source=source)
        for key in ("output", "resume", "overwrite", "progress", "loss", "seed"):
            if key in cfg.train:  # set per cell by compare itself
                raise ConfigError(f"train.{key}", cfg.train[key],
                                  "no value: compare sets it for each cell (use the top-level "
                                  "output / losses / seeds)", source=source)
        for key in _TOP_LEVEL:
            if key in cfg.train:  # it would replace the top-level value the report shows
                raise ConfigError(f"train.{key}", cfg.train[key],
                                  f"no value: {key} is a top-level field of the comparison "
                                  f"(set {key}, not train.{key})", source=source)
        if cfg.critic_kwargs and cfg.critic is None:  # they would be dropped from every cell
            raise ConfigError("critic_kwargs", cfg.critic_kwargs,
                              "no keywords without a critic: set critic too (e.g. cosine), or "
                              "give the loss's own keywords in loss_kwargs", source=source)
        for name, kwargs in cfg.loss_kwargs.items():
            if name not in cfg.losses:  # keywords for a loss that is not run: a misspelling
                raise ConfigError(f"loss_kwargs.{name}", kwargs,
                                  f"a loss of losses ({', '.join(cfg.losses)})",
                                  closest(name, cfg.losses), source=source)
        cfg._source = source  # not a field: named by the errors of the cells' configs
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> CompareConfig:
        """Load a YAML/TOML/JSON file; ``overrides`` that are not None replace its values."""
        data = load_mapping(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    def validated(self) -> CompareConfig:
        return self.from_dict(self.fields_dict(), source=getattr(self, "_source", None))

    def fields_dict(self) -> dict[str, Any]:
        """The fields and their values."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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


def train_config_for(cfg: CompareConfig, loss: str, seed: int,
                     output: str | None = None,
                     train_overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of one cell (``output``: its run folder; by default the
    key-named one under ``cfg.output``); ``train_overrides`` replace fields for this cell only
    (the tuned comparison's per-loss learning rate)."""
    kwargs = loss_defaults(loss, critic=cfg.critic is not None)
    kwargs.update(cfg.loss_kwargs.get(loss, {}))
    base = {
        "dataset": cfg.dataset, "data_dir": cfg.data_dir, "backbone": cfg.backbone,
        "loss": loss, "loss_kwargs": kwargs, "critic": cfg.critic,
        "critic_kwargs": dict(cfg.critic_kwargs) if cfg.critic is not None else {},
        "steps": cfg.steps, "batch_size": cfg.batch_size, "seed": seed, "progress": False,
        "resume": "auto", "output": output or str(Path(cfg.output) / "runs" / "pending"),
        "eval_every": max(cfg.steps // 5, 1), "checkpoint_every": max(cfg.steps // 5, 1),
    }
    base.update(cfg.train)
    base.update(train_overrides or {})
    try:
        tcfg = TrainConfig.from_dict(base)
    except ConfigError as exc:
        raise _as_compare_key(exc, cfg, loss) from None
    if output is None:
        tcfg.output = str(Path(cfg.output) / "runs" / f"{cell_name(loss, seed)}__"
                          f"{cell_key(tcfg)}")
    return tcfg


def _as_compare_key(exc: ConfigError, cfg: CompareConfig, loss: str) -> ConfigError:
    """``exc`` (an error of a cell's :class:`TrainConfig`) with the key the user wrote in the
    comparison's config: ``train.<field>`` for a value of the ``train`` mapping,
    ``loss_kwargs.<loss>.<keyword>`` for one of the loss's keywords; and the config's source."""
    key, rest = exc.field.split(".", 1) if "." in exc.field else (exc.field, None)
    if key in cfg.train:
        field_name = f"train.{exc.field}"
    elif key == "loss_kwargs" and rest is not None and rest in cfg.loss_kwargs.get(loss, {}):
        field_name = f"loss_kwargs.{loss}.{rest}"
    else:
        field_name = exc.field
    source = exc.source or getattr(cfg, "_source", None)
    if field_name == exc.field and source == exc.source:
        return exc
    return ConfigError(field_name, exc.value, exc.expected, exc.suggestion,
                       unknown=exc.unknown, source=source)


def resolved_cell_config(tcfg: TrainConfig) -> dict[str, Any]:
    """Everything that decides a cell's result: the cell's config without
    :data:`NOT_IN_KEY` (``num_workers`` kept under random transforms; ``device=None`` named as
    the GPU it becomes where there is one; a ``data_dir`` as the absolute folder, with
    :func:`data_fingerprint` of what it holds), the loss's and critic's keywords completed with
    their constructors' defaults (a sized critic's ``dim`` / ``in_dim`` as the trainer fills
    it in), and the library version."""
    import torch

    from .. import __version__
    from .config import _critic_factory, _loss_factory

    out = {k: v for k, v in tcfg.to_dict().items() if k not in NOT_IN_KEY}
    if tcfg.data_dir is not None:  # the folder it names from here, and what it holds now
        out["data_dir"] = _resolved_dir(tcfg.data_dir)
        out["data_fingerprint"] = data_fingerprint(tcfg)
    if tcfg.augment or tcfg.views >= 2:  # random transforms: the workers' streams decide them
        out["num_workers"] = tcfg.num_workers
    if tcfg.device is None and torch.cuda.is_available():
        # the automatic device is a GPU here (autocast, other kernels): not a CPU cell's result;
        # on a machine without one the key stays what it was
        out["device"] = "cuda (automatic)"
    out["loss_kwargs"] = resolved_kwargs(_loss_factory(tcfg.loss), tcfg.loss_kwargs)
    if tcfg.critic is not None:
        from ..critics import CRITICS

        ckw = dict(tcfg.critic_kwargs)
        size = CRITICS.get(tcfg.critic).meta.get("size")
        if size is not None:
            ckw.setdefault(size, tcfg.dim)
        out["critic_kwargs"] = resolved_kwargs(_critic_factory(tcfg.critic), ckw)
    out["library_version"] = __version__
    return out


#: :func:`data_fingerprint` by (data set, folder, training split, evaluation split); emptied by
#: :func:`preflight`, so each comparison reads its data once, when it starts.
_DATA_FINGERPRINTS: dict[tuple[str, str, str, str], str] = {}


def _resolved_dir(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def data_fingerprint(tcfg: TrainConfig) -> str | None:
    """16 hex digits of the SHA-256 of the data a cell reads from its ``data_dir`` (``None``
    without one: the embedded data sets are fixed by the library): for its training split and
    its evaluation sets (:func:`~.protocol.eval_sets`), the number of items, their labels, the
    class names and the items themselves (image paths, or the arrays). Another version of a data
    set at the same path (other images, splits or labels) is another cell. ``"unreadable"``
    (not remembered) when the data cannot be read: such a cell stops in its preflight."""
    if tcfg.data_dir is None:
        return None
    import numpy as np

    root = _resolved_dir(tcfg.data_dir)
    memo = (str(tcfg.dataset), root, tcfg.train_split, tcfg.eval_split)
    if memo in _DATA_FINGERPRINTS:
        return _DATA_FINGERPRINTS[memo]
    from ..datasets import get_dataset
    from .protocol import eval_sets

    try:
        sets = [get_dataset(tcfg.dataset, root=root, split=tcfg.train_split),
                *eval_sets(tcfg.dataset, root, tcfg.eval_split)]
    except Exception:  # the preflight (or the cell) reports it
        return "unreadable"
    digest = hashlib.sha256()
    for ds in sets:
        if ds is None:
            continue
        digest.update(repr((type(ds).__name__, len(ds), [str(c) for c in ds.classes])).encode())
        digest.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
        if hasattr(ds, "paths"):
            digest.update("\n".join(ds.paths).encode())
        for name in ("data", "images"):
            items = getattr(ds, name, None)
            if items is not None:
                items = items.numpy() if hasattr(items, "numpy") else np.asarray(items)
                digest.update(np.ascontiguousarray(items).tobytes())
    _DATA_FINGERPRINTS[memo] = digest.hexdigest()[:16]
    return _DATA_FINGERPRINTS[memo]


def cell_key(tcfg: TrainConfig) -> str:
    """12 hex digits of the SHA-256 of :func:`resolved_cell_config` (canonical JSON)."""
    text = json.dumps(resolved_cell_config(tcfg), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_cell(cfg: CompareConfig, loss: str, seed: int,
             tcfg: TrainConfig | None = None) -> dict[str, Any]:
    """Train and evaluate one (loss, seed) cell. A failure is recorded (``status: failed``,
    ``error``, ``traceback``) and printed on stderr, not raised; an interrupt (SIGINT/SIGTERM,
    :class:`~contrastive.app.train.TrainingInterrupted`) is raised after its checkpoint is
    written."""
    from .factory import build_loss
    from .train import fit

    tcfg = tcfg or train_config_for(cfg, loss, seed)
    record: dict[str, Any] = {"loss": loss, "seed": seed, "key": cell_key(tcfg),
                              "config": resolved_cell_config(tcfg)}
    try:
        record["critic"] = describe_critic(
            build_loss(tcfg.loss, tcfg.loss_kwargs, tcfg.critic, tcfg.critic_kwargs,
                       embedding_dim=tcfg.dim, num_classes=1)  # only its critic is read
        )
        res = fit(tcfg)
    except Exception as exc:  # one cell's failure must not stop the others; it is reported
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say(f"cell {loss} seed {seed} failed: {type(exc).__name__}: {first}")
        return record
    record.update(
        status="ok",
        metrics=res["metrics"],
        eval_backend=res.get("eval_backend", "unknown"),
        readout=res["readout"],
        train_time_s=res["train_time_s"],
        history=res["history"],
    )
    return record


def cached_cell(cfg: CompareConfig, loss: str, seed: int, tcfg: TrainConfig, cells: Path,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The record of one cell: the finished one saved under ``cells`` with the same
    :func:`cell_key`, else :func:`run_cell`'s (saved atomically when it succeeded; ``log`` is
    told before a cell trains)."""
    key = cell_key(tcfg)
    path = cells / f"{cell_name(loss, seed)}__{key}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key and saved.get("status") == "ok":
            return saved
    if log:
        log(f"training {loss} seed {seed}")
    record = run_cell(cfg, loss, seed, tcfg)
    if record.get("status") == "ok":
        ckpt.atomic_write_json(path, record)
    return record


def preflight(cfg: CompareConfig) -> dict[tuple[str, int], TrainConfig]:
    """Check what is the same for every cell before anything trains, and return each cell's
    config: the configs themselves (loss names and keywords, critic, ``train`` fields), the
    data (train and evaluation splits), the batch composition on the training labels, and each
    loss's construction. Raises :class:`UserError` on the first problem."""
    import numpy as np

    from ..datasets import get_dataset
    from ..samplers import MPerClassSampler
    from .factory import build_loss
    from .protocol import eval_sets

    _DATA_FINGERPRINTS.clear()  # the data as they are now decide the cells' keys
    configs = {(loss, seed): train_config_for(cfg, loss, seed)
               for loss in cfg.losses for seed in cfg.seeds}
    first = next(iter(configs.values()))

    user = as_user_error

    ds = user(f"data set {first.dataset!r}", get_dataset, first.dataset, root=first.data_dir,
              split=first.train_split)
    user(f"data set {first.dataset!r}", eval_sets, first.dataset, first.data_dir,
         first.eval_split)
    if first.views < 2:
        user(f"batch_size {first.batch_size} with m_per_class {first.m_per_class} on "
             f"{first.dataset!r}", MPerClassSampler, np.asarray(ds.labels), m=first.m_per_class,
             batch_size=first.batch_size, seed=0, num_replicas=1, rank=0)
    for loss in cfg.losses:
        t = configs[(loss, cfg.seeds[0])]
        keywords_as_user_error(f"loss {loss!r}", {f"loss_kwargs.{loss}": t.loss_kwargs,
                                                  "critic_kwargs": t.critic_kwargs},
                               build_loss, t.loss, t.loss_kwargs, t.critic, t.critic_kwargs,
                               embedding_dim=t.dim, num_classes=int(np.max(ds.labels)) + 1)
    return configs


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every (loss, seed) cell not already finished under ``cfg.output`` with the same
    resolved settings, then write the report (``results.json``, ``results.csv``,
    ``results.md``, PNG plots). Returns ``{"records", "rows", "files", "table", "wall_time_s",
    "failed"}``; ``failed`` lists the ``(loss, seed, error)`` of the cells that failed."""
    from tqdm.auto import tqdm

    from . import compare_report as report

    cfg = cfg.validated()
    configs = preflight(cfg)
    out = Path(cfg.output)
    with ckpt.folder_lock(out, "contrastive compare"):
        cells = out / "cells"
        cells.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        records = []
        todo = list(configs)
        bar = tqdm(todo, desc="compare", disable=not cfg.progress, dynamic_ncols=True)
        for loss, seed in bar:
            bar.set_postfix(loss=loss, seed=seed)
            records.append(cached_cell(cfg, loss, seed, configs[(loss, seed)], cells))
        bar.close()
        wall = time.perf_counter() - t0
        meta = {"config": to_jsonable(cfg.fields_dict(), nan_to_none=False), "wall_time_s": wall,
                "versions": _versions()}
        files = report.write_report(records, out, meta=meta, title=f"compare on {cfg.dataset}")
    rows = report.aggregate(records)
    failed = [(r["loss"], r["seed"], r.get("error", "")) for r in records
              if r.get("status") != "ok"]
    return {"records": records, "rows": rows, "files": files, "failed": failed,
            "table": report.format_table(rows), "wall_time_s": wall}


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from .. import __version__

    out = {"contrastive": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": numpy.__version__,
           "machine": platform.machine()}
    try:
        import faiss

        out["faiss"] = getattr(faiss, "__version__", "?")
    except ImportError:
        out["faiss"] = "absent"
    return out
