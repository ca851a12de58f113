"""The write ledger: pulses per device, and what they mean for device endurance.

HfOx RRAM endures about 10^10 write cycles; the claim to check (the hardware plan) is that a training
run of the seed's canonical recipe (32,000 steps) needs at most 10^8 writes on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

CANONICAL_STEPS = 32_000
ENDURANCE = 1e10  # HfOx RRAM write endurance
CLAIM = 1e8  # writes per device a run must stay under


@dataclass
class WriteLedger:
    """Per-device pulse counters for every analog weight, filled from the pulses the loop applied."""

    counts: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0

    def record(self, pulses: dict[str, Tensor], *, step: bool = True) -> None:
        """Count ``pulses``; ``step=False`` for writes that are no optimizer step (a rollback's
        reprogramming): they wear the devices but do not enter the per-step rate."""
        for name, p in pulses.items():
            n = p.abs().to(torch.int64)
            self.counts[name] = self.counts[name] + n if name in self.counts else n.clone()
        self.steps += int(step)

    def summary(self) -> dict[str, float]:
        return write_stats(self.counts)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "steps": self.steps}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.counts = {name: c.clone() for name, c in st["counts"].items()}
        self.steps = int(st["steps"])


def write_stats(counts: dict[str, Tensor]) -> dict[str, float]:
    """Total writes, and the max, 99th percentile and mean writes per device over all crossbars."""
    if not counts:
        return {"writes_total": 0, "writes_max": 0, "writes_p99": 0.0, "writes_mean": 0.0, "devices": 0}
    flat = torch.cat([c.reshape(-1) for c in counts.values()]).to(torch.float64)
    return {
        "writes_total": int(flat.sum().item()),
        "writes_max": int(flat.max().item()),
        "writes_p99": float(_percentile(flat, 0.99)),
        "writes_mean": float(flat.mean().item()),
        "devices": int(flat.numel()),
    }


def _percentile(x: Tensor, q: float) -> float:
    # torch.quantile refuses more than 2^24 elements; kthvalue does not.
    k = max(1, min(x.numel(), int(round(q * (x.numel() - 1))) + 1))
    return float(torch.kthvalue(x, k).values.item())


def project(
    stats: dict[str, float], steps: int, target_steps: int = CANONICAL_STEPS,
    endurance: float = ENDURANCE, claim: float = CLAIM,
) -> dict[str, float | bool | str]:
    """Scale the measured per-device writes linearly to ``target_steps`` and judge them."""
    if steps <= 0:
        raise ValueError("projecting writes needs at least one measured step")
    rate = target_steps / steps
    worst = stats["writes_max"] * rate
    holds = worst <= claim
    verdict = (
        f"at the measured rate ({stats['writes_max'] / steps:.3g} writes/step on the busiest device) a "
        f"{target_steps:,}-step run needs {worst:.3g} writes on the busiest device: "
        f"{'within' if holds else 'OVER'} the {claim:.0e} claim ({worst / claim:.2g}x) and "
        f"{'within' if worst <= endurance else 'OVER'} the {endurance:.0e} HfOx endurance"
    )
    return {
        "projected_steps": target_steps,
        "projected_writes_max": worst,
        "projected_writes_p99": stats["writes_p99"] * rate,
        "projected_writes_mean": stats["writes_mean"] * rate,
        "claim": claim,
        "endurance": endurance,
        "claim_holds": holds,
        "endurance_holds": worst <= endurance,
        "verdict": verdict,
    }


def run_summary(ledger: WriteLedger) -> dict[str, float | int]:
    """The keys ``ept train --json`` reports for an analog run."""
    stats = ledger.summary()
    out: dict[str, float | int] = {k: stats[k] for k in ("writes_total", "writes_max", "writes_p99")}
    projected = project(stats, ledger.steps)["projected_writes_max"] if ledger.steps else 0.0
    out["projected_writes_max"] = projected
    return out
