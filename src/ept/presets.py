"""The run's resolved configuration: presets, then command-line flags, then one dataclass per concern.

Flags use one flat vocabulary (the seed's spelling, and the dataclass field names); a preset is a
dict in the same vocabulary, so ``resolve(preset, flags)`` is "preset, overridden by what was
given", split into sections. The seed's composite flags map onto the core's configs:

    --holo N        EPConfig(estimator="holomorphic", holo=N)      (N=2: the centred estimator)
    --track         EPConfig(asym="track")                          (default asym="fixed")
    --t2sel K       adaptive T2 capped at K (--T2 is then only recorded)
    --T2 N          exactly N nudged steps, when --t2sel is absent (or 0)
    --solver NAME   SolverConfig(method=NAME)
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from ept.config import EPConfig, EPTConfig, SolverConfig, from_options
from ept.train import TrainConfig

MODEL_FLAGS = ("vocab_size", "C", "H", "T", "c", "qknorm", "attn_mode", "ffn_mult", "ln_f", "init_std",
               "emb_std")
SOLVER_FLAGS = ("eps", "T1", "t1max", "res_est", "m", "lam", "accel_from", "restart", "stall", "proj_every",
                "proj_jump", "mom_m", "mom_lo", "mom_restart")
EP_FLAGS = ("estimator", "holo", "hr", "track", "asym", "T2", "t2sel", "t2_tol", "nudge_solver", "nudge_m",
            "nudge_lam", "retry_hr", "drop_res", "drop_unsettled", "polish_res", "polish_max",
            "polish_from")
CONTROL_FLAGS = ("resreg", "jacreg", "jr_floor", "jr_max", "jr_target", "jr_up", "jr_decay", "hutch",
                 "eigreg", "eig_margin", "eig_iters", "eig_dir")
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig))
POSITIVE = {"B": "batch size", "T": "context length", "lr": "learning rate", "T1": "free-phase iterations",
            "steps": "number of steps", "C": "width", "H": "number of heads", "t1max": "iteration cap",
            "vocab_size": "vocabulary size"}

PRESETS: dict[str, dict[str, Any]] = {
    # EP on the embedded Shakespeare: about a minute on 2 CPU cores, and visibly learns. At this
    # size and learning rate the operator drifts off contraction within tens of steps without resreg.
    # hr=0.01 with EPConfig's drop_res=0.01 (issue 6 note, seeds 0/1/2): val CE 4.888/4.917/4.862
    # and no rollback, against 4.906/4.957/4.944 for hr=0.05 with drop_res=0.1 (seed 2 of hr=0.01
    # with drop_res=0.1: four rollbacks, 5.213). Trained tiny blocks have folds nearby, where a nudge
    # of 0.05 leaves the linear regime: EP-implicit cosines of 0.58-0.70 on batches that 0.01 brings
    # to 0.98-0.999; a small β needs the unsettled sequences out, its estimate amplifying their
    # residual by 1/β.
    # The free phase follows the physical relaxation (plain iteration; accelerated, see the end of this
    # comment): Anderson (a root finder) settled 8
    # of 64 sequences of the default run's operator on saddles, where plain iteration flows away and
    # EP's nudged phase drifts (worst-batch cos 0.989; 1.000 on all 8 batches with plain iteration,
    # at the same EP step time). Seeds 0/1/2, val CE over 8x32 sequences: 4.897/4.945/4.883 against
    # 4.892/4.931/4.900 with Anderson (t1max 60), 10-15% more training time (issue 6 note).
    # Plain iteration runs to 1e-3 (it finds the attractor), then Anderson polishes z* to 1e-6 before
    # nudging at hr=0.003. Against a float64 oracle, λ's per-sequence error on a trained block was
    # 0.136 on average at the free phase's 1e-4 (z*'s error enters the estimate amplified by 1/β and
    # by the near-critical J⁻¹), 0.043 polished at hr=0.01; hr=0.01 leaves the linear regime on
    # near-critical sequences even at a precise z*. Polishing is bimodal: a sequence reaches ~1e-6
    # in a few Anderson steps, or stays at 1e-4-1e-2 with no equilibrium to nudge (a float64
    # Anderson from there does not converge either): drop_res=1e-5 leaves those out. Handing over
    # at 1e-3 costs 15% fewer free-phase F-evals than at 1e-4 and found no saddle; at 1e-2 it found
    # 5 in 64 sequences. Evaluation stops at 1e-3 too: 3e-4 nats from 1e-6 (8x32 valid sequences).
    # The nudged phase stops at 15 steps: on the three seeds' operators trained with t2sel 20, the
    # worst of 8 batches' cos was 0.9996-0.9998 at 15 (0.996 at 12, 0.9993-0.9999 at 20), and 20
    # cost a third more EP time.
    # With the embeddings at 0.02, seeds 0/1/2: val CE 4.890/4.888/4.848 (t2sel 20: 4.871/4.897/4.857)
    # against 4.880/4.932/4.869 before polishing (issue 6 note); the figures above are from then too.
    # emb_std 1.0 (the embeddings' std; LayerNorm's Jacobian scales as 1/std(z), and z* inherits the
    # embeddings' scale): 200-step val CE EP 4.456 / BPTT 4.460 / BP 4.184, against 4.890 / 4.913 /
    # 4.144 with the embeddings at init_std 0.02 (`--emb_std 0.02` reproduces those runs).
    # asym="linear": the nudged phases relax F's linearisation at z* (one vjp a step instead of F, J and
    # Jᵀ): on the three seeds' emb_std 1.0 operators (asym fixed) the nudged phase took 0.13 s instead
    # of 0.34 s a step (EP/BPTT 0.48-0.49 against 0.61-0.64 in the same bench runs), and the worst of
    # 12 batches' cos(EP, implicit) went from 0.989 to 0.9975: at 15 steps the linear system is
    # nearer its solution. Retrained with it, val CE 4.453 / 4.447 / 4.449 against 4.456 /
    # 4.447 / 4.448.
    # The free phase is the heavy ball (solver momentum, ept.solvers.momentum._Momentum), plain iteration's
    # dynamics accelerated by a per-sequence polynomial, which finds the same attractors (0 saddles
    # in the bench's 96 sequence solves per operator, Anderson 3-12): on the operators of runs
    # trained with it, free phase and polish took 348-384 F-evals over 8 batches instead of 614-634
    # with plain iteration, and the EP step 7-20% less time. Retrained with it, val CE 4.464 / 4.441 /
    # 4.448 (plain iteration: 4.453 / 4.447 / 4.449); with the momentum window mom_m 4 (was 8) and
    # Anderson's running products (roundoff alone moves a 200-step run), 4.452 / 4.447 / 4.446. T1
    # (20) is also BPTT's unroll (the quality table's BPTT row); as EP's minimum it costs nothing
    # here: with T1 1 the free phase stopped shallower and polishing took longer (364 against 348
    # F-evals on runs/tiny).
    "tiny": dict(mode="ep", vocab_size=512, C=64, H=4, T=64, c=1.0, emb_std=1.0, B=8, steps=200,
                 lr=3e-3, warmup=10, wsd=0.3, pema=0.99, solver="momentum", T1=20, t1max=100, res_est=1e-3,
                 hr=0.003, asym="linear", t2sel=15, t2_tol=1e-3, polish_res=1e-6, polish_max=30,
                 drop_res=1e-5, resreg=0.2, eigreg=1.0, eig_margin=0.5,
                 log_every=10, eval_every=50, eval_batches=4, ckpt_every=50,
                 sample_tokens=150, threads=1),
    # A longer CPU run (hours on 2 cores). emb_std 1.0: with the embeddings at init_std 0.02, z* is
    # small and LayerNorm (Jacobian ~1/std(z)) makes the initial operator stiff at this width and
    # context: plain iteration at eps 0.5 oscillated, Anderson left 4 of 16 sequences at residuals 1-3
    # and `ept train --preset small` stopped at step 0 (init_std 0.01 was the earlier workaround: 53
    # F-evals). With emb_std 1.0 the first batch settles in 8 F-evals and nudges in 6.
    # The free phase is the heavy ball (solver momentum), as at tiny: Anderson settles on saddles of a
    # trained block, and a nudged phase started at a saddle blows up. `ept train --preset small --steps
    # 300` with Anderson: the nudged phase blew up at steps 36, 44 and 51 (lr down to 1/8, loss 7.43 at
    # step 40); with tiny's nudge settings (asym linear, hr 0.003, polish, drop_res, resreg) at 43; with
    # jacreg 0.1 at 49, 47 and 46. With momentum: once, at step 112 at the full lr; val CE 5.403 after
    # the 300 steps (2436 s). No 3000-step run has been made with either solver.
    "small": dict(mode="ep", vocab_size=2048, C=128, H=4, T=128, c=1.0, emb_std=1.0, B=16, steps=3000,
                  lr=2e-3, warmup=100, wsd=0.25, pema=0.999, solver="momentum", T1=8, t1max=100, res_est=1e-4,
                  hr=0.02, t2sel=60, t2_tol=1e-4, qknorm=True, eigreg=1.0, eig_margin=0.5,
                  log_every=20, eval_every=250, eval_batches=16,
                  ckpt_every=250),
    # The seed's canonical recipe (GPU scale): every value as in DESIGN.md §4, and emb_std 1.0 (PyTorch's
    # nn.Embedding default): with embeddings at 0.02 the initial free phase never settled (worst
    # residual 1-2 after 150 F-evals, plain or Anderson) and `ept train` stopped at step 0; at 1.0 it
    # settles in 7 and the first EP gradient has cos 1.0000 to the implicit one (B=1, CPU).
    "c512": dict(mode="ep", attn_mode="thick", vocab_size=4096, B=24, C=512, H=16, T=256, c=1.0,
                 emb_std=1.0, jacreg=0.1, jr_floor=0.1, jr_max=16.0, holo=2, hr=0.02, t2sel=80, track=True,
                 pema=0.999, t1max=150, res_est=1e-4, resreg=0.2, qknorm=True, T1=150, T2=20, lr=6e-4,
                 wsd=0.25, steps=32000, warmup=500, log_every=50, eval_every=500, eval_batches=32,
                 ckpt_every=500),
}


@dataclass
class DataConfig:
    data: str | None = None  # a text file or folder; None: the embedded Shakespeare
    vocab: int = 0  # the requested BPE vocabulary (the model's is what the tokenizer achieved)
    key: str = ""  # the tokenized corpus' content hash, filled in once prepared


@dataclass
class RunConfig:
    """The full resolved configuration of a run, one dataclass per concern (saved as config.json)."""

    model: EPTConfig = field(default_factory=EPTConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    ep: EPConfig = field(default_factory=EPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    control: dict[str, Any] = field(default_factory=dict)  # ept.controls.ControlConfig fields
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
        sections = {"model": EPTConfig, "solver": SolverConfig, "ep": EPConfig, "train": TrainConfig,
                    "data": DataConfig}
        d = dict(d)
        for key in d:
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise ValueError(f"config section '{key}' is unknown to this version of ept")
        for name, section in sections.items():
            if name in d:
                d[name] = from_options(section, d[name], f"{name} config")
        return cls(**d)


def _pick(merged: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {k: merged[k] for k in names if k in merged}


# The EP flags whose CLI spelling differs from EPConfig's fields; every other EP flag is a field.
_EP_SPELT_APART = ("estimator", "holo", "track", "asym", "T2", "t2sel", "drop_unsettled")


def ep_config(merged: dict[str, Any]) -> EPConfig:
    opts = _pick(merged, tuple(k for k in EP_FLAGS if k not in _EP_SPELT_APART))
    if merged.get("holo"):
        opts.update(estimator="holomorphic", holo=merged["holo"])
    elif "estimator" in merged:
        opts["estimator"] = merged["estimator"]
    opts["asym"] = "track" if merged.get("track") else merged.get("asym", "fixed")
    if merged.get("drop_unsettled"):
        opts["drop_unsettled"] = True
    if merged.get("t2sel"):
        opts.update(T2=None, t2sel=merged["t2sel"])
    elif merged.get("T2"):
        opts["T2"] = merged["T2"]
    return EPConfig(**opts)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def control_section(merged: dict[str, Any]) -> dict[str, Any]:
    given = _pick(merged, CONTROL_FLAGS)
    active = [k for k in ("resreg", "jacreg", "eigreg") if float(given.get(k, 0)) > 0]
    if not have("ept.controls"):
        if active:
            raise ValueError(f"--{active[0]} needs the stability controls (ept.controls), which this install "
                             "lacks: update ept, or drop the flag")
        return given
    from ept.controls import ControlConfig

    return ControlConfig.from_dict(given).to_dict()


def check_flags(merged: dict[str, Any]) -> None:
    """Bad values caught before any config is built, each with the flag's own name."""
    for name, what in POSITIVE.items():
        value = merged.get(name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} (the {what}) must be positive, got {value}: pass a value > 0")
    if merged.get("diag_cos", 0) > 0 and not have("ept.diagnostics"):
        raise ValueError("--diag_cos needs the diagnostics (ept.diagnostics), which this install lacks: "
                         "update ept, or drop the flag")


