"""``ept train --analog PRESET``: the ledger's figures in the JSON summary, refused combinations, an
exact resume of the devices, --analog_seed, a warm start programmed into the devices, and a rollback
that reprograms them."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from test_cli_train import SMALL, _usage_error
from test_train import quiet, small_cfg

import ept.train as tr
from ept import checkpoint as ckpt
from ept.analog import AnalogConfig, analog_config
from ept.cli import main
from ept.data import load_corpus, prepare
from ept.model import EquilibriumLM


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
    assert main(["train", *SMALL, "--analog_seed", "3"]) == 2
    assert "--analog_seed set without --analog" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- resume
# --wsd 0: the schedule then does not depend on --steps, so a run extended on resume matches one
# started with the longer --steps. --analog_seed differs from --seed: a resume that rebuilt the devices
# from --seed would draw another read-noise pool and be refused.
ANALOG = [*SMALL, "--analog", "rram_es", "--analog_seed", "7", "--wsd", "0", "--json"]


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
    assert config["analog"]["seed"] == 7  # what --resume rebuilds the devices from
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


# ------------------------------------------------------------------ the library: seed, warm start, rollback
@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return prepare(load_corpus(write_corpus(tmp_path_factory.mktemp("corpus"))), 300)


def _spy_devices(monkeypatch) -> list[dict]:
    """Each train() call's Session and AnalogSession, and the model's weights just before the devices
    were built."""
    seen: list[dict] = []
    real = tr.analog_session

    def spy(s, analog, update=None):
        before = {k: v.clone() for k, v in s.model.state_dict().items()}
        out = real(s, analog, update)
        seen.append({"session": s, "devices": out[2], "before": before})
        return out

    monkeypatch.setattr(tr, "analog_session", spy)
    return seen


def test_an_analog_config_without_a_seed_takes_the_runs() -> None:
    assert AnalogConfig().device_seed(5) == 5 and analog_config("ecram", seed=7).device_seed(5) == 7
    legacy = analog_config("rram_es").to_dict()
    del legacy["seed"]  # a config.json written before --analog_seed was saved
    assert AnalogConfig.from_dict(legacy) == analog_config("rram_es")


@pytest.mark.usefixtures("one_thread")
def test_analog_seed_draws_other_devices_from_the_same_init_and_data(tokens, monkeypatch) -> None:
    seen = _spy_devices(monkeypatch)
    batches: list[list[torch.Tensor]] = []
    real_batch = tr.get_batch
    monkeypatch.setattr(tr, "get_batch",
                        lambda *a, **k: batches[-1].append(real_batch(*a, **k)) or batches[-1][-1])
    for analog_seed in (0, 7):
        batches.append([])
        tr.train(small_cfg(tokens), tokens, analog=analog_config("rram_es", seed=analog_seed), stop_after=1,
                 log=quiet)
    a, b = seen
    for k, v in a["before"].items():  # --seed alone sets the initial weights ...
        assert torch.equal(v, b["before"][k]), k
    for x, y in zip(batches[0][0], batches[1][0], strict=True):  # ... and the data order
        assert torch.equal(x, y)
    for name, ta in a["devices"].substrate.tiles.items():
        tb = b["devices"].substrate.tiles[name]
        assert ta.scale == tb.scale  # the same initial weights map to the same conductance scale
        assert not torch.equal(ta.dev.scale_up, tb.dev.scale_up), name  # other device-to-device variation
        assert not torch.equal(ta.dev.bound_max, tb.dev.bound_max), name
    noise = [x["devices"].substrate.noise.fingerprint() for x in seen]
    assert noise[0] != noise[1]  # and other read noise


@pytest.fixture(scope="module")
def warm(tokens, tmp_path_factory) -> dict[str, torch.Tensor]:
    """A tiny trained checkpoint from another --seed than the runs it warm-starts (seed 0), so its
    weights are far from their random init."""
    run = tmp_path_factory.mktemp("warm")
    tr.train(small_cfg(tokens, mode="bp", seed=1, steps=2, ckpt_every=2), tokens, run, log=quiet)
    return ckpt.load_checkpoint(run, only=("model",)).weights["model"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("preset", ["ideal", "ecram", "rram_es"])
def test_init_ckpt_programs_the_devices_from_the_warm_start(tokens, warm, monkeypatch, preset: str) -> None:
    """What the devices read right after setup is the warm start up to what programming can do:
    exactly with exact writes (ideal); to float32 rounding of w/scale·scale without write noise
    (ecram, whose device bounds lie far outside the initial range); and with write noise (rram_es)
    the persistent conductances are exactly the warm start clipped to each device's own bounds."""
    seen = _spy_devices(monkeypatch)
    cfg = small_cfg(tokens)
    tr.train(cfg, tokens, init_weights=warm, analog=analog_config(preset), stop_after=0, log=quiet)
    s, devices = seen[0]["session"], seen[0]["devices"]
    torch.manual_seed(cfg.train.seed)
    random_init = EquilibriumLM(cfg.model).state_dict()
    params = dict(s.model.named_parameters())
    for name, tile in devices.substrate.tiles.items():
        w = warm[name]
        assert float((w - random_init[name]).abs().max()) > 1e-2  # the test can tell the two apart
        assert torch.equal(params[name].detach(), tile.weight), name  # the model holds what the devices read
        assert torch.equal(s.ema.weights()[name], tile.weight), name  # and the EMA averages from there
        span = min(devices.cfg.device.w_max, -devices.cfg.device.w_min) * devices.cfg.update.omega
        assert tile.scale == float(w.abs().max()) / span  # the scale belongs to the warm start
        if preset == "ideal":
            assert torch.equal(tile.weight, w), name
        elif preset == "ecram":
            torch.testing.assert_close(tile.weight, w, rtol=1e-6, atol=0.0)
        else:
            g = torch.minimum(torch.maximum(w / tile.scale, tile.dev.bound_min), tile.dev.bound_max)
            assert torch.equal(tile.g, g), name
            assert torch.equal(tile.weight, tile.g_read * tile.scale), name


