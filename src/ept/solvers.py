"""Relaxation to a fixed point F(z) = 0 of any field callable: damped iteration, Anderson, Broyden.

The solvers know nothing about transformers: the free phase, the nudged phases and the adjoint
iteration all call :func:`solve` with their own field. States may be real or complex (complex
states are relaxed as their real view), of any shape whose first dimension indexes independent
systems (sequences): the residual is reported per row, mean and worst.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ept.config import SolverConfig, unknown_option_error

Field = Callable[[Tensor], Tensor]
Monitor = Callable[[Tensor, Tensor], bool]

_TINY = 1e-30


@dataclass
class SolveStats:
    fevals: int = 0
    residual: float = float("inf")  # batch mean of ||F(z)|| / ||z||, the undamped residual
    residual_max: float = float("inf")  # worst sequence
    residual_per_seq: Tensor | None = None
    history: list[tuple[float, float]] = field(default_factory=list)  # (mean, worst) per F-eval
    converged: bool = False
    diverged: bool = False
    stopped_by_monitor: bool = False
    method: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "fevals": self.fevals,
            "residual": self.residual,
            "residual_max": self.residual_max,
            "converged": self.converged,
            "diverged": self.diverged,
        }


def residual_per_seq(fz: Tensor, z: Tensor) -> Tensor:
    """||F(z)|| / ||z|| per row: the true, undamped residual (independent of the step size)."""
    num = torch.linalg.vector_norm(fz.flatten(1), dim=1)
    den = torch.linalg.vector_norm(z.flatten(1), dim=1).clamp_min(_TINY)
    return (num / den).real.to(torch.float64)


def _flat(z: Tensor) -> Tensor:
    return (torch.view_as_real(z) if z.is_complex() else z).reshape(z.shape[0], -1)


def _unflat(v: Tensor, like: Tensor) -> Tensor:
    if like.is_complex():
        return torch.view_as_complex(v.reshape(*like.shape, 2).contiguous())
    return v.reshape(like.shape)


class _Anderson:
    """Type-II Anderson mixing on g(z) = z + eps·F(z), one set of coefficients per sequence.

    The Tikhonov term is scaled by the mean diagonal of the residual Gram matrix: a fixed absolute
    value is either negligible far from the solution or dominant near it, and in the latter case
    Anderson degrades to plain iteration (or worse).

    The last ``m`` iterates and residuals live in preallocated ring buffers, and the Gram matrix
    gains one row per step instead of being rebuilt: at the tiny preset rebuilding it (stack, then
    broadcast products) cost about as much as the field itself.
    """

    def __init__(self, m: int, lam: float, mix: float):
        self.m, self.lam, self.mix = m, lam, mix
        self.X: Tensor | None = None  # (B, m, n) iterates
        self.F: Tensor | None = None  # (B, m, n) eps-scaled residuals
        self.gram: Tensor | None = None  # (B, m, m)
        self.count = 0

    def step(self, z: Tensor, fz: Tensor, eps: float) -> Tensor:
        x, f = _flat(z), _flat(fz) * eps
        if self.X is None:
            B, n = x.shape
            self.X = x.new_zeros(B, self.m, n)
            self.F = x.new_zeros(B, self.m, n)
            self.gram = x.new_zeros(B, self.m, self.m)
        slot = self.count % self.m
        self.count += 1
        k = min(self.count, self.m)
        self.X[:, slot] = x
        self.F[:, slot] = f
        row = torch.bmm(self.F[:, :k], f.unsqueeze(-1)).squeeze(-1)  # (B, k): <f_i, f_new>
        self.gram[:, slot, :k] = row
        self.gram[:, :k, slot] = row
        gram = self.gram[:, :k, :k]
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).view(-1, 1, 1)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        # Bordered system for min ||sum a_i f_i|| subject to sum a_i = 1.
        B = x.shape[0]
        A = gram.new_zeros(B, k + 1, k + 1)
        A[:, 0, 1:] = 1
        A[:, 1:, 0] = 1
        A[:, 1:, 1:] = gram + (self.lam * scale + _TINY) * eye
        rhs = gram.new_zeros(B, k + 1, 1)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(A, rhs)[:, 1:].transpose(1, 2)  # (B, 1, k)
        mixed = torch.bmm(alpha, self.X[:, :k]) + self.mix * torch.bmm(alpha, self.F[:, :k])
        return _unflat(mixed.squeeze(1), z)


class _Broyden:
    """"Good" Broyden on the root problem eps·F(z) = 0, matrix-free (rank-one factors), one per sequence.

    The inverse Jacobian starts at -I, so the first step is plain iteration; each evaluated point adds
    a rank-one correction (u, v) with B⁻¹ ≈ -I + Σ u vᵀ. Unlike Anderson's small least-squares window it
    keeps a long secant history, which is what stiff (oscillating) fields need.
    """

    def __init__(self, m: int):
        self.m = m
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []
        self.prev: tuple[Tensor, Tensor] | None = None

    def _inv(self, x: Tensor) -> Tensor:  # B⁻¹ x
        out = -x
        for u, v in zip(self.us, self.vs, strict=True):
            out = out + u * (v * x).sum(-1, keepdim=True)
        return out

    def _inv_t(self, x: Tensor) -> Tensor:  # B⁻ᵀ x
        out = -x
        for u, v in zip(self.us, self.vs, strict=True):
            out = out + v * (u * x).sum(-1, keepdim=True)
        return out

    def step(self, z: Tensor, fz: Tensor, eps: float) -> Tensor:
        x, g = _flat(z), _flat(fz) * eps
        if self.prev is not None:
            dx, dg = x - self.prev[0], g - self.prev[1]
            v = self._inv_t(dx)
            denom = (v * dg).sum(-1, keepdim=True)
            # A nearly orthogonal secant pair (a sequence at its precision floor) would add a huge,
            # meaningless rank-one term: such a sequence gets no correction this step.
            norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True) * torch.linalg.vector_norm(
                dg, dim=-1, keepdim=True)
            safe = denom.abs() > 1e-6 * norms + _TINY
            u = torch.where(safe, (dx - self._inv(dg)) / torch.where(safe, denom, 1.0), 0.0)
            self.us.append(u)
            self.vs.append(torch.where(safe, v, 0.0))
            if len(self.us) > self.m:
                self.us.pop(0)
                self.vs.pop(0)
        self.prev = (x, g)
        return _unflat(x - self._inv(g), z)


_ALIASES = {"T1": "min_iter", "t1max": "max_iter", "res_est": "tol"}
_SOLVE_OPTS = ("tol", "max_iter", "min_iter", "eps", "m", "lam", "mix", "div_factor", "monitor")


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
    z <- z + eps F(z), default 0.5), ``m``, ``lam``, ``mix`` (Anderson), ``div_factor`` (a sequence
    whose ||F(z)|| grows this much over its lowest marks divergence), ``monitor(z, F(z)) -> bool``
    (stop early, e.g. adaptive T2). The seed's names ``T1``, ``t1max``, ``res_est`` are accepted too.

    Returns the last state at which F was evaluated (so the reported residual is its residual) and
    :class:`SolveStats`. A non-finite field or a growing residual stops the solve with
    ``diverged=True`` and returns the last finite state; nothing is clamped or NaN-scrubbed.
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
        eps=opts.get("eps", 0.5),
        T1=opts.get("min_iter", 0),
        t1max=max_iter,
        res_est=tol,
        m=opts.get("m", 5),
        lam=opts.get("lam", 1e-4),
        mix=opts.get("mix", 1.0),
        div_factor=opts.get("div_factor", 1e4),
    )
    return relax(field_fn, z0, cfg, monitor=opts.get("monitor"))


def relax(
    field_fn: Field, z0: Tensor, cfg: SolverConfig, monitor: Monitor | None = None
) -> tuple[Tensor, SolveStats]:
    """:func:`solve` driven by a :class:`SolverConfig`."""
    stats = SolveStats(method=cfg.method)
    accel: _Anderson | _Broyden | None = None
    if cfg.method == "anderson":
        accel = _Anderson(cfg.m, cfg.lam, cfg.mix)
    elif cfg.method == "broyden":
        # Dropping old secant pairs destabilises good Broyden, so it keeps all of them (as TorchDEQ
        # does): two state-sized vectors per F-evaluation, the price of this method.
        accel = _Broyden(cfg.t1max)
    z, good = z0, None
    # Divergence is judged on the absolute ||F(z)|| per sequence: a state that blows up
    # geometrically keeps a bounded *relative* residual, so that one cannot see it.
    lowest = None
    for k in range(cfg.t1max):
        fz = field_fn(z)
        stats.fevals += 1
        res = residual_per_seq(fz, z)
        stats.history.append((res.mean().item(), res.max().item()))
        size = torch.linalg.vector_norm(fz.flatten(1), dim=1).real.to(torch.float64)
        # Floored at a small fraction of ||z||, so jitter at the precision floor is not growth.
        floor = 1e-6 * torch.linalg.vector_norm(z.flatten(1), dim=1).real.to(torch.float64)
        lowest = size if lowest is None else torch.minimum(lowest, size)
        blown_up = bool((size > cfg.div_factor * torch.maximum(lowest, floor)).any())
        if not bool(torch.isfinite(res).all() and torch.isfinite(size).all()) or blown_up:
            stats.diverged = True
            break
        worst = stats.history[-1][1]
        good = (z, fz, res)
        if k + 1 >= cfg.T1 and worst <= cfg.res_est:
            stats.converged = True
            break
        if monitor is not None and monitor(z, fz):
            stats.stopped_by_monitor = True
            break
        if k + 1 == cfg.t1max:
            break
        z = accel.step(z, fz, cfg.eps) if accel is not None else z + cfg.eps * fz
    if good is None:  # the starting point itself was not finite
        stats.residual_per_seq = res
        stats.residual = stats.residual_max = float("nan")
        return z0, stats
    z, _, res = good
    stats.residual_per_seq = res
    stats.residual, stats.residual_max = res.mean().item(), res.max().item()
    return z, stats

