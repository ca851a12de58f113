"""The blocks' forces N(z), one module per ``attn_mode``: F(z) = x − (1+c) z + Σ N(z).

    thick    free softmax attention and a GELU FFN (J not symmetric)
    energy   F = −∇E: Energy-Transformer attention and a Hopfield memory (J symmetric when
             bidirectional); ``kappa`` blends it towards thick on the same weights
    mono     strongly monotone for every weight value: one fixed point
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ept.blocks.energy import energy, energy_forces
from ept.blocks.mono import mono_forces
from ept.blocks.thick import FeedForward, SelfAttention, thick_forces

Forces = Callable[[nn.Module, Tensor, Tensor, bool], list[Tensor]]
FORCES: dict[str, Forces] = {"thick": thick_forces, "energy": energy_forces, "mono": mono_forces}

__all__ = ["FORCES", "FeedForward", "SelfAttention", "energy", "energy_forces", "mono_forces", "thick_forces"]
