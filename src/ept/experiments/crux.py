"""The crux: does EP train as long as BPTT once the operator is held contractive? The stability
study's levers side by side as trajectories of val CE and ω(J): no control, the old default
(resreg 0.2), jacreg, eigreg at margin 0.5 (the preset), eigreg at margin 0 (the study's best
trade-off so far, docs/experiments/stability.md), and a warm start — no control, from the weights
of an eigreg run a quarter of the way in (the onboarding note's "lucky warm start").

A run that diverges is kept as a row (``diverged_at``); its trajectory ends there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ept.experiments.common import Experiment, ExperimentConfig, corpus, run_config
from ept.runlog import METRICS_FILE
from ept.train import TrainingDiverged, train, write_run_files

RECIPES: dict[str, dict[str, Any]] = {
    "none": {"eigreg": 0.0, "resreg": 0.0},
    "resreg": {"eigreg": 0.0},
    "jacreg": {"eigreg": 0.0, "jacreg": 0.1, "jr_floor": 0.1, "jr_target": 1e-3},
    "eigreg": {},
    "eig_margin0": {"eig_margin": 0.0},
    "warm_start": {"eigreg": 0.0},
}


def _records(run: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if line.strip()]


def _train(flags: dict[str, Any], cfg: ExperimentConfig, steps: int, seed: int, folder: Path,
           init: dict | None = None) -> tuple[dict[str, Any] | None, str | None, list[dict[str, Any]]]:
    run_cfg = run_config({**flags, "diag_cos": max(steps // 10, 1)}, cfg, steps, seed)
    data = corpus(run_cfg.model.vocab_size, cfg.quick)
    run_cfg.model.vocab_size, run_cfg.data.key = data.vocab_size, data.key
    folder.mkdir(parents=True)
    write_run_files(folder, run_cfg, data)
    try:
        s = train(run_cfg, data, folder, init_weights=init, log=lambda _msg: None)
        return s, None, _records(folder)
    except TrainingDiverged as e:
        return None, str(e).splitlines()[0], _records(folder)


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    steps = cfg.steps_or(800)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            early, _, _ = _train(RECIPES["eigreg"], cfg, max(steps // 4, 1), seed, Path(tmp) / "early")
            warm = {k: v.detach().clone() for k, v in early["model"].state_dict().items()}
            for recipe, flags in RECIPES.items():
                init = warm if recipe == "warm_start" else None
                s, error, records = _train(flags, cfg, steps, seed, Path(tmp) / recipe, init)
                vals = [(r["step"], r["val_ce"]) for r in records if "val_ce" in r and r.get("event") is None]
                diag = [(r["step"], r["numerical_abscissa"]) for r in records if r.get("event") == "diag"]
                omegas = [w for _, w in diag if w is not None]
                cfg.log(f"[crux {recipe} s{seed}] " + (error or f"val CE {s['val_ce']:.4f}"))
                rows.append({
                    "recipe": recipe, "seed": seed, "val_ce": None if s is None else s["val_ce"],
                    "rollbacks": None if s is None else s["rollbacks"],
                    "diverged_at": None if s is not None else (vals[-1][0] if vals else 0),
                    "numerical_abscissa_max": max(omegas) if omegas else None,
                    "numerical_abscissa_last": omegas[-1] if omegas else None,
                    "val_ce_curve": vals, "numerical_abscissa_curve": diag,
                })
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
        label = f"{r['recipe']} s{r['seed']}" + (" (diverged)" if r["diverged_at"] is not None else "")
        if r["val_ce_curve"]:
            ax[0].plot(*zip(*r["val_ce_curve"], strict=True), label=label)
        if r["numerical_abscissa_curve"]:
            ax[1].plot(*zip(*r["numerical_abscissa_curve"], strict=True), "o-", ms=3, label=label)
    ax[1].axhline(0.0, color="grey", ls=":", lw=0.8)
    for a, yl, t in zip(ax, ("val CE (periodic, nats/token)", "ω(J) at z*"),
                        ("loss along training", "contraction along training"), strict=True):
        a.set_xlabel("step")
        a.set_ylabel(yl)
        a.set_title(t)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["val_ce"] is not None]
    best = min(done, key=lambda r: r["val_ce"]) if done else None
    died = [f"`{r['recipe']}` s{r['seed']} at step {r['diverged_at']}" for r in rows
            if r["diverged_at"] is not None]
    first = f"Best final val CE: {best['recipe']} ({best['val_ce']:.3f})." if best else "Every run diverged."
    return first + ("\nDiverged: " + ", ".join(died) + "." if died else "\nNo run diverged.")


EXPERIMENT = Experiment(
    name="crux", question="does EP train as long as BPTT once the operator is held contractive?",
    sweep="recipe", run=run, plot=plot, reading=reading,
    columns=("seed", "val_ce", "rollbacks", "diverged_at", "numerical_abscissa_max",
             "numerical_abscissa_last"),
)
