"""Hardware: what the analog substrate's non-idealities cost EP — val CE and the measured gradient's
cosine to the exact one against the device preset, the weight read noise σ and the converters' bits,
with the write ledger's busiest device and its endurance verdict.

Each setting trains the tiny preset by EP on simulated devices (``ept train --analog``, the write
ledger counting every pulse), then measures on the trained weights: EP's gradient as the substrate
reads it (both phases through the periphery, :func:`ept.analog.loop.analog_gradient`) against the
implicit gradient of the same weights in exact arithmetic, on the operator batch.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ept.analog import SimulatedSubstrate, analog_config
from ept.analog.ledger import CLAIM, ENDURANCE
from ept.analog.loop import analog_gradient
from ept.bench.quality import operator_batch
from ept.diagnostics import compare
from ept.diagnostics.fidelity import reference_options
from ept.experiments.common import Experiment, ExperimentConfig, corpus, run_config
from ept.grad import gradient
from ept.train import grad_options, train

# (label, preset, overrides): the presets at their periphery, then read noise and converter bits on
# otherwise ideal devices.
SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ideal", "ideal", {}),
    ("rram_es", "rram_es", {}),
    ("rram_sb", "rram_sb", {}),
    ("ecram", "ecram", {}),
    ("capacitor", "capacitor", {}),
    ("w_noise=0.01", "ideal", {"w_noise": 0.01}),
    ("w_noise=0.03", "ideal", {"w_noise": 0.03}),
    ("w_noise=0.1", "ideal", {"w_noise": 0.1}),
    ("bits=8", "ideal", {"inp_bits": 8, "out_bits": 8, "out_bound": 20.0}),
    ("bits=6", "ideal", {"inp_bits": 6, "out_bits": 6, "out_bound": 20.0}),
    ("bits=4", "ideal", {"inp_bits": 4, "out_bits": 4, "out_bound": 20.0}),
)
QUICK_SETTINGS = ("ideal", "rram_es", "w_noise=0.1", "bits=4")


def _measured_cosine(model: Any, run_cfg: Any, data: Any, analog: Any, seed: int) -> dict[str, float]:
    idx, targets = operator_batch(run_cfg, data)
    implicit, _ = reference_options(grad_options(run_cfg), model.head.weight.dtype)
    exact, _ = gradient(model, idx, targets, "implicit", **implicit)
    sub = SimulatedSubstrate(copy.deepcopy(model), analog, run_cfg.solver, run_cfg.ep, seed=seed)
    measured, _, stats = analog_gradient(sub, idx, targets, run_cfg.ep)  # settles through the periphery
    return {"cos_analog_implicit": compare(measured, exact, "x")["cos_x"],
            "analog_free_fevals": float(stats["free_fevals"])}


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    steps = cfg.steps_or(200)
    chosen = [s for s in SETTINGS if not cfg.quick or s[0] in QUICK_SETTINGS]
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for label, preset, overrides in chosen:
            run_cfg = run_config({}, cfg, steps, seed)
            data = corpus(run_cfg.model.vocab_size, cfg.quick)
            run_cfg.model.vocab_size, run_cfg.data.key = data.vocab_size, data.key
            analog = analog_config(preset, seed=seed + 1, **overrides)
            s = train(run_cfg, data, None, log=lambda _msg: None, analog=analog)
            cfg.log(f"[noise {label} s{seed}] val CE {s['val_ce']:.4f} ({s['rollbacks']} rollbacks)")
            projected = s.get("projected_writes_max", 0.0)
            rows.append({"setting": label, "seed": seed, "preset": preset, **overrides,
                         "val_ce": s["val_ce"], "rollbacks": s["rollbacks"],
                         "writes_max": s.get("writes_max"),
                         "projected_writes_max": projected, "claim_holds": bool(projected <= CLAIM),
                         "endurance_holds": bool(projected <= ENDURANCE),
                         **_measured_cosine(s["model"], run_cfg, data, analog, seed + 1)})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["setting"] for r in rows if r["seed"] == rows[0]["seed"]]
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].bar(labels, [r["val_ce"] for r in first], color="tab:blue")
    ax[0].set_ylim(min(r["val_ce"] for r in first) - 0.05, max(r["val_ce"] for r in first) + 0.05)
    ax[0].set_ylabel("val CE (nats/token)")
    ax[0].set_title("loss after training on the devices")
    ax[1].bar(labels, [max(1 - r["cos_analog_implicit"], 1e-12) for r in first], color="tab:orange")
    ax[1].set_yscale("log")
    ax[1].set_ylabel("1 − cos(measured EP, implicit)")
    ax[1].set_title("gradient fidelity through the periphery")
    ax[2].bar(labels, [max(r["projected_writes_max"] or 0, 1) for r in first], color="tab:green")
    ax[2].axhline(CLAIM, color="grey", ls="--", label=f"claim {CLAIM:.0e}")
    ax[2].axhline(ENDURANCE, color="red", ls=":", label=f"HfOx endurance {ENDURANCE:.0e}")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("busiest device, writes at 32,000 steps")
    ax[2].set_title("write ledger, projected")
    ax[2].legend(fontsize=7)
    for a in ax:
        a.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: list[dict[str, Any]]) -> str:
    first = [r for r in rows if r["seed"] == rows[0]["seed"]]
    ideal = next(r for r in first if r["setting"] == "ideal")
    worst = max(first, key=lambda r: r["val_ce"])
    leaky = min(first, key=lambda r: r["cos_analog_implicit"])
    busy = max(first, key=lambda r: r["projected_writes_max"] or 0)
    return (f"Against ideal devices (val CE {ideal['val_ce']:.3f}), {worst['setting']} costs the most "
            f"({worst['val_ce'] - ideal['val_ce']:+.3f} nats); the measured gradient is least faithful on "
            f"{leaky['setting']} (cos {leaky['cos_analog_implicit']:.4f}).\n"
            "The busiest device at 32,000 steps: "
            f"{busy['setting']}, {busy['projected_writes_max']:.3g} writes "
            f"({'within' if busy['endurance_holds'] else 'beyond'} HfOx endurance).")


EXPERIMENT = Experiment(
    name="noise", question="what do the devices, read noise and converter bits cost EP's loss and gradient?",
    sweep="setting", run=run, plot=plot, reading=reading,
    columns=("seed", "val_ce", "rollbacks", "cos_analog_implicit", "writes_max", "projected_writes_max",
             "claim_holds", "endurance_holds"),
)
