"""Relaxation to a fixed point F(z) = 0 of any field callable: damped iteration, Anderson, Broyden,
heavy-ball momentum.

The solvers know nothing about transformers: the free phase, the nudged phases and the adjoint
iteration all call :func:`solve` with their own field. States may be real or complex (complex
states are relaxed as their real view), of any shape whose first dimension indexes independent
systems (sequences): the residual is reported per row, mean and worst.

Rows are independent, so a row that is done (converged, or flagged by a monitor) is frozen where it
is while the others go on. A field that can be cut to a sub-batch (:class:`RowField`) is then
evaluated on the rows still moving only: one slow sequence no longer costs a whole batch per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ept.config import SolverConfig, unknown_option_error

Field = Callable[[Tensor], Tensor]
# A monitor sees (z, F(z)) after every evaluation: True stops the solve, a (rows,) bool tensor
# freezes the rows it flags (and stops the solve once every row is frozen).
Monitor = Callable[[Tensor, Tensor], "bool | Tensor"]


@runtime_checkable
class RowField(Protocol):
    """A field over independent rows that can be restricted to some of them."""

    def __call__(self, z: Tensor) -> Tensor: ...

    def rows(self, idx: Tensor) -> Field:
        """The same field on the sub-batch ``idx`` (row indices into the full batch)."""
        ...


@dataclass
class RowwiseField:
    """``fn(z, *inputs)`` where every input is indexed by row along dim 0: cut by indexing them."""

    fn: Callable[..., Tensor]
    inputs: tuple[Tensor, ...]

    def __call__(self, z: Tensor) -> Tensor:
        return self.fn(z, *self.inputs)

    def rows(self, idx: Tensor) -> RowwiseField:
        return RowwiseField(self.fn, tuple(t[idx] for t in self.inputs))

_TINY = 1e-30
_PLAIN_PROGRESS = 0.9  # a plain step that cuts the residual by at least 10% is still worth taking


@dataclass
class SolveStats:
    fevals: int = 0  # calls of the field (each on the rows still moving)
    row_fevals: int = 0  # rows evaluated, summed over calls: the compute, in single-row F-evaluations
    residual: float = float("inf")  # batch mean of ||F(z)|| / ||z||, the undamped residual
    residual_max: float = float("inf")  # worst sequence
    residual_per_seq: Tensor | None = None
    history: list[tuple[float, float]] = field(default_factory=list)  # (mean, worst) per F-eval
    converged: bool = False
    diverged: bool = False
    stopped_by_monitor: bool = False
    method: str = ""
    unstable: Tensor | None = None  # on divergence: the rows (sequences) that blew up
    done: Tensor | None = None  # rows frozen before the end: converged, or flagged by the monitor
    flagged: Tensor | None = None  # rows the monitor flagged (a subset of done)
    recovered: int = 0  # secant steps that blew a sequence up, undone (see relax)

    def summary(self) -> dict[str, Any]:
        return {
            "fevals": self.fevals,
            "row_fevals": self.row_fevals,
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

    Each step solves min ||f_k + ΔF γ|| over the differences ΔF_i = f_i - f_k to the newest residual
    f_k (f = eps·F), in float64 and with every column of ΔF scaled to unit norm, then mixes
    z ← z_k + ΔX γ + mix·(f_k + ΔF γ). Residuals in a window span orders of magnitude; the raw
    Gram matrix of float32 residuals then loses the small (newest) ones. ``lam`` is Tikhonov on the
    scaled system, i.e. relative to each difference's own size.

    A sequence flagged in ``restart`` forgets its history and takes a plain step: Anderson's secant
    model only holds where F is nearly linear, and points far from the fixed point (z = 0, where
    LayerNorm is singular, or a state a bad extrapolation threw away) poison every later step.
    """

    def __init__(self, m: int, lam: float, mix: float):
        self.m, self.lam, self.mix = m, lam, mix
        self.X: Tensor | None = None  # (B, m, n) iterates, ring buffer
        self.F: Tensor | None = None  # (B, m, n) eps-scaled residuals
        self.stamp: Tensor | None = None  # (B, m) the step each slot was written at
        self.since: Tensor | None = None  # (B,) a sequence's history starts at this step
        self.count = 0

    def step(self, z: Tensor, fz: Tensor, eps: float, restart: Tensor | None = None) -> Tensor:
        x, f = _flat(z), _flat(fz) * eps
        if self.X is None:
            B, n = x.shape
            self.X = x.new_zeros(B, self.m, n)
            self.F = x.new_zeros(B, self.m, n)
            self.stamp = torch.full((B, self.m), -1, dtype=torch.long, device=x.device)
            self.since = torch.zeros(B, dtype=torch.long, device=x.device)
        if restart is not None:
            self.since = torch.where(restart.to(x.device), self.count, self.since)
        slot = self.count % self.m
        self.X[:, slot] = x
        self.F[:, slot] = f
        self.stamp[:, slot] = self.count
        self.count += 1
        k = min(self.count, self.m)
        if k == 1:
            return _unflat(x + self.mix * f, z)
        # Every filled slot takes part, the newest one too (its difference is zero): slots that may
        # not (the newest, and those from before a restart) are masked in the small k×k system, where
        # they get a unit diagonal, a zero right-hand side and so a zero coefficient. Masking there
        # rather than in the (B, k, n) arrays saves index copies and masking products: 25% of a
        # step at the tiny preset's free phase.
        stamp = self.stamp[:, :k]
        valid = (stamp >= self.since.unsqueeze(1)) & (stamp != self.count - 1)  # (B, k)
        f64 = f.to(torch.float64)
        dF = self.F[:, :k].to(torch.float64) - f64.unsqueeze(1)  # (B, k, n)
        gram = dF @ dF.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(_TINY)  # (B, k)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        gram = torch.where(pair, gram / (scale.unsqueeze(-1) * scale.unsqueeze(-2)), 0.0)
        gram = gram + (self.lam + (~valid).to(gram.dtype)).diag_embed()
        rhs = torch.where(valid, -(dF @ f64.unsqueeze(-1)).squeeze(-1) / scale, 0.0)
        gamma = (torch.linalg.solve(gram, rhs) / scale).unsqueeze(1)  # (B, 1, k)
        step_f = f64 + torch.bmm(gamma, dF).squeeze(1)
        step_x = x + torch.bmm(gamma.to(x.dtype), self.X[:, :k] - x.unsqueeze(1)).squeeze(1)
        return _unflat(step_x + self.mix * step_f.to(x.dtype), z)


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
        self.skip: Tensor | None = None  # rows reset since the last step

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

    def forget(self, rows: Tensor) -> None:
        """Drop the secant history of ``rows``: their inverse Jacobian is -I again (a plain step next)."""
        for t in (*self.us, *self.vs):
            t[rows.to(t.device)] = 0.0
        self.skip = rows

    def step(self, z: Tensor, fz: Tensor, eps: float) -> Tensor:
        x, g = _flat(z), _flat(fz) * eps
        skip, self.skip = self.skip, None
        if self.prev is not None:
            dx, dg = x - self.prev[0], g - self.prev[1]
            v = self._inv_t(dx)
            denom = (v * dg).sum(-1, keepdim=True)
            # A nearly orthogonal secant pair (a sequence at its precision floor) would add a huge,
            # meaningless rank-one term: such a sequence gets no correction this step.
            norms = torch.linalg.vector_norm(v, dim=-1, keepdim=True) * torch.linalg.vector_norm(
                dg, dim=-1, keepdim=True)
            safe = denom.abs() > 1e-6 * norms + _TINY
            if skip is not None:  # a secant pair across a reset row's jump back would be meaningless
                safe = safe & ~skip.to(safe.device).unsqueeze(-1)
            u = torch.where(safe, (dx - self._inv(dg)) / torch.where(safe, denom, 1.0), 0.0)
            self.us.append(u)
            self.vs.append(torch.where(safe, v, 0.0))
            if len(self.us) > self.m:
                self.us.pop(0)
                self.vs.pop(0)
        self.prev = (x, g)
        return _unflat(x - self._inv(g), z)


