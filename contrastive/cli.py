"""The ``contrastive`` command.

    contrastive compare      train several losses under one protocol, report side by side
    contrastive train        train one embedding model
    contrastive eval         evaluate a checkpoint: retrieval, clustering, linear probe, k-NN
    contrastive mi-bench     the known-MI benchmark (Poole et al. 2019)
    contrastive reproduce    the experiments of Tschannen et al. (ICLR 2020)
    contrastive list         losses, critics, data sets, timm models

User mistakes (a wrong path, an unknown loss name, a bad value) end with one ``error:`` line and
exit status 2, without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EPILOG_COMPARE = """examples:
  contrastive compare                                   # digits, MLP, 7 losses, 3 seeds
  contrastive compare --losses infonce,triplet,pml:NTXentLoss --seeds 0,1 --steps 500
  contrastive compare --dataset cub200 --data-dir ~/data --backbone resnet18 --steps 2000
  contrastive compare --critic bilinear --output runs/bilinear
  contrastive compare --config compare.yaml             # any CompareConfig fields
"""

EPILOG_TRAIN = """examples:
  contrastive train --loss infonce --steps 1000 --output runs/nce
  contrastive train --config train.yaml --set lr=3e-4 --set loss_kwargs.temperature=0.05
  contrastive train --config train.yaml --resume        # continue from runs/.../last.pt
  torchrun --nproc_per_node 4 -m contrastive train --config sop.yaml
"""

EPILOG_EVAL = """examples:
  contrastive eval runs/nce/checkpoints/last.pt
  contrastive eval last.pt --dataset sop --data-dir ~/data/Stanford_Online_Products/..
"""

EPILOG_MI = """examples:
  contrastive mi-bench                                  # 4 estimators, separable critic
  contrastive mi-bench --critic concat --steps-per-level 2000 --output runs/mi
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


class UserError(Exception):
    """A mistake of the user's: printed as one line."""


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
    import yaml

    return yaml.safe_load(text)


def _apply_sets(data: dict, sets: list[str]) -> dict:
    """``--set a.b=value`` overrides (values parsed as YAML scalars)."""
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
    return data


# ------------------------------------------------------------------------------ commands


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare

    overrides = {
        "dataset": args.dataset, "data_dir": args.data_dir, "backbone": args.backbone,
        "critic": args.critic, "steps": args.steps, "batch_size": args.batch_size,
        "output": args.output,
        "losses": tuple(_csv_list(args.losses)) if args.losses else None,
        "seeds": tuple(_int_list(args.seeds)) if args.seeds else None,
    }
    if args.config:
        cfg = CompareConfig.from_file(args.config, **overrides)
    else:
        cfg = CompareConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.no_progress:
        cfg.progress = False
    if args.dataset not in (None, "digits") and cfg.backbone == "mlp" and args.backbone is None:
        cfg.backbone = "resnet18"
    res = compare(cfg)
    print()
    print(res["table"])
    print()
    print(f"wall time: {res['wall_time_s']:.1f} s")
    for kind, path in res["files"].items():
        print(f"{kind}: {path}")
    return 0


