"""The free phase as training runs it, against other solvers to the same residual, on trained runs.

    python benchmarks/free_phase.py runs/stab6/sched05_m15_s0_n2000 RUN/ckpt-0001000
    python benchmarks/free_phase.py RUN --variants '{"m16": {"method": "anderson", "m": 16, "lam": 1e-4}}'

Per run (its evaluation weights) and per fixed training batch (``--batches`` of the run's B and T,
seeds 11, 12, …): the F-evaluations of the run's own free phase (its solver to ``--res_est`` after at
least ``--T1`` steps, then EP's Anderson polish to ``--polish_res``: ``ept.grad.ep.free_phase`` and
``polish``, exactly as a training step), and of each variant — the run's SolverConfig with the
variant's fields over it, relaxed from z = 0 straight to ``polish_res``; a variant with an ``"ep"``
object runs the run's two stages instead, with its fields over the SolverConfig and the ``ep``
object's over the EPConfig (the polish's memory is ``nudge_m``). F-evals are the batch's
(row freezing: the slowest sequence's). A count where some sequence ends above ``polish_res`` is
starred; the totals are over the batches the run's own solver settles (elsewhere EP's ``drop_res``
leaves a sequence out), a variant that misses one charged what it spent (``--max_evals``). This is
the "is it the solver or the operator" check behind the free phase's F-evals growth in
docs/experiments/stability.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import torch

from ept.bench.fevals import variants_arg
from ept.cli import UsageError
from ept.cli.fingerprint import load_run
from ept.config import EPConfig, SolverConfig
from ept.data import builtin_tokens, fixed_batch
from ept.grad.common import free_phase
from ept.grad.ep import polish

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "momentum": {"method": "momentum"},
    "anderson": {"method": "anderson"},
    "anderson_m16": {"method": "anderson", "m": 16, "lam": 1e-4},
}


def settled(res: float, target: float) -> bool:
    """Whether a worst residual met the target (float32's last digit aside)."""
    return res <= target * 1.0001


def two_stages(model: Any, x: torch.Tensor, solver: SolverConfig, ep: EPConfig) -> tuple[int, float]:
    """(F-evals, worst residual) of a training step's free phase: the solver, then EP's polish."""
    z, st = free_phase(model, x, solver)
    if ep.polish_res > 0 and not st.diverged:
        z, st, _ = polish(model, x, z, st, solver, ep)
    return st.fevals, st.residual_max


def run_batches(path: str, variants: dict[str, dict[str, Any]], batches: int, max_evals: int
                ) -> dict[str, Any]:
    cfg, model = load_run(path)
    target = cfg.ep.polish_res or cfg.solver.res_est
    data = builtin_tokens(model.cfg.vocab_size).train
    rows: list[dict[str, Any]] = []
    for b in range(batches):
        idx = fixed_batch(data, cfg.train.B, model.cfg.T, seed=11 + b)[0]
        x = model.inject(idx).detach()
        with torch.no_grad():
            row = {"run_solver": two_stages(model, x, cfg.solver, cfg.ep)}
            for name, opts in variants.items():
                opts = dict(opts)
                if "ep" in opts:
                    ep = dataclasses.replace(cfg.ep, **opts.pop("ep"))
                    row[name] = two_stages(model, x, dataclasses.replace(cfg.solver, **opts), ep)
                    continue
                over = {"T1": 0, "t1max": max_evals, "res_est": target, **opts}
                _, vst = free_phase(model, x, dataclasses.replace(cfg.solver, **over))
                row[name] = (vst.fevals, vst.residual_max)
        rows.append(row)
    done = [r for r in rows if settled(r["run_solver"][1], target)]
    totals = {k: sum(r[k][0] for r in done) for k in rows[0]}
    return {"run": path, "target": target, "batches": rows, "settled_batches": len(done), "totals": totals}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or ckpt-* folders")
    ap.add_argument("--variants", default=None, help="JSON {name: {SolverConfig fields}} (default: momentum, "
                    "anderson, anderson m16 lam 1e-4)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--max_evals", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        variants = variants_arg(args.variants, DEFAULT_VARIANTS)
    except ValueError as e:
        print(f"free_phase.py: --variants is not a JSON object of SolverConfig objects ({e}): "
              f"e.g. '{{\"m16\": {{\"method\": \"anderson\", \"m\": 16}}}}'", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = []
    for path in args.runs:
        try:
            r = run_batches(path, variants, args.batches, args.max_evals)
        except (UsageError, FileNotFoundError, TypeError, ValueError) as e:
            print(f"free_phase.py: {e}", file=sys.stderr)
            return 2
        out.append(r)
        names = list(r["totals"])
        print(f"\n{path} (to {r['target']:g}; F-evals per batch, * = some sequence ended above it)")
        heads = " | ".join(f"batch {i}" for i in range(len(r["batches"])))
        print(f"| solver | {heads} | total (settled) | vs run's |")
        print("|---|" + "---|" * (len(r["batches"]) + 2))
        base = r["totals"]["run_solver"] or 1
        for n in names:
            cells = [f"{fe}{'' if settled(res, r['target']) else '*'}"
                     for fe, res in (b[n] for b in r["batches"])]
            print(f"| {n} | " + " | ".join(cells) + f" | {r['totals'][n]} | {r['totals'][n] / base:.2f} |")
    print(json.dumps({"runs": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
