"""Q6, asymmetry: how much non-conservative coupling does the loss want, and what does it cost EP?

κ blends the energy block's force with the thick block's on the same weights,
N = (1−κ)·N_energy + κ·N_thick (``attn_mode=energy``, ``kappa``). The sweep's task is the
bidirectional masked-token objective (``causal=False, objective=mlm``): only there is the energy
block exactly conservative at κ = 0 (the causal energy block clamps the earlier keys, so its
coupling to the past is block-triangular and J is not symmetric even at κ = 0). κ = 1 is the thick
block exactly.

Per κ and seed: EP's val CE at equal steps, and on the trained operator the fingerprint's measures
(cos(EP, implicit) with the run's AsymEP and without, ρ(S⁻¹A), ω(J), the non-normality, the
symmetric fraction f = ‖S‖/(‖S‖ + ‖A‖), the free phase's F-evals). ``asymmetry`` is ‖A‖/‖S‖ =
(1 − f)/f, measured on a float64 copy of the trained block at its own float64 z* (in the run's
float32, rounding alone leaves ‖A‖/‖S‖ ≈ 1e-8 at κ = 0; in float64 it is ≈ 1e-16).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ept.bench.quality import operator_batch
from ept.diagnostics.operators import symmetric_fraction
from ept.experiments.common import Experiment, ExperimentConfig, measure, train_one
from ept.grad.common import free_phase

KAPPAS = (0.0, 0.25, 0.5, 0.75, 1.0)
TASK: dict[str, Any] = {"attn_mode": "energy", "causal": False, "objective": "mlm"}
FLOOR = 1e-16  # 1 − cos is drawn on a log axis; exact agreement is drawn here


def asymmetry64(model: torch.nn.Module, run_cfg: Any, data: Any, probes: int = 4) -> float:
    """‖A‖/‖S‖ of J at z* of the operator batch's first sequence, all in float64."""
    idx, _ = operator_batch(run_cfg, data)
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        x = m64.inject(idx[:1]).detach()
    z, _ = free_phase(m64, x, run_cfg.solver)
    f = symmetric_fraction(m64, x, z, probes=probes, generator=torch.Generator().manual_seed(0))
    return (1.0 - f) / max(f, 1e-300)


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    steps = cfg.steps_or(200)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for k in KAPPAS:
            ep, run_cfg, data = train_one({**TASK, "kappa": k}, cfg, steps, seed, f"asymmetry κ={k} s{seed}")
            model = ep["model"]
            rows.append({"kappa": k, "seed": seed, "val_ce": ep["val_ce"],
                         "nats_per_char": ep.get("nats_per_char"), "rollbacks": ep["rollbacks"],
                         "asymmetry": asymmetry64(model, run_cfg, data), **measure(model, run_cfg, data)})
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> dict[float, float]:
    """Per κ, the seeds' mean of ``key``."""
    out: dict[float, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            out.setdefault(r["kappa"], []).append(r[key])
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(1, 2, figsize=(10.5, 4))
    for seed in sorted({r["seed"] for r in rows}):
        rs = [r for r in rows if r["seed"] == seed]
        ax[0].plot([r["asymmetry"] for r in rs], [r["val_ce"] for r in rs], "o-", label=f"EP, seed {seed}")
        for r in rs:
            ax[0].annotate(f"κ={r['kappa']:g}", (r["asymmetry"], r["val_ce"]), textcoords="offset points",
                           xytext=(4, 4), fontsize=7)
        k = [r["kappa"] for r in rs]
        ax[1].plot(k, [max(1 - r["cos_ep_implicit"], FLOOR) for r in rs], "o-",
                   label=f"with AsymEP, seed {seed}")
        ax[1].plot(k, [max(1 - r["cos_ep_implicit_none"], FLOOR) for r in rs], "s--",
                   label=f"without, seed {seed}")
    ax[0].xaxis.set_major_locator(MaxNLocator(5))
    ax[0].ticklabel_format(axis="both", style="sci", scilimits=(-3, 4), useOffset=False)
    ax[0].set_xlabel("asymmetry ‖A‖/‖S‖ of the trained J")
    ax[0].set_ylabel("val CE (nats/masked token)")
    ax[0].set_title("loss vs asymmetry (Pareto view)")
    ax[1].set_xlabel("κ (0: energy, 1: thick)")
    ax[1].set_ylabel("1 − cos(EP, implicit)")
    ax[1].set_yscale("log")
    ax[1].set_title("gradient fidelity")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_spread(rows: list[dict[str, Any]], key: str = "val_ce") -> float | None:
    """The largest spread of ``key`` across seeds at one κ (None with a single seed)."""
    per: dict[float, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            per.setdefault(r["kappa"], []).append(r[key])
    spreads = [max(v) - min(v) for v in per.values() if len(v) > 1]
    return max(spreads) if spreads else None


def reading(rows: list[dict[str, Any]]) -> str:
    """A sweet spot must beat both ends by more than the seeds disagree; one seed cannot show one."""
    ce, asym, rho = _mean(rows, "val_ce"), _mean(rows, "asymmetry"), _mean(rows, "rho_SinvA")
    ks = list(ce)
    lo, hi = ks[0], ks[-1]
    valid = [k for k in ks if rho.get(k, float("inf")) < 1.0]
    best = min(valid or ks, key=lambda k: ce[k])
    gap = min(ce[lo], ce[hi]) - ce[best]
    noise = seed_spread(rows)
    listed = ", ".join(f"{k:g}" for k in valid) or "none"
    if not lo < best < hi:
        verdict = "no interior sweet spot"
    elif noise is None:
        verdict = (f"{gap:.3f} below the better end, from one seed, which cannot separate a gap "
                   "that small from seed noise: rerun with --seeds 0,1,2 before calling it a sweet spot")
    elif gap > noise:
        verdict = (f"a partially conservative sweet spot ({gap:.3f} below the better end; "
                   f"seeds spread {noise:.3f})")
    else:
        verdict = (f"no resolved sweet spot ({gap:.3f} below the better end, within the seeds' "
                   f"spread {noise:.3f})")
    return (f"From κ = {lo:g} to {hi:g}, ‖A‖/‖S‖ goes {asym[lo]:.2g} → {asym[hi]:.2g} and ρ(S⁻¹A) "
            f"{rho.get(lo, float('nan')):.3g} → {rho.get(hi, float('nan')):.3g}; EP's val CE goes "
            f"{ce[lo]:.4f} → {ce[hi]:.4f}.\nAmong κ with ρ(S⁻¹A) < 1 ({listed}) "
            f"the lowest val CE is at κ = {best:g} ({ce[best]:.4f}): {verdict}.")


EXPERIMENT = Experiment(
    name="asymmetry",
    question="how much non-conservative coupling (κ) does the loss want, and at what cost to EP?",
    sweep="kappa", run=run, plot=plot, reading=reading,
    columns=("seed", "val_ce", "nats_per_char", "asymmetry", "symmetric_fraction", "rho_SinvA",
             "nonnormality", "numerical_abscissa", "spectral_abscissa", "cos_ep_implicit",
             "cos_ep_implicit_none", "free_fevals"),
)
