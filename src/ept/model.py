"""The equilibrium block: one pre-LN transformer block run as a dynamical system.

    x    = E[idx] + P[:T]                                   (clamped input)
    F(z) = x - (1+c)·z + Attn(LN₁ z) + FFN(LN₂ z)           (the field)
    z*   : F(z*) = 0                                        (the free phase finds it)
    logits = W_h · [LN_f] z*

``field`` is the only thing the solvers and gradient routes need; it accepts real states (fused
kernels) and complex states (analytic forms from :mod:`ept.analytic`) for the holomorphic estimator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ept import analytic
from ept.config import EPTConfig


def _linear(layer: nn.Linear, h: Tensor) -> Tensor:
    if h.is_complex():
        bias = None if layer.bias is None else layer.bias.to(h.dtype)
        return F.linear(h, layer.weight.to(h.dtype), bias)
    return layer(h)


def _layer_norm(ln: nn.LayerNorm, h: Tensor) -> Tensor:
    if h.is_complex():
        return analytic.layer_norm(h, ln.weight, ln.bias, ln.eps)
    return ln(h)


class CausalSelfAttention(nn.Module):
    """Causal multi-head softmax attention with untied Q, K, V, O (so J is not symmetric)."""

    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.H = cfg.H
        self.qknorm = cfg.qknorm
        self.q = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.k = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.v = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)
        self.o = nn.Linear(cfg.C, cfg.C, bias=cfg.bias)

    def _heads(self, h: Tensor) -> Tensor:
        B, T, C = h.shape
        return h.view(B, T, self.H, C // self.H).transpose(1, 2)

    def forward(self, h: Tensor, fused: bool = True) -> Tensor:
        B, T, C = h.shape
        q, k, v = (self._heads(_linear(lin, h)) for lin in (self.q, self.k, self.v))
        if self.qknorm:
            q, k = analytic.rms_normalize(q), analytic.rms_normalize(k)
        if h.is_complex() or not fused:
            scale = 1.0 / math.sqrt(C // self.H)
            mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            att = analytic.softmax((q @ k.transpose(-2, -1)) * scale, mask=mask)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return _linear(self.o, y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.C, cfg.ffn_mult * cfg.C, bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_mult * cfg.C, cfg.C, bias=cfg.bias)

    def forward(self, h: Tensor) -> Tensor:
        u = _linear(self.fc1, h)
        u = analytic.gelu(u) if u.is_complex() else F.gelu(u, approximate="tanh")
        return _linear(self.fc2, u)


class EquilibriumLM(nn.Module):
    """A language model whose hidden state is the fixed point of one transformer block."""

    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.cfg = cfg
        # An MLM model reads one more input token, the mask (id vocab_size); it never predicts it.
        self.wte = nn.Embedding(cfg.vocab_size + (cfg.objective == "mlm"), cfg.C)
        self.wpe = nn.Embedding(cfg.T, cfg.C)
        self.ln1 = nn.LayerNorm(cfg.C, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.C, eps=cfg.ln_eps)
        self.ffn = FeedForward(cfg)
        self.ln_f = nn.LayerNorm(cfg.C, eps=cfg.ln_eps) if cfg.ln_f else None
        self.head = nn.Linear(cfg.C, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        emb_std = self.cfg.emb_std or self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = emb_std if isinstance(module, nn.Embedding) else self.cfg.init_std
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def weight_matrices(self) -> dict[str, nn.Parameter]:
        """The 2-D weights of the block's linear maps (what an analog crossbar would hold)."""
        return {
            name: p
            for name, p in self.named_parameters()
            if p.dim() == 2 and not name.startswith(("wte", "wpe", "head"))
        }

    def inject(self, idx: Tensor) -> Tensor:
        T = idx.shape[-1]
        if T > self.cfg.T:
            raise ValueError(f"sequence length {T} exceeds the model's context T={self.cfg.T}")
        pos = torch.arange(T, device=idx.device)
        return self.wte(idx) + self.wpe(pos)

    def field(self, z: Tensor, x: Tensor, fused: bool = True) -> Tensor:
        """F(z) = x - (1+c) z + Attn(LN₁ z) + FFN(LN₂ z); zero at the equilibrium.

        ``fused=False`` avoids the fused attention kernel, which has no forward-mode derivative:
        pass it under ``torch.func.jvp``.
        """
        x = x.to(z.dtype) if z.is_complex() else x
        attn = self.attn(_layer_norm(self.ln1, z), fused=fused)
        ffn = self.ffn(_layer_norm(self.ln2, z))
        return x - (1.0 + self.cfg.c) * z + attn + ffn

    def readout(self, z: Tensor) -> Tensor:
        if self.ln_f is not None:
            z = _layer_norm(self.ln_f, z)
        return _linear(self.head, z)

    @property
    def mask_id(self) -> int | None:
        """The input id of the mask token (``objective="mlm"``), else None."""
        return self.cfg.vocab_size if self.cfg.objective == "mlm" else None

    def loss(self, z: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over the targets >= 0 (an MLM batch marks unmasked positions -100, as
        ``F.cross_entropy`` ignores them); analytic in z, so it also defines the complex nudge."""
        logits = self.readout(z)
        if not logits.is_complex():
            return F.cross_entropy(logits.flatten(0, -2), targets.flatten())
        keep = targets >= 0
        picked = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ce = analytic.logsumexp(logits) - picked
        return ce.mean() if bool(keep.all()) else (ce * keep).sum() / keep.sum().clamp_min(1)

    def free_state(self, idx: Tensor) -> Tensor:
        """The relaxation's starting point z₀ = 0 (a warm start can replace it)."""
        B, T = idx.shape
        return torch.zeros(B, T, self.cfg.C, dtype=self.wte.weight.dtype, device=idx.device)
