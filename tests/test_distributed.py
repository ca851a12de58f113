"""Data-parallel EP on torch.distributed (gloo on 127.0.0.1): N ranks × B/N train what 1 × B does.

Each rank is a separate process (tests/dist_worker.py for the library route, ``torchrun -m ept`` for
the CLI); the tests compare weights across launches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("dist_worker.py")
# A small tiny-preset model, so a launch costs seconds.
FLAGS = {"C": 32, "H": 2, "T": 16, "B": 4, "vocab_size": 512, "steps": 6, "eval_every": 3,
         "eval_batches": 1, "log_every": 1, "warmup": 1, "sample_tokens": 4, "ckpt_every": 1}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if world > 1:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return env


def _spawn(path: Path, world: int, port: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, str(WORKER), str(path)], env=_env(r, world, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def launch(tmp: Path, name: str, world: int, **spec) -> dict[str, torch.Tensor]:
    """Train with ``world`` worker processes; the final weights rank 0 wrote."""
    out = tmp / f"{name}.safetensors"
    spec = {"out": str(out), "flags": FLAGS, **spec}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    procs = _spawn(path, world, _port())
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    return load_file(out)


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float(b[k].double().norm() ** 2) for k in a)
    return (num / den) ** 0.5


def test_two_ranks_train_what_one_does_through_a_drop_and_a_rollback_float64(tmp_path):
    # Step 2: global row 1 (rank 0's) misses drop_res, so only rank 0 drops a sequence; call 4: rank
    # 1's free phase alone blows up, so the step rolls back on both.
    one = launch(tmp_path, "one", 1, dtype="float64", drop=[2, 1], diverge=[4, 0])
    run = tmp_path / "run2"
    two = launch(tmp_path, "two", 2, dtype="float64", drop=[2, 1], diverge=[4, 1], run=str(run))
    assert rel_diff(two, one) <= 1e-10
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("dropped_seqs", 0) == 1 for r in records)
    assert [r["step"] for r in records if r.get("event") == "rollback"] == [3]
    # The faults changed the run: without them the weights differ.
    clean = launch(tmp_path, "clean", 1, dtype="float64")
    assert rel_diff(clean, one) > 1e-6


def test_two_ranks_float32_within_rounding_and_only_rank_zero_writes(tmp_path):
    # float32 rounding differs with the per-rank batch (1.5e-9 after one step) and training amplifies
    # it, Adam most on near-zero gradients: 1e-6 after 3 steps, 1.5e-5 after 6. Four steps here.
    flags = {**FLAGS, "steps": 4}
    one = launch(tmp_path, "one", 1, flags=flags)
    run = tmp_path / "run2"
    two = launch(tmp_path, "two", 2, run=str(run), flags=flags)
    assert rel_diff(two, one) <= 1e-5
    assert (run / "metrics.jsonl").is_file() and (run / "latest.json").is_file()
    # One writer: every metrics record once (a second writer would duplicate them).
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) == list(range(1, flags["steps"] + 1))


def _torchrun(args: list[str], tmp: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ept", *args]
    env = _env(0, 1, 0)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp)


CLI = ["--C", "32", "--H", "2", "--T", "16", "--B", "4", "--vocab_size", "512", "--steps", "4",
       "--eval_every", "2", "--eval_batches", "1", "--sample_tokens", "4", "--ckpt_every", "1",
       "--threads", "1"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run / "latest.json").read_text())
    return load_file(run / latest["checkpoint"] / "model.safetensors")


def test_torchrun_resume_of_a_two_rank_run_is_bit_identical(tmp_path):
    whole = _torchrun(["train", *CLI, "--out", str(tmp_path / "whole")], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    part = _torchrun(["train", *CLI, "--out", str(tmp_path / "part"), "--stop_after", "2"], tmp_path)
    assert part.returncode == 0, part.stderr[-2000:]
    rest = _torchrun(["train", "--resume", str(tmp_path / "part")], tmp_path)
    assert rest.returncode == 0, rest.stderr[-2000:]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.stdout.count("done at step 4") == 1  # rank 0 alone reports


def test_a_batch_the_ranks_cannot_split_is_one_line_exit_2(tmp_path):
    bad = [*CLI]
    bad[bad.index("--B") + 1] = "3"
    r = _torchrun(["train", *bad, "--out", str(tmp_path / "odd")], tmp_path)
    assert r.returncode != 0
    assert "--B 3 is not divisible by the 2 ranks" in r.stderr


def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path):
    spec = {"out": str(tmp_path / "w.safetensors"), "flags": {**FLAGS, "steps": 400}, "timeout": 20,
            "run": str(tmp_path / "run")}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    procs = _spawn(path, 2, _port())
    latest = tmp_path / "run" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert latest.exists()
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0 and time.time() - t0 < 60
    assert "a peer rank stopped" in err
    # The last good checkpoint is intact: it loads.
    from ept import checkpoint as ckpt

    assert ckpt.load_checkpoint(tmp_path / "run").state["train"]["step"] >= 1
