"""The free block: pre-LN softmax attention with untied Q, K, V, O and a GELU FFN.

    N(z) = Attn(LN₁ z) + FFN(LN₂ z)

Nothing ties the attention's value path to its scores, so J is not symmetric: EP on it needs the
AsymEP correction (docs/method.md).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ept import analytic
from ept.blocks.common import causal_mask, heads, layer_norm, linear
from ept.config import EPTConfig


class SelfAttention(nn.Module):
    """Multi-head softmax attention, causal unless ``cfg.causal`` is False."""

    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.H = cfg.H
        self.qknorm = cfg.qknorm
        self.causal = cfg.causal
        self.q = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.k = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.v = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.o = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)

    def forward(self, h: Tensor, fused: bool = True) -> Tensor:
        B, T, C = h.shape
        q, k, v = (heads(linear(lin, h), self.H) for lin in (self.q, self.k, self.v))
        if self.qknorm:
            q, k = analytic.rms_normalize(q), analytic.rms_normalize(k)
        if h.is_complex() or not fused:
            scale = 1.0 / math.sqrt(C // self.H)
            mask = causal_mask(T, h.device) if self.causal else None
            y = analytic.softmax((q @ k.transpose(-2, -1)) * scale, mask=mask) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return linear(self.o, y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.C, cfg.ffn_mult * cfg.C, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_mult * cfg.C, cfg.C, bias=cfg.bias)

    def forward(self, h: Tensor) -> Tensor:
        u = linear(self.fc1, h)
        u = analytic.gelu(u) if u.is_complex() else F.gelu(u, approximate="tanh")
        return linear(self.fc2, u)


def thick_forces(model: nn.Module, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
    """[Attn(LN₁ z), FFN(LN₂ z)], summed in this order onto x − (1+c)z by the field."""
    return [model.attn(layer_norm(model.ln1, z), fused=fused), model.ffn(layer_norm(model.ln2, z))]
