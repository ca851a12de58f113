"""Where a trained operator's non-normality lives, and how far its spectrum has spread.

    python benchmarks/operator_structure.py runs/stab5/sched05_m15_s2_n2000 --init --json
    python benchmarks/operator_structure.py RUN/ckpt-0000800 RUN/ckpt-0002000

For each run (its evaluation weights; ``--init`` adds the same config's freshly initialised block):

- **structure** of one sequence's dense J = ∂F/∂z at z*, reshaped to (T, C, T, C): the causal mask
  makes J block lower-triangular over tokens, so its eigenvalues are those of the T per-token C×C
  blocks. Printed: the share of ‖J + (1+c)I‖²_F and of ‖(J − Jᵀ)/2‖²_F in the per-token blocks; the
  non-normality ‖Jv − Jᵀv‖/‖Jv‖ (8 probes) of J and of its token blocks alone; the spectral and
  numerical abscissas of both; the steps plain relaxation z ← z + εJz (ε 0.25) takes to shrink 8
  random errors by 1e-3 with J and with the token blocks alone.
- **ends** of S = (J + Jᵀ)/2 over a batch of 8 sequences by Lanczos (`ept.controls.symmetric_extremes`),
  with eigreg's 8 steps and with 40: the spread the free phase has to relax, and how well eigreg's
  short run reads each end.

A table, then one JSON line. Minutes per run on one core (a dense 4096² eigendecomposition at the
tiny preset); only for small states.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

import ept
from ept.cli import UsageError
from ept.cli.fingerprint import load_run
from ept.controls import symmetric_extremes
from ept.data import builtin_tokens, fixed_batch
from ept.diagnostics import dense_jacobian
from ept.diagnostics.operators import JacobianOps
from ept.model import EquilibriumLM


def equilibrium(model: EquilibriumLM, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, z*) of the sequences whose free phase settles to 1e-6 (a trained operator leaves some
    without an equilibrium, as EP's drop_res does in training); UsageError if none does."""
    x = model.inject(idx).detach()
    with torch.no_grad():
        z, st = ept.solve(lambda s: model.field(s, x), torch.zeros_like(x), method="momentum", tol=1e-6,
                          max_iter=3000)
    res = st.residual_per_seq
    ok = res <= 1e-6 if res is not None else torch.full((len(x),), st.converged)
    if not bool(ok.any()):
        raise UsageError(f"no sequence's free phase settled (worst residual {st.residual_max:.1e}): no z* to "
                         "linearise at")
    return x[ok], z[ok]


def relax_steps(M: torch.Tensor, probes: torch.Tensor, eps: float = 0.25, shrink: float = 1e-3) -> int | None:
    G = torch.eye(M.shape[0], dtype=M.dtype) + eps * M
    e, start = probes.clone(), probes.norm(dim=0)
    for k in range(1, 5000):
        e = G @ e
        if bool((e.norm(dim=0) <= shrink * start).all()):
            return k
    return None


