"""The substrate interface: what the EP control loop needs from the thing that computes.

A substrate settles the equilibrium block with the input clamped (and, in the nudged phase, the
output pulled toward the targets), lets the controller read the settled state, reports the local
updates at a settled state, and programs weight increments as device pulses. The EP loop
(:func:`ept.analog.loop.analog_step`) uses these five calls and nothing else, so a board driver that
implements them trains with the same loop as the simulator.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ept.analog.io import NoisePool, analog_linear
from ept.analog.presets import AnalogConfig
from ept.analog.tiles import AnalogTile
from ept.config import EPConfig, SolverConfig
from ept.grad.common import free_phase, local_update
from ept.grad.ep import nudged_phase
from ept.model import EquilibriumLM
from ept.solvers import SolveStats


@dataclass
class Nudge:
    """The nudged phase: pull the readout toward ``targets`` with each of ``betas``, starting from and
    linearising the AsymEP correction at ``anchor`` (the free state). ``weights`` are the estimator's
    weights; a substrate with adaptive settling uses them to decide when the estimate has settled."""

    targets: Tensor
    anchor: Tensor
    betas: Sequence[complex]
    weights: Sequence[complex]


@dataclass
class Settled:
    """A settled state (for a nudge: one per beta, stacked along the batch) and how it settled."""

    state: Tensor
    stats: SolveStats


def stream(seed: int, role: str) -> torch.Generator:
    """The generator of one role (device variation, read noise, write noise) of analog seed ``seed``.

    Its seed is a hash of both, so no two roles or seeds share a stream, and none is the stream of
    ``torch.manual_seed(seed)``, which draws a run's initial weights: seeding the roles seed, seed + 1,
    seed + 2 drew the device variation from the very numbers of the weight initialisation, the read
    noise from those of the batch order (seeded run seed + 1), and shared streams between adjacent seeds.
    """
    digest = hashlib.sha256(f"ept.analog/{role}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@runtime_checkable
class Substrate(Protocol):
    def parameters(self) -> dict[str, Tensor]:
        """The controller's view of every trainable tensor, by name; the optimizer updates these in
        place and :meth:`apply_pulses` then writes the analog ones back from the devices."""
        ...

    def settle(self, idx: Tensor, nudge: Nudge | None = None) -> Settled:
        """Relax with the input clamped (``nudge=None``: the free phase)."""
        ...

    def read(self, settled: Settled) -> Tensor:
        """The settled state as the controller sees it."""
        ...

    def local_grads(
        self, idx: Tensor, targets: Tensor, z_star: Tensor, lam: Tensor
    ) -> tuple[dict[str, Tensor], float]:
        """The local update ∂L/∂θ + λᵀ∂F/∂θ at the free state, and the loss there."""
        ...

    def apply_pulses(self, proposed: dict[str, Tensor]) -> dict[str, Tensor]:
        """Move every analog weight toward ``proposed`` with pulses; returns the signed pulse counts."""
        ...


class SimulatedSubstrate:
    """:class:`Substrate` on an :class:`~ept.EquilibriumLM` with every block matrix on an analog tile.

    Three generators seeded from ``seed`` draw the device-to-device variation (once, here), the read
    noise of the forward passes, and the write noise and stochastic pulses, so a seeded run repeats
    exactly. The model's weights are replaced by what the devices hold.
    """

    def __init__(
        self, model: EquilibriumLM, cfg: AnalogConfig, solver: SolverConfig, ep: EPConfig, seed: int = 0
    ):
        self.model, self.cfg, self.solver, self.ep = model, cfg, solver, ep
        self.init_gen = stream(seed, "devices")
        self.read_gen = stream(seed, "read")
        self.noise = NoisePool(self.read_gen) if not cfg.io.ideal else None
        self.write_gen = stream(seed, "write")
        self.tiles: dict[str, AnalogTile] = {}
        self._modules: dict[str, nn.Linear] = {}
        with torch.no_grad():
            for name, weight in model.weight_matrices().items():
                tile = AnalogTile(weight, cfg.device, cfg.update, self.init_gen, self.write_gen)
                weight.copy_(tile.weight)
                self.tiles[name] = tile
                self._modules[name] = model.get_submodule(name.rsplit(".", 1)[0])

    # ---------------------------------------------------------------- forward non-idealities
    @contextlib.contextmanager
    def analog_forward(self) -> Iterator[None]:
        """Inside: every matrix–vector product of the block goes through its tile's periphery."""
        if self.cfg.io.ideal:  # nn.Linear is already the ideal tile: leave it bit for bit
            yield
            return
        io, noise = self.cfg.io, self.noise
        for name, module in self._modules.items():
            scale = self.tiles[name].scale

            def forward(h: Tensor, m: nn.Linear = module, s: float = scale) -> Tensor:
                return analog_linear(h, m.weight, m.bias, io, s, noise)

            module.forward = forward
        try:
            yield
        finally:
            for module in self._modules.values():
                del module.forward

    # ---------------------------------------------------------------- the protocol
    def parameters(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def settle(self, idx: Tensor, nudge: Nudge | None = None) -> Settled:
        x = self.model.inject(idx).detach()
        with self.analog_forward():
            if nudge is None:
                z, stats = free_phase(self.model, x, self.solver)
            else:
                z, stats = self._nudged(x, nudge)
        return Settled(z, stats)

    def read(self, settled: Settled) -> Tensor:
        # The state lives in the digital periphery between tiles in this architecture (LayerNorm,
        # softmax and GELU are digital), so reading it adds nothing the forward did not.
        return settled.state

    def local_grads(
        self, idx: Tensor, targets: Tensor, z_star: Tensor, lam: Tensor
    ) -> tuple[dict[str, Tensor], float]:
        with self.analog_forward():
            grads = local_update(self.model, idx, targets, z_star, lam)
            with torch.no_grad():
                loss = self.model.loss(z_star, targets).item()
        return grads, loss

    def apply_pulses(self, proposed: dict[str, Tensor]) -> dict[str, Tensor]:
        for name in self.tiles:
            # A NaN increment becomes INT_MIN pulses (negative write counts) and a NaN accumulator
            # that never recovers: refuse before any device is touched.
            if not bool(torch.isfinite(proposed[name]).all()):
                raise ValueError(f"{name}: non-finite weights proposed; no pulses fired")
        with torch.no_grad():
            pulses = {name: tile.program(proposed[name]) for name, tile in self.tiles.items()}
        self._read_into_model()
        return pulses

    def accumulators(self) -> dict[str, Tensor]:
        """Every tile's threshold accumulator (digital memory of the controller), as copies."""
        return {name: tile.acc.clone() for name, tile in self.tiles.items()}

    def undo(self, fired: dict[str, Tensor], acc: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reverse the signed pulses ``fired`` per tile since a rollback point whose accumulators were
        ``acc`` (:meth:`AnalogTile.undo`; tiles with exact writes rewrite the model's weights, which
        the caller has already restored); returns the pulses fired. The model then holds what the
        devices read."""
        params = self.parameters()
        with torch.no_grad():
            pulses = {name: tile.undo(fired[name], acc[name], params[name].detach())
                      for name, tile in self.tiles.items()}
        self._read_into_model()
        return pulses

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every tile's devices and counters and the three generators' states: with these a
        substrate built from the same config and seed continues bit for bit. The read-noise pool
        is deterministic in the seed, so only its size and digest are kept."""
        return {
            "rng": {"init": self.init_gen.get_state(), "read": self.read_gen.get_state(),
                    "write": self.write_gen.get_state()},
            "noise_pool": self._pool_id(),
            "tiles": {name: tile.state_dict() for name, tile in self.tiles.items()},
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and put what the devices hold back into the model.
        ValueError (one line) when it does not fit this substrate's matrices, periphery or seed."""
        if set(st["tiles"]) != set(self.tiles):
            raise ValueError(f"its crossbars {sorted(st['tiles'])} are not this model's {sorted(self.tiles)}")
        if st["noise_pool"] != self._pool_id():
            raise ValueError("its read-noise pool differs from the one this seed draws here (another "
                             "periphery, seed or torch version, or written by an ept before 2026-11-27, "
                             "whose analog noise streams overlapped the run's)")
        for name, tile in self.tiles.items():
            try:
                tile.load_state_dict(st["tiles"][name])
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        self.init_gen.set_state(st["rng"]["init"])
        self.read_gen.set_state(st["rng"]["read"])
        self.write_gen.set_state(st["rng"]["write"])
        self._read_into_model()

    def _pool_id(self) -> dict[str, Any] | None:
        if self.noise is None:
            return None
        return {"size": self.noise.pool.numel(), "sha256": self.noise.fingerprint()}

    def _read_into_model(self) -> None:
        """The model takes what the devices read (after every write, undo or restore)."""
        params = self.parameters()
        with torch.no_grad():
            for name, tile in self.tiles.items():
                params[name].copy_(tile.weight)

    # ---------------------------------------------------------------- helpers
    def _nudged(self, x: Tensor, nudge: Nudge) -> tuple[Tensor, SolveStats]:
        """All nudges relaxed together as one stacked batch, by the same code as the digital route."""
        if any(complex(b).imag for b in nudge.betas):
            raise ValueError("an analog substrate relaxes real states only: use estimator 'centred' or "
                             "'onesided' (or holo 2), not a complex holomorphic contour")
        z_beta, stats, _ = nudged_phase(self.model, x, nudge.targets, nudge.anchor, self.solver, self.ep)
        return z_beta, stats
