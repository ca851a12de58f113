"""The relaxation loop: one driver for every method, with row freezing, divergence and recovery."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ept.config import SolverConfig, unknown_option_error
from ept.solvers.common import Field, Monitor, RowField, SolveStats, residual_per_seq, row_norm, rows_mask
from ept.solvers.registry import SOLVERS

_ALIASES = {"T1": "min_iter", "t1max": "max_iter", "res_est": "tol"}
# Every SolverConfig field except those solve() spells itself (method, and the seed's three above).
_SOLVE_OPTS = ("tol", "max_iter", "min_iter", "monitor") + tuple(
    f.name for f in dataclasses.fields(SolverConfig) if f.name not in ("method", *_ALIASES))


def solve(
    field_fn: Field,
    z0: Tensor,
    method: str = "anderson",
    tol: float = 1e-4,
    max_iter: int = 150,
    **opts: Any,
) -> tuple[Tensor, SolveStats]:
    """Relax ``z`` until the worst sequence's residual ||F(z)||/||z|| is at most ``tol``.

    Options: ``min_iter`` (iterate at least this often, the seed's T1), ``eps`` (step of
    z <- z + eps F(z), default 0.5), ``m``, ``lam``, ``mix``, ``accel_from``, ``restart``, ``stall``
    (Anderson, see :class:`SolverConfig`), ``mom_lo``, ``mom_restart`` (momentum), ``div_factor`` (a
    sequence whose ||F(z)|| grows this much over its lowest marks divergence), ``monitor(z, F(z)) ->
    bool`` (stop early, e.g. adaptive T2).
    The seed's names ``T1``, ``t1max``, ``res_est`` are accepted too.

    Returns the last state at which F was evaluated (so the reported residual is its residual) and
    :class:`SolveStats`. A non-finite field or a growing residual stops the solve with
    ``diverged=True`` and returns the last finite state; nothing is clamped or NaN-scrubbed. Under
    Anderson, Broyden and momentum a sequence that blows up is first put back at its lowest-residual
    point with its secant history forgotten, at most twice (``stats.recovered`` counts these): a bad
    extrapolation is the solver's, not the dynamics', and stopping the batch for it stopped solves
    that then converged (a trained tiny batch: Broyden 66 F-evals without the stop).
    """
    for seed_name, name in _ALIASES.items():
        if seed_name in opts:
            opts[name] = opts.pop(seed_name)
    tol, max_iter = opts.pop("tol", tol), opts.pop("max_iter", max_iter)
    for key in opts:
        if key not in _SOLVE_OPTS:
            raise unknown_option_error("solver", key, list(_SOLVE_OPTS) + list(_ALIASES))
    cfg = SolverConfig(
        method=method,
        T1=opts.pop("min_iter", 0),
        t1max=max_iter,
        res_est=tol,
        **{k: v for k, v in opts.items() if k != "monitor"},
    )
    return relax(field_fn, z0, cfg, monitor=opts.get("monitor"))


def relax(
    field_fn: Field, z0: Tensor, cfg: SolverConfig, monitor: Monitor | None = None
) -> tuple[Tensor, SolveStats]:
    """:func:`solve` driven by a :class:`SolverConfig`."""
    stats = SolveStats(method=cfg.method)
    method = SOLVERS[cfg.method].from_config(cfg)
    rows = z0.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=z0.device)
    flagged = torch.zeros_like(done)
    sel: Tensor | None = None  # the rows the field is evaluated on (None: all)
    sub: Field = field_fn
    cuttable = isinstance(field_fn, RowField)  # a Protocol check: once, not per step
    z, good, fz, res = z0, None, None, None
    # Divergence is judged on the absolute ||F(z)|| per sequence: a state that blows up
    # geometrically keeps a bounded *relative* residual, so that one cannot see it.
    lowest = None
    best = _Best(rows) if method.recovers else None
    for k in range(cfg.t1max):
        fz, res, size = _evaluate(sub, z, sel, fz, res)
        stats.fevals += 1
        stats.row_fevals += rows if sel is None else len(sel)
        stats.history.append((res.mean().item(), res.max().item()))
        # Floored at a small fraction of ||z||, so jitter at the precision floor is not growth.
        floor = 1e-6 * torch.linalg.vector_norm(z.flatten(1), dim=1).real.to(torch.float64)
        grown = size > cfg.div_factor * torch.maximum(size if lowest is None else lowest, floor)
        unstable = grown | ~torch.isfinite(res) | ~torch.isfinite(size)
        reset = None
        if bool(unstable.any()):
            if best is None or not best.can_reset(unstable):
                stats.diverged, stats.unstable = True, unstable
                break
            # A secant step, not the dynamics, threw these sequences out (an extrapolation from a
            # poor secant model): back to each one's best point, its history forgotten.
            z, fz, res, size = best.restore(unstable, z, fz, res, size)
            reset, stats.recovered = unstable, stats.recovered + int(unstable.sum())
        lowest = size if lowest is None else torch.minimum(lowest, size)
        if best is not None:
            best.update(z, fz, res, size)
        good = (z, fz, res)
        if k + 1 >= cfg.T1:
            done = done | (res <= cfg.res_est).to(done.device)
        if bool(done.all()):
            stats.converged = True
            break
        if monitor is not None:
            verdict = monitor(z, fz)
            if isinstance(verdict, Tensor):
                flagged = flagged | verdict.to(done.device)
                done = done | flagged
                verdict = bool(done.all())
            if verdict:
                stats.stopped_by_monitor = True
                break
        if k + 1 == cfg.t1max:
            break
        step = method.step(z, fz, res, None if best is None else best.res, cfg, reset)
        z = step if not bool(done.any()) else torch.where(rows_mask(done, z), z, step)
        if cuttable:
            sel, sub = _narrow(field_fn, sub, sel, done)
    stats.done, stats.flagged = done, flagged
    if good is None:  # the starting point itself was not finite
        stats.residual_per_seq = res
        stats.residual = stats.residual_max = float("nan")
        return z0, stats
    z, _, res = good
    stats.residual_per_seq = res
    stats.residual, stats.residual_max = res.mean().item(), res.max().item()
    return z, stats


_MAX_RESETS = 2  # per sequence: a third blow-up is the field's, not the secant model's


class _Best:
    """Each sequence's lowest-residual point (state, field, residual, ||F||) of a secant solve, and
    how often it has been put back there."""

    def __init__(self, rows: int):
        self.z: Tensor | None = None
        self.fz: Tensor | None = None
        self.res: Tensor | None = None
        self.size: Tensor | None = None
        self.resets = torch.zeros(rows, dtype=torch.long)

    def can_reset(self, rows: Tensor) -> bool:
        return self.z is not None and bool((self.resets[rows.cpu()] < _MAX_RESETS).all())

    def restore(self, rows: Tensor, z: Tensor, fz: Tensor, res: Tensor, size: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self.z is not None and self.fz is not None and self.res is not None and self.size is not None
        self.resets[rows.cpu()] += 1
        m = rows_mask(rows, z)
        r = rows.to(res.device)
        return (torch.where(m, self.z, z), torch.where(m, self.fz, fz), torch.where(r, self.res, res),
                torch.where(r, self.size, size))

    def update(self, z: Tensor, fz: Tensor, res: Tensor, size: Tensor) -> None:
        if self.z is None or self.fz is None or self.res is None or self.size is None:
            self.z, self.fz, self.res, self.size = z, fz, res, size
            return
        better = res < self.res
        m = rows_mask(better, z)
        self.z, self.fz = torch.where(m, z, self.z), torch.where(m, fz, self.fz)
        self.res, self.size = torch.where(better, res, self.res), torch.where(better, size, self.size)


def _evaluate(sub: Field, z: Tensor, sel: Tensor | None, fz: Tensor | None,
              res: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """F(z), residual and ||F(z)|| per row; frozen rows outside ``sel`` keep their last values."""
    if sel is None or fz is None or res is None:
        fz = sub(z)
        return fz, residual_per_seq(fz, z), row_norm(fz)
    zs = z[sel]
    fs = sub(zs)
    fz, res = fz.clone(), res.clone()
    fz[sel] = fs
    res[sel.to(res.device)] = residual_per_seq(fs, zs)
    return fz, res, row_norm(fz)



def _narrow(field_fn: RowField, sub: Field, sel: Tensor | None, done: Tensor) -> tuple[Tensor | None, Field]:
    """Cut the field to the moving rows once they are at most half of those evaluated now.

    Cutting may cost a re-recording (a nudged field re-linearises on its sub-batch), so it happens
    at most log2(rows) times; in between, frozen rows inside ``sel`` are evaluated and ignored.
    """
    moving = (~done).nonzero().flatten()
    current = done.numel() if sel is None else len(sel)
    if len(moving) == 0 or 2 * len(moving) > current:
        return sel, sub
    return moving, field_fn.rows(moving)
