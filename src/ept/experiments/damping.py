"""Q2, damping: does a larger leak c buy EP-validity (ρ(S⁻¹A) < 1) by scaling the symmetric part
rather than by killing the asymmetry, and at what loss?

Per c: EP and BPTT trained at equal steps (step ε = 1/(1+c), so the leak alone maps to 0), and on
EP's trained operator ρ(S⁻¹A), ω(J), the spectral abscissa, the non-normality, cos(EP, implicit)
with and without AsymEP, and the free phase's F-evals. ``rho_SinvA_fixed`` is ρ(S⁻¹A) of one fixed
operator (the c = 1 run's weights, linearised at its z*) with only c changed: S − (c − 1)I grows,
A does not. At the equilibrium itself that saving is undone by pre-LN: z* ≈ x/(1+c) shrinks, and
LayerNorm's Jacobian (1/σ) grows as fast, so J_N, and A with it, scale with 1 + c.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ept.diagnostics import rho_SinvA
from ept.experiments.common import Experiment, ExperimentConfig, measure, train_one
from ept.grad.common import free_phase

CS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _fixed_operator_rho(model: torch.nn.Module, run_cfg: Any, data: Any, cs: tuple[float, ...]
                        ) -> dict[float, float]:
    """ρ((S − (c − 1)I)⁻¹A) of the c = 1 operator at its own z*, for each c."""
    from ept.bench.quality import operator_batch

    idx, _ = operator_batch(run_cfg, data)
    x = model.inject(idx[:1]).detach()
    z, _ = free_phase(model, x, run_cfg.solver)
    return {c: rho_SinvA(model, x, z, shift=c - model.cfg.c) for c in cs}


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    steps = cfg.steps_or(200)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        reference = None
        for c in CS:
            flags = {"c": c, "eps": 1.0 / (1.0 + c)}
            ep, run_cfg, data = train_one(flags, cfg, steps, seed, f"damping c={c} ep s{seed}")
            bptt, _, _ = train_one({**flags, "mode": "bptt"}, cfg, steps, seed, f"damping c={c} bptt s{seed}")
            row = {"c": c, "seed": seed, "val_ce_ep": ep["val_ce"], "val_ce_bptt": bptt["val_ce"],
                   "rollbacks_ep": ep["rollbacks"], **measure(ep["model"], run_cfg, data)}
            rows.append(row)
            if c == 1.0:
                reference = (ep["model"], run_cfg, data)
        if reference is not None:
            fixed = _fixed_operator_rho(*reference, CS)
            for row in rows:
                if row["seed"] == seed:
                    row["rho_SinvA_fixed"] = fixed[row["c"]]
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        c = [r["c"] for r in rs]
        ax[0].plot(c, [r["val_ce_ep"] for r in rs], "o-", label=f"EP, seed {seed}")
        ax[0].plot(c, [r["val_ce_bptt"] for r in rs], "s--", label=f"BPTT, seed {seed}")
        ax[1].plot(c, [r["rho_SinvA"] for r in rs], "o-", label=f"trained at each c, seed {seed}")
        ax[1].plot(c, [r.get("rho_SinvA_fixed") for r in rs], "s--", label=f"c=1 weights, seed {seed}")
        ax[2].plot(c, [1 - r["cos_ep_implicit"] for r in rs], "o-", label=f"with AsymEP, seed {seed}")
        ax[2].plot(c, [1 - r["cos_ep_implicit_none"] for r in rs], "s--", label=f"without, seed {seed}")
    ax[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    for a, yl, t in zip(ax, ("val CE (nats/token)", "ρ(S⁻¹A)", "1 − cos(EP, implicit)"),
                        ("loss at equal steps", "asymmetry vs damping", "gradient fidelity"), strict=True):
        a.set_xscale("log", base=2)
        a.set_xlabel("damping c")
        a.set_ylabel(yl)
        a.set_title(t)
        a.legend(fontsize=7)
    ax[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: list[dict[str, Any]]) -> str:
    lo, hi = rows[0], max((r for r in rows if r["seed"] == rows[0]["seed"]), key=lambda r: r["c"])
    fixed = "" if lo.get("rho_SinvA_fixed") is None else (
        f" on one fixed operator it falls {lo['rho_SinvA_fixed']:.3g} → {hi['rho_SinvA_fixed']:.3g} "
        "(damping scales S; A is untouched).")
    return (f"From c = {lo['c']} to {hi['c']}, ρ(S⁻¹A) of the trained operator goes {lo['rho_SinvA']:.3g} → "
            f"{hi['rho_SinvA']:.3g};{fixed}\nEP's val CE goes {lo['val_ce_ep']:.3f} → {hi['val_ce_ep']:.3f} "
            f"(BPTT {lo['val_ce_bptt']:.3f} → {hi['val_ce_bptt']:.3f}); 1 − cos without AsymEP "
            f"{1 - lo['cos_ep_implicit_none']:.2g} → {1 - hi['cos_ep_implicit_none']:.2g}, with it "
            f"{1 - lo['cos_ep_implicit']:.2g} → {1 - hi['cos_ep_implicit']:.2g}.")


EXPERIMENT = Experiment(
    name="damping", question="does damping buy EP-validity (ρ(S⁻¹A) < 1) by scaling, and at what loss?",
    sweep="c", run=run, plot=plot, reading=reading,
    columns=("seed", "val_ce_ep", "val_ce_bptt", "rho_SinvA", "rho_SinvA_fixed", "numerical_abscissa",
             "spectral_abscissa", "nonnormality", "symmetric_fraction", "cos_ep_implicit",
             "cos_ep_implicit_none", "free_fevals"),
)
