"""What an EP run costs in FLOPs, GPU-hours and dollars, against backprop's 6·N per token.

Everything is per token and counts matmul FLOPs (2 per multiply-add); elementwise work (LayerNorm,
GELU, softmax, Anderson's mixing, O(C) per token) is left out. The model is ept's: one pre-LN
transformer block of width C relaxed to its fixed point, token and position embeddings, an untied head.

    N_block   = (4 + 2m)·C² + (9 + m)·C        q,k,v,o + fc1,fc2 weights; their biases; two LayerNorms
    f_eval    = 2·N_block + 4·T·C              one F(z): the linear maps, plus QKᵀ and AV over the full
                                               context T (no causal halving: PaLM's convention)
    nudge     = 4·V·C                          β·∂CE/∂z: the head's forward and its input-gradient
    EP/token  = (free + polish)·f_eval                          the free phase and its polish
              + S·T2·(k_asym·f_eval + nudge)                    S nudged states relaxed T2 steps
              + 3·f_eval + 6·V·C                                the local update: one forward and
                                                                backward of F and of the readout
    BP/token  = 6·N                                             N the model's parameter count

``k_asym`` is the F-evaluation-equivalents of one nudged step (:data:`NUDGE_COST`). GPU time is
FLOPs / (peak · MFU).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Dense (no sparsity) BF16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets: H100 SXM and H200
# SXM 989.4 TFLOPS (same GH100 compute), A100 312 TFLOPS.
GPU_PEAK = {"h200": 989.4e12, "h100": 989.4e12, "a100": 312e12}
# Rough on-demand cloud $/GPU-hour (2025); pass --price for a quote.
GPU_PRICE = {"h200": 3.5, "h100": 2.5, "a100": 1.5}
DEFAULT_MFU = 0.4

# F-evaluation-equivalents of one nudged step, by --asym (ept.grad.ep.NudgedField): "none" is F;
# "linear" one Jᵀd (a vjp in z: the same matmuls as F); "fixed" F, Jd and Jᵀd; "track" F, a vjp, a jvp.
NUDGE_COST = {"none": 1.0, "linear": 1.0, "fixed": 3.0, "track": 3.0}

_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'1e9', '1B', '350M', '20k', '1.3T' -> a positive number; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a count such as 1e9, 1B or 350M")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} must be positive")
    return value


@dataclass(frozen=True)
class Shape:
    """ept's model: one block of width C (FFN m·C), vocabulary V, context T."""

    C: int
    V: int = 50304
    T: int = 1024
    m: int = 4

    @property
    def n_block(self) -> int:
        """(4 + 2m)·C² + (9 + m)·C: the block's weights, biases (4C + mC + C) and LayerNorms (4C)."""
        return (4 + 2 * self.m) * self.C ** 2 + (9 + self.m) * self.C

    @property
    def n_total(self) -> int:
        """The block, token and position embeddings (V·C + T·C) and the untied head (V·C)."""
        return self.n_block + (2 * self.V + self.T) * self.C


def width_for(n_params: float, V: int = 50304, T: int = 1024, m: int = 4) -> int:
    """The width C whose ept model holds about ``n_params``: the positive root of
    (4+2m)·C² + (9 + m + 2V + T)·C = N, rounded to a multiple of 64 (at least 64)."""
    a, b = 4 + 2 * m, 9 + m + 2 * V + T
    c = (-b + math.sqrt(b * b + 4 * a * n_params)) / (2 * a)
    return max(64, int(round(c / 64)) * 64)


@dataclass(frozen=True)
class FEvals:
    """F-evaluations per training step: the free phase (without polish), the polish, T2 nudged steps
    of ``nudged_states`` states relaxed together, and the nudged field's ``asym``."""

    free: float
    polish: float = 0.0
    T2: float = 0.0
    nudged_states: float = 2.0
    asym: str = "linear"


def fevals_from_run(run: Path) -> FEvals:
    """The mean F-evals per step over a run's log windows (metrics.jsonl), its asym from config.json.

    A window record's ``T1`` is the mean free-phase F-evals *including* the polish (ept.grad.ep.polish
    adds them to the free stats), so the free phase proper is T1 - polish_fevals. T2 counts calls of
    the nudged field, each on the whole stacked batch: an upper bound where adaptive T2 freezes rows.
    """
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--run {run}: no metrics.jsonl: give an 'ept train --out' folder")
    windows = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed run
        if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("T1"), (int, float)):
            windows.append(rec)
    if not windows:
        raise ValueError(f"--run {run}: metrics.jsonl holds no training window with F-evals (T1): "
                         "is it an EP run that logged a window?")

    def mean(key: str, default: float) -> float:
        return sum(float(r.get(key, default)) for r in windows) / len(windows)

    polish = mean("polish_fevals", 0.0)
    asym = "linear"
    cfg = run / "config.json"
    if cfg.is_file():
        ep = json.loads(cfg.read_text()).get("ep", {})
        asym = ep.get("asym", asym)
    return FEvals(free=mean("T1", 0.0) - polish, polish=polish, T2=mean("T2", 0.0),
                  nudged_states=mean("nudged_states", 0.0), asym=asym)


def fevals_flops(shape: Shape) -> int:
    """FLOPs per token of one F-evaluation: 2·N_block + 4·T·C (QKᵀ and AV over T positions)."""
    return 2 * shape.n_block + 4 * shape.T * shape.C


