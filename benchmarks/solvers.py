"""Solver sweep over trained operators: F-evaluations per sequence to a true residual, for variants of
``ept.solve``'s options, against plain iteration on the same batches.

    python benchmarks/solvers.py runs/tiny runs/t1 runs/t2            # Anderson, Broyden, momentum vs plain
    python benchmarks/solvers.py runs/* --variants '{"stall12": {"method": "anderson", "stall": 12}}'

This is how the README's "over N trained tiny operators" solver figures were taken: train operators
with ``ept train --seed S --out DIR``, then sweep. Per run, the same ``--batches`` fixed training
batches as ``ept bench speed`` (B=8 sequences of the run's context length). Only the sequences plain
iteration settles within ``--max_evals`` count (the others have no attractor within reach, see
``ept.bench.fevals.settled_rows``); a variant that misses one is charged ``--max_evals`` there.

Two ratios over all runs, each variant's total over plain iteration's:
- ``batch``: per batch, the F-evals until its slowest counted sequence is done (a batched solve's cost);
- ``row_sum``: F-evals summed per sequence (the cost with row freezing).
And the spread of the batch ratio over the runs (``per_run``: min, median, max, and how many runs are
at or under 1/3, the speed issue's target): one operator's ratio is one draw of its training's noise
(the same recipe's three seeds read 0.24 / 0.36 / 0.38 once), so a pooled total alone hides it.
Prints a table per run and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from ept.bench.fevals import ept_fevals, row_evals, variants_arg
from ept.bench.report import field_of
from ept.cli import UsageError
from ept.cli.fingerprint import load_run
from ept.data import builtin_tokens, fixed_batch

DEFAULT_VARIANTS = {"anderson": {"method": "anderson"}, "broyden": {"method": "broyden"},
                    "momentum": {"method": "momentum"}}


def row_counts(field, z0: torch.Tensor, opts: dict[str, Any], tol: float, max_evals: int) -> list[int | None]:
    """Each sequence's F-evals to ``tol`` under ``ept.solve(**opts)`` (None: not within max_evals)."""
    opts = dict(opts)
    with torch.no_grad():
        return row_evals(ept_fevals(field, z0, opts.pop("method", "anderson"), tol, max_evals, **opts))


def batch_cost(counts: dict[str, list[int | None]], max_evals: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Per variant, (F-evals until the slowest counted sequence is done, F-evals summed per sequence)
    over the sequences plain iteration settled (a miss charged ``max_evals``), and how many it did not."""
    kept = [i for i, c in enumerate(counts["plain"]) if c is not None]
    if not kept:
        return {}, len(counts["plain"])
    charged = {n: [c[i] or max_evals for i in kept] for n, c in counts.items()}
    return {n: (max(v), sum(v)) for n, v in charged.items()}, len(counts["plain"]) - len(kept)


def per_run_spread(per_run: dict[str, Any], names: list[str]) -> dict[str, dict[str, float | int]]:
    """Per variant, the spread over runs of its batch F-evals over plain iteration's (runs where plain
    iteration settled nothing are left out): min, median, max, and how many runs are at or under 1/3."""
    out: dict[str, dict[str, float | int]] = {}
    for n in names:
        r = [line["batch"][n] / line["batch"]["plain"] for line in per_run.values() if line["batch"]["plain"]]
        if r:
            out[n] = {"min": min(r), "median": statistics.median(r), "max": max(r),
                      "at_or_under_third": sum(x <= 1 / 3 for x in r), "runs": len(r)}
    return out


def sweep(runs: list[str], variants: dict[str, dict[str, Any]], batches: int, tol: float,
          max_evals: int) -> dict[str, Any]:
    names = ["plain", *variants]
    opts = {"plain": {"method": "fixed_point"}, **variants}
    total = {"batch": dict.fromkeys(names, 0), "row_sum": dict.fromkeys(names, 0)}
    per_run: dict[str, Any] = {}
    tokens: dict[int, Any] = {}
    for run in runs:
        _, model = load_run(run)
        vocab, T = model.cfg.vocab_size, model.cfg.T
        if vocab not in tokens:
            tokens[vocab] = builtin_tokens(vocab)
        line = {"batch": dict.fromkeys(names, 0), "no_attractor": 0}
        for b in range(batches):
            idx = fixed_batch(tokens[vocab].train, 8, T, seed=1234 + b)[0]
            field, z0 = field_of(model, idx)
            counts = {n: row_counts(field, z0, opts[n], tol, max_evals) for n in names}
            cost, left_out = batch_cost(counts, max_evals)
            line["no_attractor"] += left_out
            for n, (worst, row_sum) in cost.items():
                line["batch"][n] += worst
                total["batch"][n] += worst
                total["row_sum"][n] += row_sum
        per_run[run] = line
        cells = "  ".join(f"{n} {line['batch'][n]}" for n in names)
        print(f"{run:24s} {cells}  (no attractor: {line['no_attractor']})", flush=True)
    ratios = {kind: {n: (v / total[kind]["plain"] if total[kind]["plain"] else None) for n, v in t.items()}
              for kind, t in total.items()}
    return {"runs": per_run, "totals": total, "ratios": ratios, "per_run": per_run_spread(per_run, names[1:]),
            "tol": tol, "max_evals": max_evals, "batches": batches}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (or ckpt-* folders) of trained models")
    ap.add_argument("--variants", default=None,
                    help='JSON {name: {ept.solve options}}; default: {"anderson": ..., "broyden": ...}')
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max_evals", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        variants = variants_arg(args.variants, DEFAULT_VARIANTS)
    except ValueError as e:
        print(f"solvers.py: --variants is not a JSON object of option objects ({e}): "
              f"e.g. '{{\"m4\": {{\"method\": \"anderson\", \"m\": 4}}}}'", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        out = sweep(args.runs, variants, args.batches, args.tol, args.max_evals)
    except (UsageError, FileNotFoundError, TypeError, ValueError) as e:
        print(f"solvers.py: {e}", file=sys.stderr)
        return 2
    for kind, r in out["ratios"].items():
        cells = "  ".join(f"{n} {v:.3f}" for n, v in r.items() if v is not None)
        print(f"{kind:8s} over plain: {cells}")
    for n, d in out["per_run"].items():
        print(f"{n} over plain per run: min {d['min']:.3f}  median {d['median']:.3f}  max {d['max']:.3f}  "
              f"at or under 1/3: {d['at_or_under_third']} of {d['runs']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
