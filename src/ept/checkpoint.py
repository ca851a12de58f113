"""Crash-safe checkpoints in a run folder: safetensors for tensors, JSON for everything else.

    RUN/latest.json                     {"checkpoint": "ckpt-0000200", "step": 200}   (the pointer)
    RUN/ckpt-0000200/model.safetensors  the trained weights
    RUN/ckpt-0000200/ema.safetensors    the EMA weights (when --pema is on; evaluation uses them)
    RUN/ckpt-0000200/state.safetensors  optimizer moments, RNG states, controller tensors
    RUN/ckpt-0000200/state.json         the rest of the training state, tensors as references
    RUN/ckpt-0000200/manifest.json      size and sha256 of every file above
    RUN/best/                           the checkpoint with the best periodic val CE, laid out as
                                        a run folder of its own (best/latest.json names it and its val CE)

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place, and
only then does the pointer move (itself temp file + fsync + rename). A crash at any moment leaves
the previous pointer naming a complete checkpoint; the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ept.config import RunConfig
from ept.model import EquilibriumLM

CONFIG_FILE = "config.json"  # the run's resolved config (RunConfig.to_dict)
TOKENIZER_FILE = "tokenizer.json"
LATEST = "latest.json"
BEST = "best"
MANIFEST = "manifest.json"
STATE_JSON = "state.json"
STATE_TENSORS = "state"
FORMAT = "ept-checkpoint-1"
_NAME = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or from another model."""


class DiskFull(OSError):
    """A write into the run folder ran out of space (or hit a file-size or quota limit); what was
    already on disk is intact."""


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(e: OSError, where: Path, needed: int) -> DiskFull:
    return DiskFull(e.errno, f"no space left writing into '{where}' ({os.strerror(e.errno or 0).lower()}; "
                             f"this write needs {needed / 1e6:.2f} MB): free space, then continue with "
                             f"ept train --resume {where}")


@dataclass
class Checkpoint:
    path: Path
    weights: dict[str, dict[str, Tensor]]  # file stem ("model", "ema") -> state dict
    state: dict[str, Any]

    def eval_weights(self, raw: bool = False) -> tuple[str, dict[str, Tensor]]:
        """(stem, state dict) of the weights a run is evaluated with: the parameter EMA when the run
        kept one and ``raw`` is not asked for, else the raw last iterate ("model")."""
        which = "model" if raw or "ema" not in self.weights else "ema"
        return which, self.weights[which]


# ----------------------------------------------------------------------- nested state <-> files


