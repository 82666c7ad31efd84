"""The ``contrastive`` command.

    contrastive compare      train several losses under one protocol, report side by side
    contrastive train        train one embedding model
    contrastive eval         evaluate a checkpoint: retrieval, clustering, linear probe, k-NN
    contrastive mi-bench     the known-MI benchmark (Poole et al. 2019)
    contrastive reproduce    the experiments of Tschannen et al. (ICLR 2020)
    contrastive list         losses, critics, data sets, timm models

Exit status: 0 done; 2 a mistake in what was asked (a config value, a name, a path, a folder in
use or holding another run, a diverging setting): one ``error:`` line, no traceback (``--debug``
shows it); 3 the command ran but a result failed (a ``compare`` cell, a diverging ``mi-bench``
estimator), said on stderr and marked in the report; 130 interrupted (``train`` and ``compare``
write a checkpoint first and say how to continue); 1 an internal error, with its traceback.
(``mi-bench --family`` reports a diverging estimator on stderr and leaves it out of its
statistics, exit 0: divergence is one of the results it compares.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from .errors import UserError, as_user_error

EPILOG_COMPARE = """examples:
  contrastive compare                                   # digits, MLP, 7 losses, 3 seeds
  contrastive compare --losses infonce,triplet,pml:NTXentLoss --seeds 0,1 --steps 500
  contrastive compare --dataset cub200 --data-dir ~/data --backbone resnet18 --steps 2000
  contrastive compare --critic bilinear --output runs/bilinear
  contrastive compare --config examples/configs/compare.yaml --set train.lr=3e-4
  contrastive compare --protocol class-disjoint          # untuned, unseen test classes (digits)
  contrastive compare --tune                            # latent_classes by class, tuned, 95% CIs
  contrastive compare --tune --trials 20 --storage postgresql://user@host/db   # shared study
"""

#: ``--no-verify-md5``: the data-set option behind ``cifar10(verify_md5=None)``
NO_MD5_HELP = ("read a re-packed CIFAR-10 (the python batches with other MD5 sums) without "
               "torchvision's MD5 check, before or after the command (sets "
               "CONTRASTIVE_VERIFY_MD5=0 for this command; from Python: "
               "get_dataset('cifar10', root, verify_md5=False))")

EPILOG_TRAIN = """examples:
  contrastive train --loss infonce --steps 1000 --output runs/nce
  contrastive train --dataset cifar10 --data-dir ~/data --no-verify-md5   # re-packed CIFAR-10
  contrastive train --config examples/configs/train.yaml --set lr=3e-4
  contrastive train --config examples/configs/train.yaml --set lr=3e-4 --resume   # continue it
  contrastive train --config examples/configs/train.yaml --overwrite  # start the run over
  torchrun --nproc_per_node 4 -m contrastive train --config sop.yaml
"""

EPILOG_EVAL = """examples:
  contrastive eval runs/nce/checkpoints/last.pt
  contrastive eval runs/nce/checkpoints/last.pt --output runs/nce/eval
  contrastive eval runs/sop/checkpoints/last.pt --dataset sop --data-dir ~/data
"""

EPILOG_MI = """examples:
  contrastive mi-bench                                  # 4 estimators, separable critic
  contrastive mi-bench --critic concat --steps-per-level 2000 --output runs/mi
  contrastive mi-bench --family --output runs/mi-family   # every estimator, critic, data set
  contrastive mi-bench --quick                            # the same in under 3 minutes
"""

EPILOG_REPRO = """examples:
  contrastive reproduce bijective --output runs/repro
  contrastive reproduce noniid --seeds 0,1,2
  contrastive reproduce critics --dataset mnist --data-dir ~/data --paper-size
"""

EPILOG_LIST = """examples:
  contrastive list losses
  contrastive list models --filter 'resnet*'
