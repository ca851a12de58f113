"""How far can a two-term polynomial method (the heavy ball) beat plain iteration on one sequence of a
trained operator? The dense spectrum at its equilibrium answers it.

    python benchmarks/momentum_ceiling.py runs/t2 --batch 0 --seq 5      # the bench's batch 0, sequence 5
    python benchmarks/momentum_ceiling.py runs/tiny --batch 0 --seq 1 --png spectrum.png

For the relaxation map z + eps·F(z) linearised at z* (dense Jacobian, n = T·C), prints the spectrum's
shape (real range, largest imaginary part, eigenvalues above thresholds) and, per F-evaluation, the
worst-mode contraction of
- plain iteration (the spectral radius),
- the shipped rule: the heavy ball on [mom_lo, top real eigenvalue] (what its Ritz estimate tends to),
- the best stationary heavy ball over a grid of intervals (the ceiling of the method),
each also as its asymptotic share of plain iteration's F-evaluations, ln ρ_plain / ln ρ (the
bench's target is 1/3). The F-eval counts of plain iteration and of ept's momentum from z = 0 on
that sequence are printed beside it. Writes a PNG of the spectrum (``--png``). Prints a table and,
last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

import ept
from ept.bench.fevals import ept_fevals, row_evals
from ept.cli import UsageError
from ept.cli.fingerprint import load_run
from ept.data import builtin_tokens, fixed_batch
from ept.diagnostics import dense_jacobian
from ept.diagnostics.plots import plot_spectrum
from ept.solvers.momentum import MOM_HI, contraction

LO_GRID = np.arange(-1.0, 0.201, 0.05)
HI_GRID = np.arange(0.50, 0.996, 0.005)


def rates(lo: float, hi: float, mu: torch.Tensor) -> torch.Tensor:
    """Each mode's contraction per F-evaluation under the heavy ball tuned to [lo, hi]."""
    f64 = torch.float64
    return contraction(torch.tensor(lo, dtype=f64), torch.tensor(hi, dtype=f64), mu)


