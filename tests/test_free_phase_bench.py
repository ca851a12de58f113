"""benchmarks/free_phase.py: a training step's own free phase against other solvers, on a trained run."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

from ept.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def free_phase_bench():
    return load_benchmark("free_phase")


def test_the_runs_own_stages_count_as_a_variant_and_an_unsettled_one_is_charged(free_phase_bench, corpus_file,
                                                                                 tmp_path):
    run = tmp_path / "r"
    small = "--C 16 --H 2 --T 16 --B 4 --steps 2 --vocab_size 300 --lr 1e-3 --warmup 0 --log_every 1 " \
            "--eval_every 2 --eval_batches 1 --ckpt_every 2 --sample_tokens 4 --threads 1"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), *small.split()]) == 0
    variants = {"same": {"ep": {}}, "one_step": {"method": "momentum", "t1max": 1}}
    out = free_phase_bench.run_batches(str(run), variants, batches=2, max_evals=50)
    assert out["target"] == 1e-6  # the tiny preset's polish_res
    for b in out["batches"]:
        assert b["same"] == b["run_solver"]  # the variant path runs exactly a training step's stages
        fevals, res = b["one_step"]
        assert fevals == 1 and res > out["target"]  # one step from z = 0 settles nothing
    assert out["settled_batches"] == 2
    assert out["totals"]["one_step"] == 2 and out["totals"]["same"] == out["totals"]["run_solver"] > 2
