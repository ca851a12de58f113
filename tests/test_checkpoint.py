"""Checkpoints: exact round trips, atomic writes, clear errors on damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ept import checkpoint as ckpt
from ept.config import EPTConfig
from ept.model import EquilibriumLM
from ept.optim import build_optimizer


def _model_and_optimizer() -> tuple[EquilibriumLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=20, C=8, H=2, T=4))
    opt = build_optimizer("adamw", model, 1e-3, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return model, opt


def _state(model: EquilibriumLM, opt: torch.optim.Optimizer, step: int) -> dict:
    return {
        "train": {"step": step, "lr_scale": 0.5},
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "maybe": None,
        "pair": (1, 2.5),
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_flatten_round_trip_keeps_int_keys_tuples_and_dtypes() -> None:
    model, opt = _model_and_optimizer()
    state = _state(model, opt, 3)
    tensors: dict[str, torch.Tensor] = {}
    tree = ckpt.flatten(state, tensors)
    json.dumps(tree)  # the non-tensor part must be plain JSON
    back = ckpt.unflatten(json.loads(json.dumps(tree)), tensors)
    _assert_same(state, back)
    assert 0 in back["optimizer"]["state"]  # int parameter ids survive JSON


def test_save_load_round_trip_and_pruning(tmp_path) -> None:
    model, opt = _model_and_optimizer()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"model": model.state_dict()}, _state(model, opt, step), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000003"]
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.path.name == "ckpt-0000003"
    _assert_same(_state(model, opt, 3)["optimizer"], loaded.state["optimizer"])
    _assert_same(dict(model.state_dict()), loaded.weights["model"])
    # The loaded optimizer state is accepted by a fresh optimizer and continues identically.
    opt2 = build_optimizer("adamw", model, 1e-3, weight_decay=0.1)
    opt2.load_state_dict(loaded.state["optimizer"])
    _assert_same(opt.state_dict(), opt2.state_dict())


def test_saving_the_current_step_again_keeps_the_pointer_valid(tmp_path, monkeypatch) -> None:
    """After a rollback past a checkpoint the run saves that step again: the new copy replaces the
    old one, and at the moment the old one is deleted the pointer already names the new one."""
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 5, {"model": model.state_dict()}, _state(model, opt, 5))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    seen = []
    real_replace = ckpt.os.replace

    def watch(src, dst, *a, **k):  # the old copy leaves its name (then is deleted out of sight)
        if Path(src) == tmp_path / "ckpt-0000005" and Path(dst).name.startswith(".tmp-"):
            seen.append(ckpt.load_checkpoint(tmp_path).weights["model"]["head.weight"].clone())
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(ckpt.os, "replace", watch)
    ckpt.save_checkpoint(tmp_path, 5, {"model": model.state_dict()}, _state(model, opt, 5))
    assert len(seen) == 1 and torch.equal(seen[0], model.head.weight)  # the pointer named the new copy
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.path.name == "ckpt-0000005" and torch.equal(loaded.weights["model"]["head.weight"],
                                                             model.head.weight)


@pytest.mark.parametrize("damage, word", [("truncate", "truncated"), ("flip", "corrupt")])
def test_damaged_checkpoint_gives_a_clear_error(tmp_path, damage: str, word: str) -> None:
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, _state(model, opt, 1))
    target = tmp_path / "ckpt-0000001" / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=word) as err:
        ckpt.load_checkpoint(tmp_path)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_crash_mid_write_leaves_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, _state(model, opt, 1))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    calls = {"n": 0}
    real_write = ckpt._write_file

    def failing_write(path, data):
        calls["n"] += 1
        if calls["n"] == 3:  # die part-way through the second checkpoint
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", failing_write)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"model": model.state_dict()}, _state(model, opt, 2))
    monkeypatch.undo()
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.state["train"]["step"] == 1
    _assert_same(good, loaded.weights["model"])
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "ckpt-0000002").exists()


def test_crash_before_the_pointer_moves_keeps_the_old_pointer(tmp_path, monkeypatch) -> None:
    model, opt = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, _state(model, opt, 1))

    def failing_json(path, obj):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(ckpt, "write_json", failing_json)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"model": model.state_dict()}, _state(model, opt, 2))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path).state["train"]["step"] == 1
    # The orphaned complete folder is replaced cleanly by the next save of that step.
    ckpt.save_checkpoint(tmp_path, 2, {"model": model.state_dict()}, _state(model, opt, 2))
    assert ckpt.load_checkpoint(tmp_path).state["train"]["step"] == 2


def test_weights_from_another_config_are_refused(tmp_path) -> None:
    small = EquilibriumLM(EPTConfig(vocab_size=20, C=8, H=2, T=4))
    other = EquilibriumLM(EPTConfig(vocab_size=30, C=8, H=2, T=4))
    with pytest.raises(ckpt.CheckpointError, match="another model config or vocabulary"):
        ckpt.load_weights_into(other, small.state_dict(), "x")


def test_missing_run_folder_and_folder_without_checkpoint(tmp_path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="holds no checkpoint"):
        ckpt.load_checkpoint(tmp_path)
