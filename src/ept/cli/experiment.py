"""``ept experiment NAME [--out DIR] [--seeds 0,1,2] [--steps N] [--quick] [--runs RUN...] [--json]``:
one of the physics brief's questions, answered with DIR/NAME.json, DIR/NAME.png and DIR/NAME.md."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ept.cli import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    from ept.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="a physics question: train, measure, table + plot + record",
                       description=__doc__, allow_abbrev=False)
    p.add_argument("name", metavar="NAME", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.json, NAME.png, NAME.md")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--quick", action="store_true", help="tiny shapes and a few steps (a test, not a result)")
    p.add_argument("--runs", nargs="*", default=[], help="trained run folders to reuse")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--render", action="store_true",
                   help="redraw DIR/NAME.png and DIR/NAME.md from DIR/NAME.json, training nothing")
    p.add_argument("--json", action="store_true", help="print the record as one last JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ept.experiments import EXPERIMENTS, ExperimentConfig, ExperimentError, render, write_outputs

    if args.name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {args.name!r}: choose one of {', '.join(EXPERIMENTS)}")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r} is not a comma-separated list of integers") from None
    if not seeds or (args.steps is not None and args.steps <= 0):
        raise UsageError("--seeds needs at least one seed and --steps must be positive")
    for r in args.runs:
        if not (Path(r) / "config.json").is_file():
            raise UsageError(f"--runs {r}: holds no ept run (no config.json): give an 'ept train --out' "
                             "folder")
    exp = EXPERIMENTS[args.name]
    if args.render:
        return _render(exp, Path(args.out), args.json, render)
    cfg = ExperimentConfig(out=Path(args.out), seeds=seeds, steps=args.steps, quick=args.quick,
                           runs=tuple(Path(r) for r in args.runs), threads=args.threads,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.time()
    try:
        rows = exp.run(cfg)
    except (ExperimentError, ValueError) as e:
        raise UsageError(str(e).splitlines()[0]) from None
    command = "ept experiment " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 \
        else f"ept experiment {args.name}"
    record = write_outputs(exp, cfg, rows, time.time() - t0, command)
    print((cfg.out / f"{exp.name}.md").read_text())
    if args.json:
        print(json.dumps(record))
    return 0


def _render(exp: Any, out: Path, as_json: bool, render: Callable[..., None]) -> int:
    """Redraw NAME.png and NAME.md from NAME.json."""
    path = out / f"{exp.name}.json"
    try:
        record = json.loads(path.read_text())
        if record.get("experiment") != exp.name or not isinstance(record.get("rows"), list):
            raise ValueError
    except FileNotFoundError:
        raise UsageError(f"--render: no {path}: run 'ept experiment {exp.name} --out {out}' first") from None
    except ValueError:
        raise UsageError(f"--render: {path} is not a record of the {exp.name} experiment") from None
    render(exp, record, out)
    print((out / f"{exp.name}.md").read_text())
    if as_json:
        print(json.dumps(record))
    return 0
