"""The energy block's Lyapunov check: E along the free phase's plain relaxation.

For F = −∇E the relaxation z ← z + εF(z) is gradient descent on E, so E falls at every step once ε
is below 2/λ_max(−J); a rise names a step too large for the block's stiffest mode. A causal energy
block relaxes each position's own energy given its past, so its summed E need not fall.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ept.model import EquilibriumLM


def energy_trace(model: EquilibriumLM, x: Tensor, eps: float = 0.5, steps: int = 50,
                 z0: Tensor | None = None) -> Tensor:
    """E per sequence at each of ``steps`` plain relaxation steps from ``z0``: (steps + 1, B)."""
    # From x/(1+c), the quadratic part's minimum: at z = 0 every LayerNorm sees σ → √eps and the
    # energy's force carries LayerNorm's Jacobian (1/σ, ~300), so no small step is small enough there.
    z = x / (1.0 + model.cfg.c) if z0 is None else z0
    trace = []
    with torch.no_grad():
        for _ in range(steps):
            trace.append(model.energy(z, x))
            z = z + eps * model.field(z, x)
        trace.append(model.energy(z, x))
    return torch.stack(trace)


def energy_report(model: EquilibriumLM, x: Tensor, eps: float = 0.5, steps: int = 50) -> dict[str, Any]:
    """``energy_end`` (mean over sequences), ``energy_max_rise`` (the largest one-step increase of
    any sequence's E, relative to its |E|) and ``energy_falls`` (no rise above the dtype's rounding)."""
    e = energy_trace(model, x, eps, steps)
    rise = ((e[1:] - e[:-1]) / e[:-1].abs().clamp_min(1e-12)).max().item()
    rounding = 100 * torch.finfo(e.dtype).eps  # a float32 E of 1e4 moves by 1e-3 from rounding alone
    return {"energy_end": e[-1].mean().item(), "energy_max_rise": rise, "energy_falls": rise <= rounding}
