"""The implicit-function-theorem gradient at z*: the exact oracle the other routes are tested against."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, gmres
from torch import Tensor
from torch.func import vjp

from ept.config import ImplicitConfig, SolverConfig
from ept.grad.common import Grads, free_phase, local_update, loss_grad_z, solve_summary
from ept.model import EquilibriumLM
from ept.solvers import relax


def adjoint_solve(
    model: EquilibriumLM, z_star: Tensor, x: Tensor, g: Tensor, cfg: ImplicitConfig
) -> tuple[Tensor, dict[str, Any]]:
    """Solve Jᵀλ = -g with J = ∂F/∂z at z*, touching J only through vector–Jacobian products."""
    tol = cfg.adj_tol if cfg.adj_tol is not None else (1e-10 if g.dtype == torch.float64 else 1e-5)
    with torch.enable_grad():
        _, jt = vjp(lambda z: model.field(z, x), z_star.detach())

    def jt_apply(u: Tensor) -> Tensor:
        return jt(u)[0].detach()

    if cfg.adjoint == "anderson":
        # The adjoint iteration λ <- λ + eps(Jᵀλ + g) contracts exactly when the free phase does.
        lam, st = relax(lambda u: jt_apply(u) + g, torch.zeros_like(g),
                        SolverConfig(method="anderson", res_est=tol, t1max=cfg.adj_max_iter))
        return lam, {"adj_iters": st.fevals, "adj_converged": st.converged}

    shape, dtype = g.shape, g.dtype
    count = {"n": 0}

    def matvec(u: np.ndarray) -> np.ndarray:
        count["n"] += 1
        out = jt_apply(torch.from_numpy(np.ascontiguousarray(u)).to(dtype).reshape(shape))
        return out.reshape(-1).to(torch.float64).numpy()

    n = g.numel()
    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    rhs = -g.reshape(-1).to(torch.float64).numpy()
    sol, info = gmres(op, rhs, rtol=tol, atol=0.0, restart=min(n, 60), maxiter=cfg.adj_max_iter)
    lam = torch.from_numpy(sol).to(dtype).reshape(shape)
    return lam, {"adj_iters": count["n"], "adj_converged": info == 0}


def implicit_gradient(
    model: EquilibriumLM, idx: Tensor, targets: Tensor, solver: SolverConfig, cfg: ImplicitConfig,
    z0: Tensor | None = None,
) -> tuple[Grads, dict[str, Any]]:
    """``z0`` starts the free phase there instead of at 0: to refine another route's z* and take
    the exact gradient at *that* equilibrium (a trained block can have several)."""
    x = model.inject(idx).detach()
    z_star, st = free_phase(model, x, solver, z0=z0)
    g = loss_grad_z(model, z_star, targets)  # of the mean over the targets >= 0: ignored rows are 0
    if st.diverged:  # no fixed point, so no adjoint: the direct term only, flagged
        lam, adj = torch.zeros_like(g), {"adj_iters": 0, "adj_converged": False}
    else:
        lam, adj = adjoint_solve(model, z_star, x, g, cfg)
    grads = local_update(model, idx, targets, z_star, lam)
    with torch.no_grad():
        loss = model.loss(z_star, targets).item()
    return grads, {"loss": loss, **solve_summary("free", st), **adj, "z_star": z_star, "lam": lam}
