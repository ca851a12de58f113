"""An analog training run's hardware beside the digital Session: the simulated devices, the write
ledger, and the controller's record of the pulses it fired (for rollbacks and checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ept.analog.ledger import WriteLedger
from ept.analog.presets import AnalogConfig
from ept.analog.substrate import SimulatedSubstrate
from ept.checkpoint import CheckpointError
from ept.model import EquilibriumLM

if TYPE_CHECKING:  # ept.train builds an AnalogSession: a runtime import would be circular
    from ept.train import Update


@dataclass
class AnalogSession:
    """The simulated hardware of an analog run and the controller's record of what it fired. Its state
    is checkpointed beside the Session's.

    A rollback reprograms the devices, as it would have to on hardware, rather than restoring a
    saved device state: the controller fires the reverse of every pulse since the rollback point
    (``fired``) and puts its threshold accumulators back to their values there. Those pulses wear
    the devices, so the ledger counts them (not as optimizer steps), and the devices' real steps
    land near, not on, the rollback point's weights; the model then takes what the devices read.
    The generators run on: noise is not rewound. An update with non-finite weights fires nothing
    (it is rolled back), so no device or accumulator ever sees a NaN.
    """

    cfg: AnalogConfig
    substrate: SimulatedSubstrate
    ledger: WriteLedger
    digital: Update  # the optimizer step whose result is programmed (ept.train.apply_update)
    fired: dict[str, Tensor] = field(default_factory=dict)  # signed pulses since the rollback point

    def program(self, model: EquilibriumLM, optimizer: torch.optim.Optimizer, grads: dict[str, Tensor],
                lr: float, clip: float) -> float:
        """An :data:`Update`: the optimizer step, then its result programmed into the devices."""
        norm = self.digital(model, optimizer, grads, lr, clip)
        proposed = {n: p.detach() for n, p in model.named_parameters()}
        if all(bool(torch.isfinite(p).all()) for p in proposed.values()):  # else train() rolls it back
            pulses = self.substrate.apply_pulses(proposed)
            self.ledger.record(pulses)
            for name, p in pulses.items():
                self.fired[name] = self.fired[name] + p if name in self.fired else p.to(torch.int64)
        return norm

    def rollback_point(self) -> dict[str, Any]:
        """Mark the devices' present state as the one a rollback returns to; what it needs besides."""
        self.fired = {}
        return {"acc": self.substrate.accumulators()}

    def roll_back(self, point: dict[str, Any]) -> int:
        """Reprogram the devices toward ``point`` (after the Session's state is restored); returns
        the pulses fired, which the ledger has counted."""
        fired = {name: self.fired.get(name, torch.zeros(tile.acc.shape, dtype=torch.int64))
                 for name, tile in self.substrate.tiles.items()}
        pulses = self.substrate.undo(fired, point["acc"])
        self.ledger.record(pulses, step=False)
        self.fired = {}
        return int(sum(int(p.abs().sum()) for p in pulses.values()))

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "substrate": self.substrate.state_dict(),
                "ledger": self.ledger.state_dict()}

    def load_state_dict(self, st: dict[str, Any] | None, where: str) -> None:
        """Restore the devices, generators and ledger of checkpoint ``where``; CheckpointError (one
        line) when it has none or they belong to other analog settings."""
        if st is None:
            raise CheckpointError(
                f"checkpoint '{where}' holds no analog device state (written by a digital run, or by an ept "
                "that did not checkpoint devices): it cannot continue an analog run; start a new run")
        try:
            saved = AnalogConfig.from_dict(st["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint '{where}' has unreadable analog settings ({e}): use "
                                       "another ckpt-* folder, or start a new run") from None
        if saved != self.cfg:
            raise CheckpointError(
                f"checkpoint '{where}' holds devices of other analog settings (preset {saved.preset}, seed "
                f"{saved.seed}) than the run's ({self.cfg.preset}, seed {self.cfg.seed}): restore the run's "
                "config.json, or start a new run")
        try:
            self.substrate.load_state_dict(st["substrate"])
            self.ledger.load_state_dict(st["ledger"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint '{where}' has unusable analog device state ({e}): use another ckpt-* folder, "
                "or start a new run") from None