_MOM_HI = (0.5, 0.995)  # the range the spectrum's upper edge is taken from (see _Momentum)
_MAX_MOM_RESTARTS = 2  # per sequence: after a third loss of momentum it takes plain steps


class _Momentum:
    """Heavy-ball relaxation z ← z + a·r + b·(z − z_prev), r = eps·F(z), one (a, b) per sequence.

    On a linear field whose relaxation map g(z) = z + eps·F(z) has a real spectrum in [lo, hi], the
    pair a = 4 / (√α + √β)², b = ((√β − √α) / (√β + √α))² with α = 1 − hi, β = 1 − lo (Polyak's heavy
    ball; Frankel's second-order Richardson) contracts every mode by (√κ − 1) / (√κ + 1), κ = β / α, per
    F-evaluation, against hi for plain iteration: 0.46 against 0.85 on a trained tiny block. That
    block's spectrum is what makes this the right method there: at z* its relaxation map's
    eigenvalues were real to within 0.12, in [-0.09, 0.85], with ~60 of them above 0.5 (about one per
    token), too many for Anderson's window to deflate one by one, so Anderson stays near the bulk's
    own rate while a polynomial for the whole interval does not.

    ``hi`` is read off each sequence's last ``m`` steps: with pairs Δz, Δr, (∂g/∂z − I) Δz ≈ Δr, so
    the eigenvalues of (ΔZᵀΔZ)⁻¹ ΔZᵀΔR are the Ritz values of ∂g/∂z − I on the span of recent steps,
    whose extreme ones converge first; hi is the largest real one, clipped to [0.5, 0.995]. Modes in
    (hi, 1) still contract (more slowly), so an underestimate costs steps, not stability; modes below
    lo − (1 − hi) grow, which is why lo (``mom_lo``) is a setting with room rather than an estimate.

    The step is a polynomial in the dynamics, not a root finder: z* is a fixed point of it exactly
    when it is one of g, and one where g has an eigenvalue above 1 (a saddle the dynamics leaves)
    stays unstable. Anderson and Broyden settle on such saddles (12 of 96 sequence solves on trained
    tiny operators); this follows the dynamics to its attractor, faster.

    Safeguards, per sequence: plain steps while far (as Anderson's); a residual ``mom_restart`` times
    its best since the last restart drops the momentum and the recent steps; the third time, plain
    steps for good.
    """

    def __init__(self, m: int, lo: float, restart: float):
        self.m, self.lo, self.restart = m, lo, restart
        self.dZ: Tensor | None = None  # (B, m, n) recent steps, ring buffer
        self.dR: Tensor | None = None  # (B, m, n) the changes of eps·F(z) over them
        # Their products ΔZᵢ·ΔZⱼ and ΔZᵢ·ΔRⱼ, kept up to date one slot a step: recomputing them from
        # the buffers (in float64) cost more than an F-evaluation at the tiny preset.
        self.gram: Tensor | None = None  # (B, m, m)
        self.cross: Tensor | None = None  # (B, m, m)
        self.ok: Tensor | None = None  # (B, m) the slot holds a step of the sequence's current run
        self.prev: tuple[Tensor, Tensor] | None = None
        self.fresh: Tensor | None = None  # (B,) no usable previous point (start, or put back by relax)
        self.started: Tensor | None = None
        self.plain_only: Tensor | None = None
        self.best: Tensor | None = None
        self.prev_res: Tensor | None = None
        self.restarts: Tensor | None = None
        self.count = 0

    def forget(self, rows: Tensor) -> None:
        """``rows`` were put back at an earlier point: their last step and its momentum are void."""
        if self.ok is not None and self.fresh is not None:
            self.ok[rows.to(self.ok.device)] = False
            self.fresh = self.fresh | rows.to(self.fresh.device)

    def step(self, z: Tensor, fz: Tensor, res: Tensor, cfg: SolverConfig) -> Tensor:
        x, r = _flat(z), _flat(fz) * cfg.eps
        if self.prev is None:
            B, n = x.shape
            self.dZ, self.dR = x.new_zeros(B, self.m, n), x.new_zeros(B, self.m, n)
            self.gram = torch.zeros(B, self.m, self.m, dtype=torch.float64, device=x.device)
            self.cross = torch.zeros_like(self.gram)
            self.ok = torch.zeros(B, self.m, dtype=torch.bool, device=x.device)
            self.fresh = torch.ones(B, dtype=torch.bool, device=x.device)
            self.started = torch.zeros(B, dtype=torch.bool, device=x.device)
            self.plain_only = torch.zeros_like(self.started)
            self.best = torch.full((B,), float("inf"), dtype=torch.float64, device=x.device)
            self.prev_res = self.best.clone()
            self.restarts = torch.zeros(B, dtype=torch.long, device=x.device)
            self.prev = (x, r)
        assert self.dZ is not None and self.dR is not None and self.ok is not None and self.fresh is not None
        assert self.gram is not None and self.cross is not None
        assert self.started is not None and self.plain_only is not None and self.best is not None
        assert self.prev_res is not None and self.restarts is not None
        res = res.to(x.device)
        px, pr = self.prev
        slot = self.count % self.m
        dz, dr = x - px, r - pr
        self.dZ[:, slot], self.dR[:, slot] = dz, dr
        zz = torch.bmm(self.dZ, dz.unsqueeze(-1)).squeeze(-1).to(torch.float64)  # ΔZᵢ·Δz, the new one's too
        self.gram[:, slot], self.gram[:, :, slot] = zz, zz
        self.cross[:, slot] = torch.bmm(self.dR, dz.unsqueeze(-1)).squeeze(-1).to(torch.float64)
        self.cross[:, :, slot] = torch.bmm(self.dZ, dr.unsqueeze(-1)).squeeze(-1).to(torch.float64)
        self.ok[:, slot] = ~self.fresh
        self.count += 1
        far = ~self.started & (res > cfg.accel_from) & (res < _PLAIN_PROGRESS * self.prev_res)
        self.started = self.started | ~far
        lost = self.started & (res > self.restart * self.best)
        if bool(lost.any()):
            self.restarts = self.restarts + lost.long()
            self.plain_only = self.plain_only | (self.restarts > _MAX_MOM_RESTARTS)
            self.ok[lost] = False
            self.best = torch.where(lost, res, self.best)
        self.best = torch.minimum(self.best, res)
        still = self.fresh | lost  # no momentum this step
        alpha = (1 - _ritz_top(self.gram, self.cross, self.ok).clamp(*_MOM_HI)).to(x.device)
        beta = torch.full_like(alpha, 1 - self.lo)
        a = 4 / (alpha.sqrt() + beta.sqrt()) ** 2
        b = torch.where(still, 0.0, ((beta.sqrt() - alpha.sqrt()) / (beta.sqrt() + alpha.sqrt())) ** 2)
        plain = far | self.plain_only
        a, b = torch.where(plain, 1.0, a).to(x.dtype), torch.where(plain, 0.0, b).to(x.dtype)
        out = x + a.unsqueeze(1) * r + b.unsqueeze(1) * (x - px)
        self.prev, self.prev_res = (x, r), res
        self.fresh = torch.zeros_like(self.fresh)
        return _unflat(out, z)


