"""Speed of EP against BPTT and backprop, measured side by side in one run (``ept bench speed``).

    step time     EP (ept.gradient route="ep"), BPTT (route="bptt", T1 fixed), BP (the explicit
                  same-parameter transformer), each followed by the same optimizer-free update,
                  timed round-robin so that load from other processes hits every route alike
    peak memory   each route in its own subprocess (``python -m ept.bench.timing ROUTE``): CUDA max-allocated,
                  or on CPU the peak-RSS rise over the warmed-up baseline (VmHWM after clear_refs)
    free phase    F-evaluations to a true residual, plain iteration vs Anderson (vs TorchDEQ)
    EP anatomy    the nudged-phase share of an EP step, and cos(EP, implicit) at these shapes
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import ept
from ept.baseline import bp_gradient
from ept.data import builtin_tokens, fixed_batch
from ept.diagnostics.equilibria import equilibrium_gap, leaves_equilibrium
from ept.model import EquilibriumLM
from ept.solvers import RowwiseField, residual_per_seq

ROUTES = ("ep", "bptt", "bp")


@dataclass
class SpeedConfig:
    """One benchmark run. Shapes and the EP recipe come from the training preset of the same name."""

    preset: str = "tiny"
    T1: int = 150  # BPTT's fixed unroll (the seed's)
    repeats: int = 4  # timed steps per route, one per batch (median reported)
    train_steps: int = 300  # EP steps that make the trained operator for the F-eval comparison
    tol: float = 1e-4  # the true residual the F-eval comparison solves to
    max_evals: int = 400
    solver_batches: int = 4  # batches of the trained operator: timed, F-evals and cosines on each
    scales: tuple[float, ...] = (2.0, 3.0, 4.0)  # random fields with weights ×scale for the peer column
    # Every field is solved from z = 0 and from starts-1 points 1e-6 away: on a trained operator one
    # slow sequence's count moves by 2x under a perturbation that small (float rounding alone does
    # it: ept's and TorchDEQ's Broyden are the same method), so a single start is one draw of that.
    starts: int = 3
    lr: float = 1e-3  # the optimizer-free update's step (its cost is what counts, not its value)
    threads: int = 0  # torch threads (0: torch's default)
    peer: bool = True  # TorchDEQ column, when installed
    memory: bool = True  # the subprocess peak-memory measurement
    ep_set: dict[str, Any] = dataclasses.field(default_factory=dict)  # EP options over the preset's


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (``--set t2sel=10``) to EP options; values parsed as JSON where they can be."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not key=value: write e.g. --set t2sel=10")
        low = raw.strip().lower()
        try:
            out[key] = {"true": True, "false": False, "none": None}[low] if low in ("true", "false", "none") \
                else json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def preset_setup(preset: str, ep_set: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model config, batch size, EP options (the preset's, then ``ep_set``) and BP depth of a preset."""
    from ept.grad import split_options
    from ept.presets import resolve
    from ept.train import grad_options

    cfg = resolve(preset, {"mode": "ep"})
    ep_opts = {**grad_options(cfg), **(ep_set or {})}
    split_options("ep", ep_opts)  # a misspelt or bad --set fails here, before any work
    return {"model": cfg.model, "B": cfg.train.B, "ep": ep_opts, "layers": cfg.train.layers,
            "eps": cfg.solver.eps}


# ---------------------------------------------------------------------------- one step per route


