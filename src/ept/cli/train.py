"""``ept train``: parse flags, resolve the run's config, open its folder, call :func:`ept.train.train`.

Every flag of the seed's canonical recipe parses verbatim, and so does its spelling of files:
``--ckpt runs/myrun.pt --state runs/myrun.state`` is the run folder ``runs/myrun/`` (and, as in the
seed, giving ``--state`` for a folder that already holds the run continues it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ept import checkpoint as ckpt
from ept.analog import AnalogConfig
from ept.analog.cli_args import add_arguments as add_analog_arguments
from ept.analog.cli_args import config_from_args as analog_config_from_args
from ept.analog.cli_args import overrides_from_args as analog_overrides_from_args
from ept.checkpoint import CONFIG_FILE
from ept.cli import UsageError
from ept.cli.run_folder import (
    holds_run,
    open_new_folder,
    open_resume_folder,
    read_config,
    seed_run_folder,
)
from ept.config import SECTIONS, RunConfig
from ept.data import DataError, TokenData, load_corpus, prepare
from ept.distributed import Group, ParallelConfigError, PeerLost, init_from_env
from ept.flags import section_flags
from ept.model import EquilibriumLM
from ept.presets import PRESETS, SEED_FLAGS, resolve
from ept.runlock import RunLock, RunLocked
from ept.train import TrainingDiverged, train, write_run_files

RUN_FLAGS = ("out", "resume", "ckpt", "state", "init_ckpt", "stop_after", "json", "preset")
# Flags a resumed run may change: its length (extending it) and the machine's threads (the math is the
# same, up to the order of float sums); everything else is fixed by the run's config.json.
RESUMABLE = ("steps", "threads")


# The --help group each RunConfig section's flags are listed under.
GROUPS = {"train": "training", "model": "model", "solver": "free and nudged phases",
          "ep": "free and nudged phases", "control": "stability controls", "data": "data"}


def _or_none(kind: type) -> Callable[[str], Any]:
    """A flag's parser for an optional setting: 'none' gives None (a preset's value can be unset)."""
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse's error names the type
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (:data:`ept.flags.FLAGS`), its help text the field's own."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section in SECTIONS:
        title = GROUPS[section]
        group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
        for flag in section_flags(section):
            names = [f"--{n}" for n in (flag.name, *flag.aliases)]
            if flag.type is bool:
                group.add_argument(*names, dest=flag.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=flag.help)
                continue
            choices = flag.choices() if callable(flag.choices) else flag.choices
            kind = _or_none(flag.type) if flag.optional else flag.type
            group.add_argument(*names, dest=flag.name, type=kind, choices=choices,
                               default=argparse.SUPPRESS, help=flag.help)
        if section == "ep":
            for name, text in SEED_FLAGS.items():
                group.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=text)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an equilibrium LM (EP, BPTT) or its BP baseline",
        description=__doc__,
        allow_abbrev=False,
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "--preset", default=argparse.SUPPRESS, help=f"one of {', '.join(PRESETS)} (default tiny)"
    )
    run.add_argument("--out", default=argparse.SUPPRESS, help="run folder (default runs/PRESET-MODE-TIME)")
    run.add_argument("--resume", metavar="DIR", default=argparse.SUPPRESS, help="continue the run in DIR")
    run.add_argument(
        "--init_ckpt",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="warm-start the weights from a run folder, ckpt-* folder or .safetensors file",
    )
    run.add_argument(
        "--ckpt", metavar="FILE.pt", default=argparse.SUPPRESS, help="seed spelling: run folder FILE"
    )
    run.add_argument(
        "--state",
        metavar="FILE.state",
        default=argparse.SUPPRESS,
        help="seed spelling: continue the run in folder FILE if it exists",
    )
    run.add_argument(
        "--stop_after",
        type=int,
        default=argparse.SUPPRESS,
        help="end this session after that step (checkpointed; --resume continues)",
    )
    run.add_argument("--json", action="store_true", help="print the run summary as one last JSON line")
    add_config_flags(p)
    add_analog_arguments(p)
    p.set_defaults(func=run_train)


# ------------------------------------------------------------------------------------- data


def load_data(cfg: RunConfig, log: Any) -> TokenData:
    try:
        td = prepare(load_corpus(cfg.data.data), cfg.data.vocab or cfg.model.vocab_size, log=log)
        td.check_context(cfg.model.T)
    except DataError as e:
        raise UsageError(str(e)) from None
    return td


def init_weights(path: str, data_key: str) -> dict[str, Any]:
    """Weights of --init_ckpt, refusing one trained on another tokenizer."""
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        loaded = ckpt.load_checkpoint(p, only=("model",))
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # safetensors' own errors on a bad file
        raise UsageError(
            f"--init_ckpt '{p}' is not a readable checkpoint ({e}): give a run or ckpt-* folder"
        ) from None
    run = loaded.path.parent
    if (run / CONFIG_FILE).is_file():
        theirs = read_config(run).data.key
        if theirs and data_key and theirs != data_key:
            raise UsageError(
                f"--init_ckpt '{p}' was trained on another corpus or vocabulary (tokenizer differs): "
                "warm-start from a run on the same --data and --vocab_size"
            )
    return loaded.weights["model"]


# -------------------------------------------------------------------------------------- run


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: v for k, v in vars(args).items() if k not in ("func", "command") and not k.startswith("analog")
    }


def _analog_flags_given(args: argparse.Namespace) -> list[str]:
    given = ["analog"] if args.analog is not None else []
    given += list(analog_overrides_from_args(args))
    if getattr(args, "analog_seed", 0) != 0:  # its default is 0, not "absent"
        given.append("analog_seed")
    return given


def saved_analog(cfg: RunConfig) -> AnalogConfig | None:
    """The analog settings a run was started with, from its config.json (None: a digital run)."""
    if cfg.analog is None:
        return None
    try:
        return AnalogConfig.from_dict(cfg.analog)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(
            f"the run's {CONFIG_FILE} has an unreadable analog section ({e}): restore it, or start a new run"
        ) from None


def analog_from_args(args: argparse.Namespace, cfg: RunConfig, resuming: bool) -> AnalogConfig | None:
    if resuming:
        # As with every other flag: the devices were built from the saved settings, so a resume
        # takes them from config.json and refuses any analog flag rather than silently ignore it.
        saved, given = saved_analog(cfg), _analog_flags_given(args)
        if given:
            fixed = f"--analog {saved.preset}" if saved is not None else "a digital run"
            raise UsageError(
                f"--{given[0]} cannot change when resuming (the run's {CONFIG_FILE} fixes its analog "
                f"settings: {fixed}): drop it, or start a new run"
            )
        return saved
    try:
        analog = analog_config_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if analog is None:
        return None
    if cfg.train.mode != "ep":
        raise UsageError(
            f"--analog simulates EP's in-situ update: use --mode ep, not --mode {cfg.train.mode}"
        )
    return analog


def resolve_new(flags: dict[str, Any]) -> RunConfig:
    config_flags = {k: v for k, v in flags.items() if k not in RUN_FLAGS}
    try:
        cfg = resolve(flags.get("preset", "tiny"), config_flags)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    return cfg


def resume_overrides(cfg: RunConfig, flags: dict[str, Any]) -> RunConfig:
    for k in flags:
        if k not in RUN_FLAGS and k not in RESUMABLE:
            raise UsageError(
                f"--{k} cannot change when resuming (the run's {CONFIG_FILE} fixes it): drop it, "
                "or start a new run with --init_ckpt"
            )
    if "steps" in flags:
        if flags["steps"] < cfg.train.steps:
            raise UsageError(
                f"--steps {flags['steps']} is below the run's {cfg.train.steps}: resume can only extend a run"
            )
        cfg.train = dataclasses.replace(cfg.train, steps=flags["steps"])
    if "threads" in flags:
        cfg.train = dataclasses.replace(cfg.train, threads=flags["threads"])
    return cfg


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:

    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device here: use "
                         "--device cpu")
    # NCCL when the run names its GPUs, else gloo (which reduces through host memory on any device).
    group = init_from_env(device)
    held = Held()
    try:
        return _run_train(args, group, held)
    except PeerLost as e:
        print(f"ept train: {e}; the last good checkpoint is intact: resume with --resume", file=sys.stderr)
        return 1
    finally:
        held.release()
        group.close()


@dataclasses.dataclass
class Held:
    """What this process holds on disk: its run folder's lock, and the folder if it created it (left
    empty by a failure, the folder is removed: bad input changes nothing on disk)."""

    lock: RunLock | None = None
    created: Path | None = None

    def take(self, run: Path, log: Callable[[str], None], create: bool) -> None:
        if not run.is_dir():
            if not create or run.exists():
                return  # the folder checks that follow name the problem
            try:
                run.mkdir(parents=True)
            except OSError:
                return
            self.created = run
        try:
            self.lock = RunLock.acquire(run)
        except RunLocked as e:
            raise UsageError(str(e)) from None
        except OSError:
            return  # an unwritable folder: check_writable names it
        stale = self.lock.stale
        if stale and stale.get("pid") != os.getpid():
            log(f"{run}: took over the lock of a run that is gone (pid {stale.get('pid')} on "
                f"{stale.get('host')}, since {stale.get('since')})")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created is not None:
            with contextlib.suppress(OSError):
                self.created.rmdir()  # only when empty


def _on_main(group: Group, fn: Callable[[], Any]) -> None:
    """Run ``fn`` on rank 0 only; a UsageError it raises is raised on every rank (no rank is left
    waiting on a collective)."""
    err = None
    if group.is_main:
        try:
            fn()
        except UsageError as e:
            err = str(e)
    err = group.broadcast(err)
    if err is not None:
        raise UsageError(err)


def _same_data(group: Group, data: TokenData) -> None:
    """Every rank must hold the tokens rank 0 holds (each prepares the corpus itself)."""
    digest = hashlib.sha256(np.ascontiguousarray(data.train).tobytes()).hexdigest()
    if group.broadcast(digest) != digest:
        raise UsageError(f"rank {group.rank} tokenised the corpus differently from rank 0: give every rank "
                         "the same --data and ept version")


def _run_train(args: argparse.Namespace, group: Group, held: Held) -> int:
    log = _say if group.is_main else (lambda msg: None)
    flags = _given(args)
    seed_folder = seed_run_folder(flags.get("ckpt"), flags.get("state"))
    if seed_folder is not None and "out" in flags and Path(flags["out"]) != seed_folder:
        raise UsageError(
            f"--out {flags['out']} and --ckpt/--state name different run folders: give one of them"
        )
    out = Path(flags["out"]) if "out" in flags else seed_folder
    resume_dir = Path(flags["resume"]) if "resume" in flags else None
    if resume_dir is None and "state" in flags and seed_folder is not None and holds_run(seed_folder):
        resume_dir = seed_folder  # the seed restores --state when it exists
    if resume_dir is not None and out is not None and out != resume_dir:
        raise UsageError(
            f"--resume {resume_dir} and --out {out} differ: a resumed run writes into its own folder"
        )

    if resume_dir is not None:
        # Checked before the lock is taken: a refused --resume leaves even a dead run's lock alone.
        cfg = resume_overrides(open_resume_folder(resume_dir), flags)
        _on_main(group, lambda: held.take(resume_dir, log, create=False))
        analog = analog_from_args(args, cfg, resuming=True)
        run = resume_dir
        data = load_data(cfg, log)
        if data.key != cfg.data.key:
            raise UsageError(
                f"the data of run '{run}' ({cfg.data.data or 'embedded Shakespeare'}) changed since it "
                "started: restore it, or start a new run with --init_ckpt"
            )
        weights = None
    else:
        cfg = resolve_new(flags)
        analog = analog_from_args(args, cfg, resuming=False)
        cfg.analog = None if analog is None else analog.to_dict()  # what a --resume rebuilds the devices from
        run = out or Path("runs") / f"{cfg.preset}-{cfg.train.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = Path(group.broadcast(str(run)))  # the clock may tick between ranks
        _on_main(group, lambda: held.take(run, log, create=True))
        _on_main(group, lambda: open_new_folder(run, log))
        data = load_data(cfg, log)
        cfg.model = dataclasses.replace(cfg.model, vocab_size=data.vocab_size)
        cfg.data.key = data.key
        weights = init_weights(flags["init_ckpt"], data.key) if "init_ckpt" in flags else None
        if weights is not None:  # before the folder gets its files: refused input changes nothing
            with torch.device("meta"):
                shapes = EquilibriumLM(cfg.model).state_dict()
            try:
                ckpt.check_weights_fit(shapes, weights, "--init_ckpt")
            except ckpt.CheckpointError as e:
                raise UsageError(str(e)) from None
        _on_main(group, lambda: write_run_files(run, cfg, data))
    if group.world > 1:
        _same_data(group, data)
    log(
        f"run folder {run}: {cfg.train.mode} C={cfg.model.C} H={cfg.model.H} T={cfg.model.T} "
        f"B={cfg.train.B} vocab={cfg.model.vocab_size} steps={cfg.train.steps} ({data.source})"
    )
    try:
        summary = train(
            cfg,
            data,
            run,
            resume=resume_dir is not None,
            init_weights=weights,
            stop_after=flags.get("stop_after"),
            log=log,
            analog=analog,
            group=group,
        )
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from None
    except ckpt.DiskFull as e:
        if group.is_main:
            print(f"ept train: {e.strerror}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        if group.is_main:
            print(f"ept train: {e}", file=sys.stderr)
        return 1
    except ParallelConfigError as e:  # e.g. --B not divisible by the ranks
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(f"ept train: interrupted; continue with: ept train --resume {run}", file=sys.stderr)
        return 130
    summary.pop("model", None)
    summary.pop("sample", None)
    if not group.is_main:
        return 0
    summary["run"] = str(run)
    val = summary["val_ce"]
    what = "masked-token CE" if cfg.model.objective == "mlm" else "val CE"
    print(
        f"{'done' if summary['finished'] else 'stopped'} at step {summary['steps']}: {what} "
        f"{val if val is None else round(val, 4)} in {summary['seconds']:.0f} s; run folder {run}"
    )
    if args.json:
        print(json.dumps(summary))
    return 0
