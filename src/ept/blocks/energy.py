"""The energy block: F = −∇E, so J = −∇²E is symmetric and EP is exact without AsymEP.

    E(z)     = ½(1+c)‖z‖² − x·z + E_att(g₁) + E_mem(g₂),        gᵢ = LNᵢ(z)
    E_att(g) = −(1/β) Σ_heads Σ_q log Σ_{k ≤ q or all k} exp(β q·k),   q = W_Q g + b_Q, k = W_K g + b_K
    E_mem(g) = −Σ G(W₁ g + b₁),   G(u) = ½ softplus(u)²,   G′(u) = softplus(u)·sigmoid(u)

E_att is the Energy Transformer's attention energy (Hoover, Krotov et al. 2023), β = 1/√d; E_mem a
Hopfield memory with tied weights in place of the FFN (G′ is a smooth ReLU). The force, in closed
form, with A = softmax(β q kᵀ) per head:

    −∂E_att/∂g = (A k) W_Q + (Aᵀ q) W_K        (query side, key side)
    −∂E_mem/∂g = G′(W₁ g + b₁) W₁
    −∂E/∂z     = x − (1+c) z + LNᵀ(−∂E/∂g),    LNᵀ(u) = (v − mean v − n·mean(v n)) / σ,  v = γ u

It uses only analytic operations, so complex states (the holomorphic estimator) work too.

**Causal** (``causal=True``): a symmetric coupling between positions is bidirectional — the key side
lets position j's state depend on later queries, so a causal LM would see its targets. Position t
instead relaxes its own energy E_t(z_t; z_<t), in which the earlier states enter as clamped
inputs: its query reads the keys k ≤ t, and its key enters only its own row (the key side keeps
A[t, t] q_t alone). Each position's own block of J is symmetric (−∇²E_t); the coupling to earlier
positions is strictly block-lower-triangular and has no transpose, so J is not symmetric and EP
needs the AsymEP correction there. :func:`energy` then is Σ_t E_t with the earlier keys detached,
whose gradient is still the field, but which is a Lyapunov function of each position given its past
rather than of the whole sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ept import analytic
from ept.blocks.common import causal_mask, heads, linear, merge, weight


def _ln_parts(ln: nn.LayerNorm, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(g, n, 1/σ): g = γ n + b, n = (z − μ)/σ, σ = √(var + eps), var = mean((z − μ)²)."""
    d = z - z.mean(dim=-1, keepdim=True)
    inv = ((d * d).mean(dim=-1, keepdim=True) + ln.eps) ** -0.5
    n = d * inv
    g = n * ln.weight.to(z.dtype)
    return (g if ln.bias is None else g + ln.bias.to(z.dtype)), n, inv


def _ln_transpose(ln: nn.LayerNorm, n: Tensor, inv: Tensor, u: Tensor) -> Tensor:
    """(∂g/∂z)ᵀ u for g = LN(z): LayerNorm's Jacobian is symmetric up to γ."""
    v = u * ln.weight.to(u.dtype)
    return inv * (v - v.mean(dim=-1, keepdim=True) - n * (v * n).mean(dim=-1, keepdim=True))


def _scores(attn: nn.Module, g: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    q, k = heads(linear(attn.q, g), attn.H), heads(linear(attn.k, g), attn.H)
    beta = 1.0 / math.sqrt(q.shape[-1])
    return q, k, beta * (q @ k.transpose(-2, -1)), beta


def energy_forces(model: nn.Module, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
    """[−∇_z E_att, −∇_z E_mem] in closed form (the leak and the input are the field's)."""
    attn, causal = model.attn, model.cfg.causal
    g1, n1, inv1 = _ln_parts(model.ln1, z)
    q, k, s, _ = _scores(attn, g1)
    mask = causal_mask(s.shape[-1], s.device) if causal else None
    a = analytic.softmax(s, mask=mask)
    key_side = a.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * q if causal else a.transpose(-2, -1) @ q
    pull = merge(a @ k) @ weight(attn.q, z) + merge(key_side) @ weight(attn.k, z)
    g2, n2, inv2 = _ln_parts(model.ln2, z)
    u = linear(model.ffn.fc1, g2)
    recall = (analytic.softplus(u) * analytic.sigmoid(u)) @ weight(model.ffn.fc1, z)
    return [_ln_transpose(model.ln1, n1, inv1, pull), _ln_transpose(model.ln2, n2, inv2, recall)]


def energy(model: nn.Module, z: Tensor, x: Tensor) -> Tensor:
    """E(z) per sequence, shape (B,). Causal: Σ_t E_t(z_t; z_<t) with the earlier keys detached, so
    that −∂(energy.sum())/∂z is the field in both modes."""
    c, causal = model.cfg.c, model.cfg.causal
    x = x.to(z.dtype) if z.is_complex() else x
    quad = (0.5 * (1.0 + c) * z * z - x * z).sum(dim=(-2, -1))
    g1, _, _ = _ln_parts(model.ln1, z)
    q, k, s, beta = _scores(model.attn, g1)
    mask = None
    if causal:
        mask = causal_mask(s.shape[-1], s.device)
        kd = k.detach()
        own = beta * (q * (k - kd)).sum(-1)  # zero in value; carries the key's own-row gradient
        s = beta * (q @ kd.transpose(-2, -1)) + torch.diag_embed(own)
    e_att = -(analytic.logsumexp(s, mask=mask).sum(dim=(-2, -1))) / beta
    g2, _, _ = _ln_parts(model.ln2, z)
    sp = analytic.softplus(linear(model.ffn.fc1, g2))
    e_mem = -0.5 * (sp * sp).sum(dim=(-2, -1))
    return quad + e_att + e_mem
