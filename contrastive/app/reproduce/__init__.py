"""Reproduction of Tschannen, Djolonga, Rubenstein, Gelly, Lucic, "On Mutual Information
Maximization for Representation Learning" (ICLR 2020) on 8x8 digits (default) or MNIST.

    from contrastive.app.reproduce import run, EXPERIMENTS
    result = run("bijective", "runs/reproduce")          # writes bijective.{json,csv,png} ...
    run("critics", "runs/mnist", dataset="mnist", data_dir="~/data", paper_size=True)

Each experiment writes ``NAME.json`` (everything), ``NAME.csv`` (mean and std over seeds of the
final metrics), ``NAME_runs.csv`` (one row per seed and variant), ``NAME_curves.csv`` (every
evaluation during training) and ``NAME.png`` (the figure) into ``output``;
:func:`~contrastive.app.reproduce.paper_report.write_report` turns them into
``docs/reproduction.md``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ...checkpoint import atomic_write_bytes, fsync_directory
from ...devices import resolve_device
from ...jsonsafe import to_jsonable
from .data import load_halves
from .experiments import DEFAULTS, EXPERIMENTS, PAPER, make_config, run_experiment

__all__ = ["run", "EXPERIMENTS", "DEFAULTS", "PAPER"]


def _csv_bytes(rows: list[dict]) -> bytes:
    """``rows`` as CSV (the union of their keys as the header, ``None`` as an empty cell)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    return fh.getvalue().encode("utf-8")


def _write_set(out: Path, contents: dict[Path, bytes]) -> None:
    """Put every file of ``contents`` (paths in ``out``) in place, or, when anything fails
    first, none: each file is written and fsync-ed (:func:`contrastive.checkpoint.
    atomic_write_bytes`) into a hidden staging folder in ``out``, and only when all of them are
    there are they renamed onto their targets, in the order given (the JSON last: it is what
    the report reads). A failure while staging (disk full, an I/O error) leaves the previous
    set untouched; a kill while staging leaves it too, beside a hidden ``.reproduce-*.tmp``
    folder; only a kill during the renames themselves can leave a mix. The renames are made durable
    with one fsync of ``out``."""
    stage = Path(tempfile.mkdtemp(prefix=".reproduce-", suffix=".tmp", dir=out))
    try:
        staged = [(atomic_write_bytes(stage / target.name, data), target)
                  for target, data in contents.items()]
        for src, target in staged:
            os.replace(src, target)
        fsync_directory(out)  # the renames, durable
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def run(
    name: str,
    output: str | Path,
    *,
    steps: int | None = None,
    seeds: Iterable[int] = (0, 1, 2),
    dataset: str = "digits",
    data_dir: str | Path | None = None,
    paper_size: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    **sizes: Any,
) -> dict:
    """Run experiment ``name`` (a key of :data:`EXPERIMENTS`) and write its files to ``output``.

    Args:
        name: ``bijective``, ``adversarial``, ``critics``, ``encoders`` or ``noniid``.
        output: folder for ``NAME.json``, ``NAME.csv``, ``NAME_runs.csv``, ``NAME_curves.csv``,
            ``NAME.png`` (created if missing); they replace a previous run's as one set, after
            all of them are rendered and staged (a failure leaves the previous set).
        steps: training steps per run (encoder steps for ``adversarial``); ``None`` keeps the
            default (or the paper's with ``paper_size``). Evaluations are spread evenly.
        seeds: one run per seed and variant; tables give mean and std over seeds.
        dataset: ``"digits"`` (scikit-learn 8x8, bundled) or ``"mnist"`` (needs ``data_dir``
            holding ``MNIST/raw`` as torchvision stores it; nothing is downloaded). Ignored by
            ``noniid``.
        paper_size: the official protocol's sizes (docs/architecture.md, The paper's protocol)
            instead of the CPU defaults.
        progress: tqdm progress bars.
        device: torch device; ``None`` picks CUDA when available.
        **sizes: overrides of the experiment's configuration fields (see
            :data:`DEFAULTS` ``[name]``), e.g. ``couplings=4, hidden=32, n_train=200``.

    Returns:
        the result dict also saved as ``NAME.json``: ``experiment``, ``config``, ``seeds``,
        ``baseline``, ``runs`` (final metrics per seed and variant), ``summary`` (mean/std),
        ``curves``, ``wall_time_s``, ``files``.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds is empty; pass at least one seed, e.g. seeds=(0,)")
    cfg = make_config(name, bool(paper_size), steps, sizes)
    dev = resolve_device(device)
    needs_data = EXPERIMENTS.meta(name)["needs_data"]
    data = None
    if needs_data:
        data = load_halves(dataset, data_dir).subset(cfg.n_train, cfg.n_test).to(dev)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    res = run_experiment(name, data, cfg, seeds, dev, progress)
    res.update(
        experiment=name,
        description=EXPERIMENTS.meta(name)["description"],
        dataset=dataset if needs_data else "gaussian-2d",
        data_shape={"half": list(data.half_shape), "n_train": int(data.x_train.shape[0]),
                    "n_test": int(data.x_test.shape[0])} if data is not None else None,
        paper_size=bool(paper_size),
        seeds=list(seeds),
        device=str(dev),
        started=started,
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out / f"{name}.json",
        "summary_csv": out / f"{name}.csv",
        "runs_csv": out / f"{name}_runs.csv",
        "curves_csv": out / f"{name}_curves.csv",
        "figure": out / f"{name}.png",
    }
    res["files"] = {k: str(v) for k, v in files.items()}
    res = to_jsonable(res)  # NaN / Inf -> None: strict JSON, empty CSV cells
    from .plots import figure_png

    # everything is rendered before anything is written: a failure leaves the previous run's
    # files as they were, never a mix of two runs
    contents = {
        files["summary_csv"]: _csv_bytes(res["summary"]),
        files["runs_csv"]: _csv_bytes(res["runs"]),
        files["curves_csv"]: _csv_bytes(res["curves"]),
        files["figure"]: figure_png(name, res),
        files["json"]: json.dumps(res, indent=1).encode("utf-8"),
    }
    _write_set(out, contents)
    return res
