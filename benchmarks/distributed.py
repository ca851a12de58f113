"""Data-parallel throughput: N ranks × 1 thread against 1 process × 1 thread, same global batch.

    python benchmarks/distributed.py [--nproc 2] [--steps 40] [--B 64] [--train_flags "..."] [--json]

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
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--steps", str(args.steps), "--B", str(args.B), "--eval_every", str(args.steps),
             "--eval_batches", "1", "--sample_tokens", "1", "--log_every", str(args.log_every),
             "--threads", "1", "--json", *args.train_flags.split()]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        one = _train([sys.executable, "-m", "ept", "train", *flags, "--out", f"{tmp}/one"], env,
                     Path(tmp, "one"))
        many = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.nproc), "-m", "ept", "train", *flags, "--out", f"{tmp}/many"], env,
                      Path(tmp, "many"))
    for name, r in (("1 process", one), (f"{args.nproc} ranks", many)):
        rows[name] = {"seconds": r["seconds"], "it_s": r["step_it_s"], "val_ce": r["val_ce"]}
    speedup = rows[f"{args.nproc} ranks"]["it_s"] / rows["1 process"]["it_s"]
    record = {"benchmark": "distributed", "nproc": args.nproc, "steps": args.steps, "B": args.B,
              "train_flags": args.train_flags,
              "rows": rows, "speedup": speedup,
              "val_ce_abs_diff": abs(one["val_ce"] - many["val_ce"]),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
              "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    print(f"{'run':<12} {'wall s':>8} {'it/s':>7} {'val CE':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['seconds']:>8.1f} {r['it_s']:>7.2f} {r['val_ce']:>8.4f}")
    print(f"speed-up {speedup:.2f}x on {args.nproc} ranks; |Δ val CE| {record['val_ce_abs_diff']:.2e}")
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
