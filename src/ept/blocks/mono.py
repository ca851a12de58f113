"""The monotone block: a field that is m-strongly monotone for every weight value, so the
equilibrium exists, is unique, and plain relaxation reaches it from any start.

    F(z) = x − (1+c) z + s_a·Attn_x(z) + s_f·FFN(z)
    Attn_x(z) = concat_h(A_h (z W_V,hᵀ + b_V)) W_Oᵀ + b_O,   A_h = softmax(β q kᵀ), q, k from LN₁(x)
    FFN(z)    = W₂ gelu(W₁ z + b₁) + b₂

The attention scores read the clamped input x, not the state, so Attn_x is linear in z; the state
enters no LayerNorm (its Jacobian 1/σ is unbounded). Per sequence, in the Frobenius norm of its
T×C state:

    Lip(Attn_x) ≤ max_h ‖A_h‖₂ ‖W_V‖₂ ‖W_O‖₂,   ‖A_h‖₂ ≤ √(‖A_h‖₁ ‖A_h‖_∞) = √(max column sum)
    Lip(FFN)    ≤ ‖W₂‖₂ · max|gelu′| · ‖W₁‖₂,    max|gelu′| = 1.1290 (tanh form)

Each term is scaled to at most half the budget L = 1 + c − m: s = min(1, (L/2) / bound). Then, by
Cauchy–Schwarz, ⟨F(z) − F(y), z − y⟩ = −(1+c)‖z − y‖² + ⟨N(z) − N(y), z − y⟩ ≤ −m‖z − y‖²:
−F is strongly monotone and Lipschitz, its zero is unique (Browder–Minty), and the relaxation
map z + εF(z) contracts by |1 − ε(1+c)| + εL (at c = 1, ε = 0.5: 1 − m/2) from any start.
The template is monDEQ's (Winston & Kolter 2020); the bound is enforced, not learned.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ept import analytic
from ept.blocks.common import causal_mask, heads, layer_norm, linear, merge, spectral_norm
from ept.blocks.thick import bounded_ffn_scale


def attention_weights(model: nn.Module, x: Tensor) -> Tensor:
    """A_h(x), (B, H, T, T): softmax attention over the clamped input's LayerNorm."""
    attn = model.attn
    g = layer_norm(model.ln1, x)
    q, k = heads(linear(attn.q, g), attn.H), heads(linear(attn.k, g), attn.H)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    mask = causal_mask(s.shape[-1], s.device) if model.cfg.causal else None
    return analytic.softmax(s, mask=mask)


def lipschitz_scales(model: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """(s_a per sequence (B,), s_f): each force's bound scaled to at most (1 + c − m)/2."""
    half = 0.5 * (1.0 + model.cfg.c - model.cfg.mono_m)
    attn, ffn = model.attn, model.ffn
    a_norm = a.sum(dim=-2).amax(dim=-1).sqrt().amax(dim=-1)
    att_bound = a_norm * spectral_norm(attn.v.weight) * spectral_norm(attn.o.weight)
    return (half / att_bound).clamp(max=1.0), bounded_ffn_scale(ffn, half)


def mono_forces(model: nn.Module, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
    """[s_a·Attn_x(z), s_f·FFN(z)]; ``x`` is the real clamped input."""
    attn = model.attn
    a = attention_weights(model, x.real if x.is_complex() else x)
    s_att, s_ffn = lipschitz_scales(model, a)
    v = heads(linear(attn.v, z), attn.H)
    att = linear(attn.o, merge(a.to(z.dtype) @ v))
    return [att * s_att.to(z.dtype)[:, None, None], model.ffn(z) * s_ffn.to(z.dtype)]
