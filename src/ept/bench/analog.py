"""Measurements shared by ``benchmarks/analog.py`` and ``ept bench``: step time and a short training run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ept.analog.ledger import WriteLedger, project, write_stats
from ept.analog.loop import analog_step
from ept.analog.presets import AnalogConfig, analog_config
from ept.analog.substrate import SimulatedSubstrate
from ept.config import EPConfig, EPTConfig, SolverConfig
from ept.model import EquilibriumLM

Batches = Callable[[], tuple[Tensor, Tensor]]


def _substrate(cfg: AnalogConfig, model_cfg: EPTConfig, solver: SolverConfig, ep: EPConfig,
               seed: int) -> SimulatedSubstrate:
    torch.manual_seed(seed)
    return SimulatedSubstrate(EquilibriumLM(model_cfg), cfg, solver, ep, seed=seed)


def step_time_ratio(
    preset: str = "rram_es", C: int = 64, T: int = 64, B: int = 16, vocab: int = 512, reps: int = 3,
    T1: int = 30, T2: int = 20, seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one analog EP step and one ideal EP step, interleaved in one run.

    Both run the same fixed iteration counts (T1 free, T2 nudged), so the ratio is the cost of the
    simulated periphery and pulses per step, not of a noisy relaxation needing more iterations.
    """
    model_cfg = EPTConfig(vocab_size=vocab, C=C, H=4, T=T)
    solver = SolverConfig(T1=T1, t1max=T1, res_est=0.0)
    ep = EPConfig(estimator="centred", asym="fixed", T2=T2)
    g = torch.Generator().manual_seed(seed)
    idx, tgt = torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)
    subs = {name: _substrate(analog_config(name), model_cfg, solver, ep, seed) for name in ("ideal", preset)}
    opts = {name: torch.optim.AdamW(s.model.parameters(), lr=1e-3) for name, s in subs.items()}
    times: dict[str, list[float]] = {name: [] for name in subs}
    for rep in range(reps + 1):
        for name, sub in subs.items():
            t0 = time.perf_counter()
            analog_step(sub, idx, tgt, opts[name], ep)
            if rep:  # the first round warms caches and lazy imports
                times[name].append(time.perf_counter() - t0)
    ideal, analog = statistics.median(times["ideal"]), statistics.median(times[preset])
    return {"ideal_step_s": ideal, "analog_step_s": analog, "analog_over_ideal_time": analog / ideal}


@torch.no_grad()
def val_ce(sub: SimulatedSubstrate, batches: Iterator[tuple[Tensor, Tensor]]) -> float:
    """Mean next-token CE of the free state, with the analog forward on (inference on the devices)."""
    total, n = 0.0, 0
    for idx, tgt in batches:
        z = sub.read(sub.settle(idx))
        total += sub.model.loss(z, tgt).item() * tgt.numel()
        n += tgt.numel()
    return total / n


def train_run(
    cfg: AnalogConfig, model_cfg: EPTConfig, batches: Batches, val: Callable[[], Iterator],
    steps: int, solver: SolverConfig, ep: EPConfig, lr: float = 3e-3, seed: int = 0,
) -> dict[str, Any]:
    """``steps`` analog EP steps with AdamW; val CE before and after, the ledger and its projection."""
    sub = _substrate(cfg, model_cfg, solver, ep, seed)
    opt = torch.optim.AdamW(sub.model.parameters(), lr=lr, weight_decay=0.0)
    ledger = WriteLedger()
    ce0 = val_ce(sub, val())
    skipped = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        idx, tgt = batches()
        skipped += not analog_step(sub, idx, tgt, opt, ep, ledger).applied
    stats = write_stats(ledger.counts)
    out: dict[str, Any] = {
        "preset": cfg.preset, "val_ce_init": ce0, "val_ce": val_ce(sub, val()), "steps": steps,
        "skipped_steps": skipped, "seconds": time.perf_counter() - t0, **stats,
    }
    if ledger.steps:
        proj = project(stats, ledger.steps)
        out.update({k: proj[k] for k in ("projected_writes_max", "projected_writes_p99", "claim_holds",
                                          "endurance_holds", "verdict")})
    return out
