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
import json
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ...devices import resolve_device
from ...jsonsafe import to_jsonable
from .data import load_halves
from .experiments import DEFAULTS, EXPERIMENTS, PAPER, make_config, run_experiment

__all__ = ["run", "EXPERIMENTS", "DEFAULTS", "PAPER"]


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})


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
            ``NAME.png`` (created if missing).
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
    _write_csv(files["summary_csv"], res["summary"])
    _write_csv(files["runs_csv"], res["runs"])
    _write_csv(files["curves_csv"], res["curves"])
    from .plots import plot

    plot(name, res, files["figure"])
    with open(files["json"], "w") as fh:
        json.dump(res, fh, indent=1)
    return res
