"""``python -m contrastive.reproduce NAME --output DIR`` runs one experiment;
``python -m contrastive.reproduce report --results DIR`` writes ``docs/reproduction.md``."""

from __future__ import annotations

import argparse
import json
import sys

from . import EXPERIMENTS, run


def _size(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--size takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m contrastive.reproduce", description=__doc__)
    p.add_argument("name", choices=[*EXPERIMENTS, "report"])
    p.add_argument("--output", "--results", dest="output", default="runs/reproduce")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--paper-size", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--size", type=_size, action="append", default=[],
                   help="override a size, e.g. --size couplings=4 --size lr=3e-4")
    p.add_argument("--doc", default="docs/reproduction.md", help="report: the markdown to write")
    p.add_argument("--figures", default="docs/figures", help="report: where figures are copied")
    a = p.parse_args(argv)
    if a.name == "report":
        from .report import write_report

        print(write_report(a.output, a.doc, a.figures))
        return 0
    # the settings and the data are checked before anything trains: a mistake there is the
    # user's (one error line, exit 2); a failure later is not, and keeps its traceback
    from .data import load_halves
    from .experiments import RUNNERS, make_config

    try:
        make_config(a.name, a.paper_size, a.steps, dict(a.size))
        if RUNNERS[a.name][1] and a.dataset != "digits":
            load_halves(a.dataset, a.data_dir)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    res = run(
        a.name, a.output, steps=a.steps, seeds=a.seeds, dataset=a.dataset, data_dir=a.data_dir,
        paper_size=a.paper_size, progress=not a.no_progress, device=a.device, **dict(a.size),
    )
    print(f"{a.name}: {res['wall_time_s']:.1f} s; files: {', '.join(res['files'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