def _train_config(args: argparse.Namespace):
    from .config import TrainConfig, load_mapping

    data: dict[str, Any] = load_mapping(args.config) if args.config else {}
    for key in ("dataset", "data_dir", "loss", "backbone", "critic", "steps", "batch_size",
                "output", "seed", "lr", "device"):
        v = getattr(args, key, None)
        if v is not None:
            data[key] = v
    if getattr(args, "resume", False):
        data["resume"] = True
    if getattr(args, "no_progress", False):
        data["progress"] = False
    _apply_sets(data, args.set)
    return TrainConfig.from_dict(data)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import fit

    cfg = _train_config(args)
    res = fit(cfg)
    if "metrics" in res:
        _print_metrics(res["metrics"])
        print(f"result: {Path(cfg.output) / 'result.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_json, atomic_write_text
    from .datasets import get_dataset
    from .train import _eval_transform, eval_sets, evaluate_embedder, load_embedder

    path = Path(args.checkpoint)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    model = load_embedder(path)
    ds_name = args.dataset
    data_dir = args.data_dir
    if ds_name is None:
        from .checkpoint import load_checkpoint

        cfg = load_checkpoint(path).get("config", {})
        ds_name = cfg.get("dataset", "digits")
        data_dir = data_dir or cfg.get("data_dir")
    probe_ds = get_dataset(ds_name, root=data_dir, split=args.train_split)
    tf = _eval_transform(model, probe_ds)
    test, reference = eval_sets(ds_name, data_dir, args.split, tf)
    train = get_dataset(ds_name, root=data_dir, split=args.train_split, transform=tf)
    metrics = evaluate_embedder(model, test, train, reference=reference, probe=True,
                                device=args.device, progress=not args.no_progress)
    _print_metrics(metrics)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "eval.json", {"checkpoint": str(path), "dataset": ds_name,
                                              "metrics": metrics})
        keys = list(metrics)
        atomic_write_text(out / "eval.csv", ",".join(keys) + "\n"
                          + ",".join(f"{metrics[k]:.6g}" for k in keys) + "\n")
        atomic_write_text(out / "eval.md", _metrics_md(metrics))
        print(f"written: {out / 'eval.json'}, eval.csv, eval.md")
    return 0