def best_interval(mu: torch.Tensor) -> tuple[float, float, float]:
    """(worst contraction, lo, hi) of the best heavy ball over the grid, for eigenvalues ``mu``."""
    lo = torch.tensor(LO_GRID, dtype=torch.float64).view(-1, 1, 1)
    hi = torch.tensor(HI_GRID, dtype=torch.float64).view(1, -1, 1)
    r = contraction(lo, hi, mu.view(1, 1, -1)).amax(-1)
    i = int(r.argmin())
    return float(r.flatten()[i]), float(LO_GRID[i // len(HI_GRID)]), float(HI_GRID[i % len(HI_GRID)])


def fevals_share(rho_plain: float, rho: float) -> float | None:
    return math.log(rho_plain) / math.log(rho) if 0 < rho < 1 and 0 < rho_plain < 1 else None


def ceiling(run: str, batch: int, seq: int, eps: float, mom_lo: float, tol: float) -> tuple[dict, np.ndarray]:
    """The figures of one sequence, and its relaxation map's eigenvalues."""
    _, model = load_run(run)
    tokens = builtin_tokens(model.cfg.vocab_size)
    idx = fixed_batch(tokens.train, 8, model.cfg.T, seed=1234 + batch)[0][seq : seq + 1]
    x = model.inject(idx).detach()

    def field(z: torch.Tensor) -> torch.Tensor:
        return model.field(z, x)

    with torch.no_grad():
        counts = {m: row_evals(ept_fevals(field, torch.zeros_like(x), m, tol, 400, eps=eps))[0]
                  for m in ("fixed_point", "momentum")}
        # The equilibrium the spectrum is taken at, settled well below the counts' residual.
        z, st = ept.solve(field, torch.zeros_like(x), method="fixed_point", tol=1e-6, max_iter=5000, eps=eps)
    if not st.converged:
        raise ValueError(f"plain iteration did not settle sequence {seq} of batch {batch} (residual "
                         f"{st.residual_max:.1e}): no equilibrium to linearise at; pick another --seq")
    J = dense_jacobian(model, x, z).double()
    mu_np = np.linalg.eigvals((torch.eye(J.shape[0], dtype=J.dtype) + eps * J).numpy())
    mu = torch.from_numpy(mu_np)
    rho_plain = float(np.abs(mu_np).max())
    top = float(mu_np.real.max())
    shipped = float(rates(mom_lo, min(max(top, MOM_HI[0]), MOM_HI[1]), mu).max())  # the rule's clip
    rho_best, lo_best, hi_best = best_interval(mu)
    return {
        "run": run, "batch": batch, "seq": seq, "n": int(J.shape[0]), "eps": eps,
        "re_min": float(mu_np.real.min()), "re_max": top, "imag_max": float(np.abs(mu_np.imag).max()),
        "above": {f"{t:g}": int((mu_np.real > t).sum()) for t in (0.5, 0.7, 0.8, 0.9)},
        "rho_plain": rho_plain, "rho_shipped": shipped, "rho_best": rho_best, "best_lo": lo_best,
        "best_hi": hi_best, "share_shipped": fevals_share(rho_plain, shipped),
        "share_best": fevals_share(rho_plain, rho_best),
        "fevals_plain": counts["fixed_point"], "fevals_momentum": counts["momentum"],
        "worst_mode_best": str(np.round(mu_np[int(rates(lo_best, hi_best, mu).argmax())], 3)),
    }, mu_np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a run folder (or ckpt-* folder) of a trained model")
    ap.add_argument("--batch", type=int, default=0, help="the bench's batch (seed 1234 + batch)")
    ap.add_argument("--seq", type=int, default=0, help="the sequence of that batch (0-7)")
    ap.add_argument("--eps", type=float, default=0.5)
    ap.add_argument("--mom_lo", type=float, default=-0.3)
    ap.add_argument("--tol", type=float, default=1e-4, help="the residual the F-eval counts go to")
    ap.add_argument("--png", default=None, help="write the spectrum of J here")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not 0 <= args.seq < 8 or args.batch < 0:
        print(f"momentum_ceiling.py: --seq must be 0-7 and --batch >= 0, got {args.seq}, {args.batch}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        out, mu = ceiling(args.run, args.batch, args.seq, args.eps, args.mom_lo, args.tol)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"momentum_ceiling.py: {e}", file=sys.stderr)
        return 2
    if args.png:
        plot_spectrum((mu - 1) / args.eps, args.png, eps=args.eps,
                      title=f"{args.run} b{args.batch} s{args.seq}: J at z*")
    print(f"{args.run} batch {args.batch} seq {args.seq}: n {out['n']}, map eigenvalues Re in "
          f"[{out['re_min']:.3f}, {out['re_max']:.3f}], |Im| up to {out['imag_max']:.3f}; above 0.5 / 0.7 / "
          f"0.8 / 0.9: {' / '.join(str(v) for v in out['above'].values())}")
    best = f"best heavy ball, [{out['best_lo']:.2f}, {out['best_hi']:.3f}]"
    rows = [("plain iteration", out["rho_plain"], 1.0),
            (f"heavy ball, [{args.mom_lo:g}, top] (the shipped rule)", out["rho_shipped"],
             out["share_shipped"]),
            (best, out["rho_best"], out["share_best"])]
    print(f"{'method':48s}{'worst contraction':>20s}{'F-evals / plain':>18s}")
    for name, rho, s in rows:
        print(f"{name:48s}{rho:>20.4f}{(f'{s:.2f}' if s else 'n/a'):>18s}")
    print(f"F-evals from z = 0 to {args.tol:g}: plain {out['fevals_plain']}, momentum "
          f"{out['fevals_momentum']}; the best heavy ball's slowest mode: {out['worst_mode_best']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
