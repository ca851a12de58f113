"""One dataclass per concern. Field names are the seed's flag names, so the CLI spelling and the
Python spelling are the same word."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, TypeVar

ATTN_MODES = ("thick",)
SOLVER_METHODS = ("anderson", "fixed_point", "broyden", "momentum")

C = TypeVar("C")


def unknown_option_error(kind: str, bad: str, valid: list[str]) -> TypeError:
    """A one-line error naming the misspelled option and the closest valid one."""
    close = difflib.get_close_matches(bad, valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid options: {', '.join(sorted(valid))}"
    return TypeError(f"unknown {kind} option '{bad}': {hint}")


def from_options(cls: type[C], options: dict[str, Any], kind: str) -> C:
    """Build a config dataclass from keyword options, refusing any name it does not know."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in names:
            raise unknown_option_error(kind, key, names)
    return cls(**options)


@dataclass
class EPTConfig:
    """The equilibrium block: F(z) = x - (1+c) z + Attn(LN1 z) + FFN(LN2 z)."""

    vocab_size: int = 512
    C: int = 64
    H: int = 4
    T: int = 64
    c: float = 1.0
    qknorm: bool = False
    attn_mode: str = "thick"
    ffn_mult: int = 4
    ln_f: bool = False  # optional LayerNorm before the readout
    bias: bool = True
    ln_eps: float = 1e-5
    init_std: float = 0.02
    # The token and position embeddings' std (0: init_std). x = wte + wpe sets the scale of z*, and
    # LayerNorm's Jacobian is 1/std(z): embeddings at 0.02 make LN amplify the block's Jacobian by
    # ~1/0.02 at init, which at C=512 pushes it past the damping (the relaxation never settles).
    emb_std: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "C", "H", "T", "ffn_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"EPTConfig.{name} must be a positive integer, got {value!r}")
        if self.C % self.H:
            raise ValueError(f"EPTConfig: C={self.C} is not divisible by H={self.H}; pick H dividing C")
        if self.c < 0:
            raise ValueError(f"EPTConfig.c is the damping leak and must be >= 0, got {self.c}")
        if self.init_std <= 0 or self.emb_std < 0:
            raise ValueError(f"EPTConfig needs init_std > 0 and emb_std >= 0 (0: init_std), got "
                             f"init_std={self.init_std}, emb_std={self.emb_std}")
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f"EPTConfig.attn_mode '{self.attn_mode}' is not one of {ATTN_MODES}")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> EPTConfig:
        return from_options(cls, options, "model config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SolverConfig:
    """A relaxation to the fixed point F(z) = 0.

    Seed spelling: the free phase runs at least ``T1`` steps of z <- z + eps F(z), then keeps
    refining up to ``t1max`` while the residual is above ``res_est``.
    """

    method: str = "anderson"  # "anderson" | "fixed_point" | "broyden" | "momentum"
    eps: float = 0.5
    T1: int = 0  # minimum iterations (the seed's fixed count)
    t1max: int = 150  # maximum iterations
    res_est: float = 1e-4  # target true residual ||F(z)|| / ||z||
    m: int = 8  # Anderson memory
    lam: float = 1e-2  # Anderson regularisation, relative to each (unit-scaled) residual difference
    mix: float = 1.0  # Anderson mixing (1 = undamped)
    div_factor: float = 1e4  # growth of a sequence's ||F(z)|| over its lowest that counts as divergence
    # Anderson safeguards, per sequence (ept.solvers.anderson._Guard): plain steps while the residual is above
    # accel_from and plain steps still cut it by 10%; a fresh history when the residual exceeds
    # ``restart`` times its best; the dynamics for good (below) once the residual has not halved in
    # ``stall`` Anderson steps. 12: over 13 trained tiny operators (6 with the embeddings at 1.0, 7 at
    # 0.02; `python benchmarks/solvers.py RUN...`, 4 batches each) Anderson needed 0.431 of plain
    # iteration's F-evals to 1e-4 (batch counts; 0.429 summed per sequence) against 0.507 (0.458) at
    # 32, 0.449 at 16, 0.445 at 10; one operator lost 14%. On the emb 1.0 operators a stalled
    # sequence is one Anderson sits on while plain iteration (and Broyden) go on; 32 was chosen before
    # the stall escape's long steps existed, when a stalled sequence only had plain steps.
    accel_from: float = 0.1
    restart: float = 10.0
    stall: int = 12
    # After a stall the sequence follows the dynamics (plain steps), but every ``proj_every``+1-th step
    # is a long one, (1 + proj_jump)·eps, where the last two F(z) point the same way (cos > 0.9): a
    # projective integrator (Gear & Kevrekidis). A stalled sequence sits in a "ghost" (a slow passage
    # past a near-root, a local minimum of ||F||) that a root finder cannot leave and plain iteration
    # leaves slowly. Over 16 trained tiny operators (64 batches), F-evals to 1e-4 over the sequences
    # plain iteration settles: Anderson/plain 0.50 -> 0.41, no operator worse, none diverged (issue 6
    # note). proj_jump=0: plain steps only.
    proj_every: int = 5
    proj_jump: float = 8.0
    # Momentum (ept.solvers.momentum._Momentum): the heavy-ball step tuned to the relaxation map's
    # spectrum [lo, hi], both read off each sequence's last mom_m steps (Ritz values); mom_lo is the
    # highest lower edge it assumes, since a mode below lo - (1 - hi) grows and training stiffens a
    # block's map to eigenvalues near -1 (docs/experiments/stability.md). A sequence whose residual
    # grows mom_restart-fold over its best since its last restart loses its momentum (the third time:
    # plain steps for good). A short window follows the estimate as the sequence moves: 0.291 of plain
    # iteration's F-evals at mom_m 4 against 0.305 at 8 over 20 trained tiny operators
    # (`python benchmarks/solvers.py RUN...`).
    mom_m: int = 4
    mom_lo: float = -0.3
    mom_restart: float = 3.0

    def __post_init__(self) -> None:
        if self.method not in SOLVER_METHODS:
            raise ValueError(f"solver method '{self.method}' is not one of {', '.join(SOLVER_METHODS)}")
        if self.eps <= 0:
            raise ValueError(f"solver eps must be > 0, got {self.eps}")
        if self.t1max <= 0 or self.T1 < 0:
            raise ValueError(f"solver needs t1max > 0 and T1 >= 0, got T1={self.T1}, t1max={self.t1max}")
        if self.m < 1:
            raise ValueError(f"Anderson memory m must be >= 1, got {self.m}")
        if not self.mom_lo < 0.5 or self.mom_restart <= 1 or self.mom_m < 2:
            raise ValueError(f"momentum needs mom_lo < 0.5, mom_restart > 1 and mom_m >= 2, got "
                             f"mom_lo={self.mom_lo}, mom_restart={self.mom_restart}, mom_m={self.mom_m}")
        if self.proj_every < 1 or self.proj_jump < 0:
            raise ValueError(f"Anderson's stall escape needs proj_every >= 1 and proj_jump >= 0, got "
                             f"proj_every={self.proj_every}, proj_jump={self.proj_jump}")
        if self.accel_from <= 0 or self.restart <= 1 or self.stall < 1:
            raise ValueError(f"Anderson safeguards need accel_from > 0, restart > 1 and stall >= 1, got "
                             f"accel_from={self.accel_from}, restart={self.restart}, stall={self.stall}")


@dataclass
class ImplicitConfig:
    """The oracle: solve J^T λ = -g at z*, then one vjp of F with respect to θ."""

    adjoint: str = "gmres"  # "gmres" (scipy, matrix-free) | "anderson" (adjoint iteration)
    adj_tol: float | None = None  # None: 1e-10 in float64, 1e-5 in lower precision (reachable there)
    adj_max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.adjoint not in ("gmres", "anderson"):
            raise ValueError(f"implicit adjoint '{self.adjoint}' is not 'gmres' or 'anderson'")


@dataclass
class BPTTConfig:
    """Autograd through T1 unrolled steps z <- z + eps F(z) from z0 = 0."""

    T1: int = 150
    eps: float = 0.5
    div_factor: float = 1e4

    def __post_init__(self) -> None:
        if self.T1 <= 0 or self.eps <= 0:
            raise ValueError(f"bptt needs T1 > 0 and eps > 0, got T1={self.T1}, eps={self.eps}")


ESTIMATORS = ("onesided", "centred", "holomorphic")
ASYM = ("none", "fixed", "track", "linear")


@dataclass
class EPConfig:
    """The nudged phases and the estimator that turns them into λ.

    ``hr`` is the nudge strength β (per token: the nudge is β·∂(Σ_tokens CE)/∂z), and the radius of
    the holomorphic contour. ``T2`` set: exactly T2 nudged steps; unset: adaptive, stop when the
    estimate's relative change falls below ``t2_tol``, capped at ``t2sel``.
    """

    estimator: str = "centred"
    holo: int = 4  # points on the contour for estimator="holomorphic"
    hr: float = 0.02
    asym: str = "fixed"
    T2: int | None = None
    t2sel: int = 100
    t2_tol: float = 1e-6
    nudge_solver: str = "anderson"
    # The nudged problem starts next to its solution and is nearly linear: a short, lightly
    # regularised Anderson memory tracks it best (the free phase's m=8, lam=1e-2 gave worse EP
    # cosines and blew up nudged phases of a trained tiny model).
    nudge_m: int = 5
    nudge_lam: float = 1e-4
    # A nudged phase that blows up is relaxed once more at hr·retry_hr (0: never). Near a Hopf point
    # Jᵀ - βH can lose stability where Jᵀ alone still has it; a smaller β keeps it, at the price of
    # more sensitivity to the free phase's residual. Rolling back cannot help: same weights, same blow-up.
    retry_hr: float = 0.25
    # EP's estimate is the linear response of an equilibrium: a sequence whose free phase ended
    # above this residual is not at one, so it is left out of the step's gradient (inf: never).
    # Its nudged rows would otherwise start from a non-equilibrium, blow up and sink the batch, and
    # its error enters the estimate amplified by 1/β. (0.1 let a tiny run at hr=0.01 roll back
    # four times; 0.01 trained it cleanly: issue 6 note.)
    drop_res: float = 0.01
    # Leave out a sequence whose adaptive nudged estimate has not settled (changes by t2_tol or more)
    # at t2sel. On a trained tiny block such a sequence's λ was 60% off while the settled ones matched
    # the exact gradient to cos 0.9999996; but training the tiny preset with it (seeds 0/1/2) gave
    # val CE 4.890/4.968/4.908 against 4.877/4.918/4.886 without, dropping up to 5 of 8 sequences a
    # step late in the run (issue 6 note). Off by default; kept when no sequence settled.
    drop_unsettled: bool = False
    # Refine z* with Anderson to this residual before nudging (0: off), at most polish_max F-evals.
    # EP's estimate is a finite difference of nudged states divided by β, so z*'s own error enters
    # it amplified by 1/β — and by J⁻¹ twice where the block is near-critical (a residual r leaves z*
    # ~r/σ_min away; the nudged response's curvature there is off by as much again). On a trained
    # tiny block, λ's per-sequence error against a float64 oracle was 0.136 on average at the free
    # phase's 1e-4 and 0.043 after polishing to 1e-6 (issue 6 note). Anderson starts from the
    # attractor plain iteration found, so it refines that equilibrium rather than finding a saddle;
    # a row that polishing does not improve keeps its free-phase state.
    polish_res: float = 0.0
    polish_max: int = 40
    # Polish only the sequences the free phase brought within this × its res_est: farther out a
    # root finder travels (30-100% of ||z*|| on a drifting tiny block) to roots the relaxation never
    # reaches, and EP would train on equilibria that evaluation, which does not polish, never sees.
    polish_from: float = 3.0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"EP estimator '{self.estimator}' is not one of {ESTIMATORS}")
        if self.asym not in ASYM:
            raise ValueError(f"AsymEP correction '{self.asym}' is not one of {ASYM}")
        if self.holo < 2:
            raise ValueError(f"holomorphic estimator needs holo >= 2 points, got {self.holo}")
        if self.hr <= 0:
            raise ValueError(f"nudge strength hr must be > 0, got {self.hr}")
        if self.T2 is not None and self.T2 <= 0:
            raise ValueError(f"T2 must be a positive number of nudged steps, got {self.T2}")
        if not self.drop_res > 0:
            raise ValueError(f"drop_res must be > 0 (inf: keep every sequence), got {self.drop_res}")
        if not 0 <= self.retry_hr < 1:
            raise ValueError(f"retry_hr must be in [0, 1) (0: no retry), got {self.retry_hr}")
        if self.polish_res < 0 or self.polish_max < 1 or not self.polish_from > 0:
            raise ValueError(f"polish needs polish_res >= 0 (0: off), polish_max >= 1 and polish_from > 0, "
                             f"got {self.polish_res}, {self.polish_max}, {self.polish_from}")
        if self.nudge_solver not in SOLVER_METHODS:
            raise ValueError(f"nudge_solver '{self.nudge_solver}' is not one of {', '.join(SOLVER_METHODS)}")
