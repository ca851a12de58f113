"""Heavy-ball relaxation tuned per sequence to the spectrum its own steps reveal."""

from __future__ import annotations

import torch
from torch import Tensor

from ept.config import SolverConfig
from ept.solvers.common import TINY, flat, plain_steps_pay, unflat

MOM_HI = (0.5, 0.995)  # the range the spectrum's upper edge is taken from (see HeavyBall)
# The lower edge follows the stiff end the steps reveal (a trained block's relaxation map reached
# eigenvalues near -1 at eps 0.5, which a heavy ball tuned to mom_lo -0.3 amplifies), with room.
# Its floor only bounds a wild Ritz value: at -3 the small preset's block outgrew it by step 460
# (a mode at -3.3; docs/experiments/small_preset.md), and an edge set too low costs steps, not
# stability.
_MOM_LO_ROOM, _MOM_LO_MIN = 0.1, -30.0
_MAX_MOM_RESTARTS = 2  # per sequence: after a third loss of momentum it takes plain steps


class HeavyBall:
    """Heavy-ball relaxation z ← z + a·r + b·(z − z_prev), r = eps·F(z), one (a, b) per sequence.

    On a linear field whose relaxation map g(z) = z + eps·F(z) has a real spectrum in [lo, hi], the
    pair a = 4 / (√α + √β)², b = ((√β − √α) / (√β + √α))² with α = 1 − hi, β = 1 − lo (Polyak's heavy
    ball; Frankel's second-order Richardson) contracts every mode by (√κ − 1) / (√κ + 1), κ = β / α, per
    F-evaluation, against hi for plain iteration. A trained tiny block's relaxation map has a nearly
    real spectrum with about one eigenvalue above 0.5 per token, too many for Anderson's window to
    deflate one by one, while a polynomial for the whole interval does not care how many there are
    (docs/experiments/heavy_ball.md).

    ``hi`` is read off each sequence's last ``m`` steps: with pairs Δz, Δr, (∂g/∂z − I) Δz ≈ Δr, so
    the eigenvalues of (ΔZᵀΔZ)⁻¹ ΔZᵀΔR are the Ritz values of ∂g/∂z − I on the span of recent steps,
    whose extreme ones converge first; hi is the largest real one, clipped to [0.5, 0.995]. Modes in
    (hi, 1) still contract (more slowly), so an underestimate costs steps, not stability; modes below
    lo − (1 − hi) grow, so lo is ``mom_lo`` or, where a window of this solve has shown a lower Ritz
    value, the lowest one less 0.1: training stiffens a block until its map has eigenvalues near -1
    at eps 0.5 (``docs/experiments/stability.md``), where plain iteration barely contracts and a heavy
    ball tuned to -0.3 diverges. The edge is kept for the whole solve: a damped stiff mode leaves the
    window but not the operator, and a ball tuned without it regrows it (the small preset's blow-ups
    at step 456-511 of a 3000-step run, a mode at -2.4, ``docs/experiments/small_preset.md``).

    The step is a polynomial in the dynamics, not a root finder: z* is a fixed point of it exactly
    when it is one of g, and one where g has an eigenvalue above 1 (a saddle the dynamics leaves)
    stays unstable. Anderson and Broyden settle on such saddles of trained operators
    (docs/experiments/anderson_saddles.md); this follows the dynamics to its attractor, faster.

    Safeguards, per sequence: plain steps while far (as Anderson's); a residual ``mom_restart`` times
    its best since the last restart drops the momentum and the recent steps; the third time, plain
    steps for good. A plain step is shortened below 1 where the edge is below -1 (:func:`plain_step`).
    """

    recovers = True

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
        self.lo_seen: Tensor | None = None  # (B,) the lowest Ritz value this solve has revealed
        self.count = 0

    def forget(self, rows: Tensor) -> None:
        """``rows`` were put back at an earlier point: their last step and its momentum are void."""
        if self.ok is not None and self.fresh is not None:
            self.ok[rows.to(self.ok.device)] = False
            self.fresh = self.fresh | rows.to(self.fresh.device)

    @classmethod
    def from_config(cls, cfg: SolverConfig) -> HeavyBall:
        return cls(cfg.mom_m, cfg.mom_lo, cfg.mom_restart)

    def step(self, z: Tensor, fz: Tensor, res: Tensor, best: Tensor | None, cfg: SolverConfig,
             reset: Tensor | None = None) -> Tensor:
        if reset is not None:
            self.forget(reset)
        x, r = flat(z), flat(fz) * cfg.eps
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
            self.lo_seen = torch.zeros(B, dtype=torch.float64, device=x.device)
            self.prev = (x, r)
        assert self.dZ is not None and self.dR is not None and self.ok is not None and self.fresh is not None
        assert self.gram is not None and self.cross is not None
        assert self.started is not None and self.plain_only is not None and self.best is not None
        assert self.prev_res is not None and self.restarts is not None and self.lo_seen is not None
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
        far = ~self.started & plain_steps_pay(res, self.prev_res, cfg.accel_from)
        self.started = self.started | ~far
        lost = self.started & (res > self.restart * self.best)
        if bool(lost.any()):
            self.restarts = self.restarts + lost.long()
            self.plain_only = self.plain_only | (self.restarts > _MAX_MOM_RESTARTS)
            self.ok[lost] = False
            self.best = torch.where(lost, res, self.best)
        self.best = torch.minimum(self.best, res)
        still = self.fresh | lost  # no momentum this step
        ritz_lo, hi = ritz_range(self.gram, self.cross, self.ok)
        hi = hi.clamp(*MOM_HI).to(x.device)
        self.lo_seen = torch.minimum(self.lo_seen, ritz_lo.to(x.device))
        lo = (self.lo_seen - _MOM_LO_ROOM).clamp_min(_MOM_LO_MIN).clamp_max(self.lo)
        a, b = heavy_ball_params(lo, hi)
        b = torch.where(still, 0.0, b)
        plain = far | self.plain_only
        a = torch.where(plain, plain_step(lo, hi), a).to(x.dtype)
        b = torch.where(plain, 0.0, b).to(x.dtype)
        out = x + a.unsqueeze(1) * r + b.unsqueeze(1) * (x - px)
        self.prev, self.prev_res = (x, r), res
        self.fresh = torch.zeros_like(self.fresh)
        return unflat(out, z)


