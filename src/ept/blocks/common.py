"""Pieces every block uses: linear maps and LayerNorm at real or complex states, the head split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ept import analytic

GELU_LIP = 1.13  # above max |d gelu/dh| = 1.12899 (tests/test_blocks.py checks it)


def spectral_norm(w: Tensor) -> Tensor:
    """‖w‖₂, the largest singular value: a linear map's Lipschitz constant."""
    return torch.linalg.matrix_norm(w, ord=2)


def linear(layer: nn.Linear, h: Tensor) -> Tensor:
    if h.is_complex():
        bias = None if layer.bias is None else layer.bias.to(h.dtype)
        return F.linear(h, layer.weight.to(h.dtype), bias)
    return layer(h)


def layer_norm(ln: nn.LayerNorm, h: Tensor) -> Tensor:
    if h.is_complex():
        return analytic.layer_norm(h, ln.weight, ln.bias, ln.eps)
    return ln(h)


def weight(layer: nn.Linear, like: Tensor) -> Tensor:
    return layer.weight.to(like.dtype) if like.is_complex() else layer.weight


def heads(h: Tensor, H: int) -> Tensor:
    """(B, T, C) -> (B, H, T, C/H)."""
    B, T, C = h.shape
    return h.view(B, T, H, C // H).transpose(1, 2)


def merge(h: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H·d)."""
    B, H, T, d = h.shape
    return h.transpose(1, 2).reshape(B, T, H * d)


def causal_mask(T: int, device: torch.device) -> Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()
