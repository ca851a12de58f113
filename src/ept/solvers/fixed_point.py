"""Plain relaxation z <- z + eps·F(z): the physical dynamics, which every other method accelerates."""

from __future__ import annotations

from torch import Tensor

from ept.config import SolverConfig


class FixedPoint:
    """The damped iteration itself. No history, so nothing to recover: a blow-up is the field's."""

    recovers = False

    @classmethod
    def from_config(cls, cfg: SolverConfig) -> FixedPoint:
        return cls()

    def step(self, z: Tensor, fz: Tensor, res: Tensor, best: Tensor | None, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        return z + cfg.eps * fz