"""


THREADS_HELP = ("CPU threads for torch, before or after the command (default: the usable cores "
                "less one, so that another busy process does not stall training: on a busy "
                "2-core machine 200 default steps took 42 s with 2 threads and 3.6 s with 1; "
                "OMP_NUM_THREADS, when set, is left alone)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str | None) -> list[int] | None:
    items = _csv_list(text)
    if items is None:
        return None
    try:
        return [int(t) for t in items]
    except ValueError as exc:
        raise UserError(f"expected comma-separated integers, got {text!r}") from exc


def _parse_value(text: str) -> Any:
    """A ``--set`` value as YAML reads it (``0.05``, ``true``, ``[a, b]``), with YAML 1.2's
    booleans (``yes`` / ``no`` / ``on`` / ``off`` are refused by :func:`_apply_sets`, not read as
    booleans: :func:`~contrastive.app.config.yaml_load`); left as text when it is not valid YAML
    (the config check then says what was expected)."""
    import yaml

    from .app.config import yaml_load

    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def _size_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``reproduce --size``; the value is read as JSON when it parses
    (``4``, ``3e-4``, ``[1, 2]``), as text otherwise."""
    import json

    if "=" not in text:
        raise UserError(f"--size takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _check_size_types(name: str, paper_size: bool, sizes: dict[str, Any]) -> None:
    """``reproduce --size KEY=VALUE``: each value has its field's type (an integer, a number, a
    list of names or numbers; ``None`` where the field allows it), else one error that names
    the key. A number is made a float for a float field. Unknown keys are left to
    :func:`~contrastive.app.reproduce.experiments.make_config`, which names the valid ones."""
    import types
    import typing

    from .app.reproduce.experiments import DEFAULTS, PAPER

    base = (PAPER if paper_size else DEFAULTS).get(name)
    if base is None:
        return
    hints = typing.get_type_hints(type(base))

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key, value in list(sizes.items()):
        hint = hints.get(key)
        if hint is None:
            continue
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) \
            and type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        if value is None and optional:
            continue
        if hint is int:
            ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif hint is float:
            ok, wanted = number(value), "a number"
            if ok:
                sizes[key] = value = float(value)
        elif typing.get_origin(hint) is tuple:
            item = (typing.get_args(hint) or (str,))[0]
            items = value if isinstance(value, list) else [value]
            check = number if item is float else (lambda v: isinstance(v, str))
            ok = all(check(v) for v in items)
            wanted = "a number or a JSON list of numbers" if item is float else \
                "a name or a JSON list of names"
        else:
            continue
        if not ok:
            raise UserError(f"--size {key}: expected {wanted}"
                            f"{' (or null)' if optional else ''}, got {value!r}")


def _load_config(path: str | None) -> dict[str, Any]:
    from .app.config import load_mapping

    if not path:
        return {}
    try:
        return load_mapping(path)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def _source(args: argparse.Namespace) -> str | None:
    """Where config values came from, for error messages."""
    parts = ([args.config] if args.config else []) + (["--set"] if args.set else [])
    return " / ".join(parts) or None


def _given(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _apply_sets(data: dict, sets: list[str]) -> dict:
    """``--set a.b=value`` overrides (values parsed as YAML scalars; ``yes`` / ``no`` / ``on`` /
    ``off`` are a :class:`~contrastive.app.config.ConfigError`: booleans are true / false)."""
    from .app.config import refuse_yaml_bool_words

    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        target = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise UserError(f"--set {key}: {p} is not a mapping")
        target[parts[-1]] = _parse_value(value)
        refuse_yaml_bool_words(target[parts[-1]], key.strip(), source="--set")
    return data


# ------------------------------------------------------------------------------ commands


def _tune_compare(args: argparse.Namespace) -> int:
    """``compare --tune``: the tuned, class-disjoint comparison (:mod:`.app.tuning`)."""
    from .app.run_folder import TrainingInterrupted
    from .app.tuning import TuneConfig, tune

    if args.critic:
        raise UserError("--critic is not searched by --tune: each loss keeps its own critic")
    if (args.protocol or "class-disjoint") != "class-disjoint":
        raise UserError("--tune runs the class-disjoint protocol only (tuning folds and test "
                        "classes); drop --protocol iid or --tune")
    data = _load_config(args.config)
    data.update(_given(args, ("dataset", "data_dir", "backbone", "steps", "batch_size",
                              "output", "losses", "seeds", "trials", "folds", "storage")))
    if args.no_progress:
        data["progress"] = False
    _default_backbone(data, TuneConfig.dataset)
    _apply_sets(data, args.set)
    cfg = TuneConfig.from_dict(data, source=_source(args))
    if cfg.storage:
        _check_storage(cfg.storage)
    try:
        res = tune(cfg)
    except TrainingInterrupted as exc:
        print(f"interrupted by {exc.signal_name}: finished trials and cells are kept; run the "
              f"same command again to continue:\n  {_resume_hint(None)}", file=sys.stderr)
        return 130
    return _report_cells(res, f" (tuning {res['tune_time_s']:.1f} s)", "final cells failed")


def _check_storage(url: str) -> None:
    """``--storage``: a SQLAlchemy URL whose database driver is installed, checked before
    anything trains (a database that cannot be reached is found when the study opens)."""
    try:
        from sqlalchemy.engine import make_url

        make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        raise UserError(f"--storage {url!r}: its database driver is not installed "
                        f"({exc}); install it, or leave --storage out for the SQLite file "
                        "<output>/tuning.db") from exc
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's ArgumentError, NoSuchModuleError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--storage {url!r} is not a SQLAlchemy database URL one can open "
                        f"({first}); e.g. sqlite:///runs/tuning.db or "
                        "postgresql://user@host/db") from exc


