"""Q4, horizon: how long must BPTT unroll before its gradient is the equilibrium's, and what does a
short horizon cost in loss?

BPTT differentiates T1 plain steps z ← z + εF(z) from z0 = 0, not the fixed point: its gradient is
the implicit one only once the unroll has settled. Two views, per T1:

* one fixed operator (EP trained once): cos(BPTT at T1, implicit) and the residual after T1 steps;
* BPTT trained at that T1: the val CE it reaches, and on its own trained operator the residual
  after its T1 steps, cos(BPTT at T1, implicit) and the residual of a converged free phase (a
  short-horizon model need not have an equilibrium at all: it is trained on a transient).

The implicit oracle relaxes the free phase tighter than training does (to the run's ``polish_res``),
so the comparison at long T1 is not limited by the oracle's own z*. The ``T1 = "ep"`` row is EP's
gradient against the same oracle, on its own operator, and EP's val CE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ept.bench.quality import operator_batch
from ept.config import RunConfig
from ept.data import TokenData
from ept.diagnostics.fidelity import compare, reference_options
from ept.experiments.common import Experiment, ExperimentConfig, ExperimentError, train_one
from ept.grad import gradient
from ept.grad.common import Grads
from ept.model import EquilibriumLM
from ept.train import ep_options

T1S = (5, 10, 20, 50, 150)
# --quick trains this many steps, not QUICK_STEPS: in the first ~12 steps (warm-up) the coupling is
# still ~0, ε = 1/(1+c) cancels the leak, and every unroll settles in one step (1 − cos ~ 1e-14 at
# any T1); by step 20 five steps leave a residual ~1e-4 and the horizon shows.
QUICK_HORIZON_STEPS = 20


def oracle_options(run_cfg: RunConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The implicit route's options: the run's free-phase solver relaxed to ``polish_res`` (at most
    1e-6), its adjoint as :func:`reference_options` sets it."""
    implicit, _ = reference_options(ep_options(run_cfg), dtype)
    tight = min(run_cfg.solver.res_est, run_cfg.ep.polish_res or 1e-6, 1e-6)
    return {**implicit, "res_est": tight, "t1max": max(run_cfg.solver.t1max, 1000)}


class Oracle:
    """The implicit gradient of one model on one batch (over a subset of its sequences, cached)."""

    def __init__(self, model: EquilibriumLM, idx: torch.Tensor, targets: torch.Tensor, opts: dict[str, Any]):
        self.model, self.idx, self.targets, self.opts = model, idx, targets, opts
        self._cache: dict[tuple[bool, ...], tuple[Grads, dict[str, Any]]] = {}

    def get(self, kept: torch.Tensor | None = None) -> tuple[Grads, dict[str, Any]]:
        mask = torch.ones(len(self.idx), dtype=torch.bool) if kept is None else kept.cpu().bool()
        if not bool(mask.any()):
            mask = torch.ones_like(mask)
        key = tuple(bool(v) for v in mask)
        if key not in self._cache:
            m = mask.to(self.idx.device)
            self._cache[key] = gradient(self.model, self.idx[m], self.targets[m], "implicit", **self.opts)
        return self._cache[key]


def bptt_against(oracle: Oracle, t1: int, eps: float) -> dict[str, float]:
    """cos(BPTT at ``t1``, implicit) and BPTT's residual ||F||/||z|| after its ``t1`` steps."""
    grads, stats = gradient(oracle.model, oracle.idx, oracle.targets, "bptt", T1=t1, eps=eps)
    imp, _ = oracle.get()
    return {"cos": compare(grads, imp, "x")["cos_x"], "residual": float(stats["free_residual"])}


def ep_against(oracle: Oracle, run_cfg: RunConfig) -> dict[str, float]:
    """cos(EP, implicit) over the sequences EP kept, and EP's free residual."""
    grads, stats = gradient(oracle.model, oracle.idx, oracle.targets, "ep", **ep_options(run_cfg))
    imp, _ = oracle.get(stats.get("kept"))
    return {"cos": compare(grads, imp, "x")["cos_x"], "residual": float(stats["free_residual"])}


def _operator(model: EquilibriumLM, run_cfg: RunConfig, data: TokenData) -> Oracle:
    idx, targets = operator_batch(run_cfg, data)
    return Oracle(model, idx, targets, oracle_options(run_cfg, model.head.weight.dtype))


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    if cfg.runs:
        raise ExperimentError("horizon trains its own runs (EP once, BPTT at each T1): drop --runs")
    steps = QUICK_HORIZON_STEPS if cfg.quick else (cfg.steps or 200)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        ep, ep_cfg, data = train_one({}, cfg, steps, seed, f"horizon ep s{seed}")
        fixed = _operator(ep["model"], ep_cfg, data)
        eps = ep_cfg.solver.eps
        ep_fix = ep_against(fixed, ep_cfg)
        for t1 in T1S:
            on_fixed = bptt_against(fixed, t1, eps)
            bptt, bptt_cfg, _ = train_one({"mode": "bptt", "T1": t1}, cfg, steps, seed,
                                          f"horizon bptt T1={t1} s{seed}")
            own = _operator(bptt["model"], bptt_cfg, data)
            on_own = bptt_against(own, t1, eps)
            _, imp_stats = own.get()
            rows.append({"T1": t1, "seed": seed, "val_ce": bptt["val_ce"],
                         "cos_fixed": on_fixed["cos"], "one_minus_cos_fixed": 1.0 - on_fixed["cos"],
                         "residual_fixed": on_fixed["residual"],
                         "cos_own": on_own["cos"], "one_minus_cos_own": 1.0 - on_own["cos"],
                         "residual_own": on_own["residual"],
                         "equilibrium_residual_own": float(imp_stats["free_residual"]),
                         "rollbacks": bptt["rollbacks"]})
        _, imp_stats = fixed.get()
        rows.append({"T1": "ep", "seed": seed, "val_ce": ep["val_ce"], "cos_fixed": ep_fix["cos"],
                     "one_minus_cos_fixed": 1.0 - ep_fix["cos"], "residual_fixed": ep_fix["residual"],
                     "cos_own": ep_fix["cos"], "one_minus_cos_own": 1.0 - ep_fix["cos"],
                     "residual_own": ep_fix["residual"],
                     "equilibrium_residual_own": float(imp_stats["free_residual"]),
                     "rollbacks": ep["rollbacks"]})
    return rows


