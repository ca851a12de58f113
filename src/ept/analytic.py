"""Nonlinearities that are holomorphic, so the block can be evaluated at complex states.

The holomorphic EP estimator relaxes the block at complex nudges β = r·e^{iφ}. That needs every
nonlinearity of F written with analytic operations only (exp, tanh, powers; no ``abs``, no
``conj``), each equal to its usual real form on real inputs. The real path of the model uses
PyTorch's fused kernels; tests check the two agree and that these satisfy Cauchy–Riemann.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_GELU_K = math.sqrt(2.0 / math.pi)


def softmax(s: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Softmax; ``mask`` (bool, True = keep) zeroes entries without using -inf.

    The shift by the (detached) real maximum only guards exp against overflow: softmax is
    shift-invariant, so the result is still the analytic softmax of ``s``.
    """
    real = s.real if s.is_complex() else s
    if mask is not None:
        real = real.masked_fill(~mask, float("-inf"))
    shift = real.detach().amax(dim=dim, keepdim=True)
    e = torch.exp(s - shift)
    if mask is not None:
        e = e * mask
    return e / e.sum(dim=dim, keepdim=True)


def logsumexp(s: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """log Σ exp(s) along ``dim``, over the entries ``mask`` keeps (each row must keep one)."""
    real = s.real if s.is_complex() else s
    if mask is not None:
        real = real.masked_fill(~mask, float("-inf"))
    shift = real.detach().amax(dim=dim, keepdim=True)
    e = torch.exp(s - shift)
    if mask is not None:
        e = e * mask
    return (torch.log(e.sum(dim=dim, keepdim=True)) + shift).squeeze(dim)


def layer_norm(h: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm with the variance as mean((h-μ)²), not mean(|h-μ|²), and the principal rsqrt."""
    mu = h.mean(dim=-1, keepdim=True)
    d = h - mu
    var = (d * d).mean(dim=-1, keepdim=True)
    out = d * (var + eps) ** -0.5
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_normalize(h: Tensor, eps: float = 1e-6) -> Tensor:
    """Scale each vector to unit RMS (used for qknorm)."""
    return h * ((h * h).mean(dim=-1, keepdim=True) + eps) ** -0.5


def gelu(h: Tensor) -> Tensor:
    """The tanh form of GELU, which is entire; the real path uses ``approximate='tanh'`` to match."""
    return 0.5 * h * (1.0 + torch.tanh(_GELU_K * (h + 0.044715 * h * h * h)))


def _negative_side(h: Tensor) -> tuple[Tensor, Tensor]:
    """(a, pos): a = -h where Re h > 0, else h, so exp(a) never overflows."""
    pos = h.real > 0
    return torch.where(pos, -h, h), pos


def softplus(h: Tensor) -> Tensor:
    """log(1 + e^h), analytic near the real axis (both branches are the same function)."""
    if not h.is_complex():
        return torch.nn.functional.softplus(h)
    a, pos = _negative_side(h)
    return torch.log(1 + torch.exp(a)) + torch.where(pos, h, torch.zeros_like(h))


def sigmoid(h: Tensor) -> Tensor:
    """1 / (1 + e^-h), the derivative of :func:`softplus`."""
    if not h.is_complex():
        return torch.sigmoid(h)
    a, pos = _negative_side(h)
    e = torch.exp(a)
    return torch.where(pos, 1 / (1 + e), e / (1 + e))