def flatten(obj: Any, tensors: dict[str, Tensor], prefix: str = "s") -> Any:
    """A JSON-able tree with every tensor moved into ``tensors`` and replaced by a reference.

    Keeps what JSON alone would lose: int dict keys (optimizer state), tuples, tensor dtypes.
    """
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------ atomic writes


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old file or the complete new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_file(Path(tmp), data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    weights: dict[str, dict[str, Tensor]],
    state: dict[str, Any],
    keep: int = 2,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` of the run and point ``latest.json`` at it; returns its folder.

    ``meta`` (JSON values) is written into the pointer beside the checkpoint's name and step."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    tree = flatten(state, tensors)
    blobs = {f"{stem}.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in sd.items()})
             for stem, sd in weights.items()}
    blobs[f"{STATE_TENSORS}.safetensors"] = st_save(tensors)
    blobs[STATE_JSON] = (json.dumps({"format": FORMAT, "step": step, "state": tree}) + "\n").encode()
    files = {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()}
    manifest = {"format": FORMAT, "step": step, "files": files}
    blobs[MANIFEST] = (json.dumps(manifest, indent=1) + "\n").encode()

    final = run / checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(dir=run, prefix=f".tmp-{final.name}-"))
    pointed = False  # the pointer names tmp: it must outlive a failure
    try:
        for name, data in blobs.items():
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        if final.exists():
            if _pointer_target(run) == final.name:
                # The step is saved again after a rollback past it: the pointer first names the new,
                # complete copy, so no moment leaves it naming a missing or half-replaced checkpoint.
                write_json(run / LATEST, {"checkpoint": tmp.name, "step": step, **(meta or {})})
                pointed = True
            _discard(final)  # else a leftover of a crash after the rename, before the pointer moved
        os.replace(tmp, final)
        _fsync_dir(run)
    except BaseException as e:
        if not pointed:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            raise disk_full(e, run, sum(len(b) for b in blobs.values())) from None
        raise
    try:
        write_json(run / LATEST, {"checkpoint": final.name, "step": step, **(meta or {})})
    except OSError as e:  # the new checkpoint is complete; the pointer still names the previous one
        if e.errno in FULL_ERRNOS:
            raise disk_full(e, run, 4096) from None
        raise
    _prune(run, keep, final.name)
    return final


def _pointer_target(run: Path) -> str | None:
    try:
        return json.loads((run / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no moment shows it half-deleted under its own name: it is
    renamed out of sight first (a kill during rmtree left a visible ckpt-* missing files)."""
    trash = folder.with_name(f".tmp-{folder.name}-del-{secrets.token_hex(4)}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(run: Path, keep: int, current: str) -> None:
    ckpts = sorted((p for p in run.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
    for old in ckpts[:-keep] if keep > 0 else ckpts:
        if old.name != current:
            try:
                _discard(old)
            except OSError:
                pass  # gone already, or not ours to move: the next prune tries again
    for tmp in run.glob(".tmp-ckpt-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ loading


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / LATEST).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (follow its pointer) or a checkpoint folder -> the checkpoint folder."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint '{p}' does not exist: give a run folder written by ept train")
    if not (p / LATEST).is_file():
        raise CheckpointError(f"'{p}' holds no checkpoint ({LATEST} missing): give a run folder written by "
                              "'ept train --out', or one of its ckpt-* folders")
    target = _pointer_target(p)
    if target is None or not (p / target / MANIFEST).is_file():
        raise CheckpointError(f"'{p / LATEST}' is corrupt or names a missing checkpoint: pass one of the "
                              f"run's ckpt-* folders explicitly ({_list_ckpts(p)})")
    return p / target


def run_folder_of(ckpt_dir: Path) -> Path:
    """The run folder (config.json, tokenizer.json) a checkpoint folder belongs to: its parent, or
    the parent's parent for a checkpoint inside the run's ``best/``."""
    parent = ckpt_dir.parent
    return parent.parent if parent.name == BEST and not (parent / CONFIG_FILE).is_file() else parent


def best_pointer(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/best/latest.json`` ({"checkpoint", "step", "val_ce"}), or None when the run has no best."""
    try:
        return json.loads((Path(run_dir) / BEST / LATEST).read_text())
    except (OSError, ValueError):
        return None


def _list_ckpts(run: Path) -> str:
    names = sorted(q.name for q in run.iterdir() if _NAME.match(q.name))
    return ", ".join(names) if names else "none left"


def _read_verified(ckpt: Path, name: str, info: dict[str, Any]) -> bytes:
    try:
        data = (ckpt / name).read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint file '{ckpt / name}' is unreadable ({e.strerror}): the checkpoint "
                              "is incomplete; use an earlier ckpt-* folder of the run") from None
    if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        what = "truncated" if len(data) < info["bytes"] else "corrupt"
        raise CheckpointError(
            f"checkpoint file '{ckpt / name}' is {what} ({len(data)} of {info['bytes']} bytes, checksum "
            f"mismatch): use an earlier ckpt-* folder of the run ({_list_ckpts(ckpt.parent)})"
        )
    return data


def load_checkpoint(path: str | Path, only: tuple[str, ...] | None = None,
                    fallback: Callable[[str], None] | None = None) -> Checkpoint:
    """Load and verify a checkpoint (``only``: just these weight stems, and no training state).

    ``fallback``: given a run folder whose newest checkpoint fails verification, load the newest
    one that passes instead and say which were skipped through ``fallback(message)``. A checkpoint
    folder named explicitly is loaded or refused, never substituted."""
    p = Path(path)
    if fallback is None or (p / MANIFEST).is_file() or not (p / LATEST).is_file():
        return _load_verified(resolve_checkpoint(p), only)
    try:
        return _load_verified(resolve_checkpoint(p), only)
    except CheckpointError as first:
        skipped = [_pointer_target(p) or LATEST]
        newest_first = sorted((q for q in p.iterdir() if _NAME.match(q.name)), key=lambda q: q.name,
                              reverse=True)
        for older in newest_first:
            if older.name in skipped:
                continue
            try:
                found = _load_verified(older, only)
            except CheckpointError:
                skipped.append(older.name)
                continue
            reason = str(first).split(": use ")[0]
            fallback(f"{reason}: skipped {', '.join(skipped)}; using {older.name}, the newest intact "
                     "checkpoint")
            return found
        raise first from None


def _load_verified(ckpt: Path, only: tuple[str, ...] | None) -> Checkpoint:
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
        assert manifest["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"'{ckpt / MANIFEST}' is corrupt or not an ept checkpoint: use another ckpt-* "
                              "folder of the run") from None
    weights, state = {}, {}
    try:
        for name, info in files.items():
            stem = name.removesuffix(".safetensors")
            if name.endswith(".safetensors") and stem != STATE_TENSORS and (only is None or stem in only):
                weights[stem] = st_load(_read_verified(ckpt, name, info))
        if only is None:
            name = f"{STATE_TENSORS}.safetensors"
            tensors = st_load(_read_verified(ckpt, name, files[name]))
            tree = json.loads(_read_verified(ckpt, STATE_JSON, files[STATE_JSON]))
            state = unflatten(tree["state"], tensors)
    except (SafetensorError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}' cannot be decoded ({e}): use another ckpt-* folder") \
            from None
    return Checkpoint(ckpt, weights, state)


def load_weights_into(model: torch.nn.Module, weights: dict[str, Tensor], where: str) -> None:
    """Copy weights into ``model``, refusing any name or shape mismatch with one clear line."""
    own = model.state_dict()
    check_weights_fit(own, weights, where)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def check_weights_fit(own: dict[str, Tensor], weights: dict[str, Tensor], where: str) -> None:
    """Refuse, with one clear line, ``weights`` whose names or shapes differ from ``own`` (a state
    dict; a model built on the meta device gives one for free)."""
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    wrong = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or wrong:
        k = wrong[0] if wrong else None
        detail = (f"{k} is {tuple(weights[k].shape)} there but {tuple(own[k].shape)} here" if k
                  else f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}")
        raise CheckpointError(
            f"checkpoint '{where}' is from another model config or vocabulary ({detail}): use the same "
            "--C/--H/--T/--vocab_size as the run that wrote it, or start a fresh run"
        )


# ------------------------------------------------------------------------------------ a trained model


@dataclass
class TrainedModel:
    """A run's model with the weights evaluation uses (the EMA's when the run kept one)."""

    cfg: RunConfig
    model: EquilibriumLM  # in eval mode
    ckpt: Path  # the checkpoint folder it came from
    step: int
    weights: str  # "ema" or "model"


def load_trained(path: str | Path, raw: bool = False,
                 fallback: Callable[[str], None] | None = None) -> TrainedModel:
    """A run folder (its latest checkpoint) or one of its checkpoint folders (``ckpt-*``, ``best/``)
    -> its model and config; ``raw``: the last iterate instead of the EMA; ``fallback``: see
    :func:`load_checkpoint`. CheckpointError names the fix."""
    ck = load_checkpoint(path, only=("model", "ema"), fallback=fallback)
    folders = (Path(path), run_folder_of(ck.path))
    config = next((p / CONFIG_FILE for p in folders if (p / CONFIG_FILE).is_file()), None)
    if config is None:
        raise CheckpointError(f"'{path}' has no {CONFIG_FILE}: give a run folder written by "
                              "'ept train --out'")
    try:
        cfg = RunConfig.from_dict(json.loads(config.read_text()))
        step = json.loads((ck.path / MANIFEST).read_text())["step"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"'{config}' is unreadable or not an ept config ({e}): restore it from the "
                              "run's source, or retrain") from None
    which, weights = ck.eval_weights(raw)
    model = EquilibriumLM(cfg.model)
    load_weights_into(model, weights, str(ck.path))
    return TrainedModel(cfg, model.eval(), ck.path, step, which)
