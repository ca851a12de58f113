"""Q6/Q7, attention: what does the energy (conservative) attention cost against the free (thick)
attention, at equal steps and at equal free-phase F-evals, on the causal LM and on masked tokens?

Four EP runs per seed, flags as in ``ept.bench.quality.BLOCKS``: ``thick`` vs ``energy`` on the
causal next-token task, ``thick_mlm`` vs ``energy_mlm`` on the bidirectional masked-token task
(where the energy block is exactly conservative, so EP needs no AsymEP). Per run: the whole-split
val CE and nats per character at equal steps, and on the trained operator the fingerprint's measures
(cos(EP, implicit) with the run's AsymEP and without, the free phase's F-evals, ρ(S⁻¹A), …).

Equal F-evals: each run is evaluated every ``log_every`` steps (the periodic val CE, on
``eval_batches`` windows, not the whole split) and its cumulative free-phase F-evals are summed from
its log records (each window's mean F-evals × the window's steps; nudged and polishing phases are
not counted). ``total_free_fevals`` is a run's sum over all its steps. Within a task the budget is
the smaller of the pair's totals (the thick run's total when it is the cheaper; the brief's "the
thick run's total" is unreachable, at equal steps, by a run that spends fewer per step), and
``val_ce_equal_fevals`` is the periodic val CE each run had when its cumulative F-evals reached
that budget, interpolated linearly between evaluations (``step_equal_fevals`` the step, likewise).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from ept.bench.quality import BLOCKS
from ept.config import RunConfig
from ept.data import TokenData
from ept.experiments.common import Experiment, ExperimentConfig, corpus, measure, run_config
from ept.train import train, write_run_files

# task -> (the free block, the energy block)
PAIRS: dict[str, tuple[str, str]] = {"lm": ("thick", "energy"), "mlm": ("thick_mlm", "energy_mlm")}


def train_logged(flags: dict[str, Any], cfg: ExperimentConfig, steps: int, seed: int, label: str
                 ) -> tuple[dict[str, Any], RunConfig, TokenData, list[dict[str, Any]]]:
    """As ``common.train_one``, evaluated at every log step, in a scratch folder whose metrics
    records come back with the summary."""
    run_cfg = run_config(flags, cfg, steps, seed)
    run_cfg.train.eval_every = run_cfg.train.log_every
    run_cfg.train.ckpt_every = max(steps, 1)
    data = corpus(run_cfg.model.vocab_size, cfg.quick)
    run_cfg.model.vocab_size, run_cfg.data.key = data.vocab_size, data.key
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ept-attention-") as tmp:
        run = Path(tmp)
        write_run_files(run, run_cfg, data)
        summary = train(run_cfg, data, run, log=lambda _msg: None)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    summary["seconds_wall"] = time.time() - t0
    cfg.log(f"[{label}] val CE {summary['val_ce']:.4f} in {summary['seconds_wall']:.0f} s "
            f"({summary['rollbacks']} rollbacks)")
    return summary, run_cfg, data, records


def feval_curve(records: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(cumulative free-phase F-evals, periodic val CE, step) at each evaluation, from step 0.

    A log record holds its window's mean F-evals per step (``T1``). Steps replayed after a rollback
    are counted again (spent work); the failed partial window, never logged, is not."""
    cum, prev = 0.0, 0
    curve: list[tuple[float, float, int]] = []
    pending: tuple[int, float] | None = None
    for r in records:
        event = r.get("event")
        if event == "rollback":
            prev, pending = int(r["to_step"]), None
        elif event is None and "T1" in r:
            cum += float(r["T1"]) * (r["step"] - prev)
            prev = r["step"]
            if pending is not None and pending[0] == r["step"]:
                curve.append((cum, pending[1], r["step"]))
            pending = None
        elif event is None and "val_ce" in r:
            if r["step"] == 0:
                curve.append((0.0, float(r["val_ce"]), 0))
            else:
                pending = (r["step"], float(r["val_ce"]))
    return curve


