"""What a preconditioner built from J's per-token blocks would do to the free phase's relaxation.

    python benchmarks/preconditioners.py runs/stab6/sched05_m15_every4_s2_n2000/ckpt-0000950

On one sequence's dense J = ∂F/∂z at z* (the run's evaluation weights), the linearised free phase
e ← e + a·M e (+ heavy-ball momentum) is iterated on 8 random errors until they shrink by 1e-3, for

- M = J itself (what the solvers relax today),
- M = −D⁻¹J, D the exact per-token C×C blocks (block Jacobi: the causal coupling left over is
  nilpotent, so D⁻¹J has every eigenvalue of J's blocks mapped to 1),
- M = −(I ⊗ J̄⁻¹)J, J̄ the blocks' mean over tokens (one C×C matrix a run could keep from step to
  step instead of rebuilding D per batch).

Printed per M: the real range and largest imaginary part of −M's eigenvalues, the steps of the
heavy ball tuned to that range, and the best plain step (a in 0.1..1.0). Minutes on one core (three
dense 4096² eigendecompositions at the tiny preset); only for small states.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from operator_structure import equilibrium, steps_to_shrink  # benchmarks/, the script's own directory

from ept.cli.fingerprint import load_run
from ept.data import builtin_tokens, fixed_batch
from ept.diagnostics import dense_jacobian
from ept.solvers.momentum import heavy_ball_params


def measure(M: torch.Tensor, probes: torch.Tensor) -> dict[str, float | int | None]:
    ev = torch.linalg.eigvals(M)
    lo, hi = float((-ev.real).min()), float((-ev.real).max())
    # −M's spectrum [lo, hi] is the relaxation map I + M's [1 − hi, 1 − lo].
    map_lo, map_hi = (torch.tensor(v, dtype=torch.float64) for v in (1 - hi, 1 - max(lo, 1e-9)))
    hb_a, hb_b = heavy_ball_params(map_lo, map_hi)
    hb = steps_to_shrink(M, probes, float(hb_a), float(hb_b), cap=3000)
    plain = {a: steps_to_shrink(M, probes, a, cap=600) for a in np.round(np.arange(0.1, 1.01, 0.1), 1)}
    best = min(((k, a) for a, k in plain.items() if k is not None), default=(None, None))
    return {"re_lo": lo, "re_hi": hi, "imag_max": float(ev.imag.abs().max()), "heavy_ball_steps": hb,
            "plain_steps": best[0], "plain_a": best[1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder or one of its ckpt-* folders")
    ap.add_argument("--seq", type=int, default=0, help="which settled sequence of the bench batch")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    _, model = load_run(args.run)
    model = model.double()
    T, C = model.cfg.T, model.cfg.C
    idx = fixed_batch(builtin_tokens(model.cfg.vocab_size).train, 8, T, seed=1234)[0]
    x, z = equilibrium(model, idx)
    x, z = x[args.seq:args.seq + 1], z[args.seq:args.seq + 1]
    J = dense_jacobian(model, x, z).double()
    D = torch.stack([J.reshape(T, C, T, C)[t, :, t, :] for t in range(T)])
    mean_block = D.mean(0)
    probes = torch.randn(J.shape[0], 8, dtype=J.dtype)
    shared = torch.kron(torch.eye(T, dtype=J.dtype), torch.linalg.inv(mean_block).contiguous())
    rows = {
        "J": measure(J, probes),
        "block_jacobi": measure(-(torch.block_diag(*torch.linalg.inv(D)) @ J), probes),
        "mean_block": measure(-(shared @ J), probes),
    }
    spread = float(((D - mean_block).norm(dim=(1, 2)) / mean_block.norm()).mean())
    print("| M | −eig real range | max |imag| | heavy ball (tuned) steps | best plain steps (a) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | [{r['re_lo']:.3f}, {r['re_hi']:.3f}] | {r['imag_max']:.3f} | "
              f"{r['heavy_ball_steps']} | {r['plain_steps']} ({r['plain_a']}) |")
    print(f"per-token blocks' spread about their mean: ||D_t − J̄|| / ||J̄|| = {spread:.3f}")
    print(json.dumps({"run": args.run, "rows": rows, "block_spread": spread}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
