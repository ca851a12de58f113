"""Turning a digital weight increment into device pulses.

Modes (``UpdateConfig.pulse_mode``):

- ``ideal``: the increment is written exactly (a perfect analog write); one write per changed device.
- ``threshold``: digital accumulation per device, χ += Δg; fire ``n = trunc(χ/dw_min)`` pulses
  (at most ``max_pulses``) and remove ``n·dw_min`` from χ. Open loop: χ assumes the nominal step,
  the device's real (asymmetric, state-dependent, noisy) step is whatever the device does.
- ``stochastic``: a stochastic pulse train of length ``max_pulses`` (aihwkit's BL): every slot fires
  with probability ``p = |Δg|/(BL·dw_min)`` (clipped at 1), so the count is Binomial(BL, p) with mean
  ``|Δg|/dw_min``. This is the per-device marginal of aihwkit's coincidence scheme, applied once per
  step to the batch's aggregated increment (see the README for the per-sample alternative).
- ``sign``: one pulse per device in the direction of its increment (the fixed-amplitude view that
  matches sign optimizers such as Lion).

All modes return signed integer pulse counts per device; the write ledger counts exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ept.config import setting

PULSE_MODES = ("ideal", "threshold", "stochastic", "sign")


@dataclass
class UpdateConfig:
    """How increments reach the devices, and the weight→conductance map (``omega``)."""

    pulse_mode: str = setting("threshold",
                              'how increments become pulses: ideal, threshold, stochastic or sign')
    max_pulses: int = setting(31, "pulses per device per step at most (aihwkit's desired_bl)")
    omega: float = setting(0.5, 'the initial max |weight| of a matrix maps to omega·min(w_max, -w_min)')

    def __post_init__(self) -> None:
        if self.pulse_mode not in PULSE_MODES:
            raise ValueError(f"pulse_mode '{self.pulse_mode}' is not one of {', '.join(PULSE_MODES)}")
        if self.max_pulses < 1:
            raise ValueError(f"max_pulses must be >= 1, got {self.max_pulses}")
        if not 0 < self.omega <= 1:
            raise ValueError(f"omega (fraction of the conductance range at init) must be in (0, 1], "
                             f"got {self.omega}")


def threshold_pulses(acc: Tensor, delta: Tensor, dw_min: float, max_pulses: int) -> tuple[Tensor, Tensor]:
    """Accumulate ``delta`` and fire whole steps: returns (signed pulse counts, new accumulator)."""
    acc = acc + delta
    n = torch.trunc(acc / dw_min).clamp(-max_pulses, max_pulses)
    return n.to(torch.int32), acc - n * dw_min


def stochastic_pulses(delta: Tensor, dw_min: float, max_pulses: int, generator: torch.Generator) -> Tensor:
    """Binomial(max_pulses, |Δ|/(max_pulses·dw_min)) pulses in the direction of Δ."""
    p = (delta.abs() / (max_pulses * dw_min)).clamp(max=1.0)
    count = torch.full_like(p, float(max_pulses))
    n = torch.binomial(count, p, generator=generator)
    return (n * delta.sign()).to(torch.int32)


def sign_pulses(delta: Tensor) -> Tensor:
    return delta.sign().to(torch.int32)