def _default_backbone(data: dict[str, Any], default_dataset: str) -> None:
    """Without ``--backbone``: the MLP for vector data (digits, latent_classes), ResNet-18 for
    images."""
    from .datasets import DATASETS

    name = data.get("dataset", default_dataset)
    if "backbone" not in data and isinstance(name, str) and name in DATASETS:
        data["backbone"] = "mlp" if DATASETS.get(name).meta.get("kind") == "vector" \
            else "resnet18"


def _report_cells(res: dict[str, Any], wall_extra: str, failed_what: str) -> int:
    """Print a comparison's table, wall time and files; a failed cell is one stderr line and
    makes the exit status 3."""
    print()
    print(res["table"])
    print()
    print(f"wall time: {res['wall_time_s']:.1f} s{wall_extra}")
    for kind, path in res["files"].items():
        print(f"{kind}: {path}")
    if res["failed"]:
        for loss, seed, error in res["failed"]:
            first = error.strip().splitlines()[0] if error.strip() else "no message"
            print(f"failed: {loss} seed {seed}: {first}", file=sys.stderr)
        print(f"error: {len(res['failed'])} of {len(res['records'])} {failed_what}",
              file=sys.stderr)
        return 3
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .app.compare import CompareConfig, compare
    from .app.run_folder import TrainingInterrupted

    if args.tune:
        return _tune_compare(args)
    for flag in ("trials", "folds", "storage"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} goes with --tune")
    data = _load_config(args.config)
    data.update(_given(args, ("dataset", "data_dir", "backbone", "critic", "steps",
                              "batch_size", "output", "losses", "seeds")))
    if args.no_progress:
        data["progress"] = False
    _default_backbone(data, CompareConfig.dataset)
    if args.protocol == "class-disjoint":  # train on some classes, retrieve among the others
        from .app.tuning import class_disjoint_batch, final_splits

        dataset = data.get("dataset", CompareConfig.dataset)
        train = data.setdefault("train", {})
        # test_classes, or a data set's own class-disjoint test (In-Shop: query vs gallery)
        train.update(final_splits(dataset))
        batch = class_disjoint_batch(dataset)
        if "batch_size" in batch:
            data.setdefault("batch_size", batch["batch_size"])
        if "m_per_class" in batch:
            train.setdefault("m_per_class", batch["m_per_class"])
    _apply_sets(data, args.set)
    cfg = CompareConfig.from_dict(data, source=_source(args))
    try:
        res = compare(cfg)
    except TrainingInterrupted as exc:
        print(f"interrupted by {exc.signal_name}: the running cell wrote a checkpoint at step "
              f"{exc.step}; run the same command again to continue:\n  {_resume_hint(None)}",
              file=sys.stderr)
        return 130
    return _report_cells(res, "", f"cells failed (reasons above and in "
                                  f"{res['files']['markdown']})")


_ARGV: list[str] = []  # the command line being run (for the resume hint)


def _resume_hint(extra: str | None) -> str:
    """The command to type to continue: this one, plus ``extra`` when it is missing."""
    argv = list(_ARGV)
    if extra and extra not in argv:
        argv.append(extra)
    return shlex.join(["contrastive", *argv])


