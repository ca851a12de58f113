"""``ept experiment NAME``: the physics brief's questions, each one command with a table, a plot and
a record. One module per experiment; this registry is what the CLI offers."""

from __future__ import annotations

from ept.experiments.common import Experiment, ExperimentConfig, ExperimentError, write_outputs
from ept.experiments.damping import DAMPING

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (DAMPING,)}

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "ExperimentError", "write_outputs"]