@dataclass(frozen=True)
class Cost:
    """The per-token FLOPs of EP (by phase) and BP, and the run's GPU time and price."""

    n_params: float
    C: int
    n_block: int
    n_model: int
    f_eval: int
    fevals_per_step: float  # F-evaluation-equivalents: free + polish + S·T2·k_asym + 3
    ep_free: float
    ep_nudged: float
    ep_update: float
    ep_per_token: float
    bp_per_token: float
    factor: float
    tokens: float
    gpu: str
    mfu: float
    price: float
    gpus: int
    ep_gpu_hours: float
    bp_gpu_hours: float
    ep_days: float
    ep_dollars: float
    bp_dollars: float
    anchored_bp_hours: float | None = None  # a measured BP run's GPU-hours (e.g. plan 002's 288)
    anchored_ep_hours: float | None = None  # factor x that

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(n_params: float, shape: Shape, fe: FEvals, tokens: float, gpu: str = "h200",
             mfu: float = DEFAULT_MFU, price: float | None = None, gpus: int = 8,
             bp_hours: float | None = None) -> Cost:
    """EP's and BP's FLOPs per token (module docstring), times ``tokens``, at ``mfu`` of ``gpu``'s
    peak: GPU-hours = FLOPs / (peak·mfu) / 3600, days = hours / gpus / 24, dollars = hours · price."""
    if gpu not in GPU_PEAK:
        raise ValueError(f"unknown gpu {gpu!r}: choose one of {', '.join(GPU_PEAK)}")
    if fe.asym not in NUDGE_COST:
        raise ValueError(f"unknown asym {fe.asym!r}: choose one of {', '.join(NUDGE_COST)}")
    if not (n_params > 0 and tokens > 0 and 0 < mfu <= 1 and gpus >= 1):
        raise ValueError("need params > 0, tokens > 0, 0 < mfu <= 1 and gpus >= 1")
    if min(fe.free, fe.polish, fe.T2, fe.nudged_states) < 0:
        raise ValueError("F-evals, T2 and nudged states must be >= 0")
    price = GPU_PRICE[gpu] if price is None else price
    f = fevals_flops(shape)
    k = NUDGE_COST[fe.asym]
    vc = shape.V * shape.C
    ep_free = (fe.free + fe.polish) * f
    ep_nudged = fe.nudged_states * fe.T2 * (k * f + 4 * vc)
    ep_update = 3 * f + 6 * vc
    ep = ep_free + ep_nudged + ep_update
    bp = 6 * n_params
    rate = GPU_PEAK[gpu] * mfu
    ep_h = ep * tokens / rate / 3600
    bp_h = bp * tokens / rate / 3600
    return Cost(n_params=n_params, C=shape.C, n_block=shape.n_block, n_model=shape.n_total, f_eval=f,
                fevals_per_step=fe.free + fe.polish + fe.nudged_states * fe.T2 * k + 3,
                ep_free=ep_free, ep_nudged=ep_nudged, ep_update=ep_update, ep_per_token=ep,
                bp_per_token=bp, factor=ep / bp, tokens=tokens, gpu=gpu, mfu=mfu, price=price, gpus=gpus,
                ep_gpu_hours=ep_h, bp_gpu_hours=bp_h, ep_days=ep_h / gpus / 24, ep_dollars=ep_h * price,
                bp_dollars=bp_h * price, anchored_bp_hours=bp_hours,
                anchored_ep_hours=None if bp_hours is None else ep / bp * bp_hours)


def table(cost: Cost, fe: FEvals) -> str:
    """The readable form of :func:`estimate`'s result."""
    g = cost.gpu.upper()
    lines = [
        f"model      N {cost.n_params:.4g} (BP's 6N); ept shape C {cost.C}: N_block {cost.n_block:,}, "
        f"model {cost.n_model:,}",
        f"F-evals    free {fe.free:.4g} + polish {fe.polish:.4g} + {fe.nudged_states:.4g} states x T2 "
        f"{fe.T2:.4g} (asym {fe.asym}, x{NUDGE_COST[fe.asym]:g}) + update 3 = "
        f"{cost.fevals_per_step:.4g}/step",
        f"per token  F-eval {cost.f_eval:.4g} FLOPs; EP {cost.ep_per_token:.4g} (free {cost.ep_free:.3g}, "
        f"nudged {cost.ep_nudged:.3g}, update {cost.ep_update:.3g}); BP 6N {cost.bp_per_token:.4g}",
        f"EP/BP      {cost.factor:.1f}x",
        f"{cost.tokens:.3g} tokens on {g} at MFU {cost.mfu:g}, ${cost.price:g}/GPU-h, {cost.gpus} GPUs:",
        f"  EP  {cost.ep_gpu_hours:>12,.0f} {g}-hours  {cost.ep_days:>8,.1f} days  "
        f"${cost.ep_dollars:>14,.0f}",
        f"  BP  {cost.bp_gpu_hours:>12,.0f} {g}-hours  {cost.bp_gpu_hours / cost.gpus / 24:>8,.1f} days  "
        f"${cost.bp_dollars:>14,.0f}",
    ]
    if cost.anchored_bp_hours is not None and cost.anchored_ep_hours is not None:
        lines.append(f"anchored   a BP run of {cost.anchored_bp_hours:,.0f} {g}-hours -> EP "
                     f"{cost.factor:.1f}x = {cost.anchored_ep_hours:,.0f} {g}-hours")
    return "\n".join(lines)