def _gap(cos: float | None) -> float | None:
    """1 − cos, floored where it is below float64's resolution (a log axis cannot show 0)."""
    return None if cos is None else max(1.0 - cos, 1e-16)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, seed in enumerate(sorted({r["seed"] for r in rows})):
        rs = [r for r in rows if r["seed"] == seed and r["T1"] != "ep"]
        ep = next((r for r in rows if r["seed"] == seed and r["T1"] == "ep"), None)
        t1 = [r["T1"] for r in rs]
        color = f"C{i}"
        ax[0].plot(t1, [_gap(r["cos_fixed"]) for r in rs], "o-", color=color,
                   label=f"BPTT on EP's operator, seed {seed}")
        ax[0].plot(t1, [_gap(r["cos_own"]) for r in rs], "s--", color=color,
                   label=f"BPTT on its own trained operator, seed {seed}")
        ax[1].plot(t1, [r["val_ce"] for r in rs], "o-", color=color, label=f"BPTT trained at T1, seed {seed}")
        ax[2].plot(t1, [r["residual_fixed"] for r in rs], "o-", color=color,
                   label=f"after T1 steps, EP's operator, seed {seed}")
        ax[2].plot(t1, [r["residual_own"] for r in rs], "s--", color=color,
                   label=f"after T1 steps, own operator, seed {seed}")
        if ep is not None:
            if ep["cos_fixed"] is not None:
                ax[0].axhline(_gap(ep["cos_fixed"]), color=color, ls=":",
                              label=f"EP: 1 − cos(EP, implicit), seed {seed}")
            if ep["val_ce"] is not None:
                ax[1].axhline(ep["val_ce"], color=color, ls=":", label=f"EP, seed {seed}")
    titles = ("gradient fidelity vs horizon", "loss at equal steps", "unroll residual")
    ylabels = ("1 − cos(BPTT, implicit)", "val CE (nats/token)", "‖F(z)‖/‖z‖ after T1 steps")
    for a, yl, t in zip(ax, ylabels, titles, strict=True):
        a.set_xscale("log")
        a.set_xlabel("BPTT horizon T1 (unrolled steps)")
        a.set_ylabel(yl)
        a.set_title(t)
        a.legend(fontsize=7)
    ax[0].set_yscale("log")
    ax[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: list[dict[str, Any]]) -> str:
    seed = rows[0]["seed"]
    rs = [r for r in rows if r["seed"] == seed and r["T1"] != "ep"]
    ep = next((r for r in rows if r["seed"] == seed and r["T1"] == "ep"), None)
    lo, hi = rs[0], rs[-1]
    best = min(rs, key=lambda r: r["val_ce"] if r["val_ce"] is not None else float("inf"))

    def g(v: float | None) -> str:
        return "—" if v is None else f"{1 - v:.2g}"

    ep_part = "" if ep is None else f" (EP's own: {g(ep['cos_fixed'])})"
    ep_ce = "" if ep is None or ep["val_ce"] is None else f"; EP reaches {ep['val_ce']:.3f}"
    return (f"On EP's trained operator 1 − cos(BPTT, implicit) goes {g(lo['cos_fixed'])} at T1 = {lo['T1']}"
            " → "
            f"{g(hi['cos_fixed'])} at T1 = {hi['T1']}{ep_part}, with the unroll's residual "
            f"{lo['residual_fixed']:.2g} → {hi['residual_fixed']:.2g}.\n"
            f"Trained at each T1, BPTT's val CE runs {lo['val_ce']:.3f} (T1 = {lo['T1']}) → "
            f"{hi['val_ce']:.3f} "
            f"(T1 = {hi['T1']}), best {best['val_ce']:.3f} at T1 = {best['T1']}{ep_ce}; on its own operator "
            f"1 − cos is {g(lo['cos_own'])} → {g(hi['cos_own'])}.")


EXPERIMENT = Experiment(
    name="horizon",
    question="how long must BPTT unroll to give the equilibrium's gradient, and at what loss?",
    sweep="T1", run=run, plot=plot, reading=reading,
    columns=("seed", "val_ce", "one_minus_cos_fixed", "residual_fixed", "one_minus_cos_own",
             "residual_own",
             "equilibrium_residual_own", "rollbacks"),
)