@pytest.mark.usefixtures("one_thread")
def test_an_analog_run_programs_the_update_it_is_given(tokens) -> None:
    """train(update=...) is the digital step an analog run programs: a step that halves the learning
    rate is the one called, and its (halved) result is what the devices are asked to write."""
    calls: list[float] = []

    def half_lr(model, optimizer, grads, lr, clip):
        calls.append(lr)
        return tr.apply_update(model, optimizer, grads, lr / 2, clip)

    half = tr.train(small_cfg(tokens, steps=2, log_every=2, ckpt_every=2), tokens,
                    analog=analog_config("ecram"), update=half_lr, log=quiet)
    assert len(calls) == 2
    full = tr.train(small_cfg(tokens, steps=2, log_every=2, ckpt_every=2), tokens,
                    analog=analog_config("ecram"), log=quiet)
    assert 0 < half["writes_total"] < full["writes_total"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("preset", "poisoned"), [("ecram", "head.weight"), ("rram_es", "attn.q.weight")])
def test_a_rollback_reprograms_the_devices(tokens, tmp_path, monkeypatch, preset: str, poisoned: str) -> None:
    """A non-finite update (in a digital tensor, or in one on the devices) rolls the run back; the
    devices are then reprogrammed toward the snapshot, those pulses are counted, the model holds what
    the devices read, and no tile state is left non-finite."""
    seen = _spy_devices(monkeypatch)
    calls = {"n": 0}
    real_update = tr.apply_update

    def poisoned_update(model, optimizer, grads, lr, clip):
        calls["n"] += 1
        norm = real_update(model, optimizer, grads, lr, clip)
        if calls["n"] == 4:  # steps 1-2, the snapshot at step 2, step 3, then the 4th update blows up
            with torch.no_grad():
                dict(model.named_parameters())[poisoned].fill_(math.nan)
        return norm

    monkeypatch.setattr(tr, "apply_update", poisoned_update)
    checks: list[dict] = []
    real_rollback = tr.rollback

    def checked_rollback(s, snapshot, *args, **kwargs):
        devices = seen[0]["devices"]
        tiles = devices.substrate.tiles
        at_failure = {name: tile.weight.clone() for name, tile in tiles.items()}
        writes, steps = devices.ledger.summary()["writes_total"], devices.ledger.steps
        real_rollback(s, snapshot, *args, **kwargs)
        params = dict(s.model.named_parameters())
        for name, tile in tiles.items():
            assert torch.equal(params[name].detach(), tile.weight), name
            for key in ("acc", "g", "g_read", "weight"):
                assert bool(torch.isfinite(getattr(tile, key)).all()), (name, key)
            assert bool((tile.writes >= 0).all()) and torch.equal(devices.ledger.counts[name], tile.writes)
        checks.append({"at_failure": at_failure, "snapshot": {k: snapshot["model"][k] for k in tiles},
                       "after": {k: t.weight.clone() for k, t in tiles.items()},
                       "added": devices.ledger.summary()["writes_total"] - writes,
                       "steps_added": devices.ledger.steps - steps})

    monkeypatch.setattr(tr, "rollback", checked_rollback)
    summary = tr.train(small_cfg(tokens, steps=6, log_every=2, ckpt_every=6), tokens, tmp_path,
                       analog=analog_config(preset), log=quiet)
    assert summary["finished"] and summary["rollbacks"] == 1 and len(checks) == 1
    check = checks[0]
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (rb,) = [e for e in events if e.get("event") == "rollback"]
    assert rb["to_step"] == 2 and rb["reprogram_writes"] > 0  # step 3's pulses were undone ...
    # ... and counted as writes, but not as an optimizer step.
    assert check["added"] == rb["reprogram_writes"] and check["steps_added"] == 0
    if preset == "ecram":  # without write noise the reversed pulses land the devices near the snapshot
        for name, snap in check["snapshot"].items():
            moved = float((check["at_failure"][name] - snap).abs().sum())
            left = float((check["after"][name] - snap).abs().sum())
            assert left < 0.5 * moved, name
