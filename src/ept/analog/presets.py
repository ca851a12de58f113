"""Named device presets and the one place where user overrides are applied to them.

Sources (aihwkit 1.2.0, ``aihwkit/simulator/presets/devices.py`` and ``presets/utils.py``):

- ``ideal``: exact writes, ideal converters, no noise: the digital EP step, bit for bit.
- ``rram_es``: ``ReRamESPresetDevice`` (ExpStepDevice fitted to ReRAM data, Gong et al. 2018).
- ``rram_sb``: ``ReRamSBPresetDevice`` (soft-bounds ReRAM; aihwkit's SoftBoundsReferenceDevice with no
  reference subtraction, i.e. soft bounds with additive cycle-to-cycle noise).
- ``ecram``: ``EcRamPresetDevice`` (LinearStepDevice fitted to Li-ion ECRAM, Tang et al. IEDM 2018).
- ``capacitor``: ``CapacitorPresetDevice`` (LinearStepDevice, Li et al. VLSI 2018; aihwkit's retention
  decay, lifetime 10^6 updates, is not modelled).

Every pulsed preset uses aihwkit's ``PresetIOParameters`` periphery: 7-bit DAC, 9-bit ADC, output
bound 20, output noise 0.1, no weight read noise. Updates default to threshold programming (digital
accumulation, as a tile controller would); ``pulse_mode=stochastic`` gives aihwkit's stochastic
pulse trains (BL 31).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ept.analog.devices import DeviceConfig
from ept.analog.io import IOConfig
from ept.analog.update import UpdateConfig
from ept.config import from_options, unknown_option_error


@dataclass
class AnalogConfig:
    """A device class, its periphery and its update scheme, under one preset name, and the seed that
    draws one instance of it (``ept train --analog_seed``)."""

    preset: str = "ideal"
    device: DeviceConfig = field(default_factory=DeviceConfig)
    io: IOConfig = field(default_factory=IOConfig)
    update: UpdateConfig = field(default_factory=lambda: UpdateConfig(pulse_mode="ideal"))
    # Seeds the device-to-device variation and the read and write noise of an ``ept train`` run; 0
    # takes the run's --seed (what runs saved before this field did, so their config.json still fits).
    seed: int = 0

    def device_seed(self, run_seed: int) -> int:
        """The seed the simulated devices are drawn from in a run seeded with ``run_seed``."""
        return self.seed or run_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnalogConfig:
        """Inverse of :meth:`to_dict` (a run's saved analog settings); TypeError for a field this
        version does not know, ValueError for a missing section or a bad value."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise unknown_option_error("analog config", key, sorted(names))
        missing = sorted(names - set(d) - {"seed"})  # saved before the seed was: 0, the run's --seed
        if missing:
            raise ValueError(f"analog config lacks {', '.join(missing)}")
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"analog seed must be an integer, got {seed!r}")
        return cls(
            str(d["preset"]),
            from_options(DeviceConfig, dict(d["device"]), "analog device"),
            from_options(IOConfig, dict(d["io"]), "analog io"),
            from_options(UpdateConfig, dict(d["update"]), "analog update"),
            seed,
        )


_PERIPHERY = IOConfig(inp_bits=7, out_bits=9, out_bound=20.0, out_noise=0.1, w_noise=0.0)

PRESETS: dict[str, AnalogConfig] = {
    "ideal": AnalogConfig(),
    "rram_es": AnalogConfig(
        "rram_es",
        DeviceConfig(
            response="exp_step", dw_min=0.00135, up_down=0.259359, w_max=1.0, w_min=-1.0,
            es_a=-0.5, es_b=-0.5, es_gamma_up=5.0, es_gamma_down=5.0, es_A_up=-1.18445, es_A_down=-0.081404,
            dw_min_dtod=0.2, up_down_dtod=0.05, w_max_dtod=0.3, w_min_dtod=0.3,
            dw_min_std=5.0, write_noise_std=75.0,
        ),
        _PERIPHERY,
        UpdateConfig(),
    ),
    "rram_sb": AnalogConfig(
        "rram_sb",
        DeviceConfig(
            response="soft_bounds", dw_min=0.002, up_down=0.0, w_max=1.25, w_min=-0.75, mult_noise=False,
            dw_min_dtod=0.3, up_down_dtod=0.01, w_max_dtod=0.3 / 1.25, w_min_dtod=0.3 / 0.75,
            dw_min_std=3.75, write_noise_std=56.0,
        ),
        _PERIPHERY,
        UpdateConfig(),
    ),
    "ecram": AnalogConfig(
        "ecram",
        DeviceConfig(
            response="linear", dw_min=0.002, up_down=0.0, w_max=1.1724, w_min=-0.8276, mult_noise=True,
            gamma_up=0.1153, gamma_down=0.5085, gamma_up_dtod=0.05, gamma_down_dtod=0.05,
            dw_min_dtod=0.1, up_down_dtod=0.01, w_max_dtod=0.05, w_min_dtod=0.05, dw_min_std=0.3,
        ),
        _PERIPHERY,
        UpdateConfig(),
    ),
    "capacitor": AnalogConfig(
        "capacitor",
        DeviceConfig(
            response="linear", dw_min=0.005, up_down=0.0, w_max=1.0, w_min=-1.0, mult_noise=False,
            gamma_up=0.05, gamma_down=0.05, gamma_up_dtod=0.01, gamma_down_dtod=0.01,
            dw_min_dtod=0.1, up_down_dtod=0.06, w_max_dtod=0.07, w_min_dtod=0.07, dw_min_std=0.3,
        ),
        _PERIPHERY,
        UpdateConfig(),
    ),
}

# The seed's spelling of weight read noise.
ALIASES = {"fnoise": "w_noise"}


def override_names() -> dict[str, str]:
    """Every overridable field name -> the sub-config (``device``, ``io``, ``update``) it belongs to."""
    out: dict[str, str] = {}
    for part, cls in (("device", DeviceConfig), ("io", IOConfig), ("update", UpdateConfig)):
        out.update({f.name: part for f in dataclasses.fields(cls)})
    return out


def analog_config(preset: str = "ideal", *, seed: int = 0, **overrides: Any) -> AnalogConfig:
    """The named preset with ``overrides`` (any device, io or update field, or ``fnoise``) applied,
    drawn with ``seed`` (0: the run's --seed).

    Raises ValueError for an unknown preset or invalid value, TypeError for an unknown field name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown analog preset '{preset}': choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    owners = override_names()
    parts: dict[str, dict[str, Any]] = {"device": {}, "io": {}, "update": {}}
    for key, value in overrides.items():
        name = ALIASES.get(key, key)
        if name not in owners:
            raise unknown_option_error("analog", key, list(owners) + list(ALIASES))
        parts[owners[name]][name] = value
    return AnalogConfig(
        preset,
        dataclasses.replace(base.device, **parts["device"]),
        dataclasses.replace(base.io, **parts["io"]),
        dataclasses.replace(base.update, **parts["update"]),
        seed,
    )
