"""What every relaxation shares: fields, per-row residuals, solve statistics, the real view of states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ept.config import SolverConfig

Field = Callable[[Tensor], Tensor]
# A monitor sees (z, F(z)) after every evaluation: True stops the solve, a (rows,) bool tensor
# freezes the rows it flags (and stops the solve once every row is frozen).
Monitor = Callable[[Tensor, Tensor], "bool | Tensor"]


@runtime_checkable
class RowField(Protocol):
    """A field over independent rows that can be restricted to some of them."""

    def __call__(self, z: Tensor) -> Tensor: ...

    def rows(self, idx: Tensor) -> Field:
        """The same field on the sub-batch ``idx`` (row indices into the full batch)."""
        ...


@dataclass
class RowwiseField:
    """``fn(z, *inputs)`` where every input is indexed by row along dim 0: cut by indexing them."""

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z, *self.inputs)

    def rows(self, idx: Tensor) -> RowwiseField:
        return RowwiseField(self.fn, tuple(t[idx] for t in self.inputs))

TINY = 1e-30
_PLAIN_PROGRESS = 0.9  # a plain step that cuts the residual by at least 10% is still worth taking


@dataclass
class SolveStats:
    fevals: int = 0  # calls of the field (each on the rows still moving)
    row_fevals: int = 0  # rows evaluated, summed over calls: the compute, in single-row F-evaluations
    residual: float = float("inf")  # batch mean of ||F(z)|| / ||z||, the undamped residual
    residual_max: float = float("inf")  # worst sequence
    residual_per_seq: Tensor | None = None
    history: list[tuple[float, float]] = field(default_factory=list)  # (mean, worst) per F-eval
    converged: bool = False
    diverged: bool = False
    stopped_by_monitor: bool = False
    method: str = ""
    unstable: Tensor | None = None  # on divergence: the rows (sequences) that blew up
    done: Tensor | None = None  # rows frozen before the end: converged, or flagged by the monitor
    flagged: Tensor | None = None  # rows the monitor flagged (a subset of done)
    recovered: int = 0  # secant steps that blew a sequence up, undone (see relax)

    def summary(self) -> dict[str, Any]:
        return {
            "fevals": self.fevals,
            "row_fevals": self.row_fevals,
            "residual": self.residual,
            "residual_max": self.residual_max,
            "converged": self.converged,
            "diverged": self.diverged,
        }


def residual_per_seq(fz: Tensor, z: Tensor) -> Tensor:
    """||F(z)|| / ||z|| per row: the true, undamped residual (independent of the step size)."""
    num = torch.linalg.vector_norm(fz.flatten(1), dim=1)
    den = torch.linalg.vector_norm(z.flatten(1), dim=1).clamp_min(TINY)
    return (num / den).real.to(torch.float64)


def flat(z: Tensor) -> Tensor:
    return (torch.view_as_real(z) if z.is_complex() else z).reshape(z.shape[0], -1)


def unflat(v: Tensor, like: Tensor) -> Tensor:
    if like.is_complex():
        return torch.view_as_complex(v.reshape(*like.shape, 2).contiguous())
    return v.reshape(like.shape)


def row_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1).real.to(torch.float64)


def rows_mask(rows: Tensor, like: Tensor) -> Tensor:
    return rows.to(like.device).view(-1, *([1] * (like.dim() - 1)))


class Solver(Protocol):
    """One relaxation method's per-batch state, driven by :func:`ept.solvers.relax`.

    Built once per solve from the :class:`SolverConfig`; ``step`` maps the current point ``z`` and
    ``fz`` = F(z) to the next point. ``res`` is each row's residual and ``best`` its lowest so far
    (this one's included; None for a method that does not ``recover``); ``reset`` flags rows the
    loop just put back at their best point, whose history is void.
    """

    recovers: bool  # a blown-up row goes back to its best point (False: the solve stops)

    def step(self, z: Tensor, fz: Tensor, res: Tensor, best: Tensor | None, cfg: SolverConfig,
             reset: Tensor | None) -> Tensor: ...


def plain_steps_pay(res: Tensor, prev_res: Tensor, accel_from: float) -> Tensor:
    """Per row: still far from the fixed point (residual above ``accel_from``) and plain steps still
    cut the residual by 10% — where a secant or spectral model would be built on points it does not
    hold at (z = 0, where LayerNorm is singular, among them)."""
    return (res > accel_from) & (res < _PLAIN_PROGRESS * prev_res)
