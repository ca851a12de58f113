"""Data-parallel throughput: N ranks × 1 thread against 1 process × 1 thread, same global batch.

    python benchmarks/distributed.py [--nproc 2] [--steps 40] [--B 64] [--train_flags "..."]
        [--versus "--no-hold_memory"] [--repeats 3] [--json]

Both runs train the tiny preset from the same seed on the same global batches (``ept train`` and
``torchrun --standalone --nproc_per_node N -m ept train``), side by side in one invocation. The
rate is the training steps' own: steps over the time of the logged windows (``it_s`` in
``metrics.jsonl``), leaving out the first window (warm-up) and the last (it holds the closing
evaluation, which rank 0 runs alone). Also reported: each run's wall time as ``ept train`` reports
it, and how far the two runs' val CE differ (float32 rounding only). Needs N free cores to mean
anything; at the tiny shapes a rank's slice must stay large enough to amortise the per-step
overhead of many small kernels (B 16 → 8 per rank scales 1.5x at best on this CPU, B 64 → 32 2.1x).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _train(cmd: list[str], env: dict[str, str], run: Path) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd[:6])} …): {out.stderr.strip()[-400:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["step_it_s"] = step_rate(run / "metrics.jsonl")
    return summary


def step_rate(metrics: Path) -> float:
    """Steps per second over the logged windows but the first and the last."""
    windows = [json.loads(line) for line in metrics.read_text().splitlines()]
    windows = [w for w in windows if "it_s" in w]
    if len(windows) < 3:
        raise SystemExit("too few logged windows to time: raise --steps or lower --log_every")
    timed = [(w["step"] - prev["step"], w["it_s"]) for prev, w in itertools.pairwise(windows[:-1])]
    return sum(n for n, _ in timed) / sum(n / rate for n, rate in timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel run")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each run")
    ap.add_argument("--log_every", type=int, default=5, help="steps per timed window")
    ap.add_argument("--B", type=int, default=64, help="global batch (sequences)")
    ap.add_argument("--train_flags", default="", help="more flags for both runs, e.g. '--no-hold_memory'")
    ap.add_argument("--versus", default="", help="flags of a second condition timed alongside, each repeat "
                    "running both: e.g. '--no-hold_memory'")
    ap.add_argument("--repeats", type=int, default=1, help="alternating repeats; the figure is their median")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--steps", str(args.steps), "--B", str(args.B), "--eval_every", str(args.steps),
             "--eval_batches", "1", "--sample_tokens", "1", "--log_every", str(args.log_every),
             "--threads", "1", "--json", *args.train_flags.split()]
    conditions = {"": flags}
    if args.versus:
        conditions[args.versus] = [*flags, *args.versus.split()]
    many_name = f"{args.nproc} ranks"
    trials: dict[str, list[dict]] = {c: [] for c in conditions}
    # Repeats alternate the runs, so a slow minute of a shared host falls on both alike; the
    # median speed-up of the repeats is the figure.
    with tempfile.TemporaryDirectory() as tmp:
        for r, (cond, cflags) in itertools.product(range(args.repeats), conditions.items()):
            tag = f"{r}{'v' if cond else ''}"
            one = _train([sys.executable, "-m", "ept", "train", *cflags, "--out", f"{tmp}/one{tag}"], env,
                         Path(tmp, f"one{tag}"))
            many = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(args.nproc), "-m", "ept", "train", *cflags, "--out", f"{tmp}/many{tag}"], env,
                          Path(tmp, f"many{tag}"))
            trials[cond].append({
                "1 process": {"seconds": one["seconds"], "it_s": one["step_it_s"], "val_ce": one["val_ce"]},
                many_name: {"seconds": many["seconds"], "it_s": many["step_it_s"], "val_ce": many["val_ce"]},
                "speedup": many["step_it_s"] / one["step_it_s"],
                "val_ce_abs_diff": abs(one["val_ce"] - many["val_ce"])})
    record = {"benchmark": "distributed", "nproc": args.nproc, "steps": args.steps, "B": args.B,
              "train_flags": args.train_flags, "repeats": args.repeats,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
              "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    print(f"{'flags':<18} {'repeat':>6} {'1 proc it/s':>12} {f'{many_name} it/s':>13} {'speed-up':>9} "
          f"{'|Δ val CE|':>11}")
    for cond, runs in trials.items():
        speedup = statistics.median(t["speedup"] for t in runs)
        key = "versus" if cond else "result"
        record[key] = {"flags": cond, "speedup": speedup, "trials": runs}
        for i, t in enumerate(runs):
            one, many = t["1 process"]["it_s"], t[many_name]["it_s"]
            print(f"{cond or '(as given)':<18} {i:>6} {one:>12.3f} {many:>13.3f} {t['speedup']:>8.2f}x "
                  f"{t['val_ce_abs_diff']:>11.1e}")
        print(f"{cond or '(as given)':<18} median speed-up {speedup:.2f}x on {args.nproc} ranks")
    record["speedup"] = record["result"]["speedup"]
    if args.json:
        print(json.dumps(record))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
