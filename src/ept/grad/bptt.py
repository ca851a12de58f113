"""Backprop through the unrolled free phase: the seed's exact-for-finite-T1 control. Memory grows with T1."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ept.config import BPTTConfig
from ept.grad.common import Grads, param_grads
from ept.model import EquilibriumLM
from ept.solvers import residual_per_seq


def bptt_gradient(
    model: EquilibriumLM, idx: Tensor, targets: Tensor, cfg: BPTTConfig
) -> tuple[Grads, dict[str, Any]]:
    with torch.enable_grad():
        x = model.inject(idx)
        z = model.start(x)
        start = None
        for _ in range(cfg.T1):
            fz = model.field(z, x)
            start = fz.detach() if start is None else start
            z = z + cfg.eps * fz
        loss = model.loss(z, targets)
        grads = param_grads(model, loss)
    with torch.no_grad():
        end = model.field(z.detach(), x.detach())
        res = residual_per_seq(end, z.detach())
        # Same rule as the solvers: ||F|| grown by div_factor over its start means the unroll blew up.
        grown = end.flatten(1).norm(dim=1) > cfg.div_factor * start.flatten(1).norm(dim=1)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(res).all()) and not bool(grown.any())
    return grads, {
        "loss": loss.item(),
        "free_fevals": cfg.T1,
        "free_residual": res.mean().item(),
        "free_residual_max": res.max().item(),
        "free_diverged": not finite,
        # The unroll's last state: the control penalties are taken there (no second relaxation).
        "z_star": z.detach(),
    }
