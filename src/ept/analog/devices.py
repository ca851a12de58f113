"""Resistive device models: how one conductance responds to one programming pulse.

Conductances ``g`` are in normalised units (the nominal range is [w_min, w_max], about ±1), as in
aihwkit. Every function here is vectorised over a whole crossbar: per-device parameters are tensors
of the crossbar's shape, sampled once at initialisation (device-to-device variation), and a pulse is
applied to all devices selected by a mask at once.

Responses (aihwkit's formulas, ``src/rpucuda/rpu_{linearstep,expstep}_device.cpp``):

- ``linear`` (LinearStepDevice; ``soft_bounds`` is the same with gamma = 1, i.e. the step shrinks to
  zero at the bound): up ``Δg = s_up·(1 - γ_up·g/w_max)``, down ``Δg = -s_down·(1 - γ_down·g/w_min)``.
- ``exp_step`` (ExpStepDevice): with ``z = 2·a·g/(b_max - b_min) + b``,
  up ``Δg = s_up·max(1 - A_up·e^{γ_up·z}, 0)``, down ``Δg = -s_down·max(1 - A_down·e^{-γ_down·z}, 0)``.

``s_up``/``s_down`` carry the up/down asymmetry and the device-to-device spread of the step; each
pulse's step is perturbed by cycle-to-cycle noise (``dw_min_std``, multiplicative or additive) and the
state is clipped to the device's own bounds. ``write_noise_std`` perturbs what a read sees after a
write (aihwkit's "apparent" weight) while the update acts on the hidden persistent state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ept.config import setting

RESPONSES = ("linear", "soft_bounds", "exp_step")


@dataclass
class DeviceConfig:
    """One device class. ``dw_min_std`` and ``write_noise_std`` are in units of ``dw_min`` (aihwkit)."""

    response: str = setting("linear", 'device response: linear, soft_bounds or exp_step')
    w_min: float = setting(-1.0, 'lower conductance bound (weight units)')
    w_max: float = setting(1.0, 'upper conductance bound (weight units)')
    dw_min: float = setting(0.001, 'nominal weight step of one pulse')
    up_down: float = setting(0.0,
                             'up/down asymmetry: > 0 shrinks down steps, < 0 up steps')
    dw_min_dtod: float = setting(0.0, 'device-to-device spread of dw_min (relative)')
    up_down_dtod: float = setting(0.0, 'device-to-device spread of up_down')
    w_min_dtod: float = setting(0.0, 'device-to-device spread of w_min (relative)')
    w_max_dtod: float = setting(0.0, 'device-to-device spread of w_max (relative)')
    dw_min_std: float = setting(0.0, 'cycle-to-cycle spread of one step, in units of dw_min')
    mult_noise: bool = setting(True,
                               'cycle-to-cycle noise scales the state-dependent step (else only dw_min)')
    write_noise_std: float = setting(0.0, 'write noise std, in units of dw_min')
    gamma_up: float = setting(0.0,
                              'linear response: up-step decrease at the bound (soft_bounds: 1)')
    gamma_down: float = setting(0.0, 'linear response: relative down-step decrease at the bound')
    gamma_up_dtod: float = setting(0.0, 'device-to-device spread of gamma_up')
    gamma_down_dtod: float = setting(0.0, 'device-to-device spread of gamma_down')
    es_a: float = setting(-0.5, "exp_step shape a (aihwkit's)")
    es_b: float = setting(-0.5, "exp_step shape b (aihwkit's)")
    es_A_up: float = setting(-1.18445, "exp_step A_up (aihwkit's)")
    es_A_down: float = setting(-0.081404, "exp_step A_down (aihwkit's)")
    es_gamma_up: float = setting(5.0, "exp_step gamma_up (aihwkit's)")
    es_gamma_down: float = setting(5.0, "exp_step gamma_down (aihwkit's)")

    def __post_init__(self) -> None:
        if self.response not in RESPONSES:
            raise ValueError(f"device response '{self.response}' is not one of {', '.join(RESPONSES)}")
        if not self.w_min < 0 < self.w_max:
            raise ValueError(f"device range needs w_min < 0 < w_max, got [{self.w_min}, {self.w_max}]")
        if self.dw_min <= 0:
            raise ValueError(f"dw_min (the nominal step of one pulse) must be > 0, got {self.dw_min}")
        for name in ("dw_min_dtod", "up_down_dtod", "w_min_dtod", "w_max_dtod", "dw_min_std",
                     "write_noise_std", "gamma_up_dtod", "gamma_down_dtod"):
            if getattr(self, name) < 0:
                raise ValueError(f"device {name} is a spread and must be >= 0, got {getattr(self, name)}")
        if abs(self.up_down) >= 1:
            raise ValueError(f"up_down must lie in (-1, 1) (a step of zero otherwise), got {self.up_down}")

    def replace(self, **changes: object) -> DeviceConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class DeviceState:
    """Per-device parameters fixed at initialisation (device-to-device variation)."""

    scale_up: Tensor
    scale_down: Tensor
    bound_max: Tensor
    bound_min: Tensor
    slope_up: Tensor  # linear responses only: Δg_up = slope_up·g + scale_up
    slope_down: Tensor


def _gauss(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def sample_devices(cfg: DeviceConfig, shape: tuple[int, ...], generator: torch.Generator) -> DeviceState:
    """Draw every device's step sizes and bounds as aihwkit's ``PulsedRPUDevice::populate`` does
    (with ``enforce_consistency``), plus the linear-step slopes referenced to the mean bounds."""
    bound_max = cfg.w_max * (1 + cfg.w_max_dtod * _gauss(shape, generator))
    bound_min = cfg.w_min * (1 + cfg.w_min_dtod * _gauss(shape, generator))
    gain = 1 + cfg.dw_min_dtod * _gauss(shape, generator)
    r = cfg.up_down_dtod * _gauss(shape, generator)
    up_bias = 0.0 if cfg.up_down > 0 else cfg.up_down
    down_bias = -cfg.up_down if cfg.up_down > 0 else 0.0
    scale_up = ((up_bias + gain + r) * cfg.dw_min).abs()
    scale_down = ((down_bias + gain - r) * cfg.dw_min).abs()
    lo, hi = torch.minimum(bound_min, bound_max), torch.maximum(bound_min, bound_max)
    bound_max, bound_min = hi.abs(), -lo.abs()
    gamma_up, gamma_down = (1.0, 1.0) if cfg.response == "soft_bounds" else (cfg.gamma_up, cfg.gamma_down)
    g_up = (gamma_up + cfg.gamma_up_dtod * _gauss(shape, generator)).abs()
    g_down = (gamma_down + cfg.gamma_down_dtod * _gauss(shape, generator)).abs()
    # aihwkit's LinearStep: slope_up = -γ_up·s_up/w_max, slope_down = -γ_down·s_down/w_min, referenced
    # to the mean bounds; soft bounds reference each device's own bounds, where its step vanishes.
    ref_max, ref_min = (bound_max, bound_min) if cfg.response == "soft_bounds" else (cfg.w_max, cfg.w_min)
    slope_up = -g_up * scale_up / ref_max
    slope_down = -g_down * scale_down / ref_min
    return DeviceState(scale_up, scale_down, bound_max, bound_min, slope_up, slope_down)


def step_size(cfg: DeviceConfig, dev: DeviceState, g: Tensor, up: Tensor) -> Tensor:
    """The magnitude of one pulse's step at state ``g`` (``up`` selects the direction per device)."""
    if cfg.response == "exp_step":
        z = 2.0 * cfg.es_a * g / (dev.bound_max - dev.bound_min) + cfg.es_b
        y_up = (1.0 - cfg.es_A_up * torch.exp(cfg.es_gamma_up * z)).clamp_min(0.0)
        y_down = (1.0 - cfg.es_A_down * torch.exp(-cfg.es_gamma_down * z)).clamp_min(0.0)
        return torch.where(up, y_up * dev.scale_up, y_down * dev.scale_down)
    # linear / soft_bounds: down moves by slope_down·g + scale_down (both sign-corrected above)
    return torch.where(up, dev.slope_up * g + dev.scale_up, dev.slope_down * g + dev.scale_down)


