"""Hooks for the tests and the chaos benchmark: faults injected into a real run, and a folder's
fingerprint to show that a refused command left it as it was."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FAULTS = ("grad", "field")  # a NaN gradient; a field that returned inf (the free phase blew up)


def fault_at(step_gradient: Callable[..., tuple[dict, dict[str, Any]]], step: int,
             kind: str) -> Callable[..., tuple[dict, dict[str, Any]]]:
    """``step_gradient`` (:func:`ept.train.step_gradient`) with a fault at ``step``, the first time it
    is reached at the full learning rate: the fault is part of the run's history, not of whichever
    process replays it after a rollback or a resume."""
    if kind not in FAULTS:
        raise ValueError(f"fault '{kind}' is not one of {', '.join(FAULTS)}")

    def faulty(s: Any, idx: torch.Tensor, targets: torch.Tensor) -> tuple[dict, dict[str, Any]]:
        grads, stats = step_gradient(s, idx, targets)
        if s.state.step == step and s.state.lr_scale == 1.0:
            if kind == "grad":
                grads = {k: torch.full_like(g, math.nan) for k, g in grads.items()}
                stats["diverged"] = True
            else:
                stats.update(diverged=True, free_diverged=True)
        return grads, stats

    return faulty


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: its size and modification time, to compare before and after."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}