# Every name a preset may set: a misspelled key would otherwise be dropped without a word.
PRESET_KEYS = frozenset((*MODEL_FLAGS, *SOLVER_FLAGS, *EP_FLAGS, *CONTROL_FLAGS, *TRAIN_FLAGS, "solver",
                         "data"))


def check_preset(name: str, values: dict[str, Any]) -> None:
    """ValueError naming a preset key that no config reads."""
    unknown = sorted(set(values) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"preset '{name}' sets {', '.join(unknown)}, which no config reads: fix the "
                         "spelling")


def resolve(preset: str, flags: dict[str, Any]) -> RunConfig:
    """Preset values overridden by the given flags, split into the configs. ValueError on bad input."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    check_preset(preset, PRESETS[preset])
    merged = {**PRESETS[preset], **flags}
    check_flags(merged)
    solver = SolverConfig(method=merged.get("solver", "anderson"), **_pick(merged, SOLVER_FLAGS))
    cfg = RunConfig(
        model=EPTConfig(**_pick(merged, MODEL_FLAGS)),
        solver=solver,
        ep=ep_config(merged),
        train=TrainConfig(**_pick(merged, TRAIN_FLAGS)),
        control=control_section(merged),
        data=DataConfig(data=merged.get("data"), vocab=merged.get("vocab_size", EPTConfig.vocab_size)),
        preset=preset,
        flags=dict(flags),
    )
    if cfg.train.mode == "bp":
        given = [k for k in ("resreg", "jacreg", "eigreg") if float(flags.get(k, 0)) > 0]
        if given:
            raise ValueError(f"--{given[0]} acts on the fixed point, which --mode bp has none of: use "
                             "--mode ep or bptt, or drop it")
        cfg.control = {k: 0.0 if k in ("resreg", "jacreg", "eigreg") else v for k, v in cfg.control.items()}
    return cfg
