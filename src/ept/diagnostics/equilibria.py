"""Which equilibrium a solve found: the same one as the physical relaxation, or a saddle.

A trained block can have several equilibria per sequence, and a secant root finder meets the
residual at unstable ones as readily as at attractors; the relaxation z <- z + eps*F(z) rests only
at the attractors. EP nudged from a saddle drifts along its unstable direction
(docs/experiments/anderson_saddles.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ept.solvers import solve


def row_gap(a: Tensor, b: Tensor) -> Tensor:
    """||a - b|| / ||b|| per row (sequence)."""
    num = torch.linalg.vector_norm((a - b).flatten(1), dim=1)
    return num / torch.linalg.vector_norm(b.flatten(1), dim=1).clamp_min(1e-30)


def equilibrium_gap(a: Tensor | None, b: Tensor | None) -> float | None:
    """Worst sequence's ||a - b|| / ||b||: two solves that met the residual at different equilibria
    (a trained block can have several) differ by O(1), two at the same one by O(tol)."""
    if a is None or b is None:
        return None
    return row_gap(a, b).max().item()


def leaves_equilibrium(field: Callable[[Tensor], Tensor], z_star: Tensor, eps: float,
                       max_iter: int = 400) -> Tensor:
    """Per row, ||z_plain - z*|| / ||z*||, where z_plain is where plain iteration from z* settles
    (to a residual of 1e-5): ~0 at an attractor, O(0.01-0.1) where z* is a saddle that a secant
    solver found but the physical dynamics would flow away from."""
    with torch.no_grad():
        z, _ = solve(field, z_star, method="fixed_point", tol=1e-5, max_iter=max_iter, eps=eps)
    return row_gap(z, z_star)
