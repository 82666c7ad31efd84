"""The tuned comparison (``contrastive compare --tune``): every loss gets the same
hyper-parameter search budget, judged on class-disjoint cross-validation folds of the training
classes, then its best configuration is retrained on all training classes with several seeds and
evaluated on classes never seen while training or tuning (Musgrave, Belongie & Lim, "A Metric
Learning Reality Check", ECCV 2020).

The protocol, the same for every loss:

* Search: per loss, one Optuna study (TPE, ``TPESampler(seed=tune_seed, n_startup_trials=4,
  constant_liar=True)``) over the loss's registered space (``losses.registry`` meta
  ``search_space``; ``search_spaces`` in the config for ``pml:`` losses or to override) plus the
  learning rate (:data:`LR_SPACE`, the same range for every loss). A trial trains on fold ``k``'s
  training classes and scores MAP@R on its validation classes, for every fold
  (:func:`contrastive.splits.class_disjoint_folds`); its value is the mean over folds. A trial
  that diverges scores 0. Same backbone, embedding size, optimiser, batch composition, step
  budget, trial seed and number of trials for every loss.
* Storage: Optuna's RDB storage, a SQLite file ``<output>/tuning.db`` by default or any
  SQLAlchemy URL (``storage``). The study name is the loss and a hash of every setting that
  decides a trial's value (not the number of trials: asking for more trials extends the study).
  :func:`~.study.run_trials` counts the finished trials and runs only the remainder, so a
  killed run resumes where it stopped and several processes (or machines on a shared database)
  can work on one study without losing or repeating trials; a trial whose worker died is redone
  (:mod:`.study` says how).
* Workers sharing one ``output`` folder: each trains its trials' folds in temporary folders
  under a scratch folder of its own, ``<output>/tuning/scratch/<host>-<pid>``
  (:func:`~.study.worker_scratch`), and removes only that one when a loss's study is done (a
  worker that finishes first leaves the others' trials alone); the scratch folders of dead
  workers (a SIGKILLed one) are removed by the next worker. The final stage holds the output
  folder's lock (:func:`~contrastive.checkpoint.folder_lock`); a worker that finds it held
  waits for it (looking every :data:`~.study.POLL_S` s, at most :data:`~.study.WAIT_S` s),
  then reuses the cells the other one trained and writes the report again, so every worker
  ends with the report of its own budget.
* Final: the best configuration of each loss is retrained on all training classes
  (``"train_classes"``) with every seed and evaluated on the test classes (``"test_classes"``;
  In-Shop: its query set against its gallery, :func:`final_splits`);
  those cells are cached like ``contrastive compare``'s (:func:`~.compare.cell_key`). The report
  (:func:`~.compare_report.write_tuned_report`) gives mean and 95% t-interval per metric, the
  chosen hyper-parameters and the losses indistinguishable from the best
  (:mod:`.statistics`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint as ckpt
from ..errors import UserError
from ..jsonsafe import to_jsonable
from ..splits import fold_split_name
from .compare import (
    DEFAULT_LOSSES,
    CompareConfig,
    cached_cell,
    cell_name,
    loss_defaults,
    preflight,
    train_config_for,
)
from .config import Bool, ConfigError, IntList, NonNegInt, PosInt, TextList, TrainConfig
from .study import (
    N_STARTUP,
    POLL_S,
    SAMPLING,
    WAIT_S,
    finished_trials,
    open_study,
    run_trials,
    worker_scratch,
)

__all__ = ["TuneConfig", "LR_SPACE", "search_space", "study_name", "storage_url",
           "trial_config", "tune_loss", "tune", "reference_rows", "class_disjoint_batch"]

#: The learning-rate dimension every loss is searched over (AdamW, log-uniform).
LR_SPACE: dict[str, Any] = {"low": 1e-5, "high": 1e-2, "log": True}
#: Splits of the final retraining and evaluation (:func:`final_splits`).
FINAL_SPLITS = {"train_split": "train_classes", "eval_split": "test_classes"}


def final_splits(dataset: str) -> dict[str, str]:
    """The final retraining's and evaluation's splits: :data:`FINAL_SPLITS`, except for a
    data set whose test side is its own protocol and has no ``"test_classes"`` (In-Shop: its
    query set against its gallery, classes disjoint from the training ones by construction),
    which is evaluated on its ``"test"`` (:func:`~.protocol.eval_sets`)."""
    from ..datasets import DATASETS

    if dataset in DATASETS:
        split = DATASETS.get(dataset).meta.get("class_split")
        if isinstance(split, dict) and "test" in split and split["test"] is None:
            return {"train_split": "train_classes", "eval_split": "test"}
    return dict(FINAL_SPLITS)


@dataclass
class TuneConfig:
    """What ``contrastive compare --tune`` runs. ``steps``, ``batch_size``, ``m_per_class`` are
    the budget of every trial and of every final cell; ``trials`` per loss, ``folds`` of the
    training classes (seeded by ``fold_seed``), ``tune_seed`` seeds the sampler and the trials'
    training; ``seeds`` are the final retraining seeds. ``search_spaces`` maps a loss to a space
    that replaces its registered one (needed for ``pml:`` losses); ``loss_kwargs`` fixes keywords
    that are not searched; ``train`` holds further :class:`TrainConfig` fields for every run."""

    __pydantic_config__ = TrainConfig.__pydantic_config__

    dataset: str = "latent_classes"
    data_dir: str | None = None
    losses: TextList = DEFAULT_LOSSES
    backbone: str = "mlp"
    steps: PosInt = 400
    seeds: IntList = (0, 1, 2)
    batch_size: PosInt = 64
    m_per_class: PosInt = 4
    trials: PosInt = 10
    folds: PosInt = 2
    fold_seed: NonNegInt = 0
    tune_seed: NonNegInt = 0
    storage: str | None = None
    search_spaces: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str = "runs/compare-tuned"
    train: dict[str, Any] = field(default_factory=dict)
    progress: Bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> TuneConfig:
        """Build from a mapping, checked against the field types; a data set with few classes
        (digits) brings its own batch composition (``class_disjoint_batch`` in
        :data:`contrastive.datasets.DATASETS`) for the keys the mapping does not set."""
        from .config import validate_fields

        data = dict(data)
        for key, value in class_disjoint_batch(data.get("dataset", cls.dataset)).items():
            data.setdefault(key, value)
        cfg = validate_fields(cls, data, source=source)
        if not cfg.losses:
            raise UserError("config field 'losses': got an empty list, expected loss names")
        if not cfg.seeds:
            raise UserError("config field 'seeds': got an empty list, expected seeds")
        if cfg.folds < 2:
            raise ConfigError("folds", cfg.folds, "an int >= 2", source=source)
        for key in ("output", "resume", "overwrite", "progress", "loss", "seed", "lr",
                    "train_split", "eval_split", "m_per_class", "batch_size", "steps"):
            if key in cfg.train:
                raise ConfigError(f"train.{key}", cfg.train[key],
                                  "no value: --tune sets it (lr is searched; use the top-level "
                                  "fields for the rest)", source=source)
        for what in ("search_spaces", "loss_kwargs"):
            for name in getattr(cfg, what):
                if name not in cfg.losses:
                    raise ConfigError(f"{what}.{name}", getattr(cfg, what)[name],
                                      f"a loss of losses ({', '.join(cfg.losses)})",
                                      source=source)
        return cfg

    def validated(self) -> TuneConfig:
        return self.from_dict(dict(self.__dict__))


def class_disjoint_batch(dataset: Any) -> dict[str, int]:
    """The ``batch_size`` / ``m_per_class`` a class-disjoint run on ``dataset`` starts from
    (registry meta ``class_disjoint_batch``; empty when the data set has none or is unknown:
    the config's defaults apply and an unknown name fails in its own check)."""
    from ..datasets import DATASETS

    if not isinstance(dataset, str) or dataset not in DATASETS:
        return {}
    return dict(DATASETS.get(dataset).meta.get("class_disjoint_batch") or {})


# ------------------------------------------------------------------------------ the search


def search_space(loss: str, override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The space searched for ``loss``: ``override`` or the registered ``search_space`` of the
    loss, plus ``"lr"`` (:data:`LR_SPACE`). A ``pml:`` loss without ``override`` has only the
    learning rate. A dimension is ``{"choices": [...]}`` (values ``None``, bool, int, float or
    str, sampled as given) or a range ``{"low", "high"}`` with optional ``"log"`` (log-uniform;
    ``low > 0``) and ``"int"`` (integers, ``suggest_int``; integral bounds); anything else --
    an unknown key, ``low > high``, no choices -- is a :class:`ConfigError` naming the key."""
    from losses.registry import LOSSES

    if override is not None:
        space = dict(override)
    elif loss.startswith("pml:") or loss not in LOSSES:
        space = {}
    else:
        space = dict(LOSSES.get(loss).meta.get("search_space") or {})
    for name, spec in space.items():
        _check_dimension(f"search_spaces.{loss}.{name}", spec)
    if "lr" in space:
        raise ConfigError(f"search_spaces.{loss}.lr", space["lr"],
                          "no 'lr': the learning rate is searched for every loss alike")
    space["lr"] = dict(LR_SPACE)
    return space


_FORMS = "{low, high[, log][, int]} or {choices: [...]}"
_CHOICE_TYPES = (type(None), bool, int, float, str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check_dimension(key: str, spec: Any) -> None:
    """Refuse a dimension Optuna cannot sample as written (:func:`search_space`)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(key, spec, _FORMS)
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        choices = spec["choices"]
        if extra:
            raise ConfigError(f"{key}.{extra[0]}", spec[extra[0]],
                              f"no other key next to 'choices' ({_FORMS})")
        if isinstance(choices, (str, bytes, Mapping)) or not isinstance(choices, (list, tuple)) \
                or not choices:
            raise ConfigError(f"{key}.choices", choices, "a non-empty list of values")
        bad = [c for c in choices if not isinstance(c, _CHOICE_TYPES)]
        if bad:
            raise ConfigError(f"{key}.choices", choices,
                              "choices that are None, booleans, numbers or strings (got "
                              f"{type(bad[0]).__name__} {bad[0]!r})")
        return
    extra = sorted(set(spec) - {"low", "high", "log", "int"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}", spec[extra[0]], f"no such key ({_FORMS})")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(key, spec, _FORMS)
    low, high = spec["low"], spec["high"]
    for which, v in (("low", low), ("high", high)):
        if not _is_number(v) or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}.{which}", v, "a finite number")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise ConfigError(f"{key}.{flag}", spec[flag], "true or false")
    if low > high:
        raise ConfigError(f"{key}.low", low, f"low <= high ({high!r})")
    if spec.get("log", False) and low <= 0:
        raise ConfigError(f"{key}.low", low, "low > 0 on a log scale (log: true)")
    if spec.get("int", False) and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(key, spec, "integral low and high for an int range (int: true)")


def suggest(trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One point of ``space`` from an Optuna trial (``suggest_categorical``, ``suggest_int``
    for ``int: true``, ``suggest_float``; in the space's order)."""
    out = {}
    for name, spec in space.items():
        if "choices" in spec:
            out[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif spec.get("int", False):
            out[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                          log=bool(spec.get("log", False)))
        else:
            out[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                            log=bool(spec.get("log", False)))
    return out


def _first_point(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A fixed point of ``space`` (first choice, lower bound): the preflight's, and the one the
    study's identity is computed at (:func:`_settings`)."""
    return {n: (s["choices"][0] if "choices" in s else
                int(s["low"]) if s.get("int", False) else s["low"]) for n, s in space.items()}


def _settings(cfg: TuneConfig, loss: str) -> dict[str, Any]:
    """Everything that decides a trial's value (the study's identity): the space, the
    sampler's seed and start-up, and each fold's resolved run config
    (:func:`~.compare.resolved_cell_config` of :func:`trial_config` at one fixed point of the
    space, as a cell's key: the data set, a ``data_dir`` as its absolute folder with a
    fingerprint of its data, the loss's keywords completed with their defaults, every training
    field, the automatic device where it is a GPU, the library version). Not the number of
    trials, the final seeds, the output folder or the storage."""
    from .compare import resolved_cell_config

    space = search_space(loss, cfg.search_spaces.get(loss))
    point = _first_point(space)
    folds = [resolved_cell_config(trial_config(cfg, loss, point, k, "-"))
             for k in range(cfg.folds)]
    return {"loss": loss, "space": space, "tune_seed": cfg.tune_seed, "n_startup": N_STARTUP,
            "sampling": SAMPLING, "folds": folds}


def study_name(cfg: TuneConfig, loss: str) -> str:
    """``<loss>-<12 hex digits of the settings' SHA-256>``."""
    text = json.dumps(_settings(cfg, loss), sort_keys=True, default=repr)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{cell_name(loss, 0).rsplit('__', 1)[0]}-{digest}"


def storage_url(cfg: TuneConfig) -> str:
    """``cfg.storage`` or ``sqlite:///<output>/tuning.db``."""
    if cfg.storage:
        return cfg.storage
    path = Path(cfg.output).resolve() / "tuning.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def trial_config(cfg: TuneConfig, loss: str, params: Mapping[str, Any], fold: int,
                 output: str) -> TrainConfig:
    """The :class:`TrainConfig` of one fold of one trial: ``params`` (``lr`` and the loss's
    keywords) over the loss's defaults and ``cfg.loss_kwargs``; trains on the fold's training
    classes and evaluates retrieval on its validation classes, no probe, no checkpoints."""
    params = dict(params)
    kwargs = loss_defaults(loss)
    kwargs.update(cfg.loss_kwargs.get(loss, {}))
    kwargs.update({k: v for k, v in params.items() if k != "lr"})
    base = {"dataset": cfg.dataset, "data_dir": cfg.data_dir, "backbone": cfg.backbone,
            "loss": loss, "loss_kwargs": kwargs, "steps": cfg.steps,
            "batch_size": cfg.batch_size, "m_per_class": cfg.m_per_class,
            "lr": params.get("lr", LR_SPACE["low"]), "seed": cfg.tune_seed,
            "train_split": fold_split_name(fold, cfg.folds, "train", cfg.fold_seed),
            "eval_split": fold_split_name(fold, cfg.folds, "val", cfg.fold_seed),
            "final_probe": False, "eval_every": 0, "checkpoint_every": 0,
            "log_every": max(cfg.steps // 10, 1), "progress": False, "output": output}
    base.update(cfg.train)
    return TrainConfig.from_dict(base)


def _objective(cfg: TuneConfig, loss: str, space: Mapping[str, Any], scratch: Path):
    """The trial's value: mean validation MAP@R over the folds, each trained in a temporary
    folder under this worker's ``scratch`` folder (:func:`~.study.worker_scratch`)."""
    from .train import DivergedError, fit

    def objective(trial) -> float:
        params = suggest(trial, space)
        scores = []
        for k in range(cfg.folds):
            scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=scratch) as tmp:
                try:
                    res = fit(trial_config(cfg, loss, params, k, tmp))
                    value = float(res["metrics"]["map_at_r"])
                except DivergedError as exc:
                    trial.set_user_attr("diverged", str(exc).splitlines()[0])
                    value = 0.0
            scores.append(value if value == value else 0.0)  # NaN scores as 0
        trial.set_user_attr("fold_map_at_r", scores)
        return sum(scores) / len(scores)

    return objective


def tune_loss(cfg: TuneConfig, loss: str, log: Callable[[str], None] | None = None
              ) -> dict[str, Any]:
    """Run (or resume) the study of ``loss`` up to ``cfg.trials`` completed trials (waiting for
    other workers' running trials when they hold the rest of the budget: the best is picked
    from exactly ``cfg.trials`` trials, :func:`~.study.run_trials`); returns
    ``{"loss", "study", "storage", "space", "n_trials", "ran_now", "best_params", "best_value",
    "history": [{"number", "value", "params"}]}`` (history over the completed trials, by
    number)."""
    storage = storage_url(cfg)
    name = study_name(cfg, loss)
    study = open_study(storage, name, cfg.tune_seed)
    space = search_space(loss, cfg.search_spaces.get(loss))

    def said(trial, value):
        if log is not None:
            n = len(finished_trials(study))
            best = study.best_value
            log(f"tune {loss}: trial {trial.number} val MAP@R {value:.4f} (best {best:.4f}, "
                f"{n}/{cfg.trials} done)")

    with worker_scratch(Path(cfg.output) / "tuning" / "scratch") as scratch:
        ran = run_trials(study, cfg.trials, _objective(cfg, loss, space, scratch), said,
                         log=None if log is None else (lambda text: log(f"tune {loss}: {text}")))
    trials = finished_trials(study)[: cfg.trials]
    if len(trials) < cfg.trials:  # run_trials returns with the whole budget complete
        raise RuntimeError(f"tune {loss}: {len(trials)} of {cfg.trials} trials complete in "
                           f"study {name!r}; the best is picked from the whole budget only")
    best = max(trials, key=lambda t: (t.value, -t.number))
    return {"loss": loss, "study": name, "storage": _public_url(storage), "space": space,
            "n_trials": len(trials), "ran_now": ran, "best_params": dict(best.params),
            "best_value": float(best.value), "best_trial": best.number,
            "history": [{"number": t.number, "value": float(t.value), "params": dict(t.params),
                         "fold_map_at_r": t.user_attrs.get("fold_map_at_r"),
                         "diverged": t.user_attrs.get("diverged")} for t in trials]}


def _public_url(url: str) -> str:
    """The storage URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


# ------------------------------------------------------------------------------ the whole run


def final_compare_config(cfg: TuneConfig, best: Mapping[str, Mapping[str, Any]] | None = None
                         ) -> CompareConfig:
    """The :class:`CompareConfig` of the final cells: every loss with its best keywords
    (``best[loss]``, ``lr`` left out: see :func:`final_train_config`), on the training classes,
    evaluated on the test classes."""
    kwargs = {}
    for loss in cfg.losses:
        kw = dict(cfg.loss_kwargs.get(loss, {}))
        kw.update({k: v for k, v in (best or {}).get(loss, {}).items() if k != "lr"})
        if kw:
            kwargs[loss] = kw
    return CompareConfig.from_dict({
        "dataset": cfg.dataset, "data_dir": cfg.data_dir, "losses": cfg.losses,
        "loss_kwargs": kwargs, "backbone": cfg.backbone, "steps": cfg.steps,
        "seeds": cfg.seeds, "batch_size": cfg.batch_size, "output": cfg.output,
        "train": {**cfg.train, **final_splits(cfg.dataset), "m_per_class": cfg.m_per_class},
        "progress": False})


def final_train_config(ccfg: CompareConfig, loss: str, seed: int, lr: float | None
                       ) -> TrainConfig:
    """One final cell: :func:`~.compare.train_config_for` with the tuned learning rate."""
    return train_config_for(ccfg, loss, seed, train_overrides=None if lr is None else {"lr": lr})


def _preflight(cfg: TuneConfig) -> None:
    """Every check that is the same for all runs, before anything trains: the fold and final
    splits, the batch composition on them, each loss with its default keywords and with one
    point of its search space."""
    for k in range(cfg.folds):
        fold = CompareConfig.from_dict({
            "dataset": cfg.dataset, "data_dir": cfg.data_dir, "losses": cfg.losses,
            "backbone": cfg.backbone, "steps": cfg.steps, "seeds": [cfg.tune_seed],
            "batch_size": cfg.batch_size, "output": cfg.output, "progress": False,
            "train": {**cfg.train, "m_per_class": cfg.m_per_class,
                      "train_split": fold_split_name(k, cfg.folds, "train", cfg.fold_seed),
                      "eval_split": fold_split_name(k, cfg.folds, "val", cfg.fold_seed)}})
        preflight(fold)
    preflight(final_compare_config(cfg))
    for loss in cfg.losses:
        space = search_space(loss, cfg.search_spaces.get(loss))
        trial_config(cfg, loss, _first_point(space), 0,
                     str(Path(cfg.output) / "tuning" / "check"))


@contextlib.contextmanager
def _output_lock(out: Path, log: Callable[[str], None] | None, poll_s: float = POLL_S,
                 wait_s: float = WAIT_S) -> Iterator[Path]:
    """Hold the lock of the output folder for the final stage. While another run holds it (a
    worker of the same studies in its final stage) wait, looking every ``poll_s`` seconds
    (``log`` is told once); :class:`~contrastive.checkpoint.FolderInUse` after ``wait_s``."""
    start, told = time.monotonic(), False
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(ckpt.folder_lock(out, "contrastive compare --tune"))
                break
            except ckpt.FolderInUse as exc:
                if time.monotonic() - start > wait_s:
                    raise
                if log is not None and not told:
                    held = str(exc).split(";", 1)[0]  # "output folder ... (pid, command)"
                    log(f"final cells: {held}; waiting until it is released")
                    told = True
            time.sleep(poll_s)
        yield out


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tune(cfg: TuneConfig) -> dict[str, Any]:
    """Tune every loss (resuming its study), retrain the best configurations with every seed
    on the training classes, evaluate on the test classes and write the report. Returns
    ``{"records", "rows", "tuning", "files", "table", "wall_time_s", "tune_time_s",
    "failed"}``."""
    from . import compare_report as report
    from .compare import _versions

    cfg = cfg.validated()
    _preflight(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = _say if cfg.progress else None
    tuning = {loss: tune_loss(cfg, loss, log) for loss in cfg.losses}
    tune_time = time.perf_counter() - t0
    ccfg = final_compare_config(cfg, {k: v["best_params"] for k, v in tuning.items()})
    with _output_lock(out, log):
        cells = out / "cells"
        cells.mkdir(parents=True, exist_ok=True)
        records = []
        for loss in cfg.losses:
            for seed in cfg.seeds:
                tcfg = final_train_config(ccfg, loss, seed, tuning[loss]["best_params"].get("lr"))
                records.append(cached_cell(ccfg, loss, seed, tcfg, cells, log))
        wall = time.perf_counter() - t0
        meta = {"config": to_jsonable(cfg.__dict__, nan_to_none=False), "wall_time_s": wall,
                "tune_time_s": tune_time, "versions": _versions(),
                "budget": budget_text(cfg), "references": reference_rows(cfg)}
        files = report.write_tuned_report(records, tuning, out, meta=meta,
                                          title=f"tuned compare on {cfg.dataset} "
                                                "(class-disjoint)")
    rows = report.aggregate_ci(records)
    failed = [(r["loss"], r["seed"], r.get("error", "")) for r in records
              if r.get("status") != "ok"]
    sig = {m: report.significance(records, m) for m in report.SIGNIFICANCE_METRICS}
    return {"records": records, "rows": rows, "tuning": tuning, "files": files,
            "failed": failed, "wall_time_s": wall, "tune_time_s": tune_time,
            "significance": sig,
            "table": report.format_tuned_table(rows, tuning, sig, meta["references"])}


def reference_rows(cfg: TuneConfig) -> dict[str, dict[str, float]]:
    """Retrieval metrics on the test classes of embeddings nobody trained: ``"(raw input)"``,
    the flattened input itself (the floor a trained embedding has to clear; not for data read
    from image files), and ``"(true latent)"`` where the data set knows the answer (registry
    meta ``known_answer``, e.g. ``latent_classes``' class signal: the ceiling)."""
    import torch

    from evaluation import retrieval_metrics

    from ..datasets import DATASETS, TensorDataset, get_dataset

    known = DATASETS.get(cfg.dataset).meta.get("known_answer") if cfg.dataset in DATASETS \
        else None
    out: dict[str, dict[str, float]] = {}
    for row, kw in (("(raw input)", {}), ("(true latent)", known)):
        if kw is None:
            continue
        ds = get_dataset(cfg.dataset, root=cfg.data_dir,
                         split=final_splits(cfg.dataset)["eval_split"], **kw)
        if not isinstance(ds, TensorDataset) or ds.transform is not None:
            continue
        x = ds.data.reshape(len(ds), -1).float()
        r = retrieval_metrics(x, torch.as_tensor(ds.labels), ks=(1,))
        out[row] = {k: float(r[k]) for k in ("map_at_r", "recall_at_1", "r_precision")}
    return out


def budget_text(cfg: TuneConfig) -> str:
    """The budget every loss got, in one sentence."""
    return (f"per loss: {cfg.trials} TPE trials (seed {cfg.tune_seed}, {N_STARTUP} random "
            f"first) x {cfg.folds} class-disjoint folds of the training classes, each "
            f"{cfg.steps} steps of batch {cfg.batch_size} ({cfg.batch_size // cfg.m_per_class} "
            f"classes x {cfg.m_per_class}) with {cfg.backbone}; then {len(cfg.seeds)} seeds on "
            f"all training classes, evaluated on the test classes")
