"""``ept gradcheck``: each gradient route against the implicit oracle on a small random problem."""

from __future__ import annotations

import argparse
import json

from ept.cli import UsageError
from ept.config import ATTN_MODES
from ept.gradcheck import GradcheckConfig, run_gradcheck


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gradcheck", help="cosine and relative norm of every route vs the implicit gradient")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the block's weight matrices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--c", type=float, default=1.0, help="damping leak of the block")
    p.add_argument("--attn_mode", choices=ATTN_MODES, default="thick",
                   help="the block (see ept train --help)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                   help="causal attention (--no-causal: bidirectional)")
    p.add_argument("--kappa", type=float, default=0.0, help="energy mode: the blend towards free attention")
    p.add_argument("--mono_m", type=float, default=0.5, help="mono mode: the monotonicity margin")
    p.add_argument("--emb_std", type=float, default=0.0, help="embedding std (0: the block's init_std)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = GradcheckConfig(dtype=args.dtype, scale=args.scale, seed=args.seed, c=args.c,
                          attn_mode=args.attn_mode, causal=args.causal, kappa=args.kappa,
                          mono_m=args.mono_m, emb_std=args.emb_std)
    try:
        cfg.model_config()
    except ValueError as e:
        raise UsageError(str(e)) from None
    report = run_gradcheck(cfg)
    print(f"problem: {cfg.attn_mode} block{'' if cfg.causal else ' (bidirectional)'}, C={cfg.C} H={cfg.H} "
          f"T={cfg.T} B={cfg.B} c={cfg.c} scale={cfg.scale} {cfg.dtype}")
    print(
        f"free phase: residual {report['free_residual']:.1e} in {report['free_fevals']} F-evals"
        f"{'' if report['converged'] else '  (NOT converged)'}; "
        f"non-normality ||Jv-J'v||/||Jv|| = {report['nonnormality']:.3f}"
    )
    print(f"{'route':<20} {'cos vs implicit':>16} {'1 - cos':>9} {'rel. norm':>10} {'T2':>5}")
    for name, entry in report["routes"].items():
        flag = "  DIVERGED" if entry["diverged"] else ""
        print(
            f"{name:<20} {entry['cos']:>16.10f} {1 - entry['cos']:>9.1e} {entry['relnorm']:>10.6f}"
            f" {entry.get('T2', ''):>5}{flag}"
        )
    if args.json:
        print(json.dumps(report))
    return 0
