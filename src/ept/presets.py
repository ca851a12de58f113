"""Presets, and the run's configuration resolved from a preset and the command line's flags.

Flags use one flat vocabulary, the config fields' names (:data:`ept.flags.FLAGS`); a preset is a
dict in the same vocabulary, so ``resolve(preset, flags)`` is "preset, overridden by what was
given", split into :class:`~ept.config.RunConfig`'s sections. The seed's composite flags map onto
the configs:

    --holo N        EPConfig(estimator="holomorphic", holo=N)      (N=2: the centred estimator)
    --track         EPConfig(asym="track")                          (default asym="fixed")
    --t2sel K       adaptive T2 capped at K (--T2 is then only recorded)
    --T2 N          exactly N nudged steps, when --t2sel is absent (or 0)
    --solver NAME   SolverConfig(method=NAME)
"""

from __future__ import annotations

from typing import Any

from ept.config import (
    ControlConfig,
    DataConfig,
    EPConfig,
    EPTConfig,
    RunConfig,
    SolverConfig,
    TrainConfig,
)
from ept.flags import FLAGS, section_flags

# The seed's spellings that are no field of their own (see the module docstring).
SEED_FLAGS = {"track": "AsymEP correction linearised at the current state (the seed's --asym track)"}
POSITIVE = {"B": "batch size", "T": "context length", "lr": "learning rate", "T1": "free-phase iterations",
            "steps": "number of steps", "C": "width", "H": "number of heads", "t1max": "iteration cap",
            "vocab_size": "vocabulary size"}

PRESETS: dict[str, dict[str, Any]] = {
    # EP on the embedded Shakespeare, about a minute on 2 CPU cores. The free phase is the heavy ball
    # to 1e-3 (docs/experiments/heavy_ball.md), polished to 1e-6 before a linear nudged phase at
    # hr 0.003 (polishing.md, linear_nudge.md), embeddings at 1.0 (embeddings.md); eigreg holds
    # omega(J) <= -0.5 until the learning rate decays, then loosens to +1.5: the best mean val CE of
    # every recipe at 2000 steps on seeds 0/1/2, no rollback, >= 97.5% of sequences kept (stability.md).
    "tiny": dict(mode="ep", vocab_size=512, C=64, H=4, T=64, c=1.0, emb_std=1.0, B=8, steps=200,
                 lr=3e-3, warmup=10, wsd=0.3, pema=0.99, solver="momentum", T1=20, t1max=100, res_est=1e-3,
                 hr=0.003, asym="linear", t2sel=15, t2_tol=1e-3, polish_res=1e-6, polish_max=30,
                 drop_res=1e-5, resreg=0.2, eigreg=1.0, eig_margin=0.5, eig_margin_end=-1.5,
                 log_every=10, eval_every=50, eval_batches=4, ckpt_every=50,
                 sample_tokens=150, threads=1),
    # A longer CPU run (hours on 2 cores). The heavy ball as at tiny: Anderson settled on saddles of
    # the trained block and the nudged phase started there blew up. Without a floor the stiff end of
    # (J+Jᵀ)/2 ran from -8.7 to -14.3 in steps 420-540, the free phase's cost with it; the linearised
    # nudge is 2x (step 400) to 15x (step 60) cheaper at cos 1.00000 (docs/experiments/small_preset.md).
    "small": dict(mode="ep", vocab_size=2048, C=128, H=4, T=128, c=1.0, emb_std=1.0, B=16, steps=3000,
                  lr=2e-3, warmup=100, wsd=0.25, pema=0.999, solver="momentum", T1=8, t1max=100, res_est=1e-4,
                  hr=0.02, asym="linear", t2sel=60, t2_tol=1e-3, qknorm=True, eigreg=1.0, eig_margin=0.5,
                  eig_margin_end=-1.5, eig_floor=5.0, log_every=20, eval_every=250, eval_batches=16,
                  ckpt_every=100),
    # The seed's canonical recipe (GPU scale), with emb_std 1.0: at 0.02 its initial free phase never
    # settled and `ept train` stopped at step 0 (docs/experiments/embeddings.md).
    "c512": dict(mode="ep", attn_mode="thick", vocab_size=4096, B=24, C=512, H=16, T=256, c=1.0,
                 emb_std=1.0, jacreg=0.1, jr_floor=0.1, jr_max=16.0, holo=2, hr=0.02, t2sel=80, track=True,
                 pema=0.999, t1max=150, res_est=1e-4, resreg=0.2, qknorm=True, T1=150, T2=20, lr=6e-4,
                 wsd=0.25, steps=32000, warmup=500, log_every=50, eval_every=500, eval_batches=32,
                 ckpt_every=500),
}


def section_options(merged: dict[str, Any], section: str) -> dict[str, Any]:
    """The given values of a RunConfig section's flags, keyed by its fields."""
    return {f.field: merged[f.name] for f in section_flags(section) if f.name in merged}


# The EP flags whose seed spelling is not "set this field" (see the module docstring).
_EP_SPELT_APART = ("estimator", "holo", "asym", "T2", "t2sel")


def ep_config(merged: dict[str, Any]) -> EPConfig:
    opts = {k: v for k, v in section_options(merged, "ep").items() if k not in _EP_SPELT_APART}
    if merged.get("holo"):
        opts.update(estimator="holomorphic", holo=merged["holo"])
    elif "estimator" in merged:
        opts["estimator"] = merged["estimator"]
    opts["asym"] = "track" if merged.get("track") else merged.get("asym", "fixed")
    if merged.get("t2sel"):
        opts.update(T2=None, t2sel=merged["t2sel"])
    elif merged.get("T2"):
        opts["T2"] = merged["T2"]
    return EPConfig(**opts)


def check_flags(merged: dict[str, Any]) -> None:
    """Bad values caught before any config is built, each with the flag's own name."""
    for name, what in POSITIVE.items():
        value = merged.get(name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} (the {what}) must be positive, got {value}: pass a value > 0")


# Every name a preset may set: a misspelled key would otherwise be dropped without a word.
PRESET_KEYS = frozenset((*FLAGS, *SEED_FLAGS))


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
    cfg = RunConfig(
        model=EPTConfig(**section_options(merged, "model")),
        solver=SolverConfig(**section_options(merged, "solver")),
        ep=ep_config(merged),
        train=TrainConfig(**section_options(merged, "train")),
        control=ControlConfig.from_dict(section_options(merged, "control")).to_dict(),
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
