"""One rank of a data-parallel training run, for tests/test_distributed.py (not a test itself).

    python tests/dist_worker.py SPEC.json      # RANK / WORLD_SIZE / MASTER_* in the environment

SPEC: {"out": weights file, "run": run folder or null, "flags": preset flags, "dtype": "float64",
"drop": [step, global row] (that row's free residual is inflated past drop_res at that step),
"diverge": [step, rank] (that rank's free phase reports a blow-up at that step), "stop_after": N,
"resume": bool}. Rank 0 writes the final weights to SPEC["out"] (safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import ept.grad.ep as ep_module
from ept.data import builtin_tokens
from ept.distributed import init_from_env, shard
from ept.presets import resolve
from ept.train import train


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    if spec.get("dtype") == "float64":
        torch.set_default_dtype(torch.float64)
    group = init_from_env("cpu", timeout_s=spec.get("timeout", 60))
    cfg = resolve("tiny", spec["flags"])
    data = builtin_tokens(cfg.model.vocab_size)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
    rows = shard(cfg.train.B, group) if group.world > 1 else slice(0, cfg.train.B)
    calls = {"n": 0}
    free_phase = ep_module.free_phase

    def faulty_free_phase(model, x, solver, z0=None):  # the free phase proper (z0 None), not polish
        z, stats = free_phase(model, x, solver, z0)
        if z0 is not None:
            return z, stats
        calls["n"] += 1
        drop, diverge = spec.get("drop"), spec.get("diverge")
        if drop and calls["n"] == drop[0] and rows.start <= drop[1] < rows.stop:
            res = stats.residual_per_seq.clone()
            res[drop[1] - rows.start] = 1e9
            stats = dataclasses.replace(stats, residual_per_seq=res)
        if diverge and calls["n"] == diverge[0] and group.rank == diverge[1]:
            stats = dataclasses.replace(stats, diverged=True)
        return z, stats

    ep_module.free_phase = faulty_free_phase
    run = Path(spec["run"]) if spec.get("run") else None
    if run is not None and not spec.get("resume") and group.is_main:
        run.mkdir(parents=True, exist_ok=True)
    group.barrier()
    summary = train(cfg, data, run, resume=bool(spec.get("resume")), stop_after=spec.get("stop_after"),
                    log=lambda msg: None, group=group)
    if group.is_main:
        model = summary["model"]
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, spec["out"])
        Path(spec["out"] + ".json").write_text(json.dumps(
            {"rollbacks": summary["rollbacks"], "steps": summary["steps"], "calls": calls["n"]}))
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
