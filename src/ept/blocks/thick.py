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
from ept.blocks.common import GELU_LIP, causal_mask, heads, layer_norm, linear, spectral_norm
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
        return linear(self.fc2, self._hidden(h))

    def tied(self, h: Tensor) -> Tensor:
        """W₁ᵀ gelu(W₁ h + b₁) + b₂: fc2's weight unused, the Jacobian W₁ᵀ diag(gelu′) W₁ symmetric."""
        u = self._hidden(h)
        bias = None if self.fc2.bias is None else self.fc2.bias.to(u.dtype)
        return F.linear(u, self.fc1.weight.t().to(u.dtype), bias)

    def _hidden(self, h: Tensor) -> Tensor:
        u = linear(self.fc1, h)
        return analytic.gelu(u) if u.is_complex() else F.gelu(u, approximate="tanh")


def bounded_ffn_scale(ffn: FeedForward, lip: float, tied: bool = False) -> Tensor:
    """s = min(1, lip / (1.13 ‖W₂‖₂ ‖W₁‖₂)): s·FFN(z) is lip-Lipschitz in z (W₂ = W₁ when tied).
    Also the monotone block's FFN scale."""
    w1 = spectral_norm(ffn.fc1.weight)
    bound = GELU_LIP * w1 * (w1 if tied else spectral_norm(ffn.fc2.weight))
    return (lip / bound).clamp(max=1.0)


def thick_forces(model: nn.Module, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
    """[Attn(LN₁ z), FFN(LN₂ z)], summed in this order onto x − (1+c)z by the field.

    The trained block's slow modes and most of its non-normality are the pre-LN FFN's (LN₂'s 1/σ,
    W₂ and W₁ untied; docs/experiments/stability.md, "The block as the lever"). ``ffn_tied``: the
    FFN reads z without LN₂ and W₂ = W₁ᵀ (a symmetric per-token Jacobian); ``ffn_lip`` > 0: it reads
    z and is scaled to that Lipschitz bound, capping how far it can lift J's spectrum.
    """
    attn = model.attn(layer_norm(model.ln1, z), fused=fused)
    lip, tied = model.cfg.ffn_lip, model.cfg.ffn_tied
    if not (lip or tied):
        return [attn, model.ffn(layer_norm(model.ln2, z))]
    ffn = model.ffn.tied(z) if tied else model.ffn(z)
    return [attn, ffn * bounded_ffn_scale(model.ffn, lip, tied).to(z.dtype) if lip else ffn]
