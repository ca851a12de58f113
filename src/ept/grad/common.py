"""Pieces every gradient route shares: the free phase, ∂L/∂z, and the local θ-vjp of F."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from ept import analytic
from ept.config import SolverConfig
from ept.model import EquilibriumLM
from ept.solvers import RowwiseField, SolveStats, relax

Grads = dict[str, Tensor]


def free_phase(
    model: EquilibriumLM, x: Tensor, cfg: SolverConfig, z0: Tensor | None = None
) -> tuple[Tensor, SolveStats]:
    """Relax to z* without autograd history: the free phase costs the memory of one field call.

    Sequences that converge stop there while the slower ones go on, on a sub-batch.
    """
    x = x.detach()
    start = model.start(x) if z0 is None else z0.detach()
    with torch.no_grad():
        return relax(RowwiseField(free_field(model, cfg), (x,)), start, cfg)


_COMPILED: weakref.WeakKeyDictionary[EquilibriumLM, Callable[..., Tensor]] = weakref.WeakKeyDictionary()


def free_field(model: EquilibriumLM, cfg: SolverConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """F(z, x) as the free phase evaluates it: ``model.field``, compiled (``cfg.compile``, once per
    model) and under bf16 autocast (``cfg.dtype``), its value returned in the state's dtype."""
    fn: Callable[..., Tensor] = model.field
    if cfg.compile:
        if model not in _COMPILED:
            _COMPILED[model] = torch.compile(model.field, dynamic=True)
        fn = _COMPILED[model]
    if cfg.dtype == "float32":
        return fn
    inner = fn

    def lowered(z: Tensor, x: Tensor) -> Tensor:
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            return inner(z, x).to(z.dtype)

    return lowered


def n_targets(targets: Tensor) -> int:
    """The tokens the loss averages over: the targets >= 0 (an MLM batch ignores the rest)."""
    return int((targets >= 0).sum())


def loss_grad_z(model: EquilibriumLM, z: Tensor, targets: Tensor, scale: float = 1.0,
                count: int | None = None) -> Tensor:
    """∂(scale·L)/∂z as the holomorphic derivative, so complex states get the analytic nudge.

    L is the mean CE over the ``count`` targets >= 0 (counted when not given; the nudged phase,
    which calls this at every step, counts once): ignored positions get zero rows, and with no
    target at all the gradient is zero. Without ``ln_f`` the readout is linear and the gradient has
    a closed form (see :func:`readout_ce_grad`), about 3x cheaper than a reverse pass on CPU. With
    ``ln_f``, autograd: PyTorch returns conj(dL/dz) for a holomorphic L, hence the conjugation.
    """
    n = n_targets(targets) if count is None else count
    if n == 0:  # nothing to predict (the mean would be 0/0)
        return torch.zeros_like(z)
    if model.ln_f is None:
        return readout_ce_grad(model, z, targets) * (scale / n)
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loss = model.loss(z, targets) * scale
        (g,) = torch.autograd.grad(loss, z, grad_outputs=torch.ones_like(loss))
    return g.conj() if g.is_complex() else g


def readout_ce_grad(model: EquilibriumLM, z: Tensor, targets: Tensor) -> Tensor:
    """Σ_tokens ∂CE/∂z for logits = W z: (softmax(W z) − e_y) W, holomorphic as written; zero rows
    where the target is < 0 (ignored)."""
    W = model.head.weight.detach().to(z.dtype)
    logits = z.detach() @ W.t()
    p = analytic.softmax(logits) if z.is_complex() else torch.softmax(logits, dim=-1)
    # In place on the fresh softmax, and no mask where every target counts (an LM's): each (B, T, V)
    # copy cost ~35 ms at the small preset's nudged batch (32 x 128 x 2048), 0.28 -> 0.20 s a call.
    p.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), -torch.ones_like(p[..., :1]))
    valid = targets >= 0
    if not bool(valid.all()):
        p.masked_fill_(~valid.unsqueeze(-1), 0)
    return p @ W


def local_update(model: EquilibriumLM, idx: Tensor, targets: Tensor, z_star: Tensor, lam: Tensor) -> Grads:
    """dL/dθ = ∂L/∂θ|direct + λᵀ ∂F/∂θ|z*: one vjp of F at the fixed point, nothing through time."""
    with torch.enable_grad():
        z = z_star.detach()
        x = model.inject(idx)
        # With no target the mean loss is 0/0: its term is dropped (the readout gets zeros).
        loss = model.loss(z, targets) if n_targets(targets) else z.new_zeros(())
        total = loss + (model.field(z, x) * lam.detach()).sum()
        return param_grads(model, total)


def param_grads(model: EquilibriumLM, scalar: Tensor) -> Grads:
    """d scalar / dθ for every named parameter (zeros for those it does not touch)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def solve_summary(prefix: str, stats: SolveStats) -> dict[str, float | int | bool]:
    return {f"{prefix}_{k}": v for k, v in stats.summary().items()}