def cmd_mi_bench(args: argparse.Namespace) -> int:
    from evaluation import mi_benchmark

    kwargs: dict[str, Any] = {"critic": args.critic, "output": args.output,
                              "progress": not args.no_progress}
    if args.estimators:
        kwargs["estimators"] = tuple(_csv_list(args.estimators))
    for key in ("dim", "batch_size", "steps_per_level", "seed", "lr"):
        v = getattr(args, key)
        if v is not None:
            kwargs[key] = v
    if args.levels:
        kwargs["levels"] = tuple(float(x) for x in _csv_list(args.levels))
    res = mi_benchmark.run(**kwargs)
    print(mi_benchmark.markdown_table(res))
    if args.output:
        print(f"written under {args.output}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from . import reproduce

    if args.name not in reproduce.EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; choose from "
                        f"{sorted(reproduce.EXPERIMENTS)}")
    kwargs: dict[str, Any] = {"dataset": args.dataset, "data_dir": args.data_dir,
                              "paper_size": args.paper_size, "progress": not args.no_progress}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.seeds:
        kwargs["seeds"] = tuple(_int_list(args.seeds))
    res = reproduce.run(args.name, args.output, **kwargs)
    print(_rows_md(res.get("summary") or []))
    print(f"written under {args.output}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    what = args.what
    if what in ("losses", "all"):
        import losses

        print("losses:   " + ", ".join(losses.available()) + ", pml:<ClassName>")
    if what in ("critics", "all"):
        from . import critics

        print("critics:  " + ", ".join(critics.available()))
    if what in ("datasets", "all"):
        from .datasets import available_datasets

        print("datasets: " + ", ".join(available_datasets()))
    if what in ("experiments", "all"):
        from . import reproduce

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


_PCT = {"precision_at_1", "r_precision", "map_at_r", "linear_probe", "knn_top1", "knn_top5",
        "nmi", "ami"}


def _print_metrics(metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
        if k.startswith("recall_at_") or k in _PCT:
            print(f"  {k:<18} {100 * v:6.2f} %")
        else:
            print(f"  {k:<18} {v:g}")


def _rows_md(rows: list[dict]) -> str:
    """A Markdown table of a list of flat dicts (numbers to 4 significant digits)."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _metrics_md(metrics: dict[str, float]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4g} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="contrastive", description=__doc__, formatter_class=fmt)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for the "
                   "small default models on a busy machine)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compare", help="compare losses side by side", epilog=EPILOG_COMPARE,
                       formatter_class=fmt,
                       description="Train several losses under one protocol (same encoder, data, "
                       "optimiser, batch and steps) and report retrieval, clustering, linear-probe "
                       "and k-NN accuracy with the MI readouts, mean +- std over seeds. Finished "
                       "(loss, seed) cells in --output are not run again.")
    c.add_argument("--dataset", help="data set name (default digits; see `contrastive list`)")
    c.add_argument("--data-dir", help="local root of the data set")
    c.add_argument("--losses", help="comma-separated loss names, ours or pml:ClassName")
    c.add_argument("--backbone", help="timm model name or 'mlp' (default mlp for digits)")
    c.add_argument("--critic", help="critic for every loss that takes one (default: per loss)")
    c.add_argument("--steps", type=int, help="training steps per cell (default 1000)")
    c.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    c.add_argument("--batch-size", type=int, help="batch size (default 64)")
    c.add_argument("--output", help="output directory (default runs/compare)")
    c.add_argument("--config", help="YAML/TOML/JSON file with CompareConfig fields")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", help="train one embedding model", epilog=EPILOG_TRAIN,
                       formatter_class=fmt,
                       description="Train an embedder with one loss (TrainConfig fields from "
                       "--config and flags; --set for any other field).")
    t.add_argument("--config", help="YAML/TOML/JSON file with TrainConfig fields")
    t.add_argument("--dataset")
    t.add_argument("--data-dir")
    t.add_argument("--loss", help="loss name or pml:ClassName")
    t.add_argument("--backbone")
    t.add_argument("--critic")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--output")
    t.add_argument("--resume", action="store_true", help="continue from <output>/checkpoints")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable; nested with dots)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint", epilog=EPILOG_EVAL,
                       formatter_class=fmt,
                       description="Retrieval (Recall@K, P@1, R-Precision, MAP@R), NMI/AMI, "
                       "linear probe and weighted k-NN of a trainer checkpoint on a data set.")
    e.add_argument("checkpoint", help="a checkpoint written by contrastive train")
    e.add_argument("--dataset", help="default: the one the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--split", default="test", help="evaluation split (default test)")
    e.add_argument("--train-split", default="train", help="split for probe/k-NN training")
    e.add_argument("--device")
    e.add_argument("--output", help="directory for eval.json/.csv/.md")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("mi-bench", help="known-MI estimator benchmark", epilog=EPILOG_MI,
                       formatter_class=fmt,
                       description="Correlated Gaussians with known MI (staircase 2..10 nats); "
                       "each estimator trains a critic and is plotted against the truth.")
    m.add_argument("--estimators", help="comma-separated: infonce,nwj,js,dv")
    m.add_argument("--critic", default="separable", help="separable, bilinear or concat")
    m.add_argument("--dim", type=int)
    m.add_argument("--batch-size", type=int)
    m.add_argument("--steps-per-level", type=int)
    m.add_argument("--levels", help="comma-separated MI levels in nats (default 2,4,6,8,10)")
    m.add_argument("--lr", type=float)
    m.add_argument("--seed", type=int)
    m.add_argument("--output", default="runs/mi-bench")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=cmd_mi_bench)

    r = sub.add_parser("reproduce", help="reproduce Tschannen et al. 2020", epilog=EPILOG_REPRO,
                       formatter_class=fmt,
                       description="Experiments of 'On Mutual Information Maximization for "
                       "Representation Learning': bijective, adversarial, critics, encoders, "
                       "noniid.")
    r.add_argument("name", help="experiment name")
    r.add_argument("--output", default="runs/reproduce")
    r.add_argument("--steps", type=int)
    r.add_argument("--seeds", help="comma-separated seeds")
    r.add_argument("--dataset", default="digits", help="digits (default) or mnist")
    r.add_argument("--data-dir")
    r.add_argument("--paper-size", action="store_true", help="the paper's sizes (slow)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    li = sub.add_parser("list", help="list losses, critics, data sets, models",
                        epilog=EPILOG_LIST, formatter_class=fmt)
    li.add_argument("what", nargs="?", default="all",
                    choices=["all", "losses", "critics", "datasets", "models", "experiments"])
    li.add_argument("--filter", help="timm model name pattern, e.g. 'vit_*'")
    li.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if args.threads is not None:
        if args.threads <= 0:
            print("error: --threads must be a positive integer", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
