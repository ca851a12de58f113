"""``ept cost --params N [--run RUN | --free_fevals F ...] [--tokens D] [--gpu h200|h100|a100] [--mfu X]
[--price $/h] [--gpus K] [--bp_hours H] [--json]``: EP's FLOPs per token against backprop's 6·N, as
GPU-hours, days and dollars (formulas: :mod:`ept.cost`, docs/cost.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ept.cli import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    from ept.cost import DEFAULT_MFU, GPU_PEAK, NUDGE_COST

    p = sub.add_parser("cost", help="EP's training cost in FLOPs, GPU-hours and dollars, against BP's 6N",
                       description=__doc__, allow_abbrev=False)
    p.add_argument("--params", required=True, help="model parameters N: 1e9, 1B, 350M")
    p.add_argument("--run", default=None, help="an 'ept train --out' folder: F-evals from its metrics.jsonl")
    p.add_argument("--free_fevals", type=float, default=None,
                   help="free-phase F-evals per step, without the polish (required without --run)")
    p.add_argument("--polish_fevals", type=float, default=None, help="polish F-evals per step (0)")
    p.add_argument("--T2", type=float, default=None, help="nudged steps per step (0)")
    p.add_argument("--nudged_states", type=float, default=None, help="nudged states relaxed together (2)")
    p.add_argument("--asym", default=None, choices=tuple(NUDGE_COST),
                   help="the nudged field, which sets a nudged step's cost (the run's, else linear)")
    p.add_argument("--d", type=int, default=None, help="block width C (default: the ept shape holding N)")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary V")
    p.add_argument("--ctx", type=int, default=1024, help="context length T")
    p.add_argument("--ffn_mult", type=int, default=4, help="FFN width in multiples of C")
    p.add_argument("--tokens", default=None, help="training tokens D (default 20·N, Chinchilla)")
    p.add_argument("--gpu", default="h200", help=f"one of {', '.join(GPU_PEAK)} (dense BF16 peak)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation")
    p.add_argument("--price", type=float, default=None, help="$ per GPU-hour (default: a rough cloud price)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs, for the wall-clock days")
    p.add_argument("--bp_hours", type=float, default=None,
                   help="a measured BP run's GPU-hours: EP's estimate is then the factor x this too")
    p.add_argument("--json", action="store_true", help="print the result as one last JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ept.cost import GPU_PEAK, FEvals, Shape, estimate, fevals_from_run, parse_count, table, width_for

    try:
        n = parse_count(args.params)
        tokens = 20 * n if args.tokens is None else parse_count(args.tokens)
    except ValueError as e:
        raise UsageError(f"--params/--tokens: {e}") from None
    if args.gpu not in GPU_PEAK:
        raise UsageError(f"unknown --gpu {args.gpu!r}: choose one of {', '.join(GPU_PEAK)}")
    for name in ("d", "vocab", "ctx", "ffn_mult", "gpus"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    if args.run is not None:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise UsageError(f"--run {run_dir}: no such folder")
        try:
            fe = fevals_from_run(run_dir)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.free_fevals is None:
        raise UsageError("give the F-evals: --run RUN, or --free_fevals F (with --polish_fevals, --T2, "
                         "--nudged_states)")
    else:
        fe = FEvals(free=args.free_fevals)
    # Flags given beside --run override what the run measured.
    fe = FEvals(free=fe.free if args.free_fevals is None else args.free_fevals,
                polish=fe.polish if args.polish_fevals is None else args.polish_fevals,
                T2=fe.T2 if args.T2 is None else args.T2,
                nudged_states=fe.nudged_states if args.nudged_states is None else args.nudged_states,
                asym=fe.asym if args.asym is None else args.asym)
    C = args.d or width_for(n, args.vocab, args.ctx, args.ffn_mult)
    shape = Shape(C=C, V=args.vocab, T=args.ctx, m=args.ffn_mult)
    try:
        cost = estimate(n, shape, fe, tokens, gpu=args.gpu, mfu=args.mfu, price=args.price, gpus=args.gpus,
                        bp_hours=args.bp_hours)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(table(cost, fe))
    if args.json:
        print(json.dumps({**cost.to_dict(), "fevals": fe.__dict__}))
    return 0
