"""Optimisers (AdamW, SGD, SGD-SaI, Lion), the warmup–stable–decay schedule and the parameter EMA.

The training loop only needs :func:`build_optimizer`, :func:`wsd_factor` and :class:`ParamEMA`;
everything here checkpoints through plain ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

OPTIMIZERS = ("adamw", "sgd", "sgdsai", "lion")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): the sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch's contract
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class SGDSaI(torch.optim.Optimizer):
    """SGD-SaI (Xu et al. 2024): SGD with momentum whose per-tensor learning rate is scaled, once,
    by the gradient signal-to-noise ratio ||g||/std(g) of the first step it sees."""

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 - torch's contract
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "gsnr" not in state:
                    std = p.grad.std() if p.grad.numel() > 1 else p.grad.new_zeros(())
                    state["gsnr"] = (p.grad.norm() / (std + 1e-8)).clamp_max(1e4)
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(buf * state["gsnr"], alpha=-group["lr"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices: biases, LayerNorm gains and scalars keep their scale."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.9) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "sgdsai":
        return SGDSaI(groups, lr=lr, momentum=momentum)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer '{name}': choose one of {', '.join(OPTIMIZERS)}")


def wsd_factor(step: int, steps: int, warmup: int, decay: float) -> float:
    """Warmup–stable–decay: linear warmup over ``warmup`` steps, flat, then a linear decay to zero
    over the last ``decay`` fraction of ``steps`` (the seed's ``--wsd``; 0 keeps it flat)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return decay_left(step, steps, decay)


def decay_left(step: int, steps: int, decay: float) -> float:
    """How much of the WSD decay is left at ``step``: 1 before it starts, falling linearly to 0 at
    ``steps`` (1 throughout when ``decay`` is 0)."""
    n_decay = int(round(decay * steps))
    if n_decay <= 0:
        return 1.0
    return min(1.0, max(0.0, (steps - step) / n_decay))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ParamEMA:
    """Exponential moving average of the parameters (the seed's ``--pema``), used for evaluation.

    The decay ramps up as min(pema, (1+n)/(10+n)) over the n updates so far: a plain 0.999 average
    would still be mostly the random initialisation after a few hundred steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: p.detach().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach(), 1 - d)

    def weights(self) -> dict[str, Tensor]:
        return self.shadow

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
