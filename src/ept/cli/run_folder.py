"""An ``ept train`` run folder: the seed's file spelling of it, and opening it new or to resume.

A folder holds a run once it has its config.json or a checkpoint; one whose run stopped before its
first checkpoint is started again by the same command, never resumed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ept import checkpoint as ckpt
from ept.checkpoint import CONFIG_FILE, TOKENIZER_FILE
from ept.cli import UsageError
from ept.config import RunConfig
from ept.runlock import LOCK_FILE


def seed_run_folder(ckpt_file: str | None, state_file: str | None) -> Path | None:
    """The seed's --ckpt runs/x.pt / --state runs/x.state -> the run folder runs/x."""
    stems = {Path(f).with_suffix("") for f in (ckpt_file, state_file) if f}
    if len(stems) > 1:
        raise UsageError(
            f"--ckpt {ckpt_file} and --state {state_file} name different runs: give them the same "
            "stem (runs/myrun.pt, runs/myrun.state), or use --out DIR"
        )
    return stems.pop() if stems else None


def holds_run(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or ckpt.has_checkpoint(folder)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(
            f"run folder '{folder}' is not writable ({e.strerror}): choose a folder you can write "
            "to with --out"
        ) from None


# What a run writes before its first checkpoint: a run stopped then (killed in set-up or in its
# first steps) has nothing to resume, and the same command starts it again in the same folder.
BEFORE_FIRST_CHECKPOINT = (CONFIG_FILE, TOKENIZER_FILE, "metrics.jsonl", "sample.txt", "curves.png")


def never_checkpointed(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and not ckpt.has_checkpoint(folder)


def open_new_folder(folder: Path, log: Callable[[str], None] = lambda msg: None) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out '{folder}' is a file: give a folder path")
    if folder.is_dir() and never_checkpointed(folder):
        log(f"{folder}: its run stopped before its first checkpoint; starting it again")
        for name in BEFORE_FIRST_CHECKPOINT:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for sub in [folder / ckpt.BEST, *folder.glob("ckpt-*"), *folder.glob(".tmp-*")]:
            shutil.rmtree(sub, ignore_errors=True)
    if folder.is_dir() and holds_run(folder):
        raise UsageError(
            f"'{folder}' holds another run: continue it with --resume {folder}, or choose a new --out"
        )
    if folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise UsageError(f"'{folder}' is not empty and holds no ept run: choose a new or empty --out folder")
    check_writable(folder)


def open_resume_folder(folder: Path) -> RunConfig:
    if folder.is_dir() and never_checkpointed(folder):
        raise UsageError(f"--resume '{folder}': its run stopped before its first checkpoint, so nothing was "
                         f"kept to resume; run the same 'ept train --out {folder} ...' command again")
    if not folder.is_dir() or not (folder / CONFIG_FILE).is_file() or not ckpt.has_checkpoint(folder):
        raise UsageError(
            f"--resume '{folder}' holds no ept run (needs {CONFIG_FILE} and a checkpoint): give the "
            "--out folder of an earlier 'ept train'"
        )
    if not (folder / TOKENIZER_FILE).is_file():
        raise UsageError(f"--resume '{folder}' lacks its {TOKENIZER_FILE} (the run's vocabulary): restore it "
                         "from a copy of the run folder, or start a new run with --init_ckpt")
    check_writable(folder)
    return read_config(folder)


def read_config(folder: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"'{folder / CONFIG_FILE}' is unreadable or corrupt ({e}): restore it, or start a new "
            "run with --init_ckpt"
        ) from None