def at_budget(curve: list[tuple[float, float, int]], budget: float) -> tuple[float | None, float | None]:
    """(val CE, step) where the cumulative F-evals reach ``budget``, linear between evaluations."""
    for (f0, v0, s0), (f1, v1, s1) in zip(curve, curve[1:], strict=False):
        if f0 <= budget <= f1:
            w = 0.0 if f1 == f0 else (budget - f0) / (f1 - f0)
            return v0 + w * (v1 - v0), s0 + w * (s1 - s0)
    return None, None


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    steps = cfg.steps_or(200)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for task, pair in PAIRS.items():
            runs = []
            for block in pair:
                s, run_cfg, data, records = train_logged(BLOCKS[block], cfg, steps, seed,
                                                         f"attention {block} s{seed}")
                curve = feval_curve(records)
                row = {"block": block, "task": task, "seed": seed, "val_ce": s["val_ce"],
                       "nats_per_char": s.get("nats_per_char"), "rollbacks": s["rollbacks"],
                       "seconds": round(s["seconds"], 1),
                       "total_free_fevals": curve[-1][0] if curve else None,
                       **measure(s["model"], run_cfg, data)}
                runs.append((row, curve))
            totals = [r["total_free_fevals"] for r, _ in runs if r["total_free_fevals"] is not None]
            budget = min(totals) if len(totals) == len(runs) else None
            for row, curve in runs:
                ce, step = at_budget(curve, budget) if budget is not None else (None, None)
                row.update(fevals_budget=budget, val_ce_equal_fevals=ce, step_equal_fevals=step)
                rows.append(row)
    return rows


def _mean(rows: list[dict[str, Any]], block: str, key: str) -> float | None:
    vals = [r[key] for r in rows if r["block"] == block and r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("val_ce", "val CE at equal steps"), ("val_ce_equal_fevals", "val CE at equal free F-evals"),
              ("nats_per_char", "nats/char at equal steps"))
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    tasks = list(PAIRS)
    width = 0.38
    for a, (key, title) in zip(ax, panels, strict=True):
        for j, (kind, color) in enumerate((("free (thick)", "tab:orange"), ("energy", "tab:blue"))):
            xs = [i + (j - 0.5) * width for i in range(len(tasks))]
            hs = [_mean(rows, PAIRS[t][j], key) for t in tasks]
            a.bar(xs, [h if h is not None else 0.0 for h in hs], width, color=color, label=kind)
            for x, h in zip(xs, hs, strict=True):
                if h is not None:
                    a.annotate(f"{h:.3f}", (x, h), ha="center", va="bottom", fontsize=7)
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(hi - lo, 1e-3)
            a.set_ylim(lo - pad, hi + pad)
        a.set_xticks(range(len(tasks)), ["causal LM", "masked tokens (MLM)"][: len(tasks)])
        a.set_xlabel("task")
        a.set_ylabel("nats/char" if key == "nats_per_char" else "val CE (nats/target token)")
        a.set_title(title)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reading(rows: list[dict[str, Any]]) -> str:
    lines = []
    for task, (free, energy) in PAIRS.items():
        m = {(b, k): _mean(rows, b, k) for b in (free, energy)
             for k in ("val_ce", "val_ce_equal_fevals", "total_free_fevals", "cos_ep_implicit_none",
                       "nats_per_char")}
        if m[free, "val_ce"] is None or m[energy, "val_ce"] is None:
            continue

        def f(v: float | None, spec: str = ".4f") -> str:
            return "—" if v is None else format(v, spec)

        lines.append(
            f"{task}: val CE {free} {f(m[free, 'val_ce'])} vs {energy} {f(m[energy, 'val_ce'])} "
            f"at equal steps "
            f"(energy − free {m[energy, 'val_ce'] - m[free, 'val_ce']:+.4f}); at equal free F-evals "
            f"{f(m[free, 'val_ce_equal_fevals'])} vs {f(m[energy, 'val_ce_equal_fevals'])} (totals "
            f"{f(m[free, 'total_free_fevals'], '.0f')} vs {f(m[energy, 'total_free_fevals'], '.0f')}); "
            f"1 − cos without AsymEP {f(_gap(m[free, 'cos_ep_implicit_none']), '.2g')} vs "
            f"{f(_gap(m[energy, 'cos_ep_implicit_none']), '.2g')}.")
    return "\n".join(lines)


def _gap(cos: float | None) -> float | None:
    return None if cos is None else 1.0 - cos


EXPERIMENT = Experiment(
    name="attention",
    question="energy vs free attention at equal steps and equal F-evals, on the causal LM and masked tokens",
    sweep="block", run=run, plot=plot, reading=reading,
    columns=("task", "seed", "val_ce", "nats_per_char", "val_ce_equal_fevals", "step_equal_fevals",
             "total_free_fevals", "fevals_budget", "free_fevals", "cos_ep_implicit", "cos_ep_implicit_none",
             "rho_SinvA", "symmetric_fraction", "seconds"),
)
