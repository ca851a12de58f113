"""How faithful is each gradient route? Cosine and relative norm against the implicit oracle
on a small random problem, with the operator's non-normality alongside."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import ept
from ept.config import EPTConfig
from ept.diagnostics import compare as fidelity_compare
from ept.diagnostics import nonnormality
from ept.model import EquilibriumLM

# Route variants reported by ``ept gradcheck``: name -> (route, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bptt": ("bptt", {"T1": 300}),
    "ep_onesided_fixed": ("ep", {"estimator": "onesided", "asym": "fixed"}),
    "ep_centred_none": ("ep", {"estimator": "centred", "asym": "none"}),
    "ep_centred_fixed": ("ep", {"estimator": "centred", "asym": "fixed"}),
    "ep_centred_track": ("ep", {"estimator": "centred", "asym": "track"}),
    "ep_holo2_fixed": ("ep", {"estimator": "holomorphic", "holo": 2, "asym": "fixed"}),
    "ep_holo4_fixed": ("ep", {"estimator": "holomorphic", "holo": 4, "asym": "fixed"}),
    "ep_holo4_track": ("ep", {"estimator": "holomorphic", "holo": 4, "asym": "track"}),
}


@dataclass
class GradcheckConfig:
    vocab_size: int = 50
    C: int = 16
    H: int = 2
    T: int = 8
    B: int = 3
    c: float = 1.0
    scale: float = 1.0
    seed: int = 0
    dtype: str = "float64"
    attn_mode: str = "thick"
    causal: bool = True
    kappa: float = 0.0
    mono_m: float = 0.5
    emb_std: float = 0.0  # 0: the block's init_std, the problem this check was calibrated on

    def model_config(self) -> EPTConfig:
        """The block; a bidirectional one is built as an MLM model (a bidirectional LM is refused)."""
        return EPTConfig(vocab_size=self.vocab_size, C=self.C, H=self.H, T=self.T, c=self.c,
                         attn_mode=self.attn_mode, causal=self.causal, kappa=self.kappa, mono_m=self.mono_m,
                         objective="lm" if self.causal else "mlm", emb_std=self.emb_std)


def compare(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    both = fidelity_compare(grads, reference, "ref")
    return {"cos": both["cos_ref"], "relnorm": both["relnorm_ref"]}


def build_problem(cfg: GradcheckConfig) -> tuple[EquilibriumLM, Tensor, Tensor]:
    torch.manual_seed(cfg.seed)
    model = EquilibriumLM(cfg.model_config()).to(getattr(torch, cfg.dtype))
    with torch.no_grad():
        for p in model.weight_matrices().values():
            p.mul_(cfg.scale)
    idx = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T))
    targets = torch.randint(0, cfg.vocab_size, (cfg.B, cfg.T))
    return model, idx, targets


def run_gradcheck(cfg: GradcheckConfig) -> dict[str, Any]:
    """Every variant in :data:`VARIANTS` against the implicit gradient, plus the problem's facts."""
    model, idx, targets = build_problem(cfg)
    tight = cfg.dtype == "float64"
    free = {"res_est": 1e-11 if tight else 1e-6, "t1max": 1000}
    ep_extra = {"t2_tol": 1e-10 if tight else 1e-6, "t2sel": 400}
    oracle, ostats = ept.gradient(model, idx, targets, route="implicit", **free)
    x = model.inject(idx).detach()
    report: dict[str, Any] = {
        "routes": {},
        "nonnormality": nonnormality(model, x, ostats["z_star"], generator=torch.Generator().manual_seed(0)),
        "free_residual": ostats["free_residual_max"],
        "free_fevals": ostats["free_fevals"],
        "converged": bool(ostats["free_converged"]),
        "diverged": bool(ostats["diverged"]),
    }
    for name, (route, opts) in VARIANTS.items():
        extra = {} if route == "bptt" else {**free, **ep_extra}
        grads, stats = ept.gradient(model, idx, targets, route=route, **opts, **extra)
        entry = compare(grads, oracle)
        entry["diverged"] = bool(stats["diverged"])
        if "T2" in stats:
            entry["T2"] = stats["T2"]
        report["routes"][name] = entry
    return report
