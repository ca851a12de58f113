"""``ept train --analog PRESET``: the ledger's figures in the JSON summary, refused combinations, and an
exact resume of the devices."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_train import SMALL, _usage_error
from test_train import write_corpus

from ept import checkpoint as ckpt
from ept.cli import main


def test_analog_run_reports_the_write_ledger(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EPT_CACHE", str(tmp_path / "cache"))
    data = write_corpus(tmp_path)
    out = tmp_path / "run"
    code = main(["train", *SMALL, "--data", str(data), "--out", str(out), "--analog", "rram_es", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("val_ce", "writes_total", "writes_max", "writes_p99", "projected_writes_max"):
        assert isinstance(summary[key], (int, float)), key
    steps = summary["steps"]
    assert 0 < summary["writes_max"] <= 31 * steps  # at most one 31-pulse train per device per step
    assert summary["writes_p99"] <= summary["writes_max"]
    assert summary["projected_writes_max"] == summary["writes_max"] / steps * 32_000


def test_analog_flags_are_refused_where_they_do_not_apply(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a run folder would default to ./runs
    data = tmp_path / "missing.txt"
    assert main(["train", *SMALL, "--data", str(data), "--mode", "bptt", "--analog", "ideal"]) == 2
    assert "--mode ep" in capsys.readouterr().err
    assert main(["train", *SMALL, "--out_bits", "6"]) == 2
    assert "without --analog" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- resume
# --wsd 0: the schedule then does not depend on --steps, so a run extended on resume matches one
# started with the longer --steps.
ANALOG = [*SMALL, "--analog", "rram_es", "--wsd", "0", "--json"]


def _train(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *argv]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def analog_runs(tmp_path_factory) -> dict:
    """The same analog run (rram_es: threshold pulses, cycle-to-cycle and write noise, a noisy
    periphery) uninterrupted to step 6, and stopped at step 2 of 4 then resumed with --steps 6."""
    root = tmp_path_factory.mktemp("analog")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPT_CACHE", str(root / "cache"))
        data = write_corpus(root)
        straight, split = root / "straight", root / "split"
        a = _train([*ANALOG, "--data", str(data), "--out", str(straight), "--steps", "6"])
        b1 = _train([*ANALOG, "--data", str(data), "--out", str(split), "--stop_after", "2"])
        b2 = _train(["--resume", str(split), "--steps", "6", "--json"])
    return {"root": root, "straight": straight, "split": split, "a": a, "b1": b1, "b2": b2}


def _state(run: Path) -> tuple[dict, dict, ckpt.Checkpoint]:
    loaded = ckpt.load_checkpoint(run)
    tensors: dict[str, torch.Tensor] = {}
    tree = ckpt.flatten(loaded.state, tensors)
    tree["train"].pop("seconds")  # wall time, the one thing a resume may change
    return tree, tensors, loaded


def _metrics(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "it_s"} for r in recs]


def test_analog_resume_is_bit_identical_to_an_uninterrupted_run(analog_runs) -> None:
    a, b1, b2 = analog_runs["a"], analog_runs["b1"], analog_runs["b2"]
    assert b1["steps"] == 2 and not b1["finished"] and b2["steps"] == 6 and b2["finished"]
    ta, xa, ca = _state(analog_runs["straight"])
    tb, xb, cb = _state(analog_runs["split"])
    assert ca.path.name == cb.path.name == "ckpt-0000006"
    for stem in ("model", "ema"):
        assert ca.weights[stem].keys() == cb.weights[stem].keys()
        for k, v in ca.weights[stem].items():
            assert torch.equal(v, cb.weights[stem][k]), (stem, k)
    # Conductances, sampled device parameters, accumulators, write counters, the ledger and every
    # generator, besides the optimizer and the digital RNGs: all equal, bit for bit.
    tile = "s.analog.substrate.tiles.attn.q.weight"
    for key in (f"{tile}.g", f"{tile}.g_read", f"{tile}.acc", f"{tile}.writes", f"{tile}.dev.scale_up",
                "s.analog.substrate.rng.write", "s.analog.substrate.rng.read",
                "s.analog.ledger.counts.attn.q.weight"):
        assert key in xa, key
    assert xa.keys() == xb.keys()
    for k, v in xa.items():
        assert torch.equal(v, xb[k]), k
    assert ta == tb
    assert int(xa[f"{tile}.writes"].sum()) > 0  # the devices were written: the comparison has teeth
    for key in ("writes_total", "writes_max", "writes_p99", "projected_writes_max", "val_ce", "train_loss",
                "rollbacks"):
        assert a[key] == b2[key], key
    assert _metrics(analog_runs["straight"]) == _metrics(analog_runs["split"])


def test_resume_takes_the_analog_settings_from_the_run_and_refuses_flags(analog_runs, capsys) -> None:
    split = str(analog_runs["split"])
    config = json.loads((analog_runs["split"] / "config.json").read_text())
    assert config["analog"]["preset"] == "rram_es" and config["analog"]["device"]["response"] == "exp_step"
    refused = (["--analog", "ecram"], ["--analog", "rram_es"], ["--out_bits", "6"], ["--analog_seed", "3"])
    for flags in refused:
        line = _usage_error(capsys, ["train", "--resume", split, *flags],
                            f"{flags[0]} cannot change when resuming", "--analog rram_es", "drop it")
        assert len(line) < 240


def test_analog_checkpoint_that_does_not_fit_the_run_is_refused(analog_runs, tmp_path, capsys,
                                                                 monkeypatch) -> None:
    monkeypatch.setenv("EPT_CACHE", str(analog_runs["root"] / "cache"))
    run = tmp_path / "old"
    shutil.copytree(analog_runs["split"], run)
    loaded = ckpt.load_checkpoint(run)
    state = {k: v for k, v in loaded.state.items() if k != "analog"}  # as an ept before device checkpoints
    (run / "latest.json").unlink()
    ckpt.save_checkpoint(run, 6, loaded.weights, state)
    _usage_error(capsys, ["train", "--resume", str(run)], "holds no analog device state", "start a new run")

    # A config.json without its analog section (an analog run of an older ept) resumes as a digital
    # run would: refused on a checkpoint that holds devices, and --analog cannot be added back.
    shutil.rmtree(run)
    shutil.copytree(analog_runs["split"], run)
    config = json.loads((run / "config.json").read_text())
    del config["analog"]
    (run / "config.json").write_text(json.dumps(config))
    _usage_error(capsys, ["train", "--resume", str(run)], "holds the devices of an analog run")
    _usage_error(capsys, ["train", "--resume", str(run), "--analog", "rram_es"], "a digital run")

    config["analog"] = json.loads((analog_runs["split"] / "config.json").read_text())["analog"]
    config["analog"]["device"]["dw_min"] *= 2  # config.json edited after the devices were built
    (run / "config.json").write_text(json.dumps(config))
    _usage_error(capsys, ["train", "--resume", str(run)], "other analog settings", "restore")
