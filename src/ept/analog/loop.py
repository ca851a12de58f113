"""One EP training step on any :class:`~ept.analog.substrate.Substrate`.

    free settle → read z* → nudged settles → read z_β → λ (the estimator) → local updates
    → optimizer (digital) → pulses (the substrate programs the analog weights) → write ledger

Only the substrate protocol is used, so the same step drives the simulator or a board.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ept.analog.ledger import WriteLedger
from ept.analog.substrate import Nudge, Substrate
from ept.config import EPConfig
from ept.grad.common import n_targets
from ept.grad.ep import contour, contour_estimate


@dataclass
class StepReport:
    loss: float
    applied: bool  # False when a relaxation diverged or a gradient was not finite: nothing written
    grads: dict[str, Tensor]
    pulses: dict[str, Tensor]
    stats: dict[str, Any] = field(default_factory=dict)


def ep_lambda_from_reads(z_beta: Tensor, z_star: Tensor, ep: EPConfig, n_tokens: int) -> Tensor:
    """λ for the mean loss over ``n_tokens`` targets from the read nudged states (stacked one batch
    per beta)."""
    betas, weights = contour(ep)
    S = len(betas)
    zs = z_star.repeat(S, *([1] * (z_star.dim() - 1)))
    w = torch.tensor([complex(c).real for c in weights], dtype=z_star.dtype)
    return contour_estimate(z_beta, zs, w, S) / max(n_tokens, 1)


def analog_gradient(
    substrate: Substrate, idx: Tensor, targets: Tensor, ep: EPConfig
) -> tuple[dict[str, Tensor], float, dict[str, Any]]:
    """EP's gradient as the substrate measures it: both phases settled and read through its
    periphery, λ from the reads, the local updates. (grads, loss, stats); nothing is written."""
    free = substrate.settle(idx)
    z_star = substrate.read(free)
    betas, weights = contour(ep)
    nudged = substrate.settle(idx, Nudge(targets, z_star, betas, weights))
    # The loss averages over the targets >= 0 (an MLM batch ignores the unmasked positions).
    lam = ep_lambda_from_reads(substrate.read(nudged), z_star, ep, n_targets(targets))
    grads, loss = substrate.local_grads(idx, targets, z_star, lam)
    finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
    stats = {
        "free_fevals": free.stats.fevals, "free_residual": free.stats.residual,
        "free_converged": free.stats.converged, "T2": nudged.stats.fevals,
        "diverged": free.stats.diverged or nudged.stats.diverged or not finite,
    }
    return grads, loss, stats


def analog_step(
    substrate: Substrate,
    idx: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    ep: EPConfig,
    ledger: WriteLedger | None = None,
) -> StepReport:
    """One EP step. ``optimizer`` must hold the tensors of ``substrate.parameters()``."""
    grads, loss, stats = analog_gradient(substrate, idx, targets, ep)
    if stats["diverged"]:
        return StepReport(loss, False, grads, {}, stats)
    params = substrate.parameters()
    for name, p in params.items():
        p.grad = grads[name]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pulses = substrate.apply_pulses({name: p.detach() for name, p in params.items()})
    if ledger is not None:
        ledger.record(pulses)
    return StepReport(loss, True, grads, pulses, stats)