def structure(model: EquilibriumLM, x: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
    """The dense figures of one sequence (x, z*: (1, T, C))."""
    T, C = model.cfg.T, model.cfg.C
    J = dense_jacobian(model, x, z).double()
    n = J.shape[0]
    tok = torch.arange(T)
    same = (tok[:, None] == tok[None, :]).double()[:, None, :, None]  # the per-token blocks
    Jd = (J.reshape(T, C, T, C) * same).reshape(n, n)
    K = J + (1 + model.cfg.c) * torch.eye(n, dtype=J.dtype)
    A = 0.5 * (J - J.T)

    def share(M: torch.Tensor) -> float:
        return float((M.reshape(T, C, T, C) * same).pow(2).sum() / M.pow(2).sum())

    probes = torch.randn(n, 8, generator=torch.Generator().manual_seed(0), dtype=J.dtype)

    def nonnormality(M: torch.Tensor) -> float:
        return float(((M @ probes - M.T @ probes).norm(dim=0) / (M @ probes).norm(dim=0)).mean())

    ev, evd = np.linalg.eigvals(J.numpy()), np.linalg.eigvals(Jd.numpy())
    return {
        "K_fro2_token_share": share(K), "antisym_fro2_token_share": share(A),
        "nonnormality": nonnormality(J), "nonnormality_token_blocks": nonnormality(Jd),
        "spectral_abscissa": float(ev.real.max()), "spectral_abscissa_token_blocks": float(evd.real.max()),
        "eig_re_min": float(ev.real.min()),
        "numerical_abscissa": float(torch.linalg.eigvalsh(0.5 * (J + J.T)).max()),
        "numerical_abscissa_token_blocks": float(torch.linalg.eigvalsh(0.5 * (Jd + Jd.T)).max()),
        "relax_steps": relax_steps(J, probes), "relax_steps_token_blocks": relax_steps(Jd, probes),
    }


def ends(model: EquilibriumLM, x: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
    ops = JacobianOps(model, x, z)
    out: dict[str, Any] = {}
    for iters in (8, 40):
        g = torch.Generator().manual_seed(0)
        start = torch.randn(z.shape, generator=g, dtype=z.dtype)
        top, _, bottom, _ = symmetric_extremes(ops.S, start, iters, g)
        out[f"S_top_{iters}"] = [round(v, 3) for v in top.tolist()]
        out[f"S_bottom_{iters}"] = [round(v, 3) for v in bottom.tolist()]
    return out


def measure(label: str, model: EquilibriumLM) -> dict[str, Any]:
    model = model.eval()
    idx = fixed_batch(builtin_tokens(model.cfg.vocab_size).train, 8, model.cfg.T, seed=1234)[0]
    x, z = equilibrium(model, idx)
    return {"run": label, **structure(model, x[:1], z[:1]), **ends(model, x, z)}  # the first that settled


def describe(r: dict[str, Any]) -> str:
    top_miss = max(a - b for a, b in zip(r["S_top_40"], r["S_top_8"], strict=True))
    bottom_miss = max(b - a for a, b in zip(r["S_bottom_40"], r["S_bottom_8"], strict=True))
    return "\n  ".join([
        r["run"],
        f"token blocks hold {r['antisym_fro2_token_share']:.0%} of the antisymmetric part, "
        f"{r['K_fro2_token_share']:.0%} of ||J+(1+c)I||²",
        f"non-normality {r['nonnormality']:.3f} (token blocks {r['nonnormality_token_blocks']:.3f})",
        f"spectral abscissa {r['spectral_abscissa']:.3f} (token blocks "
        f"{r['spectral_abscissa_token_blocks']:.3f}), eigenvalues' Re down to {r['eig_re_min']:.2f}",
        f"numerical abscissa {r['numerical_abscissa']:.3f} (token blocks "
        f"{r['numerical_abscissa_token_blocks']:.3f})",
        f"relaxation steps to 1e-3: {r['relax_steps']} (token blocks {r['relax_steps_token_blocks']})",
        f"S's ends, 40 Lanczos steps: [{min(r['S_bottom_40']):.2f}, {max(r['S_top_40']):.2f}]; 8 steps "
        f"under-read the top by up to {top_miss:.2f}, the bottom by up to {bottom_miss:.2f}",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or ckpt-* folders")
    ap.add_argument("--init", action="store_true", help="also the first run's config, freshly initialised")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    try:
        if args.init:
            cfg, _ = load_run(args.runs[0])
            torch.manual_seed(cfg.train.seed)
            rows.append(measure(f"init ({args.runs[0]})", EquilibriumLM(cfg.model)))
        for run in args.runs:
            rows.append(measure(run, load_run(run)[1]))
    except UsageError as err:
        print(f"operator_structure: {err}", file=sys.stderr)
        return 2
    if not args.json:
        for r in rows:
            print(describe(r))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
