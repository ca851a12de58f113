"""benchmarks/stability.py's pareto: each EP run placed by F-evals growth and its gap to BPTT."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def stability():
    return load_benchmark("stability")


def fake_run(root: Path, name: str, mode: str, seed: int, fevals: list[float], val: float | None) -> Path:
    """A run folder with 100 steps logged every 10: T1 (free F-evals) per log line, a final val CE."""
    folder = root / name
    folder.mkdir()
    train = {"steps": 100, "B": 8, "mode": mode, "seed": seed}
    (folder / "config.json").write_text(json.dumps({"train": train}))
    lines = [{"step": 10 * (i + 1), "loss": 4.0, "T1": f, "it_s": 1.0, "dropped_seqs": 0.0}
             for i, f in enumerate(fevals)]
    if val is not None:
        lines.append({"step": 100, "event": "final", "val_ce": val})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_pareto_places_each_finished_ep_run(stability, tmp_path):
    slow = fake_run(tmp_path, "loose_s2_n100", "ep", 2, [20.0] * 9 + [60.0], 3.55)  # 3× its first tenth
    fast = fake_run(tmp_path, "held_s0_n100", "ep", 0, [20.0] * 9 + [26.0], 3.60)
    unfinished = fake_run(tmp_path, "cut_s0_n100", "ep", 0, [20.0] * 10, None)
    bptt = fake_run(tmp_path, "bptt_s0_n100", "bptt", 0, [20.0] * 10, 3.51)
    pts = {p["run"]: p for p in stability.pareto_points([slow, fast, unfinished, bptt], {0: 3.51, 2: 3.49})}
    assert set(pts) == {"loose_s2_n100", "held_s0_n100"}  # BPTT and unfinished runs are not points
    assert pts["loose_s2_n100"]["fevals_growth"] == pytest.approx(3.0)
    assert pts["loose_s2_n100"]["gap"] == pytest.approx(0.06)  # against seed 2's reference
    assert pts["held_s0_n100"]["fevals_growth"] == pytest.approx(1.3)
    assert pts["held_s0_n100"]["recipe"] == "held"
    with pytest.raises(ValueError, match="seed 2"):
        stability.pareto_points([slow], {0: 3.51})


def test_pareto_bad_refs_is_a_usage_error(stability, tmp_path, capsys):
    run = fake_run(tmp_path, "a_s0_n100", "ep", 0, [20.0] * 10, 3.6)
    args = argparse.Namespace(runs=[str(run)], refs="0:3.5", fevals_target=1.5, gap_target=0.05, png=None,
                              json=False)
    assert stability.cmd_pareto(args) == 2
    assert "--refs" in capsys.readouterr().err
    args.refs = "0=3.5"
    assert stability.cmd_pareto(args) == 0
    assert "0 of 1 runs meet both targets" in capsys.readouterr().out  # gap +0.1


def test_the_front_is_titled_by_the_runs_length_only_when_they_share_one(stability):
    same = [{"run": "eig05_s0_n800"}, {"run": "mono_s2_n800"}]
    assert stability.steps_title(same) == " at 800 steps"
    assert stability.steps_title([*same, {"run": "mono_s0_n2000"}]) == ""


def test_every_recipe_is_a_valid_training_config(stability):
    # The record's commands name recipes: a flag renamed or a setting's check tightened since must
    # fail here, not an hour into a rerun. Parsed the way `ept train` parses its own argv.
    from ept.cli import UsageError, build_parser
    from ept.cli.train import _given, resolve_new

    parser = build_parser()
    for name, flags in stability.RECIPES.items():
        args = parser.parse_args(["train", "--steps", "20", "--seed", "1", "--out", "unused", *flags])
        cfg = resolve_new(_given(args))
        assert cfg.train.steps == 20, name
    # ...and a recipe whose settings conflict would be caught, not trained.
    bad = parser.parse_args(["train", "--out", "unused", "--eig_floor", "5", "--eig_dir", "slow"])
    with pytest.raises(UsageError, match="eig_floor"):
        resolve_new(_given(bad))
