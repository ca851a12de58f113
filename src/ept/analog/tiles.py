"""One crossbar: the device state behind one weight matrix, its pulse programmer and write counters."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ept.analog.devices import DeviceConfig, DeviceState, apply_pulse_train, sample_devices
from ept.analog.update import UpdateConfig, sign_pulses, stochastic_pulses, threshold_pulses


class AnalogTile:
    """Devices holding ``weight = scale·g``; ``weight`` is always what a read of the devices returns.

    ``scale`` is fixed at initialisation so that the largest initial weight sits at ``omega`` of the
    conductance range; device-to-device variation is drawn once from ``init_gen``. ``writes`` counts
    the pulses every device has received (the write ledger).
    """

    def __init__(
        self,
        weight: Tensor,
        device: DeviceConfig,
        update: UpdateConfig,
        init_gen: torch.Generator,
        write_gen: torch.Generator,
    ):
        self.device, self.update, self.write_gen = device, update, write_gen
        w = weight.detach().to(torch.float32)
        self.writes = torch.zeros(w.shape, dtype=torch.int64)
        self.acc = torch.zeros_like(w)
        span = min(device.w_max, -device.w_min) * update.omega
        amax = float(w.abs().max())
        self.scale = amax / span if amax > 0 else 1.0
        if update.pulse_mode == "ideal":  # exact writes: the periphery still reads through ``scale``
            self.dev = None
            self.weight = weight.detach().clone()
            return
        self.dev = sample_devices(device, tuple(w.shape), init_gen)
        self.g = torch.minimum(torch.maximum(w / self.scale, self.dev.bound_min), self.dev.bound_max)
        self.g_read = self._with_write_noise(self.g, torch.ones_like(self.g, dtype=torch.bool), self.g)
        self.weight = (self.g_read * self.scale).to(weight.dtype)

    def _with_write_noise(self, g: Tensor, touched: Tensor, previous: Tensor) -> Tensor:
        """What a read sees after a write: the persistent state plus write noise, redrawn only for
        the devices just written (aihwkit's apparent weight)."""
        std = self.device.write_noise_std * self.device.dw_min
        if std <= 0:
            return g
        noisy = g + std * torch.randn(g.shape, generator=self.write_gen, dtype=g.dtype)
        return torch.where(touched, noisy, previous)

    @property
    def dw_min_weight(self) -> float:
        """The nominal weight change of one pulse."""
        return self.device.dw_min * self.scale

    def pulses_for(self, delta_g: Tensor) -> Tensor:
        """Signed pulse counts for a conductance increment, by the configured mode."""
        u, dw = self.update, self.device.dw_min
        if u.pulse_mode == "threshold":
            pulses, self.acc = threshold_pulses(self.acc, delta_g, dw, u.max_pulses)
            return pulses
        if u.pulse_mode == "stochastic":
            return stochastic_pulses(delta_g, dw, u.max_pulses, self.write_gen)
        return sign_pulses(delta_g)

    def apply(self, pulses: Tensor) -> None:
        """Fire ``pulses`` on the devices and refresh the read weight; counts them in ``writes``."""
        self.writes += pulses.abs().to(torch.int64)
        touched = pulses != 0
        self.g = apply_pulse_train(self.device, self.dev, self.g, pulses, self.write_gen)
        self.g_read = self._with_write_noise(self.g, touched, torch.where(touched, self.g, self.g_read))
        self.weight = (self.g_read * self.scale).to(self.weight.dtype)

    def program(self, proposed: Tensor) -> Tensor:
        """Move the devices toward ``proposed`` (model units); returns the pulses fired."""
        proposed = proposed.detach()
        if self.dev is None:  # an ideal write: exact, one write per changed device
            pulses = torch.sign(proposed - self.weight).to(torch.int32)
            self.writes += pulses.abs().to(torch.int64)
            self.weight = proposed.clone()
            return pulses
        delta_g = (proposed - self.weight).to(torch.float32) / self.scale
        pulses = self.pulses_for(delta_g)
        self.apply(pulses)
        return pulses

    def undo(self, fired: Tensor, acc: Tensor, target: Tensor) -> Tensor:
        """Reprogram toward an earlier state (a training rollback): fire the reverse of ``fired``, the
        signed pulses since then, as one train, and put the threshold accumulator back to ``acc``, its
        value then; returns the pulses fired. Exact writes (no devices) write ``target`` instead.

        Reversing the controller's own pulses, rather than programming toward the earlier read,
        does not chase the write noise of either read; the devices' real steps (asymmetric, state
        dependent, noisy, clipped at the bounds) land them near, not on, the earlier state.
        """
        if self.dev is None:
            return self.program(target)
        self.acc = acc.clone()
        pulses = (-fired).to(torch.int32)
        if bool(pulses.any()):  # nothing to undo fires nothing and draws no write noise
            self.apply(pulses)
        return pulses

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a write changes or initialisation drew, as tensors and floats (the shared
        write generator belongs to the substrate). ``scale`` is saved, not recomputed: it belongs to
        the weights the run started from, not to whatever a restoring tile was built on."""
        st: dict[str, Any] = {"scale": self.scale, "writes": self.writes, "acc": self.acc,
                              "weight": self.weight}
        if self.dev is not None:
            st.update(g=self.g, g_read=self.g_read,
                      dev={f.name: getattr(self.dev, f.name) for f in dataclasses.fields(DeviceState)})
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError when it is from another crossbar shape or
        update scheme (pulsed devices vs exact writes)."""
        shape = tuple(self.weight.shape)
        if tuple(st["weight"].shape) != shape:
            raise ValueError(f"crossbar is {tuple(st['weight'].shape)} there but {shape} here")
        if (self.dev is None) != ("dev" not in st):
            raise ValueError("saved with another pulse_mode (exact writes vs pulsed devices)")
        self.scale = float(st["scale"])
        self.writes, self.acc = st["writes"].clone(), st["acc"].clone()
        self.weight = st["weight"].clone()
        if self.dev is not None:
            names = [f.name for f in dataclasses.fields(DeviceState)]
            self.dev = DeviceState(**{name: st["dev"][name].clone() for name in names})
            self.g, self.g_read = st["g"].clone(), st["g_read"].clone()
