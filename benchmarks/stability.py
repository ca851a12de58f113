"""Does EP train as long as BPTT? The stability levers side by side, from scratch, on the tiny shapes.

    python benchmarks/stability.py run --recipes base,eig05 --seeds 0 --steps 800 --jobs 2
    python benchmarks/stability.py report runs/stab/*_n800 --png docs/experiments/stability_800.png --json

``run`` trains each (recipe, seed) with ``ept train`` (the tiny preset plus the recipe's flags, with
``--diag_cos`` so the operator is measured along the way) into ``--out``/RECIPE_sSEED_nSTEPS, skipping
runs that already finished; ``--jobs`` runs that many at once (one CPU thread each).
``report`` reads run folders' ``metrics.jsonl`` and prints, per run: the final val CE (the whole
valid split), the best periodic one, rollbacks, whether it finished, the worst share of sequences
a log window (10 steps) dropped from EP, the free phase's median F-evals over the first and last
tenth of the run, the lowest cos(EP, implicit) and the last numerical and spectral abscissa the
diagnostics logged. ``--png`` draws the trajectories side by side (val CE, worst free residual,
F-evals, ω(J), cos); ``--json`` ends with one JSON line holding every row; ``--heldout FILE``
adds each run's CE on a text that neither training nor the periodic evaluations (which pick
RUN/best) ever read. ``fevals RUNS`` fits the free phase's log F-evals at the diag points on ω(J)
and the non-normality ||Jv - Jᵀv||/||Jv||: what a contractive operator's free phase slows with.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Each recipe: flags on top of `ept train` (the tiny preset). The study's record says which won.
# The recipes spell out every eigreg setting, so each means what it meant when its runs were made
# (base is the preset before eigreg: --eigreg 0; sched05_m15 is the preset since 2026-12-07).
FIXED = ["--eig_margin_end", "none"]  # the margin held throughout
# Margin 0.5, loosened over the decay to -1 (the preset before) or -1.5 (the preset now).
SCHED05_M1 = ["--eigreg", "1", "--eig_margin", "0.5", "--eig_margin_end", "-1"]
SCHED05_M15 = ["--eigreg", "1", "--eig_margin", "0.5", "--eig_margin_end", "-1.5"]
RECIPES: dict[str, list[str]] = {
    "base": ["--eigreg", "0"],
    "lr15": ["--eigreg", "0", "--lr", "1.5e-3"],
    "c2": ["--eigreg", "0", "--c", "2"],
    "resreg2": ["--eigreg", "0", "--resreg", "2"],
    "jacreg": ["--eigreg", "0", "--jacreg", "0.1", "--jr_floor", "0.1", "--jr_target", "1e-3"],
    "eig05": ["--eigreg", "1", "--eig_margin", "0.5", *FIXED],
    "eig1": ["--eigreg", "1", "--eig_margin", "1.0", *FIXED],
    "eig02": ["--eigreg", "1", "--eig_margin", "0.2", *FIXED],
    "eig0": ["--eigreg", "1", "--eig_margin", "0.0", *FIXED],
    "eigm1": ["--eigreg", "1", "--eig_margin", "-1.0", *FIXED],  # lets ω(J) reach +1: non-normal, still held
    "t1max300": ["--eigreg", "0", "--t1max", "300"],
    "slow05": ["--eigreg", "1", "--eig_margin", "0.5", "--eig_dir", "slow", *FIXED],
    "slow1": ["--eigreg", "1", "--eig_margin", "1.0", "--eig_dir", "slow", *FIXED],
    "slow2": ["--eigreg", "1", "--eig_margin", "2.0", "--eig_dir", "slow", *FIXED],
    "slow1w5": ["--eigreg", "5", "--eig_margin", "1.0", "--eig_dir", "slow", *FIXED],
    "bptt": ["--eigreg", "0", "--mode", "bptt"],
    "bptt_eig05": ["--mode", "bptt", "--eigreg", "1", "--eig_margin", "0.5", *FIXED],
    "bp": ["--mode", "bp"],
    "c025": ["--eigreg", "1", "--eig_margin", "0.5", "--c", "0.25", *FIXED],  # the damping experiment's best
    "bptt_c025": ["--eigreg", "0", "--mode", "bptt", "--c", "0.25"],
    "sched05_0": ["--eigreg", "1", "--eig_margin", "0.5", "--eig_margin_end", "0"],  # 0.5 → 0 over the decay
    "sched05_m1": SCHED05_M1,
    "sched05_m15": SCHED05_M15,
    # A looser hold while the learning rate is high (eig02 fixed was 0.02 better than eig05 on seed 2).
    "sched02_m15": ["--eigreg", "1", "--eig_margin", "0.2", "--eig_margin_end", "-1.5"],
    # The same, each rollback tightening the margin by 0.5 for the rest of the run.
    "sched02_m15_backoff": ["--eigreg", "1", "--eig_margin", "0.2", "--eig_margin_end", "-1.5",
                            "--eig_backoff", "0.5"],
    # The preset's free phase by Anderson (memory 16) from z = 0 straight to 1e-6: 0.78-0.88x the
    # heavy ball's F-evals on the preset's operators (benchmarks/free_phase.py).
    "sched05_m15_anderson16": [*SCHED05_M15, "--solver", "anderson", "--m", "16", "--lam", "1e-4",
                               "--T1", "1", "--res_est", "1e-6"],
    # The same memory in the preset's two stages (20 steps at least to 1e-3, then the polish).
    "sched05_m15_anderson16_t20": [*SCHED05_M15, "--solver", "anderson", "--m", "16", "--lam", "1e-4"],
    "sched05_m2": ["--eigreg", "1", "--eig_margin", "0.5", "--eig_margin_end", "-2"],
    # eigreg every 4th step at 4x the weight: its Lanczos steps are a quarter of an EP step's cost.
    "sched05_m15_every4": [*SCHED05_M15, "--eig_every", "4"],
    # The preset, rolled back only when the batch's mean free residual passes 1 (not 0.1): one
    # sequence of eight with no equilibrium (which EP leaves out) no longer halves the lr.
    "sched05_m1_div1": [*SCHED05_M1, "--div_res", "1"],
    # The preset with jacreg's controller on top: eigreg holds the top of J's symmetric part, jacreg
    # its Frobenius norm (the stiffness that slows the free phase), raised while the residual is high.
    "sched05_m1_jac": [*SCHED05_M1, "--jacreg", "0.1", "--jr_floor", "0.1", "--jr_target", "1e-3"],
    # eigreg's floor on the bottom of (J+J')/2 as well: the free phase's F-evals follow the spread of
    # J's spectrum (a trained operator's runs from -5 to -0.4, an initial one's sits at -(1+c)).
    "sched05_m1_floor3": [*SCHED05_M1, "--eig_floor", "3"],
    "sched05_m1_floor5": [*SCHED05_M1, "--eig_floor", "5"],
    "eig05_floor5": ["--eigreg", "1", "--eig_margin", "0.5", *FIXED, "--eig_floor", "5"],
    # Margin 0 held throughout was the front's middle at 2000 steps (1.90-2.05x, +0.05); the floor
    # took margin 0.5 from 2.18x to 1.31x at the same loss.
    "eig0_floor5": ["--eigreg", "1", "--eig_margin", "0.0", *FIXED, "--eig_floor", "5"],
    # The block itself as the lever: mono is strongly monotone for every weight (its relaxation
    # contracts by a fixed factor, so training cannot create slow modes); energy is F = -grad E,
    # whose per-token blocks are symmetric (where the thick block's non-normality lives).
    "mono": ["--attn_mode", "mono", "--eigreg", "0"],
    "mono_m025": ["--attn_mode", "mono", "--mono_m", "0.25", "--eigreg", "0"],
    "energy_sched": ["--attn_mode", "energy", *SCHED05_M15],
    # The thick block with its FFN bounded (no LayerNorm, spectral norms scaled to a Lipschitz budget):
    # at step 1700 the preset's FFN alone brings J's spectrum to -0.52, attention alone to -1.39.
    "sched05_m15_ffnlip1": [*SCHED05_M15, "--ffn_lip", "1"],
    "sched05_m15_ffnlip2": [*SCHED05_M15, "--ffn_lip", "2"],
    # The FFN tied (W2 = W1^T, on z without LN2): a symmetric per-token Jacobian, whose top eigreg
    # reads exactly, and no FFN non-normality to slow the free phase at a held abscissa.
    "sched05_m15_ffntied": [*SCHED05_M15, "--ffn_tied"],
    "sched05_m15_ffntied_lip2": [*SCHED05_M15, "--ffn_tied", "--ffn_lip", "2"],
}


def run_name(recipe: str, seed: int, steps: int) -> str:
    return f"{recipe}_s{seed}_n{steps}"


def finished(folder: Path) -> bool:
    path = folder / "metrics.jsonl"
    return path.is_file() and any(json.loads(line).get("event") == "final" for line in path.open())


def train_one(recipe: str, seed: int, steps: int, out: Path, diag: int) -> tuple[str, int, float]:
    folder = out / run_name(recipe, seed, steps)
    if finished(folder):
        return folder.name, 0, 0.0
    diag_flags = [] if "bp" in RECIPES[recipe] else ["--diag_cos", str(diag)]
    cmd = [sys.executable, "-m", "ept", "train", "--steps", str(steps), "--seed", str(seed), "--threads", "1",
           "--out", str(folder), "--keep", "3", *diag_flags, *RECIPES[recipe]]
    t0 = time.time()
    with open(out / f"{folder.name}.log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    return folder.name, rc, time.time() - t0


def cmd_run(args: argparse.Namespace) -> int:
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        print(f"stability: unknown recipe {unknown[0]!r}: choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(r, int(s), args.steps) for s in args.seeds.split(",") for r in recipes]
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, rc, sec in pool.map(lambda j: train_one(*j, out, args.diag), jobs):
            print(f"{name}: exit {rc}, {sec:.0f} s", flush=True)
    return 0


# ------------------------------------------------------------------------------------- report


def run_folders(paths: list[str]) -> list[Path]:
    """The given paths that are run folders (they hold a metrics.jsonl)."""
    return [Path(f) for f in paths if (Path(f) / "metrics.jsonl").is_file()]


def read(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]


def series(records: list[dict], key: str, event: str | None = None) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records
           if r.get("event") == event and r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def summarize(folder: Path) -> dict[str, Any]:
    recs = read(folder)
    cfg = json.loads((folder / "config.json").read_text())
    steps, B = cfg["train"]["steps"], cfg["train"]["B"]
    logs = [r for r in recs if r.get("event") is None and "loss" in r]
    final = next((r for r in recs if r.get("event") == "final"), None)
    vx, vy = series(recs, "val_ce")
    fx, fe = series(logs, "T1")
    tenth = max(steps // 10, 1)
    first = [f for s, f in zip(fx, fe, strict=True) if s <= tenth]
    last = [f for s, f in zip(fx, fe, strict=True) if s > steps - tenth]
    drops = [r.get("dropped_seqs", 0.0) for r in logs]  # a log window's mean over its steps
    _, cos = series(recs, "cos_ep_implicit", "diag")
    _, omega = series(recs, "numerical_abscissa", "diag")
    _, alpha = series(recs, "spectral_abscissa", "diag")
    row = {
        "run": folder.name, "mode": cfg["train"]["mode"], "seed": cfg["train"]["seed"], "steps": steps,
        "finished": final is not None, "last_step": logs[-1]["step"] if logs else 0,
        "rollbacks": sum(r.get("event") == "rollback" for r in recs),
        "val_ce_final": final["val_ce"] if final else None,
        "val_ce_best": min(vy) if vy else None,
        "worst_dropped_share": max(drops) / B if drops else None,
        "fevals_first_tenth": statistics.median(first) if first else None,
        "fevals_last_tenth": statistics.median(last) if last else None,
        "cos_ep_implicit_min": min(cos) if cos else None,
        "numerical_abscissa_last": omega[-1] if omega else None,
        "spectral_abscissa_last": alpha[-1] if alpha else None,
    }
    prev, seconds = 0, 0.0
    for r in logs:  # each window's steps at its own rate (a rollback restarts the count)
        if r["step"] > prev and r.get("it_s"):
            seconds += (r["step"] - prev) / r["it_s"]
        prev = r["step"]
    row["train_seconds"] = round(seconds, 1)
    if row["fevals_first_tenth"] and row["fevals_last_tenth"]:
        row["fevals_growth"] = row["fevals_last_tenth"] / row["fevals_first_tenth"]
    return row


def heldout_ce(folder: Path, text: str) -> float | None:
    """CE of the run's final weights on a text it never trained or selected on (``ept eval``)."""
    cmd = [sys.executable, "-m", "ept", "eval", "--ckpt", str(folder), "--data", text, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["val_ce"]


def plot(folders: list[Path], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("val_ce", None, "val CE (nats)", False),
              ("free_residual_max", None, "worst free residual", True),
              ("T1", None, "free-phase F-evals", False), ("numerical_abscissa", "diag", "ω(J)", False),
              ("spectral_abscissa", "diag", "spectral abscissa", False),
              ("cos_ep_implicit", "diag", "cos(EP, implicit)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for folder in folders:
        recs = read(folder)
        for ax, (key, event, label, log) in zip(axes.flat, panels, strict=True):
            xs, ys = series(recs if key != "T1" else [r for r in recs if "loss" in r], key, event)
            if key == "val_ce":
                pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y < 8]  # a blown-up eval off the axis
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if xs:
                (ax.semilogy if log else ax.plot)(xs, ys, label=folder.name, lw=1.2)
            ax.set(xlabel="step", title=label)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> int:
    folders = run_folders(args.runs)
    rows = [summarize(f) for f in folders]
    if args.heldout:
        for row, f in zip(rows, folders, strict=True):
            row["heldout_ce"] = heldout_ce(f, args.heldout) if row["finished"] else None
    cols = ["run", "finished", "rollbacks", "val_ce_final", "val_ce_best",
            "worst_dropped_share",
            "fevals_first_tenth", "fevals_last_tenth", "cos_ep_implicit_min", "numerical_abscissa_last",
            "spectral_abscissa_last", "train_seconds", *(["heldout_ce"] if args.heldout else [])]

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    if args.png:
        plot(folders, args.png)
        print(f"wrote {args.png}")
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


def cmd_fevals(args: argparse.Namespace) -> int:
    """What the free phase's cost follows: log F-evals (T1) at each diag point, least squares on the
    operator's numerical abscissa ω(J) and its non-normality ||Jv - Jᵀv||/||Jv||, over the runs."""
    import numpy as np

    pts = []
    for folder in run_folders(args.runs):
        recs = read(folder)
        t1 = {r["step"]: r["T1"] for r in recs if r.get("event") is None and "T1" in r}
        pts += [(t1[r["step"]], r["numerical_abscissa"], r["nonnormality"]) for r in recs
                if r.get("event") == "diag" and r["step"] in t1 and r.get("nonnormality") is not None]
    if len(pts) < 4:
        print("stability: fewer than 4 diag points with F-evals: give EP runs made with --diag_cos",
              file=sys.stderr)
        return 2
    x = np.array(pts, dtype=float)
    y = np.log(x[:, 0])

    def fit(cols: list[int]) -> tuple[np.ndarray, float]:
        a = np.c_[np.ones(len(x)), x[:, cols]]
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        return coef, float(1 - ((y - a @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    (c0, c_omega, c_nn), r2 = fit([1, 2])
    out = {"points": len(x), "intercept": c0, "per_omega": c_omega, "per_nonnormality": c_nn, "r2": r2,
           "r2_omega_alone": fit([1])[1], "r2_nonnormality_alone": fit([2])[1]}
    print(f"log F-evals = {c0:.2f} + {c_omega:.2f}·ω(J) + {c_nn:.2f}·non-normality   "
          f"(R² {r2:.2f}; ω alone {out['r2_omega_alone']:.2f}, non-normality alone "
          f"{out['r2_nonnormality_alone']:.2f}; {len(x)} diag points)")
    if args.json:
        print(json.dumps(out))
    return 0


def recipe_of(run: str) -> str:
    """A run folder's recipe: its name without the ``_s<seed>_n<steps>`` tail."""
    return re.sub(r"_s\d+_n\d+$", "", run)


def pareto_points(folders: list[Path], refs: dict[int, float]) -> list[dict[str, Any]]:
    """(recipe, seed, F-evals growth, val CE over the seed's BPTT reference) of each finished EP run."""
    pts = []
    for row in map(summarize, folders):
        if row["mode"] != "ep" or not row["finished"] or row.get("fevals_growth") is None:
            continue
        if row["seed"] not in refs:
            raise ValueError(f"no BPTT reference for seed {row['seed']} (run {row['run']}): add it to --refs")
        pts.append({"run": row["run"], "recipe": recipe_of(row["run"]), "seed": row["seed"],
                    "fevals_growth": row["fevals_growth"], "gap": row["val_ce_final"] - refs[row["seed"]],
                    "rollbacks": row["rollbacks"], "worst_dropped_share": row["worst_dropped_share"]})
    return pts


def steps_title(pts: list[dict[str, Any]]) -> str:
    """The title's ' at N steps' when every run has the same length (its folder's ``_nN`` tail)."""
    steps = {m.group(1) for p in pts if (m := re.search(r"_n(\d+)$", p["run"]))}
    return f" at {steps.pop()} steps" if len(steps) == 1 else ""


def plot_pareto(pts: list[dict[str, Any]], path: str, fevals_target: float, gap_target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    recipes = sorted({p["recipe"] for p in pts})
    markers = "osD^v<>P*Xh"
    for i, rec in enumerate(recipes):
        mine = [p for p in pts if p["recipe"] == rec]
        ax.scatter([p["fevals_growth"] for p in mine], [p["gap"] for p in mine], s=40,
                   marker=markers[i % len(markers)], color=plt.cm.tab20(i % 20), label=rec)
    ax.fill_between([0, fevals_target], -1, gap_target, color="tab:green", alpha=0.12,
                    label=f"targets: F-evals ≤ {fevals_target}×, EP ≤ BPTT + {gap_target}")
    xs, ys = [p["fevals_growth"] for p in pts], [p["gap"] for p in pts]
    ax.set(xlim=(min(1.0, min(xs) - 0.1), max(xs) + 0.2), ylim=(min(-0.01, min(ys) - 0.01), max(ys) + 0.01),
           xlabel="free-phase F-evals, last tenth / first tenth (median)",
           ylabel="val CE − BPTT's (same seed, same steps)",
           title=f"EP{steps_title(pts)}: the free phase's cost against the loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_pareto(args: argparse.Namespace) -> int:
    """Where each EP run sits between the two targets that trade: F-evals growth and the gap to BPTT."""
    try:
        refs = {int(k): float(v) for k, v in (kv.split("=") for kv in args.refs.split(","))}
    except ValueError:
        print(f"stability: --refs {args.refs!r} is not SEED=CE[,SEED=CE...]: e.g. --refs 0=3.513,1=3.496",
              file=sys.stderr)
        return 2
    folders = run_folders(args.runs)
    try:
        pts = pareto_points(folders, refs)
    except ValueError as err:
        print(f"stability: {err}", file=sys.stderr)
        return 2
    if not pts:
        print("stability: no finished EP run among the folders given", file=sys.stderr)
        return 2
    both = [p for p in pts if p["fevals_growth"] <= args.fevals_target and p["gap"] <= args.gap_target]
    print("| run | F-evals growth | val CE − BPTT | rollbacks | worst window dropped |")
    print("|---|---|---|---|---|")
    for p in sorted(pts, key=lambda p: p["gap"]):
        print(f"| {p['run']} | {p['fevals_growth']:.2f}× | {p['gap']:+.3f} | {p['rollbacks']} | "
              f"{100 * p['worst_dropped_share']:.1f}% |")
    print(f"{len(both)} of {len(pts)} runs meet both targets")
    if args.png:
        plot_pareto(pts, args.png, args.fevals_target, args.gap_target)
        print(f"wrote {args.png}")
    if args.json:
        print(json.dumps({"points": pts, "meet_both": [p["run"] for p in both]}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the recipes")
    r.add_argument("--recipes", default="base", help=f"comma-separated: {', '.join(RECIPES)}")
    r.add_argument("--seeds", default="0")
    r.add_argument("--steps", type=int, default=800)
    r.add_argument("--out", default="runs/stab")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    r.add_argument("--diag", type=int, default=100, help="--diag_cos interval")
    r.set_defaults(func=cmd_run)
    f = sub.add_parser("fevals", help="fit the free phase's F-evals on ω(J) and non-normality")
    f.add_argument("runs", nargs="+")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fevals)
    pp = sub.add_parser("pareto", help="F-evals growth against the gap to BPTT, per EP run (a PNG)")
    pp.add_argument("runs", nargs="+")
    pp.add_argument("--refs", required=True, metavar="SEED=CE,...",
                    help="BPTT's final val CE per seed at the runs' steps, e.g. 0=3.513,1=3.496,2=3.494")
    pp.add_argument("--fevals_target", type=float, default=1.5)
    pp.add_argument("--gap_target", type=float, default=0.05)
    pp.add_argument("--png", default=None)
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_pareto)
    q = sub.add_parser("report", help="summarise run folders")
    q.add_argument("runs", nargs="+")
    q.add_argument("--png", default=None)
    q.add_argument("--json", action="store_true")
    q.add_argument("--heldout", default=None, metavar="FILE",
                   help="also evaluate each finished run on this text (ept eval), e.g. the valid split's "
                        "Twelfth Night (docs/experiments/stability.md says how to cut it out)")
    q.set_defaults(func=cmd_report)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
