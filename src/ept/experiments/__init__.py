"""``ept experiment NAME``: the physics brief's questions, each one command with a table, a plot and
a record. One module per experiment, each defining ``EXPERIMENT``; the registry lists them in the
brief's order (a module not yet written is skipped)."""

from __future__ import annotations

import importlib

from ept.experiments.common import Experiment, ExperimentConfig, ExperimentError, render, write_outputs

MODULES = ("damping", "asymmetry", "attention", "horizon", "fidelity", "noise", "crux")


def _registry() -> dict[str, Experiment]:
    out = {}
    for name in MODULES:
        try:
            module = importlib.import_module(f"ept.experiments.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"ept.experiments.{name}":
                raise
            continue
        out[module.EXPERIMENT.name] = module.EXPERIMENT
    return out


EXPERIMENTS: dict[str, Experiment] = _registry()

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "ExperimentError", "render", "write_outputs"]