def route_step(route: str, model: EquilibriumLM, idx: Tensor, tgt: Tensor, opts: dict[str, Any],
               lr: float) -> dict[str, Any]:
    """One training step of ``route``: the gradient, then p -= lr·g (no optimizer state, same for all)."""
    if route == "bp":
        grads, stats = bp_gradient(model, idx, tgt, opts["layers"])
    elif route == "bptt":
        grads, stats = ept.gradient(model, idx, tgt, route="bptt", T1=opts["T1"], eps=opts["eps"])
    else:
        grads, stats = ept.gradient(model, idx, tgt, route="ep", **opts["ep"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.sub_(lr * grads[name])
    return {k: v for k, v in stats.items() if not isinstance(v, Tensor)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


Batch = tuple[Tensor, Tensor]


def time_routes(model: EquilibriumLM, batches: list[Batch], opts: dict[str, Any], repeats: int,
                lr: float, routes: tuple[str, ...] = ROUTES) -> dict[str, list[float]]:
    """Seconds per step of each route, round-robin so every route sees the same background load.

    Round r runs every route on batch r (cycling): EP's cost follows its free phase's F-evals, which
    swing by 4x from batch to batch on a trained operator, so one batch would be one sample of it.
    Each step starts from the same weights (restored after it), so every route times the same operator.
    """
    start = {k: v.clone() for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {r: [] for r in routes}
    for rep in range(repeats + 1):  # the first round warms up and is dropped
        idx, tgt = batches[max(rep - 1, 0) % len(batches)]
        for r in routes:
            _sync()
            t0 = time.perf_counter()
            route_step(r, model, idx, tgt, opts, lr)
            _sync()
            if rep:
                times[r].append(time.perf_counter() - t0)
            model.load_state_dict(start)
    return times


def ep_anatomy(model: EquilibriumLM, batches: list[Batch], ep_opts: dict[str, Any],
               repeats: int) -> dict[str, float]:
    """Median seconds of the free phase, the nudged phases (the estimator) and the local update,
    repeat r on batch r (cycling), and the median nudged steps."""
    from ept.grad import split_options
    from ept.grad.common import free_phase, local_update
    from ept.grad.ep import ep_lambda

    solver, cfg = split_options("ep", ep_opts)
    parts: dict[str, list[float]] = {"free": [], "nudged": [], "update": []}
    steps = []
    for rep in range(repeats):
        idx, tgt = batches[rep % len(batches)]
        t0 = time.perf_counter()
        x = model.inject(idx).detach()
        z, _ = free_phase(model, x, solver)
        t1 = time.perf_counter()
        lam, st = ep_lambda(model, x, tgt, z, solver, cfg)
        t2 = time.perf_counter()
        local_update(model, idx, tgt, z, lam)
        t3 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            parts[k].append(dt)
        steps.append(st.fevals)
    out = {k: statistics.median(v) for k, v in parts.items()}
    out["estimator_share"] = out["nudged"] / sum(out[k] for k in ("free", "nudged", "update"))
    out["T2"] = statistics.median(steps)
    return out


def flat_cosine(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    va = torch.cat([a[k].flatten().double() for k in sorted(a)])
    vb = torch.cat([b[k].flatten().double() for k in sorted(a)])
    return float(va @ vb / (va.norm() * vb.norm()).clamp_min(1e-300))


_ORACLE_MOVE = 1e-2  # the oracle's refinement may move EP's z* this far (relative, worst sequence)


def cos_ep_implicit(model: EquilibriumLM, batches: list[Batch], ep_opts: dict[str, Any]) -> dict[str, Any]:
    """cos(EP as benchmarked, implicit oracle) per batch: the worst is the figure (a target must hold
    on every batch), the mean is reported beside it.

    The oracle is the exact gradient of what EP computed, at *EP's* equilibrium: the mean loss over
    the sequences EP kept, in float64 (a copy of the model), with EP's z* refined to a residual of
    1e-10 (Anderson from there, no plain-step gate) and its adjoint solved to 1e-10 by GMRES. In
    float32 a 1e-6 adjoint is at the precision floor, and GMRES failed on batches of trained blocks
    near criticality, the very batches the figure is about. Relaxed from 0 it could land on another
    equilibrium of a trained block, or blow up, and compare gradients of different points; and the
    adjoint *iteration* diverges where z* is a saddle, which Anderson's free phase does reach (GMRES
    needs J invertible only). A batch whose refinement or adjoint fails, or whose refinement moved z*
    by more than 1% (another equilibrium), has no valid cosine (None), and is counted.
    ``cos_ep_implicit_full_batch`` compares with the exact gradient over every sequence instead, and
    ``dropped_seqs`` counts what EP left out.

    ``saddle_seqs`` counts the sequences EP nudged from a z* that is not an attractor of the
    physical dynamics: plain iteration z <- z + eps F(z) started there leaves it (moves it by more
    than 1%). Those EP left out are not counted: a sequence below res_est but above drop_res is off
    equilibrium, and plain iteration moves it for that reason. ``unconverged_seqs``: the sequences
    whose free phase stopped above res_est.
    """
    from ept.config import ImplicitConfig
    from ept.grad import split_options
    from ept.grad.implicit import implicit_gradient

    solver, _ = split_options("ep", ep_opts)
    # A refinement, not a journey: no stall hand-over to the dynamics (whose long steps carried z* 2.6%
    # away on a trained batch, to another point's gradient).
    tight = dataclasses.replace(solver, method="anderson", T1=0, res_est=1e-10, t1max=500,
                                accel_from=math.inf, lam=1e-8, stall=10**9, proj_jump=0.0)
    adjoint = ImplicitConfig(adjoint="gmres", adj_tol=1e-10, adj_max_iter=20)
    exact = copy.deepcopy(model).double()
    cos: list[float | None] = []
    full: list[float | None] = []
    gaps, res, dropped, saddles, unconverged = [], [], 0, 0, 0
    for idx, tgt in batches:
        ep_g, ep_st = ept.gradient(model, idx, tgt, route="ep", **ep_opts)
        field = RowwiseField(model.field, (model.inject(idx).detach(),))
        z_star = ep_st["z_star"]
        with torch.no_grad():
            settled = residual_per_seq(field(z_star), z_star) <= solver.res_est
        left = leaves_equilibrium(field, z_star, solver.eps) > 1e-2
        kept = ep_st["kept"].to(idx.device)
        saddles += int((left & kept).sum())
        unconverged += int((~settled).sum())
        dropped += int((~kept).sum())
        z0 = ep_st["z_star"].double()
        oracle, st = implicit_gradient(exact, idx[kept], tgt[kept], tight, adjoint, z0=z0[kept])
        # Refined more than 1% away, the oracle is another equilibrium's gradient: no valid cosine.
        moved = equilibrium_gap(z0[kept], st["z_star"])
        valid = bool(st["free_converged"] and st["adj_converged"]) and moved is not None \
            and moved <= _ORACLE_MOVE
        cos.append(flat_cosine(ep_g, oracle) if valid else None)
        if bool(kept.all()):
            full.append(cos[-1])
        else:
            every, st_all = implicit_gradient(exact, idx, tgt, tight, adjoint, z0=z0)
            valid_all = st_all["free_converged"] and st_all["adj_converged"]
            full.append(flat_cosine(ep_g, every) if valid_all else None)
        res.append(st["free_residual_max"])
        gaps.append(moved)
    ok = [c for c in cos if c is not None]
    ok_full = [c for c in full if c is not None]
    return {"cos_ep_implicit": min(ok, default=None),
            "cos_ep_implicit_mean": statistics.fmean(ok) if ok else None,
            "cos_ep_implicit_per_batch": cos, "oracle_failed_batches": len(cos) - len(ok),
            "cos_ep_implicit_full_batch": min(ok_full, default=None), "cos_full_batch_per_batch": full,
            "dropped_seqs": dropped, "saddle_seqs": saddles,
            "unconverged_seqs": unconverged, "seqs": sum(len(b[0]) for b in batches),
            "implicit_free_residual": max(res), "oracle_moved_z": max(gaps)}


# ------------------------------------------------------------------------------- peak memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is then just less tight
        pass


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def measure_peak(fn: Callable[[], Any]) -> int:
    """Peak memory in bytes that ``fn`` adds over what is live before it (call it warmed up).

    CUDA: max_memory_allocated over the allocated baseline. CPU: VmHWM after resetting it through
    /proc/self/clear_refs, over VmRSS before; freed heap is trimmed first so the baseline is tight.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    _malloc_trim()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    return (_status_kb("VmHWM") - base) * 1024


def child_env() -> dict[str, str]:
    # A fixed mmap threshold returns every large freed block to the OS at once, so RSS tracks live memory.
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def peak_in_subprocess(route: str, preset: str, weights: Path | None, T1: int, threads: int = 0,
                       ep_set: dict[str, Any] | None = None, timeout: float = 1800) -> int:
    """Run one route's step in a fresh interpreter and return its peak memory in bytes."""
    cmd = [sys.executable, "-m", "ept.bench.timing", route, "--preset", preset, "--T1", str(T1),
           "--threads", str(threads), "--ep_json", json.dumps(ep_set or {})]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child for {route} failed: {out.stderr.strip()[-500:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ept.bench.timing",
                                description="peak memory of one route's step")
    p.add_argument("route", choices=ROUTES)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--weights", default=None)
    p.add_argument("--T1", type=int, default=150)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ep_json", default="{}")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    setup = preset_setup(a.preset, json.loads(a.ep_json))
    data = builtin_tokens(setup["model"].vocab_size)
    model_cfg = dataclasses.replace(setup["model"], vocab_size=data.vocab_size)
    torch.manual_seed(0)
    model = EquilibriumLM(model_cfg)
    if a.weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(a.weights))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    idx, tgt = (t.to(device) for t in fixed_batch(data.train, setup["B"], model_cfg.T))
    opts = {**setup, "T1": a.T1}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    route_step(a.route, model, idx, tgt, opts, 0.0)  # warm-up: kernels, thread pools, lazy imports
    model.load_state_dict(start)
    peak = measure_peak(lambda: route_step(a.route, model, idx, tgt, opts, 0.0))
    print(json.dumps({"route": a.route, "peak_bytes": peak, "device": device}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
