"""Safeguarded Anderson mixing: the secant solver with a short window, and its per-sequence guard."""

from __future__ import annotations

import torch
from torch import Tensor

from ept.config import SolverConfig
from ept.solvers.common import TINY, flat, plain_steps_pay, rows_mask, unflat


class AndersonMixing:
    """Type-II Anderson mixing on g(z) = z + eps·F(z), one set of coefficients per sequence.

    Each step solves min ||f_k + ΔF γ|| over the differences ΔF_i = f_i - f_k to the newest residual
    f_k (f = eps·F), in float64 and with every column of ΔF scaled to unit norm, then mixes
    z ← z_k + ΔX γ + mix·(f_k + ΔF γ). Residuals in a window span orders of magnitude; the raw
    Gram matrix of float32 residuals then loses the small (newest) ones. ``lam`` is Tikhonov on the
    scaled system, i.e. relative to each difference's own size.

    A sequence flagged in ``restart`` forgets its history and takes a plain step: Anderson's secant
    model only holds where F is nearly linear, and points far from the fixed point (z = 0, where
    LayerNorm is singular, or a state a bad extrapolation threw away) poison every later step.
    """

    def __init__(self, m: int, lam: float, mix: float):
        self.m, self.lam, self.mix = m, lam, mix
        # Ring buffers of the steps that arrived with each slot's point: dX = x - x_prev (in the
        # state's dtype) and dF = f - f_prev (f = eps·F, in float64: residuals in a window span
        # orders of magnitude, and their differences' products in float32 lose the small, newest
        # ones), and the products dFᵢ·dFⱼ, a row and column renewed per step. The least-squares
        # system over the differences to the newest residual, Fᵢ - f = -Σ (the dF after slot i),
        # follows from these in k×k algebra: rebuilding it from stored residuals ((B, m, n)
        # differences and an m×m product over n every step) cost twice an F-evaluation at the tiny
        # preset, and products of the residuals themselves cancel where a sequence stagnates.
        self.dX: Tensor | None = None  # (B, m, n)
        self.dF: Tensor | None = None  # (B, m, n)
        self.G: Tensor | None = None  # (B, m, m) float64
        self.prev: tuple[Tensor, Tensor] | None = None  # the last point and its f (float64)
        self.stamp: Tensor | None = None  # (m,) the step each slot was written at
        self.since: Tensor | None = None  # (B,) a sequence's history starts at this step
        self.count = 0

    def step(self, z: Tensor, fz: Tensor, eps: float, restart: Tensor | None = None) -> Tensor:
        x, f = flat(z), flat(fz) * eps
        f64 = f.to(torch.float64)
        if self.prev is None:
            B, n = x.shape
            self.dX, self.dF = x.new_zeros(B, self.m, n), f64.new_zeros(B, self.m, n)
            self.G = f64.new_zeros(B, self.m, self.m)
            self.stamp = torch.full((self.m,), -1, dtype=torch.long, device=x.device)
            self.since = torch.zeros(B, dtype=torch.long, device=x.device)
            self.prev = (x, f64)
        assert self.dX is not None and self.dF is not None and self.G is not None
        assert self.stamp is not None and self.since is not None
        if restart is not None:
            self.since = torch.where(restart.to(x.device), self.count, self.since)
        slot = self.count % self.m
        px, pf = self.prev
        self.prev = (x, f64)
        self.dX[:, slot], self.dF[:, slot] = x - px, f64 - pf
        self.stamp[slot] = self.count
        self.count += 1
        k = min(self.count, self.m)
        if k == 1:
            return unflat(x + self.mix * f, z)
        dF = self.dF[:, :k]
        new = torch.bmm(dF, dF[:, slot].unsqueeze(-1)).squeeze(-1)  # (B, k) dFᵢ·dF_new
        self.G[:, slot, :k], self.G[:, :k, slot] = new, new
        # Slot i's residual difference to the newest is -Σⱼ dFⱼ over the slots j written after it:
        # ΔF = M·dF with M = -[stamp_j > stamp_i], the same for every row.
        stamp = self.stamp[:k]
        M = -(stamp.unsqueeze(0) > stamp.unsqueeze(1)).to(torch.float64)  # (k, k)
        gram = M @ self.G[:, :k, :k] @ M.t()
        rhs_raw = -(M @ torch.bmm(dF, f64.unsqueeze(-1))).squeeze(-1)  # -ΔFᵢ·f
        # Every filled slot takes part, the newest one too (its difference is zero): slots that may
        # not (the newest, and those from before a restart) are masked in the small k×k system, where
        # they get a unit diagonal, a zero right-hand side and so a zero coefficient.
        valid = (stamp.unsqueeze(0) >= self.since.unsqueeze(1)) & (stamp != self.count - 1)  # (B, k)
        scale = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(TINY)  # (B, k)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        gram = torch.where(pair, gram / (scale.unsqueeze(-1) * scale.unsqueeze(-2)), 0.0)
        gram = gram + (self.lam + (~valid).to(gram.dtype)).diag_embed()
        rhs = torch.where(valid, rhs_raw / scale, 0.0)
        gamma = torch.linalg.solve(gram, rhs) / scale  # (B, k) weights of the differences ΔFᵢ = Fᵢ - f
        # Σᵢ γᵢ ΔFᵢ = Σⱼ cⱼ dFⱼ with c = γ·M (and likewise for the iterates).
        c = (gamma @ M).unsqueeze(1)  # (B, 1, k)
        step_f = f64 + torch.bmm(c, dF).squeeze(1)
        step_x = x + torch.bmm(c.to(x.dtype), self.dX[:, :k]).squeeze(1)
        return unflat(step_x + self.mix * step_f.to(x.dtype), z)