def _ritz_top(gram: Tensor, cross: Tensor, ok: Tensor) -> Tensor:
    """Per row, the largest real part of 1 + the eigenvalues of (ΔZᵀΔZ)⁻¹ ΔZᵀΔR over the slots in
    ``ok`` (0 where a row has none): the top Ritz value of the map whose steps ΔZ changed r by ΔR,
    from the products ``gram`` = ΔZᵢ·ΔZⱼ and ``cross`` = ΔZᵢ·ΔRⱼ (float64, (B, m, m))."""
    scale = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(_TINY)
    outer = scale.unsqueeze(-1) * scale.unsqueeze(-2)
    pair = ok.unsqueeze(-1) & ok.unsqueeze(-2)
    eye = torch.eye(ok.shape[1], dtype=gram.dtype, device=ok.device)
    # A slot that is not in use gets the eigenvalue -1 (Ritz value 0): it never sets the top.
    gram = torch.where(pair, gram / outer, eye) + 1e-10 * eye
    cross = torch.where(pair, cross / outer, -eye)
    top = 1 + torch.linalg.eigvals(torch.linalg.solve(gram, cross)).real.max(-1).values
    return torch.nan_to_num(top, nan=0.0)


class _Guard:
    """Per-sequence safeguards around Anderson (see :class:`SolverConfig`).

    - far: plain steps while the residual is above ``accel_from`` and plain steps still cut it by
      10%: the secant model is wrong far from the fixed point (z = 0 always: LayerNorm is singular
      there), and such points poison every later extrapolation;
    - restart: a residual ``restart`` times above the best so far clears the sequence's history;
    - stall: a sequence whose residual has not halved in ``stall`` steps is left to the dynamics
      for the rest of the solve. On a trained operator Anderson otherwise sits at a residual of
      ~1e-3-1e-2 (a local minimum of ||F||, the "ghost" of a root) on sequences plain iteration
      does solve: the dynamics drifts slowly past the ghost, its residual rising before it falls,
      which a root finder, descending ||F||, never does;
    - escape: such a sequence takes plain steps, every ``proj_every``+1-th of them a long step
      (1 + proj_jump)·eps (projective integration: the plain steps damp the fast modes, the long
      step carries the slow drift) where its last two F(z) are aligned. An oscillating sequence
      (a stiff field) would be thrown further by a long step, so it only takes plain ones.
    """

    def __init__(self) -> None:
        self.k = 0
        self.prev = torch.tensor(float("inf"), dtype=torch.float64)
        self.mark: Tensor | None = None  # the residual each sequence must next halve ...
        self.mark_at: Tensor | None = None  # ... and the step it was set at
        self.plain_only: Tensor | None = None
        self.since_long: Tensor | None = None  # plain steps since the last long one (escaping rows)
        self.prev_f: Tensor | None = None

    def step(self, accel: _Anderson, z: Tensor, fz: Tensor, res: Tensor, best: Tensor, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        """``best``: each sequence's lowest residual so far, this one's included (:class:`_Best`)."""
        if self.mark is None:
            self.mark = res
            self.mark_at = torch.zeros_like(res, dtype=torch.long)
            self.plain_only = torch.zeros_like(res, dtype=torch.bool)
            self.since_long = torch.zeros_like(res, dtype=torch.long)
        halved = res < 0.5 * self.mark
        self.mark = torch.where(halved, res, self.mark)
        far = (res > cfg.accel_from) & (res < _PLAIN_PROGRESS * self.prev)
        # The stall clock restarts on progress, and runs only for sequences Anderson is driving.
        self.mark_at = torch.where(halved | far, self.k, self.mark_at)
        self.plain_only = self.plain_only | (self.k - self.mark_at > cfg.stall)
        restart = far | (res > cfg.restart * best) | self.plain_only
        if reset is not None:
            restart = restart | reset.to(restart.device)
        self.prev = res
        self.k += 1
        out = accel.step(z, fz, cfg.eps, restart)
        if cfg.proj_jump > 0 and bool(self.plain_only.any()):
            out = self._escape(z, fz, out, cfg)
        return out

    def _escape(self, z: Tensor, fz: Tensor, out: Tensor, cfg: SolverConfig) -> Tensor:
        f = _flat(fz)
        due = self.plain_only & (self.since_long >= cfg.proj_every)
        if self.prev_f is not None:
            norms = torch.linalg.vector_norm(f, dim=1) * torch.linalg.vector_norm(self.prev_f, dim=1)
            cos = (f * self.prev_f).sum(1) / norms.clamp_min(_TINY)
            long = due & (cos.to(due.device) > 0.9)
        else:
            long = torch.zeros_like(due)
        self.prev_f = f
        self.since_long = torch.where(long | ~self.plain_only, 0, self.since_long + 1)
        if not bool(long.any()):
            return out
        return torch.where(_rows_mask(long, z), z + (1 + cfg.proj_jump) * cfg.eps * fz, out)


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
    accel: _Anderson | _Broyden | _Momentum | None = None
    if cfg.method == "anderson":
        accel = _Anderson(cfg.m, cfg.lam, cfg.mix)
    elif cfg.method == "momentum":
        accel = _Momentum(cfg.m, cfg.mom_lo, cfg.mom_restart)
    elif cfg.method == "broyden":
        # Dropping old secant pairs destabilises good Broyden, so it keeps all of them (as TorchDEQ
        # does): two state-sized vectors per F-evaluation, the price of this method.
        accel = _Broyden(cfg.t1max)
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
    guard = _Guard()
    best = _Best(rows) if accel is not None else None
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
        if isinstance(accel, _Anderson):
            assert best is not None and best.res is not None  # kept for every secant solve
            step = guard.step(accel, z, fz, res, best.res, cfg, reset)
        elif isinstance(accel, _Momentum):
            if reset is not None:
                accel.forget(reset)
            step = accel.step(z, fz, res, cfg)
        elif accel is not None:
            if reset is not None:
                accel.forget(reset)
            step = accel.step(z, fz, cfg.eps)
        else:
            step = z + cfg.eps * fz
        z = step if not bool(done.any()) else torch.where(_rows_mask(done, z), z, step)
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
        m = _rows_mask(rows, z)
        r = rows.to(res.device)
        return (torch.where(m, self.z, z), torch.where(m, self.fz, fz), torch.where(r, self.res, res),
                torch.where(r, self.size, size))

    def update(self, z: Tensor, fz: Tensor, res: Tensor, size: Tensor) -> None:
        if self.z is None or self.fz is None or self.res is None or self.size is None:
            self.z, self.fz, self.res, self.size = z, fz, res, size
            return
        better = res < self.res
        m = _rows_mask(better, z)
        self.z, self.fz = torch.where(m, z, self.z), torch.where(m, fz, self.fz)
        self.res, self.size = torch.where(better, res, self.res), torch.where(better, size, self.size)


def _evaluate(sub: Field, z: Tensor, sel: Tensor | None, fz: Tensor | None,
              res: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """F(z), residual and ||F(z)|| per row; frozen rows outside ``sel`` keep their last values."""
    if sel is None or fz is None or res is None:
        fz = sub(z)
        return fz, residual_per_seq(fz, z), _row_norm(fz)
    zs = z[sel]
    fs = sub(zs)
    fz, res = fz.clone(), res.clone()
    fz[sel] = fs
    res[sel.to(res.device)] = residual_per_seq(fs, zs)
    return fz, res, _row_norm(fz)


def _row_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t.flatten(1), dim=1).real.to(torch.float64)


def _rows_mask(rows: Tensor, like: Tensor) -> Tensor:
    return rows.to(like.device).view(-1, *([1] * (like.dim() - 1)))


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
