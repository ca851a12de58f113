"""Good Broyden, matrix-free: the secant solver with a long memory, for stiff fields."""

from __future__ import annotations

import torch
from torch import Tensor

from ept.config import SolverConfig
from ept.solvers.common import TINY, flat, unflat


class Broyden:
    """"Good" Broyden on the root problem eps·F(z) = 0, matrix-free (rank-one factors), one per sequence.

    The inverse Jacobian starts at -I, so the first step is plain iteration; each evaluated point adds
    a rank-one correction (u, v) with B⁻¹ ≈ -I + Σ u vᵀ. Unlike Anderson's small least-squares window it
    keeps a long secant history, which is what stiff (oscillating) fields need.
    """

    recovers = True

    def __init__(self, m: int):
        self.m = m
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []
        self.prev: tuple[Tensor, Tensor] | None = None
        self.skip: Tensor | None = None  # rows reset since the last step

    def _inv(self, x: Tensor) -> Tensor:  # B⁻¹ x
        out = -x
        for u, v in zip(self.us, self.vs, strict=True):
            out = out + u * (v * x).sum(-1, keepdim=True)
        return out

    def _inv_t(self, x: Tensor) -> Tensor:  # B⁻ᵀ x
        out = -x
        for u, v in zip(self.us, self.vs, strict=True):
            out = out + v * (u * x).sum(-1, keepdim=True)
        return out

    def forget(self, rows: Tensor) -> None:
        """Drop the secant history of ``rows``: their inverse Jacobian is -I again (a plain step next)."""
        for t in (*self.us, *self.vs):
            t[rows.to(t.device)] = 0.0
        self.skip = rows

    @classmethod
    def from_config(cls, cfg: SolverConfig) -> Broyden:
        # Dropping old secant pairs destabilises good Broyden, so it keeps all of them (as TorchDEQ
        # does): two state-sized vectors per F-evaluation, the price of this method.
        return cls(cfg.t1max)

    def step(self, z: Tensor, fz: Tensor, res: Tensor, best: Tensor | None, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        if reset is not None:
            self.forget(reset)
        x, g = flat(z), flat(fz) * cfg.eps
        skip, self.skip = self.skip, None
        if self.prev is not None:
            dx, dg = x - self.prev[0], g - self.prev[1]
            v = self._inv_t(dx)
            denom = (v * dg).sum(-1, keepdim=True)
            # A nearly orthogonal secant pair (a sequence at its precision floor) would add a huge,
            # meaningless rank-one term: such a sequence gets no correction this step.
            norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True) * torch.linalg.vector_norm(
                dg, dim=-1, keepdim=True)
            safe = denom.abs() > 1e-6 * norms + TINY
            if skip is not None:  # a secant pair across a reset row's jump back would be meaningless
                safe = safe & ~skip.to(safe.device).unsqueeze(-1)
            u = torch.where(safe, (dx - self._inv(dg)) / torch.where(safe, denom, 1.0), 0.0)
            self.us.append(u)
            self.vs.append(torch.where(safe, v, 0.0))
            if len(self.us) > self.m:
                self.us.pop(0)
                self.vs.pop(0)
        self.prev = (x, g)
        return unflat(x - self._inv(g), z)