def plain_step(lo: Tensor, hi: Tensor) -> Tensor:
    """The step a of z ← z + a·r without momentum: 1 (the dynamics) unless the spectrum reaches
    below -1, where a plain step grows that mode; there Richardson's optimum 2 / ((1 − lo) + (1 − hi)),
    which contracts both ends alike."""
    return torch.where(lo < -1, 2 / ((1 - lo) + (1 - hi)), torch.ones_like(lo))


def heavy_ball_params(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """The heavy ball's (a, b) for a relaxation map whose spectrum is the real interval [lo, hi]:
    a = 4 / (√α + √β)², b = ((√β − √α) / (√β + √α))², α = 1 − hi, β = 1 − lo."""
    sa, sb = (1 - hi).sqrt(), (1 - lo).sqrt()
    return 4 / (sa + sb) ** 2, ((sb - sa) / (sb + sa)) ** 2


def contraction(lo: Tensor, hi: Tensor, mu: Tensor) -> Tensor:
    """Per F-evaluation, how much the heavy ball tuned to [lo, hi] contracts a mode whose relaxation
    map eigenvalue is ``mu`` (complex allowed; broadcast): the larger root modulus of
    r² − (1 + b − a(1 − μ)) r + b. √b for every μ in [lo, hi]; more off the interval, and from a
    complex μ beside it already: the shape of the spectrum, not only its real range, sets the
    rate. lo = hi = 0 is plain iteration (a = 1, b = 0): |μ|."""
    return step_contraction(*heavy_ball_params(lo, hi), mu)


def step_contraction(a: Tensor, b: Tensor, mu: Tensor) -> Tensor:
    """Per F-evaluation, how much the step z ← z + a·r + b·(z − z_prev) contracts a mode whose
    relaxation map eigenvalue is ``mu``: the larger root modulus of r² − (1 + b − a(1 − μ)) r + b."""
    p = 1 + b - a * (1 - mu)
    d = (p * p - 4 * b).sqrt()
    return torch.maximum(((p + d) / 2).abs(), ((p - d) / 2).abs())


def ritz_top(gram: Tensor, cross: Tensor, ok: Tensor) -> Tensor:
    """Per row, the largest real part of 1 + the eigenvalues of (ΔZᵀΔZ)⁻¹ ΔZᵀΔR over the slots in
    ``ok`` (0 where a row has none): the top Ritz value of the map whose steps ΔZ changed r by ΔR,
    from the products ``gram`` = ΔZᵢ·ΔZⱼ and ``cross`` = ΔZᵢ·ΔRⱼ (float64, (B, m, m))."""
    return ritz_range(gram, cross, ok)[1]


def ritz_range(gram: Tensor, cross: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, (lowest, largest) real part of the Ritz values of :func:`ritz_top` (0 and 0 where
    a row has no slot in use)."""
    scale = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(TINY)
    outer = scale.unsqueeze(-1) * scale.unsqueeze(-2)
    pair = ok.unsqueeze(-1) & ok.unsqueeze(-2)
    eye = torch.eye(ok.shape[1], dtype=gram.dtype, device=ok.device)
    # A slot that is not in use gets the eigenvalue -1 (Ritz value 0): it never sets the top.
    gram = torch.where(pair, gram / outer, eye) + 1e-10 * eye
    cross = torch.where(pair, cross / outer, -eye)
    real = torch.linalg.eigvals(torch.linalg.solve(gram, cross)).real
    top = 1 + real.max(-1).values
    # Unused slots sit at Ritz value 0: they can only hold the lower edge at 0, which mom_lo is below.
    low = (1 + real.min(-1).values).clamp_max(0.0)
    return torch.nan_to_num(low, nan=0.0), torch.nan_to_num(top, nan=0.0)

