"""Q1/Q5, fidelity: along one training run, how good is EP's gradient under each AsymEP variant, and
does it degrade where ρ(S⁻¹A) reaches 1?

AsymEP's correction −(J − Jᵀ)d is first order in the antisymmetric part A relative to the symmetric
part S: its warranty is ρ(S⁻¹A) < 1 (docs/method.md §4). Per checkpoint of one EP run (the tiny
preset, checkpointed every ``steps/10`` steps, all of them kept) and on one fixed batch: cos(EP,
implicit) for asym fixed, track and linear (and none, the uncorrected estimate), each against one
implicit oracle over the sequences that route kept; ρ(S⁻¹A) and the FTLE of the relaxation from
z0 = 0 on the first sequence; the free phase's residual. Weights are the raw iterate (the operator
the training gradients are taken on), not the EMA. ``--runs`` reuses trained run folders: every
ckpt-* folder they still hold is measured.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ept import checkpoint as ckpt
from ept.bench.quality import operator_batch
from ept.config import RunConfig
from ept.data import TokenData, load_corpus, prepare
from ept.diagnostics import ftle, rho_SinvA
from ept.diagnostics.fidelity import compare
from ept.experiments.common import Experiment, ExperimentConfig, ExperimentError, corpus, run_config
from ept.experiments.horizon import Oracle, oracle_options
from ept.grad import gradient
from ept.model import EquilibriumLM
from ept.train import ep_options, train, write_run_files

ASYMS = ("fixed", "track", "linear")  # AsymEP's variants; "none" is measured too, as the baseline
QUICK_FIDELITY_STEPS, QUICK_CKPTS = 40, 5  # past the warm-up, while the coupling is still ~0
RUN_FOLDER = "fidelity_run"


def _checkpoints(run: Path) -> list[Path]:
    return sorted((p for p in run.glob("ckpt-*") if (p / ckpt.MANIFEST).is_file()), key=lambda p: p.name)


def train_run(cfg: ExperimentConfig, seed: int) -> Path:
    """One EP run of the tiny preset into ``cfg.out/fidelity_run[-sSEED]``, every checkpoint kept."""
    steps = QUICK_FIDELITY_STEPS if cfg.quick else (cfg.steps or 400)
    every = max(1, steps // (QUICK_CKPTS if cfg.quick else 10))
    run_cfg = run_config({"ckpt_every": every, "keep": steps // every + 2}, cfg, steps, seed)
    data = corpus(run_cfg.model.vocab_size, cfg.quick)
    run_cfg.model.vocab_size, run_cfg.data.key = data.vocab_size, data.key
    run = cfg.out / (RUN_FOLDER if seed == cfg.seeds[0] else f"{RUN_FOLDER}-s{seed}")
    if run.exists():
        shutil.rmtree(run)  # a fresh run, not a resume of an earlier experiment's
    run.mkdir(parents=True)
    write_run_files(run, run_cfg, data)
    summary = train(run_cfg, data, run, log=lambda _msg: None)
    cfg.log(f"[fidelity s{seed}] val CE {summary['val_ce']:.4f}, {len(_checkpoints(run))} checkpoints "
            f"in {run}")
    return run


def measure_checkpoint(model: EquilibriumLM, run_cfg: RunConfig, data: TokenData) -> dict[str, Any]:
    """cos(EP, implicit) per asym against one oracle, ρ(S⁻¹A), the FTLE and the free residual."""
    idx, targets = operator_batch(run_cfg, data)
    oracle = Oracle(model, idx, targets, oracle_options(run_cfg, model.head.weight.dtype))
    opts = ep_options(run_cfg)
    out: dict[str, Any] = {}
    z_star = None
    for asym in (*ASYMS, "none"):
        grads, stats = gradient(model, idx, targets, "ep", **{**opts, "asym": asym})
        imp, _ = oracle.get(stats.get("kept"))
        out[f"cos_{asym}"] = compare(grads, imp, "x")["cos_x"]
        out[f"one_minus_cos_{asym}"] = 1.0 - out[f"cos_{asym}"]
        if asym == ASYMS[0]:
            out["residual"] = float(stats["free_residual"])
            out["residual_max"] = float(stats["free_residual_max"])
            out["free_fevals"] = float(stats["free_fevals"])
            out["kept_seqs"] = int(stats["kept"].sum()) if stats.get("kept") is not None else len(idx)
            z_star = stats["z_star"]
    with torch.no_grad():
        x = model.inject(idx[:1])
    assert z_star is not None
    z = z_star[:1]
    finite = bool(torch.isfinite(z).all())
    out["rho_SinvA"] = rho_SinvA(model, x, z, tol=1e-6) if finite else math.nan
    out["ftle"] = ftle(model, x, steps=100, eps=run_cfg.solver.eps,
                       generator=torch.Generator().manual_seed(0))
    return out


def _run_data(run_cfg: RunConfig, quick: bool) -> TokenData:
    try:
        return corpus(run_cfg.model.vocab_size, quick) if quick else prepare(load_corpus(run_cfg.data.data),
                                                                             run_cfg.model.vocab_size)
    except ValueError as e:
        raise ExperimentError(f"the run's corpus cannot be loaded: {e}") from None


def measure_run(run: Path, cfg: ExperimentConfig, seed: int | None, label: str) -> list[dict[str, Any]]:
    ckpts = _checkpoints(run)
    if not ckpts:
        raise ExperimentError(f"--runs {run}: holds no ckpt-* checkpoint")
    rows: list[dict[str, Any]] = []
    data: TokenData | None = None
    for path in ckpts:
        try:
            trained = ckpt.load_trained(path, raw=True)
        except ckpt.CheckpointError as e:
            raise ExperimentError(f"{path}: {e}") from None
        if data is None:
            data = _run_data(trained.cfg, cfg.quick)
        row = {"step": trained.step, "run": label, "seed": trained.cfg.train.seed if seed is None else seed,
               **measure_checkpoint(trained.model, trained.cfg, data)}
        cfg.log(f"[fidelity {label}] step {row['step']}: ρ(S⁻¹A) {row['rho_SinvA']:.3g}, "
                + ", ".join(f"1−cos {a} {1 - row[f'cos_{a}']:.2g}" for a in ASYMS))
        rows.append(row)
    return rows


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if cfg.runs:
        for path in cfg.runs:
            rows += measure_run(path, cfg, None, path.name)
        return rows
    for seed in cfg.seeds:
        run_dir = train_run(cfg, seed)
        rows += measure_run(run_dir, cfg, seed, run_dir.name)
    return rows


def _gap(cos: float | None) -> float | None:
    return None if cos is None else max(1.0 - cos, 1e-16)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    twin, res_ax = ax[0].twinx(), ax[1].twinx()
    marks = {"fixed": "o-", "track": "s-", "linear": "^-", "none": "x:"}
    for i, label in enumerate(dict.fromkeys(r["run"] for r in rows)):
        rs = sorted((r for r in rows if r["run"] == label), key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        for j, asym in enumerate((*ASYMS, "none")):
            ax[0].plot(steps, [_gap(r[f"cos_{asym}"]) for r in rs], marks[asym], color=f"C{j}",
                       label=f"asym {asym}" + (f", {label}" if i else ""))
        twin.plot(steps, [r["rho_SinvA"] for r in rs], "d--", color="k", alpha=0.7,
                  label=f"ρ(S⁻¹A), {label}")
        ax[1].plot(steps, [r["ftle"] for r in rs], "o-", color=f"C{i}", label=f"FTLE, {label}")
        res_ax.plot(steps, [r["residual"] for r in rs], "s--", color=f"C{i}", alpha=0.6,
                    label=f"free residual (right axis), {label}")
    twin.axhline(1.0, color="k", lw=0.8, ls=":")
    twin.set_ylabel("ρ(S⁻¹A) (dotted: 1, AsymEP's warranty)")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("training step (checkpoint)")
    ax[0].set_ylabel("1 − cos(EP, implicit)")
    ax[0].set_title("EP's fidelity per AsymEP variant along training")
    h0, l0 = ax[0].get_legend_handles_labels()
    h1, l1 = twin.get_legend_handles_labels()
    ax[0].legend(h0 + h1, l0 + l1, fontsize=7)
    res_ax.set_yscale("log")
    res_ax.set_ylabel("free residual ‖F(z*)‖/‖z*‖")
    ax[1].axhline(0.0, color="grey", lw=0.8, ls=":")
    ax[1].set_xlabel("training step (checkpoint)")
    ax[1].set_ylabel("FTLE of the relaxation from 0 (1/time)")
    ax[1].set_title("relaxation: FTLE and the free phase's residual")
    h0, l0 = ax[1].get_legend_handles_labels()
    h1, l1 = res_ax.get_legend_handles_labels()
    ax[1].legend(h0 + h1, l0 + l1, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worst(rs: list[dict[str, Any]], asym: str) -> float:
    gaps = [1 - r[f"cos_{asym}"] for r in rs if r[f"cos_{asym}"] is not None]
    return max(gaps) if gaps else math.nan


def reading(rows: list[dict[str, Any]]) -> str:
    rs = [r for r in rows if r["run"] == rows[0]["run"]]
    rhos = [r["rho_SinvA"] for r in rs if r["rho_SinvA"] is not None]
    peak = max(rs, key=lambda r: r["rho_SinvA"] if r["rho_SinvA"] is not None else -math.inf)
    below = [r for r in rs if r["rho_SinvA"] is not None and r["rho_SinvA"] < 1]
    above = [r for r in rs if r["rho_SinvA"] is not None and r["rho_SinvA"] >= 1]

    def worst(sel: list[dict[str, Any]]) -> str:
        return ", ".join(f"{a} {_worst(sel, a):.2g}" for a in (*ASYMS, "none"))

    head = (f"Over {len(rs)} checkpoints (steps {rs[0]['step']}–{rs[-1]['step']}) ρ(S⁻¹A) runs "
            f"{min(rhos, default=math.nan):.3g}–{max(rhos, default=math.nan):.3g} "
            f"(peak at step {peak['step']}); "
            f"the FTLE {min(r['ftle'] for r in rs):.3g}–{max(r['ftle'] for r in rs):.3g}.")
    if not above:
        return (f"{head}\nρ(S⁻¹A) < 1 at every checkpoint, so AsymEP's first-order warranty holds "
                f"throughout: worst 1 − cos {worst(rs)}.")
    first = above[0]["step"]
    return (f"{head}\nρ(S⁻¹A) ≥ 1 from step {first} ({len(above)} checkpoints): worst 1 − cos there "
            f"{worst(above)}, against {worst(below) if below else '— (none below 1)'} where ρ < 1.")


EXPERIMENT = Experiment(
    name="fidelity",
    question="along training, how good is EP's gradient per AsymEP variant, and where ρ(S⁻¹A) ≥ 1?",
    sweep="step", run=run, plot=plot, reading=reading,
    columns=("run", "seed", "one_minus_cos_fixed", "one_minus_cos_track", "one_minus_cos_linear",
             "one_minus_cos_none", "rho_SinvA", "residual", "residual_max", "ftle", "free_fevals",
             "kept_seqs"),
)
