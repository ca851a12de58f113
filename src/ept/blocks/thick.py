"""The free block: pre-LN softmax attention with untied Q, K, V, O and a GELU FFN.

    N(z) = Attn(LN₁ z) + FFN(LN₂ z)

Nothing ties the attention's value path to its scores, so J is not symmetric: EP on it needs the
AsymEP correction (docs/method.md).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn
from torch.linalg import matrix_norm

from ept import analytic
from ept.blocks.common import GELU_LIP, causal_mask, heads, layer_norm, linear
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


def bounded_ffn_scale(ffn: FeedForward, lip: float) -> Tensor:
    """s = min(1, lip / (1.13 ‖W₂‖₂ ‖W₁‖₂)): s·FFN(z) is lip-Lipschitz in z (mono's bound, one force)."""
    bound = GELU_LIP * matrix_norm(ffn.fc1.weight, ord=2) * matrix_norm(ffn.fc2.weight, ord=2)
    return (lip / bound).clamp(max=1.0)


def thick_forces(model: nn.Module, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
    """[Attn(LN₁ z), FFN(LN₂ z)], summed in this order onto x − (1+c)z by the field.

    With ``ffn_lip`` > 0 the FFN term is s·FFN(z) instead: the trained block's slow modes and most of
    its non-normality are the pre-LN FFN's (LN₂'s 1/σ, W₂ and W₁ untied), and a Lipschitz bound on
    it caps how far it can lift J's spectrum (docs/experiments/stability.md, "The block as the lever").
    """
    attn = model.attn(layer_norm(model.ln1, z), fused=fused)
    lip = model.cfg.ffn_lip
    if not lip:
        return [attn, model.ffn(layer_norm(model.ln2, z))]
    return [attn, model.ffn(z) * bounded_ffn_scale(model.ffn, lip).to(z.dtype)]
