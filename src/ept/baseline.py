"""The fair control (``--mode bp``): the same parameters run as an explicit pre-LN transformer.

    h₀ = x = E[idx] + P[:T]
    h ← h + N(h)        repeated ``layers`` times, N the block's own forces (thick: Attn(LN₁ h) + FFN(LN₂ h))
    logits = W_h · [LN_f] h

trained by ordinary backprop. No leak, no fixed point: a standard weight-tied transformer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ept.grad.common import Grads, param_grads
from ept.model import EquilibriumLM


def explicit_hidden(model: EquilibriumLM, idx: Tensor, layers: int) -> Tensor:
    x = h = model.inject(idx)
    for _ in range(layers):
        for term in model.forces(h, x):
            h = h + term
    return h


def explicit_logits(model: EquilibriumLM, idx: Tensor, layers: int) -> Tensor:
    return model.readout(explicit_hidden(model, idx, layers))


def bp_gradient(
    model: EquilibriumLM, idx: Tensor, targets: Tensor, layers: int
) -> tuple[Grads, dict[str, Any]]:
    """Backprop gradient of the mean next-token CE, with stats shaped like ``ept.gradient``'s."""
    with torch.enable_grad():
        logits = explicit_logits(model, idx, layers)
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
        grads = param_grads(model, loss)
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    return grads, {"loss": loss.item(), "grads_finite": finite, "diverged": not finite, "route": "bp"}
