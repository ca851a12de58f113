"""Analog hardware benchmark: step cost, val CE per device preset, converter and read-noise sweeps,
the write ledger and its projection to the seed's 32,000-step recipe.

    python benchmarks/analog.py                 # default run (~15 min on 2 cores)
    python benchmarks/analog.py --steps 10 --quick

Prints a table and, last, one JSON line. Uses its own minimal loop (ept.analog.analog_step with
AdamW) on the embedded corpus, so it needs nothing from the training CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ept.analog import PRESETS, analog_config
from ept.bench.analog import step_time_ratio, train_run
from ept.config import EPConfig, EPTConfig, SolverConfig
from ept.data import get_batch, load_corpus, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--T1", type=int, default=20)
    ap.add_argument("--T2", type=int, default=12)
    ap.add_argument("--hr", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val_batches", type=int, default=4)
    ap.add_argument("--png", default="analog_sweeps.png")
    ap.add_argument("--quick", action="store_true", help="skip the sweeps")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    timing = step_time_ratio(C=args.C, T=64, B=16, vocab=512)
    print(f"step time at C={args.C} T=64 B=16 vocab 512: ideal {timing['ideal_step_s']:.2f}s, rram_es "
          f"{timing['analog_step_s']:.2f}s, ratio {timing['analog_over_ideal_time']:.2f}x", flush=True)

    data = prepare(load_corpus(None), 512)
    model_cfg = EPTConfig(vocab_size=data.vocab_size, C=args.C, H=4, T=args.T)
    solver = SolverConfig(T1=args.T1, t1max=args.T1, res_est=0.0)
    ep = EPConfig(estimator="centred", asym="fixed", T2=args.T2, hr=args.hr)

    def runner(cfg):  # every run sees the same batches and validation windows
        gen = torch.Generator().manual_seed(0)

        def batches():
            return get_batch(data.train, args.B, args.T, gen)

        def val():
            vg = torch.Generator().manual_seed(1)
            return (get_batch(data.valid, args.B, args.T, vg) for _ in range(args.val_batches))

        r = train_run(cfg, model_cfg, batches, val, args.steps, solver, ep, lr=args.lr)
        print(f"  {r['preset']:<22} val CE {r['val_ce_init']:.3f} -> {r['val_ce']:.3f}  writes/device max "
              f"{r['writes_max']} p99 {r['writes_p99']:.0f}  ({r['seconds']:.0f}s)", flush=True)
        return r

    print(f"training {args.steps} steps, B={args.B} T={args.T} C={args.C} (T1={args.T1}, T2={args.T2}, "
          f"hr={args.hr}, AdamW lr={args.lr})")
    presets = {name: runner(analog_config(name)) for name in PRESETS}
    sweeps: dict[str, dict] = {}
    if not args.quick:
        # Forward non-idealities in isolation: exact writes, one converter or noise level at a time.
        sweeps["out_bits"] = {
            b: runner(replace(analog_config("ideal", out_bits=b, out_bound=4.0), preset=f"adc{b}"))["val_ce"]
            for b in (4, 6, 8)
        }
        sweeps["w_noise"] = {
            s: runner(replace(analog_config("ideal", w_noise=s), preset=f"ideal+fnoise{s}"))["val_ce"]
            for s in (0.01, 0.03, 0.1)
        }
        sweeps["w_noise"][0.0] = presets["ideal"]["val_ce"]
        _plot(sweeps, presets["ideal"]["val_ce"], Path(args.png))
        print(f"sweeps: {sweeps}  (plot: {args.png})")

    print(f"\n{'preset':<10} {'val CE':>8} {'writes max':>11} {'p99':>8} {'proj. 32k max':>14}  claim<=1e8")
    for name, r in presets.items():
        print(f"{name:<10} {r['val_ce']:8.3f} {r['writes_max']:11d} {r['writes_p99']:8.0f} "
              f"{r.get('projected_writes_max', 0):14.3g}  {r.get('claim_holds')}")
    for name, r in presets.items():
        print(f"{name}: {r.get('verdict', '')}")
    summary = {
        **timing,
        "val_ce": {k: r["val_ce"] for k, r in presets.items()},
        "writes_max": {k: r["writes_max"] for k, r in presets.items()},
        "writes_p99": {k: r["writes_p99"] for k, r in presets.items()},
        "projected_writes_max": {k: r.get("projected_writes_max") for k, r in presets.items()},
        "claim_holds": all(r.get("claim_holds", True) for r in presets.values()),
        "sweeps": {k: {str(a): b for a, b in v.items()} for k, v in sweeps.items()},
        "steps": args.steps,
    }
    print(json.dumps(summary))
    return 0


def _plot(sweeps: dict, ideal_ce: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "out_bits", "ADC bits (out_bound 4)"),
                           (axes[1], "w_noise", "weight read noise σ_w (--fnoise)")):
        xs = sorted(sweeps[key])
        ax.plot(xs, [sweeps[key][x] for x in xs], "o-", label="analog forward")
        ax.axhline(ideal_ce, color="gray", ls="--", label="ideal")
        ax.set_xlabel(label)
        ax.set_ylabel("val CE")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