def pulse_once(
    cfg: DeviceConfig, dev: DeviceState, g: Tensor, direction: Tensor, generator: torch.Generator
) -> Tensor:
    """Apply one pulse to every device with ``direction`` ±1 (0 leaves the device untouched)."""
    up = direction > 0
    dw = step_size(cfg, dev, g, up)
    if cfg.dw_min_std > 0:
        xi = _gauss(tuple(g.shape), generator) * cfg.dw_min_std
        if cfg.mult_noise or cfg.response == "exp_step":
            dw = dw * (1.0 + xi)
        else:
            dw = dw + torch.where(up, dev.scale_up, dev.scale_down) * xi
    new = g + direction.to(g.dtype) * dw
    return torch.minimum(torch.maximum(new, dev.bound_min), dev.bound_max)


def apply_pulse_train(
    cfg: DeviceConfig, dev: DeviceState, g: Tensor, pulses: Tensor, generator: torch.Generator
) -> Tensor:
    """Fire ``pulses`` (signed integer counts per device) one after another, as a device sees them.

    The loop runs over the pulse index (at most the largest count, e.g. 31), never over devices:
    state dependence means the k-th pulse of a device sees the state the (k-1)-th left.
    """
    direction = pulses.sign().to(g.dtype)
    remaining = pulses.abs()
    n = int(remaining.max().item()) if remaining.numel() else 0
    for k in range(n):
        active = torch.where(remaining > k, direction, torch.zeros_like(direction))
        g = pulse_once(cfg, dev, g, active, generator)
    return g
