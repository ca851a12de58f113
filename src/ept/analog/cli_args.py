"""``--analog PRESET`` and one flag per device, periphery and update field, for any ``ept`` command.

    add_arguments(parser)                 # --analog, --dw_min, --out_bits, --fnoise, ...
    cfg = config_from_args(args)          # None without --analog; the preset with the flags (and
                                          # --analog_seed) applied
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ept.analog.devices import DeviceConfig
from ept.analog.io import IOConfig
from ept.analog.presets import ALIASES, PRESETS, AnalogConfig, analog_config
from ept.analog.update import UpdateConfig


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


_PARSERS = {"float": float, "int": int, "bool": _bool, "str": str}


def _fields() -> list[tuple[str, Any, str]]:
    """(name, parser, help) of every device, periphery and update field."""
    out = []
    for cls in (DeviceConfig, IOConfig, UpdateConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((f.name, _PARSERS[hints[f.name].__name__], f"{f.metadata['help']} ({cls.__name__})"))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "analog hardware", "simulate the block's matrices on analog devices; any field below overrides the "
        "preset's value")
    group.add_argument("--analog", choices=list(PRESETS), default=None,
                       help="device preset: " + ", ".join(PRESETS))
    group.add_argument("--analog_seed", type=int, default=0,
                       help="seed of device-to-device variation and read/write noise (0: --seed); "
                       "--seed alone still sets the initial weights and the data order")
    for name, parse, text in _fields():
        flags = [f"--{name}"] + [f"--{a}" for a, target in ALIASES.items() if target == name]
        group.add_argument(*flags, dest=f"analog_{name}", type=parse, default=None, help=text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, f"analog_{name}") for name, _, _ in _fields()
            if getattr(args, f"analog_{name}", None) is not None}


def config_from_args(args: argparse.Namespace) -> AnalogConfig | None:
    """The analog configuration the flags ask for; ValueError (one line) for a bad value, and an
    override without ``--analog`` is refused rather than silently ignored."""
    overrides = overrides_from_args(args)
    seed = getattr(args, "analog_seed", 0)
    if args.analog is None:
        if overrides or seed:
            flags = ", ".join(f"--{k}" for k in [*overrides, *(["analog_seed"] if seed else [])])
            raise ValueError(f"{flags} set without --analog: add --analog PRESET "
                             f"(one of {', '.join(PRESETS)})")
        return None
    return analog_config(args.analog, seed=seed, **overrides)
