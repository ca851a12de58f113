"""The equilibrium block: one pre-LN transformer block run as a dynamical system.

    x    = E[idx] + P[:T]                                   (clamped input)
    F(z) = x - (1+c)·z + N(z)                               (the field; N: :mod:`ept.blocks`)
    z*   : F(z*) = 0                                        (the free phase finds it)
    logits = W_h · [LN_f] z*

``field`` is the only thing the solvers and gradient routes need; it accepts real states (fused
kernels) and complex states (analytic forms from :mod:`ept.analytic`) for the holomorphic estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ept import analytic
from ept.blocks import FORCES, FeedForward, SelfAttention
from ept.blocks import energy as block_energy
from ept.blocks.common import layer_norm, linear
from ept.blocks.energy import energy_forces
from ept.blocks.thick import thick_forces
from ept.config import EPTConfig


class EquilibriumLM(nn.Module):
    """A language model whose hidden state is the fixed point of one transformer block."""

    def __init__(self, cfg: EPTConfig):
        super().__init__()
        self.cfg = cfg
        # An MLM model reads one more input token, the mask (id vocab_size); it never predicts it.
        self.wte = nn.Embedding(cfg.vocab_size + (cfg.objective == "mlm"), cfg.C)
        self.wpe = nn.Embedding(cfg.T, cfg.C)
        self.ln1 = nn.LayerNorm(cfg.C, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
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
        """F(z) = x - (1+c) z + N(z), N the forces of ``cfg.attn_mode``; zero at the equilibrium.

        ``fused=False`` avoids the fused attention kernel, which has no forward-mode derivative:
        pass it under ``torch.func.jvp``.
        """
        terms = self.forces(z, x, fused)  # before the leak: the vjp's accumulation order, bit for bit
        out = (x.to(z.dtype) if z.is_complex() else x) - (1.0 + self.cfg.c) * z
        for term in terms:
            out = out + term
        return out

    def forces(self, z: Tensor, x: Tensor, fused: bool = True) -> list[Tensor]:
        """The block's terms of F beyond the leak and the input (``kappa``: the energy block's blend
        (1-κ)·N_energy + κ·N_thick on the same weights)."""
        kappa = self.cfg.kappa
        if self.cfg.attn_mode != "energy" or kappa == 0.0:
            return FORCES[self.cfg.attn_mode](self, z, x, fused)
        thick = thick_forces(self, z, x, fused)
        if kappa == 1.0:
            return thick
        return [(1.0 - kappa) * e + kappa * t for e, t in zip(energy_forces(self, z, x), thick, strict=True)]

    def energy(self, z: Tensor, x: Tensor) -> Tensor:
        """E(z) per sequence, (B,), with field = −∂(energy.sum())/∂z at kappa 0 (energy mode only;
        at kappa > 0 it is the conservative part's energy)."""
        if self.cfg.attn_mode != "energy":
            raise ValueError(f"attn_mode {self.cfg.attn_mode!r} has no energy: only attn_mode 'energy' is a "
                             "gradient field")
        return block_energy(self, z, x)

    def readout(self, z: Tensor) -> Tensor:
        if self.ln_f is not None:
            z = layer_norm(self.ln_f, z)
        return linear(self.head, z)

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

    def start(self, x: Tensor) -> Tensor:
        """The relaxation's starting point z₀ = 0 (a warm start can replace it). The energy block
        starts there too: from x/(1+c), its quadratic part's minimum, the heavy-ball free phase of a
        training run stopped converging (diverged at step 56; from 0 no rollback in 60 steps)."""
        return torch.zeros_like(x)
