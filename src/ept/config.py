"""Every setting of ept, defined once: one dataclass per concern, one field per setting.

A field's help text lives in its metadata (:func:`setting`); ``ept train``'s flags are generated
from these fields (:data:`ept.flags.FLAGS`), so the CLI spelling, the Python spelling and the config.json key
are the same word. A run's full configuration is a :class:`RunConfig`, saved as config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

C = TypeVar("C")

ATTN_MODES = ("thick", "energy", "mono")
OBJECTIVES = ("lm", "mlm")
ESTIMATORS = ("onesided", "centred", "holomorphic")
ASYM = ("none", "fixed", "track", "linear")
EIG_DIRS = ("sym", "slow")
MODES = ("ep", "bptt", "bp")


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A config field and its help text. ``meta``: ``flag`` (the CLI name where it is not the field's),
    ``aliases`` (more CLI names), ``choices`` (a tuple, or a function returning one), ``cli=False``
    (a field no flag sets)."""
    return field(default=default, metadata={"help": help, **meta})


def solver_methods() -> tuple[str, ...]:
    """The solver registry's names (read when a config is checked: the solvers import this module)."""
    from ept.solvers.registry import SOLVERS

    return tuple(SOLVERS)


def optimizer_names() -> tuple[str, ...]:
    from ept.optim import OPTIMIZERS

    return OPTIMIZERS


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


# ------------------------------------------------------------------------------------ the block