class AndersonGuard:
    """Per-sequence safeguards around Anderson (see :class:`SolverConfig`).

    - far: plain steps while the residual is above ``accel_from`` and plain steps still cut it by
      10%: the secant model is wrong far from the fixed point (z = 0 always: LayerNorm is singular
      there), and such points poison every later extrapolation;
    - restart: a residual ``restart`` times above the best so far clears the sequence's history;
    - stall: a sequence whose residual has not halved in ``stall`` steps is left to the dynamics
      for the rest of the solve. On a trained operator Anderson otherwise sits at a residual of
      ~1e-3-1e-2 (a local minimum of ||F||, the "ghost" of a root) on sequences plain iteration
      does solve: the dynamics drifts slowly past the ghost, its residual rising before it falls,
      which a root finder, descending ||F||, never does;
    - escape: such a sequence takes plain steps, every ``proj_every``+1-th of them a long step
      (1 + proj_jump)·eps (projective integration: the plain steps damp the fast modes, the long
      step carries the slow drift) where its last two F(z) are aligned. An oscillating sequence
      (a stiff field) would be thrown further by a long step, so it only takes plain ones.
    """

    def __init__(self) -> None:
        self.k = 0
        self.prev = torch.tensor(float("inf"), dtype=torch.float64)
        self.mark: Tensor | None = None  # the residual each sequence must next halve ...
        self.mark_at: Tensor | None = None  # ... and the step it was set at
        self.plain_only: Tensor | None = None
        self.since_long: Tensor | None = None  # plain steps since the last long one (escaping rows)
        self.prev_f: Tensor | None = None

    def step(self, accel: AndersonMixing, z: Tensor, fz: Tensor, res: Tensor, best: Tensor, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        """``best``: each sequence's lowest residual so far, this one's included (:class:`_Best`)."""
        if self.mark is None:
            self.mark = res
            self.mark_at = torch.zeros_like(res, dtype=torch.long)
            self.plain_only = torch.zeros_like(res, dtype=torch.bool)
            self.since_long = torch.zeros_like(res, dtype=torch.long)
        halved = res < 0.5 * self.mark
        self.mark = torch.where(halved, res, self.mark)
        far = plain_steps_pay(res, self.prev, cfg.accel_from)
        # The stall clock restarts on progress, and runs only for sequences Anderson is driving.
        self.mark_at = torch.where(halved | far, self.k, self.mark_at)
        self.plain_only = self.plain_only | (self.k - self.mark_at > cfg.stall)
        restart = far | (res > cfg.restart * best) | self.plain_only
        if reset is not None:
            restart = restart | reset.to(restart.device)
        self.prev = res
        self.k += 1
        out = accel.step(z, fz, cfg.eps, restart)
        if cfg.proj_jump > 0 and bool(self.plain_only.any()):
            out = self._escape(z, fz, out, cfg)
        return out

    def _escape(self, z: Tensor, fz: Tensor, out: Tensor, cfg: SolverConfig) -> Tensor:
        f = flat(fz)
        due = self.plain_only & (self.since_long >= cfg.proj_every)
        if self.prev_f is not None:
            norms = torch.linalg.vector_norm(f, dim=1) * torch.linalg.vector_norm(self.prev_f, dim=1)
            cos = (f * self.prev_f).sum(1) / norms.clamp_min(TINY)
            long = due & (cos.to(due.device) > 0.9)
        else:
            long = torch.zeros_like(due)
        self.prev_f = f
        self.since_long = torch.where(long | ~self.plain_only, 0, self.since_long + 1)
        if not bool(long.any()):
            return out
        return torch.where(rows_mask(long, z), z + (1 + cfg.proj_jump) * cfg.eps * fz, out)



class Anderson:
    """The registry's "anderson": :class:`AndersonMixing` behind its :class:`AndersonGuard`."""

    recovers = True

    def __init__(self, cfg: SolverConfig):
        self.mixing = AndersonMixing(cfg.m, cfg.lam, cfg.mix)
        self.guard = AndersonGuard()

    @classmethod
    def from_config(cls, cfg: SolverConfig) -> Anderson:
        return cls(cfg)

    def step(self, z: Tensor, fz: Tensor, res: Tensor, best: Tensor | None, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        assert best is not None  # relax keeps it for every method that recovers
        return self.guard.step(self.mixing, z, fz, res, best, cfg, reset)
