"""Stability controls: penalties that keep the block contractive while it learns.

Training drifts J = ∂F/∂z towards a Hopf bifurcation (docs/experiments/stability.md). Three
default-off controls, each a penalty P(θ) evaluated locally at the free-phase state z* (z and x
held fixed, so only the block's parameters receive a gradient; nothing flows through the
relaxation):

- ``resreg ρ``: ρ·mean_b ||F(z*)||²/||z*||², the relative residual the free phase left behind.
- ``jacreg λ``: w·||K||_F²/n by Hutchinson, K = J + (1+c)I = ∂(Attn+FFN)/∂z. The leak is taken
  out because ||J||_F² = (1+c)²n - 2(1+c)·tr K + ||K||_F²: penalising J itself would push tr K
  *up*, towards instability. The weight w is a controller: it rises (×``jr_up``, capped at
  ``jr_max``) while the free residual is above ``jr_target`` and decays (×``jr_decay``) back to
  ``jr_floor`` once the free phase converges again.
- ``eigreg λ --eig_margin m``: λ·mean_b relu(ω_b + m)², ω_b = u_bᵀJu_b with u_b the top
  eigenvector of S = (J+Jᵀ)/2 for sequence b, from a few Lanczos steps on jvp/vjp products,
  warm-started from the previous step's u. With u fixed, ∂ω/∂θ = uᵀ(∂J/∂θ)u (Hellmann–Feynman).
  ``--eig_floor L`` adds λ·mean_b relu(-L - v_bᵀJv_b)² with v_b the bottom eigenvector of the same
  Lanczos run: the stiff end, which with the top sets the relaxation's condition number.

``Controller.penalty_grads`` returns the penalties' parameter gradients, to be added to the loss
gradient, and the floats to log.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ept.config import ControlConfig
from ept.diagnostics.operators import JacobianOps
from ept.distributed import SINGLE, Group
from ept.grad.common import Grads, param_grads
from ept.model import EquilibriumLM


def _rownorm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, *([1] * (v.dim() - 1)))


def eig_margin_at(cfg: ControlConfig, decay: float) -> float:
    """eigreg's margin with ``decay`` of the learning rate's decay left: ``eig_margin`` until the
    decay starts, ``eig_margin_end`` (when set) at its end, linear between. A looser hold late buys
    back loss once the learning rate is too small to push the operator off contraction."""
    if cfg.eig_margin_end is None:
        return cfg.eig_margin
    return cfg.eig_margin_end + (cfg.eig_margin - cfg.eig_margin_end) * decay


def top_symmetric_eig(
    apply_s, start: Tensor, iters: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Largest *algebraic* eigenpair of a symmetric operator, one per row, by Lanczos.

    Rayleigh–Ritz on the Krylov space of ``start`` with full reorthogonalisation (``iters`` is
    small). Unlike plain power iteration it needs no shift to prefer the largest algebraic over
    the largest magnitude (J's spectrum sits around -(1+c), so magnitude would pick the wrong end),
    and the Ritz value can only improve on the warm start's Rayleigh quotient.
    Returns (θ of shape (B,), u shaped like ``start`` with unit rows).
    """
    theta, u, _, _ = symmetric_extremes(apply_s, start, iters, generator)
    return theta, u


