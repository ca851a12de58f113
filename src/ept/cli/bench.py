"""``ept bench PART``: benchmarks that print a table and a JSON last line.

    ept bench quality [--steps N] [--json]   EP, BPTT and BP at one preset, equal steps: val CE each
    ept bench [speed] [--preset P] [--json]  EP vs BPTT vs BP step time and peak memory, solver F-evals

Each part is a sub-command registered in :data:`PARTS` (name -> function adding its parser), so a
new part (e.g. ``speed``) is one more entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from ept.bench.quality import BLOCKS, quality
from ept.bench.quality import format_table as quality_table
from ept.cli import UsageError
from ept.data import DataError
from ept.presets import PRESETS
from ept.train import MODES


def _add_quality(parts: argparse._SubParsersAction) -> None:
    q = parts.add_parser("quality", help="val CE of EP, BPTT and BP at equal steps", allow_abbrev=False)
    q.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    q.add_argument("--steps", type=int, default=None, help="steps per mode (default: the preset's)")
    q.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of ep,bptt,bp")
    q.add_argument("--blocks", default="thick", help=f"comma-separated block variants: {', '.join(BLOCKS)} "
                   "(or all); more than thick also probes each trained operator")
    q.add_argument("--out", default=None, help="keep each mode's run folder under this (new) folder")
    q.add_argument("--json", action="store_true", help="print the results as one last JSON line")
    q.set_defaults(part=run_quality)


def run_quality(args: argparse.Namespace) -> int:
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UsageError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    names = args.blocks.split(",") if args.blocks != "all" else list(BLOCKS)
    blocks = tuple(b.strip() for b in names if b.strip())
    if not blocks or any(b not in BLOCKS for b in blocks):
        raise UsageError(f"--blocks {args.blocks!r}: choose from {', '.join(BLOCKS)}, or all")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise UsageError(f"--out '{out}' is not empty: choose a new folder")
    try:
        summary = quality(args.preset, args.steps, modes, out,
                          log=lambda msg: print(msg, file=sys.stderr, flush=True), blocks=blocks)
    except (DataError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(quality_table(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def _speed_args(p: argparse.ArgumentParser, top: bool = False) -> None:
    # At the top level (``ept bench [--json]``, speed by default) the defaults live on the speed part.
    p.add_argument("--preset", default=argparse.SUPPRESS if top else "tiny",
                   help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if top else False,
                   help="print the results as one last JSON line")
    if top:
        return
    p.add_argument("--repeats", type=int, default=4, help="timed steps per route, one per batch (median)")
    p.add_argument("--T1", type=int, default=150, help="BPTT's fixed unroll")
    p.add_argument("--train_steps", type=int, default=300, help="EP steps that make the trained operator")
    p.add_argument("--ckpt", default=None, help="use this checkpoint's weights as the trained operator")
    p.add_argument("--raw", action="store_true",
                   help="with --ckpt: the raw last iterate, not the parameter EMA (as in eval and generate)")
    # The earlier spelling of --raw, still accepted.
    p.add_argument("--weights", choices=("ema", "model"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the field")
    p.add_argument("--no_peer", action="store_true", help="skip the TorchDEQ column")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--starts", type=int, default=3,
                   help="start points per field of the F-eval table: z = 0, then points 1e-6 away")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an EP option over the preset's (repeatable), e.g. --set t2sel=10 --set asym=none")


def _add_speed(parts: argparse._SubParsersAction) -> None:
    sp = parts.add_parser("speed", help="EP vs BPTT vs BP step time and memory, solver F-evals",
                          allow_abbrev=False)
    _speed_args(sp)
    sp.set_defaults(part=run_speed_part)


def run_speed_part(args: argparse.Namespace) -> int:
    from ept.bench.report import format_table, json_line, run_speed
    from ept.bench.timing import SpeedConfig, parse_set

    if args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    for name in ("repeats", "T1", "train_steps", "starts"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    from ept.bench.timing import preset_setup

    if args.raw and args.weights == "ema":
        raise UsageError("--raw and --weights ema contradict each other: give one of them")
    weights = args.weights or ("model" if args.raw else "ema")
    try:
        cfg = SpeedConfig(preset=args.preset, T1=args.T1, repeats=args.repeats, train_steps=args.train_steps,
                          threads=args.threads, peer=not args.no_peer, memory=not args.no_memory,
                          starts=args.starts, ep_set=parse_set(args.set))
        preset_setup(args.preset, cfg.ep_set)  # refuse a bad --set before any work
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    try:
        s = run_speed(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True),
                      compile_field=args.compile, ckpt=args.ckpt, weights=weights)
    except (DataError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(format_table(s))
    if args.json:
        print(json.dumps(json_line(s)))
    return 0


PARTS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "quality": _add_quality,
    "speed": _add_speed,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (quality: EP vs BPTT vs BP val CE)",
                              description=__doc__, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _speed_args(p, top=True)
    parts = p.add_subparsers(dest="bench_part", metavar="PART")
    for add in PARTS.values():
        add(parts)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    part = getattr(args, "part", None)
    if part is None:  # plain ``ept bench [--json] [--preset P]`` is the speed benchmark
        speed = argparse.ArgumentParser(prog="ept bench", allow_abbrev=False)
        _speed_args(speed)
        defaults = vars(speed.parse_args([]))
        args = argparse.Namespace(**{**defaults, **{k: v for k, v in vars(args).items() if k in defaults}})
        part = run_speed_part
    return int(part(args) or 0)