def _train_config(args: argparse.Namespace):
    from .app.config import TrainConfig

    data: dict[str, Any] = _load_config(args.config)
    data.update(_given(args, ("dataset", "data_dir", "loss", "backbone", "critic", "steps",
                              "batch_size", "output", "seed", "lr", "device")))
    if getattr(args, "resume", None) is not None:
        data["resume"] = args.resume
    if getattr(args, "overwrite", False):
        data["overwrite"] = True
    if getattr(args, "no_progress", False):
        data["progress"] = False
    _apply_sets(data, args.set)
    return TrainConfig.from_dict(data, source=_source(args))


def cmd_train(args: argparse.Namespace) -> int:
    from .app.run_folder import TrainingInterrupted
    from .app.train import fit

    cfg = _train_config(args)
    try:
        res = fit(cfg)
    except TrainingInterrupted as exc:
        print(f"interrupted by {exc.signal_name} at step {exc.step}; checkpoint written to "
              f"{exc.checkpoint}\nresume with:\n  {_resume_hint('--resume')}", file=sys.stderr)
        return 130
    if "metrics" in res:
        _print_metrics(res["metrics"])
        print(f"result: {Path(cfg.output) / 'result.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .app.factory import eval_transform, load_embedder
    from .app.protocol import eval_sets, evaluate_embedder
    from .app.results import metrics_csv, metrics_markdown
    from .checkpoint import atomic_write_json, atomic_write_text, load_checkpoint
    from .datasets import get_dataset
    from .devices import resolve_device

    if args.device is not None:
        as_user_error("eval", resolve_device, args.device, name="--device")
    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    out = Path(args.output) if args.output else None
    if out is not None and not args.overwrite:
        _check_eval_output(out, path)
    state = _read_checkpoint(path, load_checkpoint)
    model = as_user_error(f"checkpoint {path}", load_embedder, path)
    # The run's own settings are the defaults: on its data set, its splits and its seed (the
    # clustering's and the probe's), so eval reproduces the metrics the run reported.
    run = (state.get("config") if isinstance(state, dict) else None) or {}
    own_data = args.dataset is None or args.dataset == run.get("dataset")
    ds_name = args.dataset or run.get("dataset", "digits")
    # a relative data_dir of the run is relative to the folder it was started from
    data_dir = args.data_dir or (_run_relative(path, run, run.get("data_dir"))
                                 if own_data else None)
    split = args.split or (run.get("eval_split") if own_data else None) or "test"
    train_split = args.train_split or (run.get("train_split") if own_data else None) or "train"
    seed = args.seed if args.seed is not None else int(run.get("seed") or 0)
    what = f"data set {ds_name!r}"
    probe_ds = as_user_error(what, get_dataset, ds_name, root=data_dir, split=train_split)
    tf = eval_transform(model, probe_ds)
    test, reference = as_user_error(what, eval_sets, ds_name, data_dir, split, tf)
    train = as_user_error(what, get_dataset, ds_name, root=data_dir, split=train_split,
                          transform=tf)
    metrics, backend = evaluate_embedder(model, test, train, reference=reference, probe=True,
                                         return_backend=True, device=args.device, seed=seed,
                                         progress=not args.no_progress)
    _print_metrics(metrics)
    print(f"  {'k-NN search':<18} {backend}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", {"checkpoint": str(path.resolve()),
                                              "dataset": ds_name,
                                              "split": split, "train_split": train_split,
                                              "seed": seed, "metrics": metrics,
                                              "backend": backend})
        # the numbers of eval.json exactly; the table as printed (rates in %)
        atomic_write_text(out / "eval.csv", metrics_csv(metrics))
        atomic_write_text(out / "eval.md", metrics_markdown(metrics, backend))
        print(f"written: {out / 'eval.json'}, eval.csv, eval.md")
    return 0


def _read_checkpoint(path: Path, load_checkpoint: Any) -> Any:
    """The checkpoint at ``path``; a file that cannot be read as one (a text file, a truncated
    or foreign file: torch's unpickler raises what it meets, ``IndexError`` included) is the
    user's mistake, one line that names the file."""
    try:
        return load_checkpoint(path)
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(f"checkpoint {path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever torch.load raises on a foreign file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {path} cannot be read as a checkpoint written by "
                        f"contrastive train ({type(exc).__name__}: {first})") from exc


def _run_relative(checkpoint: Path, run: dict[str, Any], value: Any) -> Any:
    """A relative path ``value`` of the run's config, relative to the folder the run was
    started from: found by taking the run's relative ``output`` off the checkpoint's folder
    (``<output>/checkpoints/last.pt``), so that ``eval`` finds the run's data from any working
    directory. Unchanged when absolute, absent, or when that folder cannot be told."""
    if not value or os.path.isabs(str(value)):
        return value
    output = run.get("output")
    if not output or os.path.isabs(str(output)):
        return value
    run_dir = Path(os.path.abspath(checkpoint)).parent.parent
    parts = Path(os.path.normpath(str(output))).parts
    if ".." in parts or checkpoint.parent.name != "checkpoints" \
            or run_dir.parts[-len(parts):] != parts:
        return value
    return str(Path(*run_dir.parts[:-len(parts)]) / str(value))


def _check_eval_output(out: Path, checkpoint: Path) -> None:
    """``eval --output``: a folder that holds the evaluation of another checkpoint is not
    overwritten without ``--overwrite`` (one of the same checkpoint is replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder; pick another path")
    previous = out / "eval.json"
    if not previous.exists():
        return
    try:
        before = json.loads(previous.read_text()).get("checkpoint")
    except (ValueError, OSError, AttributeError):
        before = None
    if before is None or Path(str(before)).resolve() != checkpoint.resolve():
        raise UserError(f"--output {out} holds the evaluation of another checkpoint "
                        f"({before or 'unreadable eval.json'}); pass --overwrite to replace "
                        "it or choose another --output")


def _mi_bench_family(args: argparse.Namespace) -> int:
    """``mi-bench --family`` / ``--quick``: every estimator x critic x data set."""
    from .app import mi_family
    kwargs: dict[str, Any] = {"budget": "quick" if args.quick else "default",
                              "output": args.output, "progress": not args.no_progress,
                              "critics": tuple(_csv_list(args.critic or
                                                         "separable,bilinear,concat")),
                              "transforms": tuple(_csv_list(args.data or "gaussian,cubic"))}
    if args.estimators:
        kwargs["estimators"] = tuple(_csv_list(args.estimators))
    for key in ("dim", "batch_size", "steps_per_level", "seed", "lr"):
        v = getattr(args, key)
        if v is not None:
            kwargs[key] = v
    if args.levels:
        try:
            kwargs["levels"] = tuple(float(x) for x in _csv_list(args.levels))
        except ValueError:
            raise UserError(f"--levels expects comma-separated numbers of nats, got "
                            f"{args.levels!r}") from None
    try:  # run_family checks every run's arguments before anything trains
        res = mi_family.run_family(**kwargs)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc
    print(mi_family.family_table(res))
    print(f"{res['seconds']:.0f} s; written under {args.output}" if args.output else
          f"{res['seconds']:.0f} s")
    if res["diverged"]:  # a finding of the family benchmark (an estimator's failure mode)
        parts = ", ".join(f"{k} ({n} non-finite)" for k, n in res["diverged"].items())
        print(f"note: non-finite estimates, left out of the statistics: {parts}",
              file=sys.stderr)
    return 0


def cmd_mi_bench(args: argparse.Namespace) -> int:
    from .app import mi_benchmark

    if args.family or args.quick:
        return _mi_bench_family(args)
    kwargs: dict[str, Any] = {"critic": args.critic or "separable", "output": args.output,
                              "progress": not args.no_progress}
    if args.data:
        kwargs["transform"] = args.data
    if args.estimators:
        names = tuple(_csv_list(args.estimators))
        try:
            kwargs["estimators"] = (mi_benchmark.family_estimators(names)
                                    if any(n.lower() in mi_benchmark.NEW_ESTIMATORS
                                           for n in names) else names)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    for key in ("dim", "batch_size", "steps_per_level", "seed", "lr"):
        v = getattr(args, key)
        if v is not None:
            kwargs[key] = v
    if args.levels:
        try:
            kwargs["levels"] = tuple(float(x) for x in _csv_list(args.levels))
        except ValueError:
            raise UserError(f"--levels expects comma-separated numbers of nats, got "
                            f"{args.levels!r}") from None
    try:  # the arguments are checked before anything trains: a mistake is the user's
        mi_benchmark.check_arguments(**{k: v for k, v in kwargs.items()
                                        if k not in ("output", "progress")})
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from exc
    res = mi_benchmark.run(**kwargs)
    print(mi_benchmark.markdown_table(res))
    if args.output:
        print(f"written under {args.output}")
    diverged = res.get("diverged") or {}
    if diverged:
        steps = len(res["true_mi"])
        parts = ", ".join(f"{name} ({n} of {steps} estimates non-finite)"
                          for name, n in diverged.items())
        print(f"error: estimator diverged: {parts}; lower --lr (now {res['config']['lr']:g})",
              file=sys.stderr)
        return 3
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .app import reproduce

    if args.name == "report":
        from .app.reproduce.paper_report import write_report

        print(as_user_error("reproduce report", write_report, args.output, args.doc,
                            args.figures))
        return 0
    if args.name not in reproduce.EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; choose from "
                        f"{sorted(reproduce.EXPERIMENTS)}")
    from .devices import resolve_device

    as_user_error("reproduce", resolve_device, args.device, name="--device")
    kwargs: dict[str, Any] = {"dataset": args.dataset, "data_dir": args.data_dir,
                              "paper_size": args.paper_size, "progress": not args.no_progress,
                              "device": args.device}
    sizes = dict(_size_override(text) for text in args.size)
    _check_size_types(args.name, bool(args.paper_size), sizes)
    if "steps" in sizes:  # reproduce.run takes it as its steps argument
        if args.steps is not None:
            raise UserError(f"--steps {args.steps} and --size steps={sizes['steps']} both set "
                            "the steps; give one")
        kwargs["steps"] = sizes.pop("steps")
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.seeds:
        kwargs["seeds"] = tuple(_int_list(args.seeds))
    # the settings and the data are checked here, before anything trains: a mistake there is
    # the user's; whatever fails later is not
    from .app.reproduce.data import load_halves
    from .app.reproduce.experiments import EXPERIMENTS, make_config

    as_user_error("reproduce", make_config, args.name, bool(args.paper_size),
                  kwargs.get("steps"), sizes)
    if EXPERIMENTS.meta(args.name)["needs_data"] and args.dataset != "digits":
        as_user_error(f"data set {args.dataset!r}", load_halves, args.dataset, args.data_dir)
    res = reproduce.run(args.name, args.output, **kwargs, **sizes)
    print(_rows_md(res.get("summary") or []))
    print(f"written under {args.output}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if what in ("losses", "all"):
        import losses

        print("losses:   " + ", ".join(losses.available()) + ", pml:<ClassName>")
    if what in ("estimators", "all"):
        from losses.registry import ESTIMATORS

        print("estimators: " + ", ".join(ESTIMATORS.available()))
    if what in ("critics", "all"):
        from . import critics

        print("critics:  " + ", ".join(critics.available()))
    if what in ("datasets", "all"):
        from .datasets import available_datasets

        print("datasets: " + ", ".join(available_datasets()))
    if what in ("experiments", "all"):
        from .app import reproduce

        print("experiments: " + ", ".join(sorted(reproduce.EXPERIMENTS)))
    if what in ("models", "all"):
        import timm

        names = timm.list_models(args.filter or "*")
        if what == "all" and not args.filter:
            print(f"models:   {len(names)} timm models (contrastive list models --filter PATTERN)")
        else:
            print("\n".join(names))
    return 0


# ------------------------------------------------------------------------------ helpers


def _print_metrics(metrics: dict[str, float]) -> None:
    from .app.results import format_metric

    for k, v in metrics.items():
        print(f"  {k:<18} {format_metric(k, v)}")


def _rows_md(rows: list[dict]) -> str:
    """A Markdown table of a list of flat dicts (numbers to 4 significant digits)."""
    from .app.results import markdown_table

    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if v is None:  # e.g. the std of one seed: nothing was measured
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    return markdown_table(keys, [[cell(r.get(k, "")) for k in keys] for r in rows])


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="contrastive", description=__doc__, formatter_class=fmt)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option after the command does not reset one given before it
    common.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                        metavar="N", help=THREADS_HELP)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks of user errors too")
    common.add_argument("--no-verify-md5", action="store_true", default=argparse.SUPPRESS,
                        help=NO_MD5_HELP)
    p.add_argument("--debug", action="store_true", default=False,
                   help="show tracebacks of user errors too")
    p.add_argument("--no-verify-md5", action="store_true", default=False, help=NO_MD5_HELP)
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help=THREADS_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compare", parents=[common],
                       help="compare losses side by side", epilog=EPILOG_COMPARE,
                       formatter_class=fmt,
                       description="Train several losses under one protocol (same encoder, data, "
                       "optimiser, batch and steps) and report retrieval, clustering, linear-probe "
                       "and k-NN accuracy with the MI readouts, mean +- std over seeds. A finished "
                       "cell in --output is reused only when every setting that decides its "
                       "result is the same (cells are keyed by a hash of their resolved "
                       "config); one run at a time per --output.")
    c.add_argument("--dataset", help="data set name (default digits; with --tune "
                   "latent_classes; see `contrastive list`)")
    c.add_argument("--data-dir", help="local root of the data set")
    c.add_argument("--losses", help="comma-separated loss names, ours or pml:ClassName")
    c.add_argument("--backbone", help="timm model name or 'mlp' (default mlp for vector data "
                   "such as digits and latent_classes, resnet18 for images)")
    c.add_argument("--critic", help="critic for every loss that takes one (default: per loss)")
    c.add_argument("--steps", help="training steps per cell (default 1000)")
    c.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    c.add_argument("--batch-size", help="batch size (default 64; digits split by class: 48 of "
                   "3 classes x 16)")
    c.add_argument("--output", help="output directory (default runs/compare)")
    c.add_argument("--config", help="YAML/TOML/JSON file with CompareConfig fields")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a CompareConfig field (repeatable; nested with dots, e.g. "
                   "train.lr=3e-4 or loss_kwargs.infonce.temperature=0.05)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--protocol", choices=("iid", "class-disjoint"),
                   help="iid: the data set's train/test split (default without --tune); "
                   "class-disjoint: train on the training classes, evaluate on unseen test "
                   "classes (the only protocol of --tune)")
    c.add_argument("--tune", action="store_true",
                   help="tune each loss first (equal budget: Optuna TPE over its search space "
                   "and lr, MAP@R on class-disjoint folds of the training classes), then "
                   "retrain the best with every seed; report 95%% intervals and which losses "
                   "are indistinguishable from the best (default output runs/compare-tuned)")
    c.add_argument("--trials", help="--tune: trials per loss (default 10)")
    c.add_argument("--folds", help="--tune: class-disjoint folds of the training classes "
                   "(default 2)")
    c.add_argument("--storage", help="--tune: Optuna storage URL shared by workers (default "
                   "sqlite:///<output>/tuning.db); a killed run resumes from it")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", parents=[common],
                       help="train one embedding model", epilog=EPILOG_TRAIN,
                       formatter_class=fmt,
                       description="Train an embedder with one loss (TrainConfig fields from "
                       "--config and flags; --set for any other field).")
    t.add_argument("--config", help="YAML/TOML/JSON file with TrainConfig fields")
    t.add_argument("--dataset")
    t.add_argument("--data-dir")
    t.add_argument("--loss", help="loss name or pml:ClassName")
    t.add_argument("--backbone")
    t.add_argument("--critic")
    t.add_argument("--steps")
    t.add_argument("--batch-size")
    t.add_argument("--lr")
    t.add_argument("--seed")
    t.add_argument("--device")
    t.add_argument("--output")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="auto",
                   help="continue from <output>/checkpoints/last.pt (an error when there is "
                   "none, or when the settings differ from the checkpoint's); '--resume auto' "
                   "continues when there is a checkpoint and starts fresh otherwise")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (without it, train refuses a "
                   "folder that holds one)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable; nested with dots)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", parents=[common],
                       help="evaluate a checkpoint", epilog=EPILOG_EVAL,
                       formatter_class=fmt,
                       description="Retrieval (Recall@K, P@1, R-Precision, MAP@R), NMI/AMI, "
                       "linear probe and weighted k-NN of a trainer checkpoint on a data set.")
    e.add_argument("checkpoint", help="a checkpoint written by contrastive train")
    e.add_argument("--dataset", help="default: the one the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--split", help="evaluation split (default: the run's eval_split on its "
                   "data set, else test)")
    e.add_argument("--train-split", help="split for probe/k-NN training (default: the run's "
                   "train_split on its data set, else train)")
    e.add_argument("--seed", type=int, help="seed of the clustering and the probe (default: "
                   "the run's seed)")
    e.add_argument("--device")
    e.add_argument("--output", help="directory for eval.json/.csv/.md (one that holds the "
                   "evaluation of another checkpoint needs --overwrite)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the evaluation of another checkpoint in --output")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("mi-bench", parents=[common],
                       help="known-MI estimator benchmark", epilog=EPILOG_MI,
                       formatter_class=fmt,
                       description="Correlated Gaussians with known MI (staircase 2..10 nats); "
                       "each estimator trains a critic and is plotted against the truth.")
    m.add_argument("--estimators", help="comma-separated: infonce,nwj,js,dv, and tuba, mine_ma, "
                   "smile_1, smile_5, alpha_infonce, flo, l1out, club (the upper bounds get a "
                   "Gaussian conditional critic)")
    m.add_argument("--critic", help="separable (default), bilinear or concat; with --family "
                   "a comma-separated list (default all three)")
    m.add_argument("--data", help="gaussian (default) or cubic (y -> y^3, same MI); with "
                   "--family a comma-separated list (default both)")
    m.add_argument("--family", action="store_true",
                   help="every estimator x critic x data set, a bias/variance/MSE table and a "
                   "figure per data set (9-15 min on 2 CPU cores; docs/mi_estimators.md)")
    m.add_argument("--quick", action="store_true",
                   help="--family with small critics and 100 steps per level (under 3 min)")
    m.add_argument("--dim", type=int)
    m.add_argument("--batch-size", type=int)
    m.add_argument("--steps-per-level", type=int)
    m.add_argument("--levels", help="comma-separated MI levels in nats (default 2,4,6,8,10)")
    m.add_argument("--lr", type=float)
    m.add_argument("--seed", type=int)
    m.add_argument("--output", default="runs/mi-bench")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_mi_bench)

    r = sub.add_parser("reproduce", parents=[common],
                       help="reproduce Tschannen et al. 2020", epilog=EPILOG_REPRO,
                       formatter_class=fmt,
                       description="Experiments of 'On Mutual Information Maximization for "
                       "Representation Learning': bijective, adversarial, critics, encoders, "
                       "noniid.")
    r.add_argument("name", help="experiment name, or 'report' to write the reproduction page "
                   "from the results under --output")
    r.add_argument("--output", "--results", dest="output", default="runs/reproduce")
    r.add_argument("--steps", type=int)
    r.add_argument("--seeds", help="comma-separated seeds")
    r.add_argument("--dataset", default="digits", help="digits (default) or mnist")
    r.add_argument("--data-dir")
    r.add_argument("--paper-size", action="store_true", help="the paper's sizes (slow)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    r.add_argument("--size", action="append", default=[], metavar="KEY=VALUE",
                   help="override one size of the experiment, e.g. --size couplings=4")
    r.add_argument("--doc", default="docs/reproduction.md", help="report: the page to write")
    r.add_argument("--figures", default="docs/figures", help="report: where figures are copied")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    li = sub.add_parser("list", parents=[common],
                       help="list losses, critics, data sets, models",
                        epilog=EPILOG_LIST, formatter_class=fmt)
    li.add_argument("what", nargs="?", default="all",
                    choices=["all", "losses", "estimators", "critics", "datasets", "models",
                             "experiments"])
    li.add_argument("--filter", help="timm model name pattern, e.g. 'vit_*'")
    li.set_defaults(func=cmd_list)
    return p


def default_threads() -> int:
    """The torch thread count used unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise:
    the cores this process may use, less one (at least 1), at most torch's own default.
    Leaving a core free keeps torch's thread pool from stalling when another process holds a
    core (measured with the default 200-step digits training on a busy 2-core machine: 42 s
    with torch's 2 threads against 3.6 s with 1; 141 s against 6.4 s with another process
    spinning on a core)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())


@contextlib.contextmanager
def _md5_setting(off: bool):
    """``--no-verify-md5``: ``CONTRASTIVE_VERIFY_MD5=0`` while the command runs (the data-set
    readers read it, and processes the command starts inherit it), restored afterwards."""
    if not off:
        yield
        return
    from .datasets.torchvision_sets import VERIFY_MD5_ENV

    before = os.environ.get(VERIFY_MD5_ENV)
    os.environ[VERIFY_MD5_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VERIFY_MD5_ENV, None)
        else:
            os.environ[VERIFY_MD5_ENV] = before


def main(argv: list[str] | None = None) -> int:
    from . import check_own_packages

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        check_own_packages()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command != "list":
        _set_threads(args.threads)
    try:
        with _md5_setting(args.no_verify_md5):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if args.debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