def symmetric_extremes(
    apply_s, start: Tensor, iters: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(θ_top, u_top, θ_bottom, u_bottom): both extreme Ritz pairs of one Lanczos run (see
    :func:`top_symmetric_eig`); Krylov spaces resolve both ends of a spectrum first, so the stiff end
    comes at no extra product. Only the top is warm-started; the bottom Ritz value never
    undershoots the true bottom eigenvalue."""
    q = start / _rownorm(start).clamp_min(1e-30)
    basis, images = [], []
    for _ in range(iters):
        basis.append(q)
        images.append(apply_s(q))
        Q = torch.stack([b.flatten(1) for b in basis], 1)  # (B, k, n)
        w = images[-1].flatten(1)
        for _ in range(2):  # twice is enough for orthogonality to working precision
            w = w - (Q.transpose(1, 2) @ (Q @ w.unsqueeze(-1))).squeeze(-1)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        # A row whose Krylov space closed (an invariant subspace) restarts from a random direction.
        scale = torch.linalg.vector_norm(images[-1].flatten(1), dim=1, keepdim=True).clamp_min(1e-30)
        dead = norm < 1e-10 * scale
        if bool(dead.any()):
            r = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
            for _ in range(2):
                r = r - (Q.transpose(1, 2) @ (Q @ r.unsqueeze(-1))).squeeze(-1)
            w = torch.where(dead, r, w)
            norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        q = (w / norm.clamp_min(1e-30)).view_as(start)
    Q = torch.stack([b.flatten(1) for b in basis], 1)
    SQ = torch.stack([s.flatten(1) for s in images], 1)
    T = Q @ SQ.transpose(1, 2)
    evals, evecs = torch.linalg.eigh(0.5 * (T + T.transpose(1, 2)))
    top = (evecs[:, :, -1].unsqueeze(1) @ Q).view_as(start)
    bottom = (evecs[:, :, 0].unsqueeze(1) @ Q).view_as(start)
    return (evals[:, -1], top / _rownorm(top).clamp_min(1e-30),
            evals[:, 0], bottom / _rownorm(bottom).clamp_min(1e-30))


class Controller:
    """Holds the adaptive jacreg weight, the eigreg warm start and the probe generator."""

    def __init__(self, cfg: ControlConfig, group: Group = SINGLE, rows: slice | None = None,
                 global_rows: int = 0):
        self.cfg = cfg
        self.jr_weight = min(max(cfg.jacreg, cfg.jr_floor), cfg.jr_max) if cfg.jacreg > 0 else 0.0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.eig_u: Tensor | None = None  # under data parallelism: the whole global batch's
        # Data parallelism: this rank's rows of the global batch. Probes are drawn for the whole
        # batch and sliced, so they, the generator and eig_u do not depend on the number of ranks.
        self.group, self.rows, self.global_rows = group, rows, global_rows

    def _randn(self, like: Tensor) -> Tensor:
        """A float64 normal draw shaped like ``like`` (this rank's rows of a global-batch draw)."""
        if self.rows is None:
            return torch.randn(like.shape, generator=self.generator, dtype=torch.float64).to(like)
        full = torch.randn((self.global_rows, *like.shape[1:]), generator=self.generator, dtype=torch.float64)
        return full[self.rows].to(like)

    # -- the jacreg controller ------------------------------------------------------------
    def update_weight(self, residual: float | None) -> float:
        """One controller step: rise while the free phase misses its target, else decay to the floor."""
        cfg = self.cfg
        if cfg.jacreg <= 0 or residual is None:
            return self.jr_weight
        if not residual <= cfg.jr_target:  # NaN counts as "above": a blown-up phase needs more control
            self.jr_weight = min(cfg.jr_max, max(self.jr_weight * cfg.jr_up, cfg.jacreg))
        else:
            self.jr_weight = max(cfg.jr_floor, self.jr_weight * cfg.jr_decay)
        return self.jr_weight

    # -- eigreg's eigenvector ---------------------------------------------------------------
    def _eig_start(self, z: Tensor) -> Tensor:
        u = self.eig_u
        if u is not None and self.rows is not None and u.shape[0] == self.global_rows:
            u = u[self.rows]
        if u is not None and u.shape == z.shape:
            return u.to(z)
        return self._randn(z)

    def top_eigvec(self, model: EquilibriumLM, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        theta, u, _, _ = self.extreme_eigvecs(model, x, z)
        return theta, u

    def extreme_eigvecs(
        self, model: EquilibriumLM, x: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both ends of S = (J+Jᵀ)/2 at (x, z), per sequence; the top's vector is the next warm start."""
        ops = JacobianOps(model, x, z)
        top, u, bottom, v = symmetric_extremes(ops.S, self._eig_start(z), self.cfg.eig_iters, self.generator)
        self.eig_u = u.detach().clone() if self.rows is None else self.group.all_gather(u.detach())
        return top, u, bottom, v

    # -- the penalties ---------------------------------------------------------------------
    def penalty_grads(
        self, model: EquilibriumLM, x: Tensor, z_star: Tensor, stats: dict[str, Any], decay: float = 1.0,
        step: int | None = None, tighten: float = 0.0,
    ) -> tuple[Grads, dict[str, float]]:
        """Gradients of the active penalties w.r.t. the model's parameters at (x, z*), and logs.

        Call once per training step, after the free phase (``stats`` is ``ept.gradient``'s, whose
        ``free_residual`` drives the jacreg controller). ``decay`` is how much of the learning
        rate's decay is left (1 until it starts, 0 at the end: :func:`ept.optim.decay_left`), which
        moves eigreg's margin toward ``eig_margin_end``. eigreg acts on the steps that ``step`` (the
        training step; None: every call) is a multiple of ``eig_every`` at, its weight times
        ``eig_every``; ``tighten`` is added to its margin (the rollbacks' ``eig_backoff``). Returns
        ({}, {}) when no control acts.
        """
        cfg = self.cfg
        eig_now = cfg.eigreg > 0 and (step is None or step % cfg.eig_every == 0)
        if not (eig_now or cfg.resreg > 0 or cfg.jacreg > 0):
            return {}, {}
        x, z = x.detach(), z_star.detach()
        self.update_weight(stats.get("free_residual"))
        eig_weight = cfg.eigreg * cfg.eig_every
        logs: dict[str, float] = {}
        if eig_now and cfg.eig_dir == "sym":
            _, u, stiff, v = self.extreme_eigvecs(model, x, z)
            # The stiff end comes with the Lanczos run at no extra product: logged with or without a
            # floor, since the free phase's cost grows as √(stiff end / slow end) (small_preset.md).
            logs["eig_bottom"] = stiff.min().item()
        with torch.enable_grad():
            zr = z.clone().requires_grad_(True)
            fz = model.field(zr, x, fused=False)  # unfused: its backward is twice differentiable
            if eig_now and cfg.eig_dir == "slow":
                r = fz.detach()
                u = r / _rownorm(r).clamp_min(1e-30)
            total = fz.new_zeros(())
            if cfg.resreg > 0:
                rel = (fz.flatten(1).pow(2).sum(1) / z.flatten(1).pow(2).sum(1).clamp_min(1e-30)).mean()
                total = total + cfg.resreg * rel
                logs["resreg_penalty"] = rel.item()
            if cfg.jacreg > 0:
                fro2 = self._hutchinson(model, fz, zr)
                total = total + self.jr_weight * fro2
                logs.update(jr_weight=self.jr_weight, jac_fro2=fro2.item())
            if eig_now:
                (jt_u,) = torch.autograd.grad((fz * u).sum(), zr, create_graph=True)
                omega = (jt_u * u).flatten(1).sum(1)  # uᵀJu per sequence
                margin = eig_margin_at(cfg, decay) + tighten
                total = total + eig_weight * torch.relu(omega + margin).pow(2).mean()
                logs.update(eig_omega=omega.max().item(), eig_omega_mean=omega.mean().item())
                if cfg.eig_margin_end is not None or tighten:
                    logs["eig_margin"] = margin
                if cfg.eig_floor is not None:  # the stiff end: vᵀJv >= -eig_floor
                    (jt_v,) = torch.autograd.grad((fz * v).sum(), zr, create_graph=True)
                    bottom = (jt_v * v).flatten(1).sum(1)
                    total = total + eig_weight * torch.relu(-cfg.eig_floor - bottom).pow(2).mean()
            logs["penalty"] = total.item()
            grads = param_grads(model, total)
        return {k: g.detach() for k, g in grads.items()}, logs

    def _hutchinson(self, model: EquilibriumLM, fz: Tensor, zr: Tensor) -> Tensor:
        """||K||_F²/n ≈ mean over probes ε of ||Kᵀε||²/n, Kᵀε = Jᵀε + (1+c)ε (one vjp each)."""
        leak = 1.0 + model.cfg.c
        total = fz.new_zeros(())
        for _ in range(self.cfg.hutch):
            e = self._randn(zr)
            (jt_e,) = torch.autograd.grad((fz * e).sum(), zr, create_graph=True)
            total = total + (jt_e + leak * e).pow(2).sum()
        return total / (self.cfg.hutch * zr.numel())

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "jr_weight": float(self.jr_weight),
            "generator": self.generator.get_state(),
            "eig_u": None if self.eig_u is None else self.eig_u.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.jr_weight = float(state["jr_weight"])
        self.generator.set_state(state["generator"])
        self.eig_u = state.get("eig_u")


__all__ = ["ControlConfig", "Controller", "top_symmetric_eig"]
