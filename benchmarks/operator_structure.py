"""Where a trained operator's non-normality lives, and how far its spectrum has spread.

    python benchmarks/operator_structure.py runs/stab5/sched05_m15_s2_n2000 --init --json
    python benchmarks/operator_structure.py RUN/ckpt-0000800 RUN/ckpt-0002000
    python benchmarks/operator_structure.py RUN/ckpt-0001700 --forces   # which force does it

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

- **forces** (``--forces``): the numerical abscissa split exactly along S's top eigenvector into
  the leak and each force's uᵀJ_i u, each force's share of the antisymmetric part, and the
  spectral abscissa of the leak plus that force alone.

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


def steps_to_shrink(M: torch.Tensor, probes: torch.Tensor, a: float, b: float = 0.0, shrink: float = 1e-3,
                    cap: int = 5000) -> int | None:
    """Steps of the linearised relaxation e ← e + a·M e + b·(e − e_prev) until every probe (a column)
    is ``shrink`` times smaller; None if it blows up or the cap is reached."""
    e_prev, e, start = probes.clone(), probes.clone(), probes.norm(dim=0)
    for k in range(1, cap):
        e, e_prev = e + a * (M @ e) + b * (e - e_prev), e
        if not bool(torch.isfinite(e).all()):
            return None
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
        "relax_steps": steps_to_shrink(J, probes, 0.25),
        "relax_steps_token_blocks": steps_to_shrink(Jd, probes, 0.25),
    }


def force_jacobians(model: EquilibriumLM, x: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    """Dense ∂N_i/∂z of each of the block's forces (``model.forces``: attention, FFN) at one sequence."""
    x, z = x.detach(), z.detach()
    n = z.numel()
    with torch.enable_grad():
        jacs = torch.autograd.functional.jacobian(lambda s: tuple(model.forces(s, x, fused=False)), z,
                                                  vectorize=True)
    return [j.reshape(n, n).double() for j in jacs]


def token_blocks(M: torch.Tensor, T: int) -> torch.Tensor:
    """The T diagonal C×C blocks of an (n, n) matrix over (token, channel), shape (T, C, C)."""
    C = M.shape[0] // T
    return torch.stack([M[t * C:(t + 1) * C, t * C:(t + 1) * C] for t in range(T)])


def attribution(model: EquilibriumLM, x: torch.Tensor, z: torch.Tensor) -> dict[str, Any]:
    """Which force lifts the top of S = (J + Jᵀ)/2 and carries J's antisymmetric part, at one sequence.

    J = −(1+c)I + Σ_i J_i, so the numerical abscissa splits exactly along S's top eigenvector u:
    uᵀSu = −(1+c) + Σ_i uᵀJ_i u. Per force, also ‖(J_i − J_iᵀ)/2‖_F over ‖(J − Jᵀ)/2‖_F, and the
    spectral abscissa of −(1+c)I + J_i alone (by the token blocks: exact under the causal mask).
    """
    T, c = model.cfg.T, model.cfg.c
    parts = force_jacobians(model, x, z)
    n = parts[0].shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    J = -(1 + c) * eye + sum(parts)
    evals, evecs = torch.linalg.eigh(0.5 * (J + J.T))
    u = evecs[:, -1]
    anti = (0.5 * (J - J.T)).norm()
    names = ["attention", "ffn"] if len(parts) == 2 else [f"force{i}" for i in range(len(parts))]
    out: dict[str, Any] = {"numerical_abscissa": float(evals[-1]), "leak": -(1 + c)}
    for name, Ji in zip(names, parts, strict=True):
        alone = torch.linalg.eigvals(token_blocks(-(1 + c) * eye + Ji, T)).real.max()
        out[name] = {"top_share": float(u @ Ji @ u),
                     "antisym_ratio": float((0.5 * (Ji - Ji.T)).norm() / anti),
                     "spectral_abscissa_alone": float(alone)}
    return out


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


def measure(label: str, model: EquilibriumLM, forces: bool = False) -> dict[str, Any]:
    model = model.eval()
    idx = fixed_batch(builtin_tokens(model.cfg.vocab_size).train, 8, model.cfg.T, seed=1234)[0]
    x, z = equilibrium(model, idx)
    row = {"run": label, **structure(model, x[:1], z[:1]), **ends(model, x, z)}  # the first that settled
    if forces:
        row["forces"] = attribution(model, x[:1], z[:1])
    return row


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
        *([] if "forces" not in r else [describe_forces(r["forces"])]),
    ])


def describe_forces(f: dict[str, Any]) -> str:
    names = [k for k, v in f.items() if isinstance(v, dict)]
    split = " + ".join(f"{f[k]['top_share']:+.3f} ({k})" for k in names)
    return "\n  ".join([
        f"numerical abscissa {f['numerical_abscissa']:.3f} = {f['leak']:.1f} (leak) + {split}",
        *(f"{k}: antisymmetric part {f[k]['antisym_ratio']:.2f} of J's; spectral abscissa of "
          f"-(1+c)I + J_{k} alone {f[k]['spectral_abscissa_alone']:.3f}" for k in names),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or ckpt-* folders")
    ap.add_argument("--init", action="store_true", help="also the first run's config, freshly initialised")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    ap.add_argument("--forces", action="store_true",
                    help="also split the numerical abscissa and the antisymmetric part by force")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    try:
        if args.init:
            cfg, _ = load_run(args.runs[0])
            torch.manual_seed(cfg.train.seed)
            rows.append(measure(f"init ({args.runs[0]})", EquilibriumLM(cfg.model), args.forces))
        for run in args.runs:
            rows.append(measure(run, load_run(run)[1], args.forces))
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