@dataclass
class EPTConfig:
    """The equilibrium block: F(z) = x - (1+c) z + N(z), N the attention and FFN forces of ``attn_mode``."""

    vocab_size: int = setting(512, "BPE vocabulary size (trained on the data)", aliases=("vocab",))
    C: int = setting(64, "width")
    H: int = setting(4, "attention heads")
    T: int = setting(64, "context length")
    c: float = setting(1.0, "damping leak: F = x - (1+c) z + ...")
    qknorm: bool = setting(False, "normalise q and k per head")
    attn_mode: str = setting("thick", "the block: thick (free softmax attention), energy (F = -grad E, "
                             "Energy-Transformer attention and a Hopfield memory), mono (strongly monotone: "
                             "one fixed point)", choices=ATTN_MODES)
    causal: bool = setting(True, "position t's equilibrium depends on tokens <= t only (--no-causal: "
                           "bidirectional, for --objective mlm)")
    kappa: float = setting(0.0, "energy mode: F = (1-kappa) F_energy + kappa F_thick on the same weights "
                           "(0: conservative, 1: thick)")
    mono_m: float = setting(0.5, "mono mode: the monotonicity margin m, <F(z)-F(y), z-y> <= -m |z-y|^2 "
                            "(0 < m < 1 + c)")
    ffn_lip: float = setting(0.0, "thick mode: the FFN reads z without LayerNorm and is scaled each call so "
                             "its Lipschitz bound 1.13 |W2| |W1| stays <= this (0: the free pre-LN FFN; "
                             "its slow modes, docs/experiments/stability.md)")
    ffn_tied: bool = setting(False, "thick mode: the FFN reads z without LayerNorm with W2 = W1^T, "
                             "W1^T gelu(W1 z + b1) + b2: a symmetric per-token Jacobian (no non-normality)")
    objective: str = setting("lm", "lm: next-token prediction; mlm: predict masked tokens (with "
                             "--no-causal); the embedding gains a mask token", choices=OBJECTIVES)
    ffn_mult: int = setting(4, "FFN hidden width, in multiples of C")
    ln_f: bool = setting(False, "LayerNorm before the readout")
    bias: bool = setting(True, "biases in the block's linear maps")
    ln_eps: float = setting(1e-5, "LayerNorm epsilon")
    init_std: float = setting(0.02, "std of the block's initial weights")
    # x = wte + wpe sets the scale of z*, and LayerNorm's Jacobian is 1/std(z): embeddings at 0.02
    # amplify the block's Jacobian ~50-fold at init (docs/experiments/embeddings.md).
    emb_std: float = setting(0.0, "std of the token and position embeddings (0: init_std; every preset: 1.0)")

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
        if self.objective not in OBJECTIVES:
            raise ValueError(f"EPTConfig.objective '{self.objective}' is not one of {OBJECTIVES}")
        if not 0.0 <= self.kappa <= 1.0:
            raise ValueError(f"kappa={self.kappa} is outside [0, 1]: 0 is the energy block, 1 free attention")
        if self.kappa and self.attn_mode != "energy":
            raise ValueError(f"kappa blends the energy block towards free attention: it needs --attn_mode "
                             f"energy, not {self.attn_mode} (or drop --kappa)")
        if not 0.0 < self.mono_m < 1.0 + self.c:
            raise ValueError(f"mono_m={self.mono_m} must lie in (0, 1 + c) = (0, {1.0 + self.c:g}): the "
                             "margin is what the damping leaves after the forces' Lipschitz budget")
        if self.ffn_tied and self.attn_mode != "thick":
            raise ValueError(f"ffn_tied ties the thick block's FFN: it needs --attn_mode thick, not "
                             f"{self.attn_mode} (or drop --ffn_tied)")
        if self.ffn_lip < 0 or (self.ffn_lip and self.attn_mode != "thick"):
            raise ValueError(f"ffn_lip={self.ffn_lip} bounds the thick block's FFN: it needs --attn_mode "
                             "thick and a value >= 0 (0: off)")
        if self.qknorm and self.attn_mode != "thick":
            raise ValueError(f"qknorm is a thick-attention option; attn_mode {self.attn_mode} has its own "
                             "scale: add --no-qknorm")
        if self.objective == "mlm" and self.causal:
            raise ValueError("--objective mlm predicts masked tokens from both sides: add --no-causal")
        if self.objective == "lm" and not self.causal:
            raise ValueError("a next-token LM with bidirectional attention sees its own targets: drop "
                             "--no-causal, or use --objective mlm")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> EPTConfig:
        return from_options(cls, options, "model config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- relaxation and routes


@dataclass
class SolverConfig:
    """A relaxation to the fixed point F(z) = 0 (:mod:`ept.solvers`).

    Seed spelling: the free phase runs at least ``T1`` steps of z <- z + eps F(z), then keeps
    refining up to ``t1max`` while the residual is above ``res_est``.
    """

    method: str = setting("anderson", "free-phase solver", flag="solver", choices=solver_methods)
    eps: float = setting(0.5, "relaxation step size: z <- z + eps F(z)")
    T1: int = setting(0, "free phase: minimum iterations (bptt: the unrolled steps)")
    t1max: int = setting(150, "free phase: maximum iterations")
    res_est: float = setting(1e-4, "free phase: target residual ||F(z)||/||z||")
    m: int = setting(8, "Anderson memory")
    lam: float = setting(1e-2, "Anderson regularisation, relative to each residual difference")
    mix: float = setting(1.0, "Anderson mixing (1: undamped)")
    div_factor: float = setting(1e4, "a sequence whose ||F(z)|| grows this much over its lowest diverged")
    # Anderson's safeguards (ept.solvers.anderson.AndersonGuard; the settings' study:
    # docs/experiments/anderson_saddles.md).
    accel_from: float = setting(0.1, "Anderson: plain steps while the residual is above this and still "
                                "falling")
    restart: float = setting(10.0, "Anderson: clear a sequence's history when its residual exceeds this x "
                             "its best")
    stall: int = setting(12, "Anderson: follow the dynamics for good after this many steps without halving "
                         "the residual")
    # A stalled sequence sits in a ghost (a slow passage past a near-root) that a root finder cannot
    # leave: long steps where F holds its direction carry the slow drift (projective integration).
    proj_every: int = setting(5, "after a stall: plain steps between two long ones (projective integration)")
    proj_jump: float = setting(8.0, "after a stall: a long step spans 1 + this plain ones where F holds its "
                               "direction; 0: none")
    # The heavy ball (ept.solvers.momentum.HeavyBall) reads its spectrum [lo, hi] off each sequence's
    # last mom_m steps; mom_lo is the highest lower edge it assumes (docs/experiments/heavy_ball.md).
    mom_m: int = setting(4, "momentum: the recent steps the spectrum is read off")
    mom_lo: float = setting(-0.3, "momentum: the lower edge assumed for the relaxation map's spectrum (lower "
                            "where the steps reveal a stiffer mode)")
    mom_restart: float = setting(3.0, "momentum: drop a sequence's momentum when its residual exceeds this x "
                                 "its best")
    # Only F is lowered: the solver's own arithmetic, the polish, the nudged phase, the local update
    # and evaluation stay in the model's dtype (bf16's ~3 digits floor the residual near 1e-3).
    dtype: str = setting("float32", "free phase's field evaluations: float32, or bf16 (autocast; the "
                         "solver, polish, nudged phase and update stay float32)", choices=("float32", "bf16"))
    compile: bool = setting(False, "torch.compile the free phase's field (dynamic shapes; the first steps "
                            "pay the compilation)")

    def __post_init__(self) -> None:
        if self.method not in solver_methods():
            raise ValueError(f"solver method '{self.method}' is not one of {', '.join(solver_methods())}")
        if self.eps <= 0:
            raise ValueError(f"solver eps must be > 0, got {self.eps}")
        if self.t1max <= 0 or self.T1 < 0:
            raise ValueError(f"solver needs t1max > 0 and T1 >= 0, got T1={self.T1}, t1max={self.t1max}")
        if self.m < 1:
            raise ValueError(f"Anderson memory m must be >= 1, got {self.m}")
        if self.dtype not in ("float32", "bf16"):
            raise ValueError(f"--dtype {self.dtype!r} is not float32 or bf16")
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

    adjoint: str = setting("gmres", "adjoint solve: gmres (scipy, matrix-free) or anderson (adjoint "
                           "iteration)", choices=("gmres", "anderson"))
    adj_tol: float | None = setting(None, "adjoint tolerance (None: 1e-10 in float64, 1e-5 in lower "
                                    "precision)")
    adj_max_iter: int = setting(1000, "adjoint iterations at most")

    def __post_init__(self) -> None:
        if self.adjoint not in ("gmres", "anderson"):
            raise ValueError(f"implicit adjoint '{self.adjoint}' is not 'gmres' or 'anderson'")


@dataclass
class BPTTConfig:
    """Autograd through T1 unrolled steps z <- z + eps F(z) from z0 = 0."""

    T1: int = setting(150, "unrolled steps")
    eps: float = setting(0.5, "relaxation step size")
    div_factor: float = setting(1e4, "growth of ||F(z)|| over its lowest that counts as divergence")

    def __post_init__(self) -> None:
        if self.T1 <= 0 or self.eps <= 0:
            raise ValueError(f"bptt needs T1 > 0 and eps > 0, got T1={self.T1}, eps={self.eps}")


@dataclass
class EPConfig:
    """The nudged phases and the estimator that turns them into λ (docs/method.md).

    ``hr`` is the nudge strength β (per token: the nudge is β·∂(Σ_tokens CE)/∂z), and the radius of
    the holomorphic contour. ``T2`` set: exactly T2 nudged steps; unset: adaptive, stop when the
    estimate's relative change falls below ``t2_tol``, capped at ``t2sel``. The CLI keeps the seed's
    spelling: ``--holo N`` selects the holomorphic estimator, ``--t2sel K`` the adaptive T2.
    """

    estimator: str = setting("centred", "onesided, centred or holomorphic", choices=ESTIMATORS)
    holo: int = setting(4, "the holomorphic N-point estimator (2 = centred)")
    hr: float = setting(0.02, "nudge strength beta / contour radius")
    asym: str = setting("fixed", "AsymEP correction: none, fixed, track or linear (the nudged phase of F's "
                        "linearisation at z*)", choices=ASYM)
    T2: int | None = setting(None, "fixed nudged steps (without --t2sel)")
    t2sel: int = setting(100, "adaptive nudged phase, capped at this many steps")
    t2_tol: float = setting(1e-6, "adaptive T2: stop when the estimate changes less than this")
    # The nudged problem starts next to its solution and is nearly linear: a short, lightly
    # regularised Anderson memory tracks it best.
    nudge_solver: str = setting("anderson", "nudged-phase solver", choices=solver_methods)
    nudge_m: int = setting(5, "nudged-phase Anderson memory")
    nudge_lam: float = setting(1e-4, "nudged-phase Anderson regularisation")
    # Near a Hopf point Jᵀ - βH can lose stability where Jᵀ alone still has it; a smaller β keeps it.
    # Rolling back cannot help: same weights, same blow-up.
    retry_hr: float = setting(0.25, "relax a blown-up nudged phase again at hr x this (0: never)")
    # EP's estimate is the linear response of an equilibrium: a sequence not at one would start its
    # nudged rows from a non-equilibrium, and its error enters the estimate amplified by 1/β.
    drop_res: float = setting(0.01, "leave sequences whose free residual ends above this out of the EP "
                              "gradient (inf: keep all)")
    drop_unsettled: bool = setting(False, "leave sequences whose adaptive nudged estimate has not settled at "
                                   "--t2sel out of the EP gradient")
    # z*'s own error enters the estimate amplified by 1/β (and by J⁻¹ where the block is
    # near-critical), so z* is refined before nudging (docs/experiments/polishing.md).
    polish_res: float = setting(0.0, "refine z* with Anderson to this residual before nudging (0: off)")
    polish_max: int = setting(40, "F-evaluations the polish may take")
    # Farther out a root finder travels to roots the relaxation never reaches, which evaluation
    # (no polish) never sees (docs/experiments/stability.md).
    polish_from: float = setting(3.0, "polish only sequences whose free residual is within this x --res_est")

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
        if self.nudge_solver not in solver_methods():
            raise ValueError(f"nudge_solver '{self.nudge_solver}' is not one of "
                             f"{', '.join(solver_methods())}")


# ----------------------------------------------------------------------------- stability controls


@dataclass
class ControlConfig:
    """Stability controls (:mod:`ept.controls`); all off at their defaults."""

    resreg: float = setting(0.0, "resreg: weight of the free phase's relative residual ||F(z*)||²/||z*||²")
    jacreg: float = setting(0.0, "jacreg: base (starting) weight of the Jacobian penalty")
    jr_floor: float = setting(0.0, "jacreg: the weight decays back to this once the residual is on target")
    jr_max: float = setting(16.0, "jacreg: the weight's cap")
    jr_target: float = setting(1e-4, "jacreg: free-phase residual above which the weight rises")
    jr_up: float = setting(2.0, "jacreg: weight factor per step above the target")
    jr_decay: float = setting(0.9, "jacreg: weight factor per step on target")
    hutch: int = setting(1, "jacreg: Hutchinson probes per step")
    eigreg: float = setting(0.0, "eigreg: weight of relu(omega + margin)², omega = u'Ju at z*")
    eig_margin: float = setting(1.0, "eigreg: keep omega(J) <= -this")
    eig_margin_end: float | None = setting(
        None, "eigreg: the margin at the last step, reached linearly over the learning rate's decay "
        "(--wsd); none holds --eig_margin throughout")
    eig_iters: int = setting(8, "eigreg: Lanczos steps per training step (warm-started)")
    # A rollback returns to weights whose operator is already at the edge: a lower learning rate alone
    # replayed the same failure from the same checkpoint (docs/experiments/stability.md).
    eig_backoff: float = setting(0.0, "eigreg: each rollback tightens the margin by this for the rest of the "
                                 "run (0: off)")
    # Its Lanczos steps are ~27% of a B 32 EP gradient (docs/experiments/stability.md).
    eig_every: int = setting(1, "eigreg: act every N training steps, with N x its weight")
    # The free phase's F-evals grow with the spread of J's spectrum, not its top alone
    # (docs/experiments/stability.md): the floor holds the other end.
    eig_floor: float | None = setting(
        None, "eigreg (sym): also keep the bottom of (J+J')/2's spectrum >= -this, the stiff end; none: "
        "no floor")
    # "sym": ω is the numerical abscissa (the log-norm); "slow": the residual F(z*) the free phase
    # left, which its slowest modes dominate (no Lanczos).
    eig_dir: str = setting("sym", "eigreg: the direction u of u'Ju: sym (top eigenvector of (J+J')/2) or "
                           "slow (the free phase's last residual, its slowest modes)", choices=EIG_DIRS)
    seed: int = setting(0, "probes and Lanczos starts (the run's --seed)", cli=False)

    def __post_init__(self) -> None:
        for name in ("resreg", "jacreg", "jr_floor", "jr_max", "jr_target", "eigreg", "eig_backoff"):
            if getattr(self, name) < 0:
                raise ValueError(f"control {name} must be >= 0, got {getattr(self, name)}")
        if self.jr_floor > self.jr_max:
            raise ValueError(f"jr_floor={self.jr_floor} is above jr_max={self.jr_max}; lower the floor")
        if self.jr_up < 1 or not 0 < self.jr_decay <= 1:
            raise ValueError(f"need jr_up >= 1 and 0 < jr_decay <= 1, got {self.jr_up}, {self.jr_decay}")
        if self.eig_dir not in EIG_DIRS:
            raise ValueError(f"eig_dir '{self.eig_dir}' is not one of {', '.join(EIG_DIRS)}")
        if self.eig_floor is not None and not self.eig_floor > 0:
            raise ValueError(f"eig_floor must be > 0 (the bottom of (J+J')/2 is held >= -eig_floor), got "
                             f"{self.eig_floor}: pass a positive floor or none")
        if self.eig_floor is not None and self.eig_dir != "sym":
            raise ValueError("eig_floor needs --eig_dir sym (the floor's direction is the bottom "
                             "eigenvector of (J+J')/2): drop --eig_floor or use --eig_dir sym")
        if self.hutch < 1 or self.eig_iters < 2 or self.eig_every < 1:
            raise ValueError(f"need hutch >= 1, eig_iters >= 2 and eig_every >= 1, got {self.hutch}, "
                             f"{self.eig_iters}, {self.eig_every}")

    @property
    def active(self) -> bool:
        return self.resreg > 0 or self.jacreg > 0 or self.eigreg > 0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> ControlConfig:
        return from_options(cls, options, "control")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------- training run


@dataclass
class TrainConfig:
    """The optimisation and the run's bookkeeping (:mod:`ept.train`)."""

    mode: str = setting("ep", "ep (equilibrium propagation), bptt (backprop through the relaxation), bp "
                        "(explicit)", choices=MODES)
    steps: int = setting(300, "optimizer steps")
    B: int = setting(16, "batch size (sequences)")
    lr: float = setting(3e-3, "peak learning rate")
    optimizer: str = setting("adamw", "adamw, sgd, sgdsai or lion", choices=optimizer_names)
    weight_decay: float = setting(0.0, "decoupled weight decay")
    warmup: int = setting(0, "linear warmup steps")
    wsd: float = setting(0.0, "fraction of the steps in the final linear decay to zero")
    pema: float = setting(0.0, "parameter-EMA decay; evaluation uses the EMA weights (0: off)")
    clip: float = setting(1.0, "global gradient-norm clip (0: off)")
    layers: int = setting(1, "depth of the explicit transformer (--mode bp)")
    seed: int = setting(0, "seed of the initial weights, the data order and the controls' probes")
    log_every: int = setting(10, "progress line and metrics.jsonl record every N steps")
    eval_every: int = setting(100, "periodic validation (and RUN/best) every N steps")
    eval_batches: int = setting(8, "valid batches per periodic evaluation; the final one covers the split")
    ckpt_every: int = setting(100, "checkpoint every N steps")
    keep: int = setting(2, "checkpoints kept in the run folder")
    diag_cos: int = setting(0, "log gradient cosines and operator diagnostics every N steps (0: off)")
    div_res: float = setting(0.1, "free-phase residual that counts as divergence after --div_patience steps")
    div_patience: int = setting(3, "steps in a row above --div_res before a rollback")
    lr_backoff: float = setting(0.5, "learning-rate factor applied at each rollback")
    max_rollbacks: int = setting(5, "rollbacks before the run stops")
    sample_tokens: int = setting(200, "tokens of the sample written at the end")
    device: str = setting("cpu", "cpu, or cuda (under torchrun: each rank's own GPU, LOCAL_RANK)",
                          choices=("cpu", "cuda"))
    threads: int = setting(0, "torch CPU threads (0: torch's default); small models run best on 1")
    hold_memory: bool = setting(True, "on CPU, keep the memory a step frees for the next one (glibc "
                                "mallopt) instead of faulting it back in (10-20 percent of a B 32 tiny step)")
    mask_rate: float = setting(0.15, "--objective mlm: the fraction of each sequence's tokens masked (at "
                               "least one), for training and evaluation")

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"--mask_rate {self.mask_rate} is outside (0, 1): give the fraction of tokens "
                             "to mask, e.g. --mask_rate 0.15")
        if self.mode not in MODES:
            raise ValueError(f"--mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.optimizer not in optimizer_names():
            raise ValueError(f"--optimizer '{self.optimizer}' is not one of {', '.join(optimizer_names())}")
        for name in ("steps", "B", "layers", "log_every", "eval_every", "ckpt_every", "keep", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.wsd <= 1 or not 0 <= self.pema < 1 or not 0 < self.lr_backoff < 1:
            raise ValueError(f"need 0 <= --wsd <= 1, 0 <= --pema < 1, 0 < --lr_backoff < 1; got "
                             f"{self.wsd}, {self.pema}, {self.lr_backoff}")
        if min(self.warmup, self.clip, self.weight_decay, self.diag_cos, self.threads) < 0:
            raise ValueError("--warmup, --clip, --weight_decay, --diag_cos and --threads must be >= 0")


@dataclass
class DataConfig:
    data: str | None = setting(None, "text file or folder (default: embedded Shakespeare)")
    vocab: int = setting(0, "the requested BPE vocabulary (the model's is what the tokenizer achieved)",
                         cli=False)
    key: str = setting("", "the tokenized corpus' content hash, filled in once prepared", cli=False)


@dataclass
class RunConfig:
    """The full resolved configuration of a run, one dataclass per concern (saved as config.json)."""

    model: EPTConfig = field(default_factory=EPTConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    ep: EPConfig = field(default_factory=EPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    control: dict[str, Any] = field(default_factory=dict)  # ControlConfig's fields
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = ""
    flags: dict[str, Any] = field(default_factory=dict)  # what was given on the command line, verbatim
    analog: dict[str, Any] | None = None  # ept.analog.AnalogConfig fields of an --analog run

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["analog"] is None:  # a digital run's config.json stays readable by versions without analog
            del d["analog"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        for key in d:
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"config section '{key}' is unknown to this version of ept")
        for name, section in SECTIONS.items():
            if name in d and name != "control":
                d[name] = from_options(section, d[name], f"{name} config")
        return cls(**d)


# RunConfig's sections, in the order ``ept train --help`` lists them.
SECTIONS: dict[str, type] = {"train": TrainConfig, "model": EPTConfig, "solver": SolverConfig, "ep": EPConfig,
                             "control": ControlConfig, "data": DataConfig}
