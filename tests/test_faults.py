"""Faults a shared machine does to a long run: a full disk, a flipped bit, two writers, a NaN, a kill
between a rollback and the next save — nothing lost, nothing silently wrong."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from test_cli_train import SMALL as CLI_SMALL
from test_train import quiet, small_cfg

import ept.checkpoint as ckpt
import ept.train as tr
from ept.cli import main
from ept.runlock import LOCK_FILE, RunLock
from ept.testing import fault_at, tree
from ept.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line_exit(capsys, argv: list[str], code: int, *words: str) -> str:
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("ept ")]
    assert err, "no error line"
    for w in words:
        assert w in err[-1], (w, err[-1])
    return err[-1]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, corpus_file) -> Path:
    run = tmp_path_factory.mktemp("faults") / "r"
    assert main(["train", "--data", str(corpus_file), "--out", str(run), *CLI_SMALL]) == 0
    return run


@pytest.fixture
def run_copy(run_folder, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run_folder, dst)
    return dst


# ------------------------------------------------------------------------------------ two writers


def test_a_live_writer_refuses_a_second_one_and_a_dead_ones_lock_is_taken_over(run_copy, capsys,
                                                                               corpus_file):
    before = tree(run_copy)
    lock = RunLock.acquire(run_copy)  # what a live ept train holds
    try:
        _one_line_exit(capsys, ["train", "--resume", str(run_copy)], 2, "in use by a live ept train",
                       f"pid {os.getpid()}")
        _one_line_exit(capsys, ["train", "--data", str(corpus_file), "--out", str(run_copy), *CLI_SMALL], 2,
                       "in use by a live ept train")
    finally:
        lock.release()
    assert tree(run_copy) == before
    # A killed run leaves its lock file behind, but no lock: the next run takes it over and says so.
    (run_copy / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then"}))
    assert main(["train", "--resume", str(run_copy), "--steps", "6"]) == 0
    assert "took over the lock of a run that is gone (pid 999999" in capsys.readouterr().err
    assert not (run_copy / LOCK_FILE).exists()  # a clean exit leaves none


# -------------------------------------------------------------------------------------- full disk


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_with_one_line(tmp_path, capsys, corpus_file,
                                                                           monkeypatch):
    run = tmp_path / "full"
    real = ckpt._write_file
    written = {"n": 0}

    def write(path: Path, data: bytes) -> None:
        written["n"] += 1
        if ".tmp-ckpt-0000004" in str(path) and path.name == "state.safetensors":  # mid-checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_file", write)
    line = _one_line_exit(capsys, ["train", "--data", str(corpus_file), "--out", str(run), *CLI_SMALL], 1,
                          "no space left writing into", str(run), "MB", "--resume")
    assert "Traceback" not in line
    assert json.loads((run / "latest.json").read_text())["checkpoint"] == "ckpt-0000002"
    assert not list(run.glob(".tmp-*"))  # no partial checkpoint is visible
    assert ckpt.load_checkpoint(run).state["train"]["step"] == 2
    monkeypatch.setattr(ckpt, "_write_file", real)
    assert main(["train", "--resume", str(run)]) == 0  # space freed: the run continues


# ------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(run_copy, capsys, corpus_file,
                                                                        damage):
    latest = json.loads((run_copy / "latest.json").read_text())["checkpoint"]
    bad = run_copy / latest / "model.safetensors"
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 3]
    bad.write_bytes(bytes(data))
    assert main(["eval", "--ckpt", str(run_copy), "--data", str(corpus_file), "--raw"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "model.safetensors" in err and f"skipped {latest}" in err
    assert "using ckpt-0000002" in err
    # Named explicitly, the damaged checkpoint is refused, not substituted.
    _one_line_exit(capsys, ["eval", "--ckpt", str(run_copy / latest), "--data", str(corpus_file)], 2,
                   "model.safetensors", "corrupt" if damage == "flip" else "truncated")
    assert main(["train", "--resume", str(run_copy), "--steps", "6"]) == 0
    assert "resuming" in capsys.readouterr().err
    ckpt.load_checkpoint(run_copy)  # the redone steps replaced the damaged checkpoint


class _Payload:
    def __reduce__(self):
        return (open, (str(_Payload.target), "w"))


def test_a_pickle_in_a_checkpoint_is_refused_and_never_runs(run_copy, capsys, corpus_file):
    _Payload.target = run_copy / "pwned"
    latest = run_copy / json.loads((run_copy / "latest.json").read_text())["checkpoint"]
    blob = pickle.dumps({"weight": _Payload()})
    (latest / "model.safetensors").write_bytes(blob)
    manifest = json.loads((latest / "manifest.json").read_text())  # a forger fixes the checksum too
    import hashlib

    manifest["files"]["model.safetensors"] = {"bytes": len(blob),
                                              "sha256": hashlib.sha256(blob).hexdigest()}
    (latest / "manifest.json").write_text(json.dumps(manifest))
    _one_line_exit(capsys, ["eval", "--ckpt", str(latest), "--data", str(corpus_file)], 2,
                   "cannot be decoded")
    assert not _Payload.target.exists()


# ------------------------------------------------------------- a kill between a rollback and a save


def test_a_resume_after_a_rollback_is_bit_identical(tokens, tmp_path, monkeypatch):
    # Snapshots every 4 steps, checkpoints every step: the rollback at step 6 returns to step 4, and
    # a checkpoint written at step 5 must know that.
    flags = dict(steps=10, ckpt_every=1, log_every=4, eval_every=5, keep=2)
    monkeypatch.setattr(tr, "step_gradient", fault_at(tr.step_gradient, 6, "field"))
    for name in ("whole", "part"):
        (tmp_path / name).mkdir()
    whole = train(small_cfg(tokens, **flags), tokens, tmp_path / "whole", log=quiet)
    assert whole["rollbacks"] == 1
    # Killed after the checkpoint of step 5 (before the fault), then resumed: the fault recurs at step
    # 6, and the rollback must return to step 4, as the uninterrupted run's did.
    part = tmp_path / "part"
    train(small_cfg(tokens, **flags), tokens, part, log=quiet, stop_after=5)
    resumed = train(small_cfg(tokens, **flags), tokens, part, resume=True, log=quiet)
    assert resumed["rollbacks"] == 1
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [e["to_step"] for e in events if e.get("event") == "rollback"] == [4]


# --------------------------------------------------------------------------------- numerical faults


def test_a_nan_gradient_rolls_back_and_no_nan_is_ever_saved(tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(tr, "step_gradient", fault_at(tr.step_gradient, 3, "grad"))
    out = train(small_cfg(tokens, steps=6, ckpt_every=1, keep=10), tokens, tmp_path, log=quiet)
    assert out["finished"] and out["rollbacks"] == 1
    for folder in sorted(tmp_path.glob("ckpt-*")) + sorted((tmp_path / "best").glob("ckpt-*")):
        loaded = ckpt.load_checkpoint(folder)
        for sd in loaded.weights.values():
            assert all(bool(torch.isfinite(v).all()) for v in sd.values()), folder


def test_repeated_faults_stop_after_max_rollbacks_naming_the_best(tokens, tmp_path, monkeypatch):
    real = tr.step_gradient

    def always(s, idx, targets):
        grads, stats = real(s, idx, targets)
        if s.state.step >= 3:
            stats.update(diverged=True, free_diverged=True)
        return grads, stats

    monkeypatch.setattr(tr, "step_gradient", always)
    with pytest.raises(tr.TrainingDiverged, match=r"after 2 rollbacks.*best model .* is kept in .*best"):
        train(small_cfg(tokens, steps=6, max_rollbacks=2), tokens, tmp_path, log=quiet)


# ------------------------------------------------------------------------------------ bad input


def test_more_bad_input_is_one_line_exit_2_and_changes_nothing(run_copy, tmp_path, capsys, corpus_file):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    _one_line_exit(capsys, ["train", "--data", str(binary), "--out", str(tmp_path / "a")], 2, "not UTF-8")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world. " * 400)
    _one_line_exit(capsys, ["train", "--data", str(tiny), "--out", str(tmp_path / "b"), "--vocab_size",
                            "4000", "--T", "16"], 2, "too small for --vocab_size 4000", "--vocab_size")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["solver"]["eps"] = -1.0  # a hand edit
    (run_copy / "config.json").write_text(json.dumps(cfg))
    before = tree(run_copy)
    _one_line_exit(capsys, ["train", "--resume", str(run_copy)], 2, "config.json", "eps must be > 0")
    assert tree(run_copy) == before

    (other / "tokenizer.json").unlink()
    # A killed run's lock left behind: a refused --resume leaves it as it was.
    (other / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then"}))
    before = tree(other)
    _one_line_exit(capsys, ["train", "--resume", str(other)], 2, "tokenizer.json")
    _one_line_exit(capsys, ["eval", "--ckpt", str(other), "--data", str(corpus_file)], 2, "tokenizer.json")
    assert tree(other) == before

    # Another shape's weights are refused before the new folder gets any file.
    fresh = tmp_path / "fresh"
    _one_line_exit(capsys, ["train", "--data", str(corpus_file), "--out", str(fresh), *CLI_SMALL, "--C", "32",
                            "--init_ckpt", str(other)], 2, "another model config", "--C")
    assert not fresh.exists()
