"""Data-parallel throughput: N ranks × 1 thread against 1 process × 1 thread, same global batch.

    python benchmarks/distributed.py [--nproc 2] [--steps 40] [--B 16] [--json]

Both runs train the tiny preset from the same seed on the same global batches (``ept train`` and
``torchrun --standalone --nproc_per_node N -m ept train``), side by side in one invocation; the
rate is steps over the training wall time the run reports (start-up, tokenisation and the final
evaluation left out). Also reported: how far the two runs' val CE differ (float32 rounding only).
Needs N free cores to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _train(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd[:6])} …): {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel run")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each run")
    ap.add_argument("--B", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--steps", str(args.steps), "--B", str(args.B), "--eval_every", str(args.steps),
             "--eval_batches", "1", "--sample_tokens", "1", "--threads", "1", "--json"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        one = _train([sys.executable, "-m", "ept", "train", *flags, "--out", f"{tmp}/one"], env)
        many = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.nproc), "-m", "ept", "train", *flags, "--out", f"{tmp}/many"], env)
    for name, r in (("1 process", one), (f"{args.nproc} ranks", many)):
        rows[name] = {"seconds": r["seconds"], "it_s": args.steps / r["seconds"], "val_ce": r["val_ce"]}
    speedup = rows[f"{args.nproc} ranks"]["it_s"] / rows["1 process"]["it_s"]
    record = {"benchmark": "distributed", "nproc": args.nproc, "steps": args.steps, "B": args.B,
              "rows": rows, "speedup": speedup,
              "val_ce_abs_diff": abs(one["val_ce"] - many["val_ce"]),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
              "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    print(f"{'run':<12} {'train s':>8} {'it/s':>7} {'val CE':>8}")
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
