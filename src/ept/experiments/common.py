"""What every experiment shares: its config, short training runs, the operator measures under the
fingerprint's names, and the three outputs (NAME.json, NAME.png, NAME.md).

An experiment is a question, the setting it sweeps, and three pure functions: ``run(cfg) -> rows``
(one dict per setting and seed, keyed by the swept setting's own name), ``plot(rows, path)`` and
``reading(rows) -> str`` (two lines a reader can check against the table).
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ept import checkpoint as ckpt
from ept.bench.quality import operator_batch
from ept.config import RunConfig
from ept.data import Corpus, TokenData, load_corpus, prepare
from ept.diagnostics.fidelity import fidelity_report
from ept.diagnostics.monitor import operator_report
from ept.model import EquilibriumLM
from ept.presets import resolve
from ept.train import ep_options, train

# --quick: shapes and steps that make each experiment a test (seconds, not minutes).
QUICK = dict(C=16, H=2, T=16, B=4, vocab_size=300, log_every=5, eval_every=1000, eval_batches=1,
             sample_tokens=4, ckpt_every=1000)
QUICK_STEPS = 6


@dataclass
class ExperimentConfig:
    out: Path = Path("runs/experiments")
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None  # training steps per run (None: the experiment's own default)
    quick: bool = False
    runs: tuple[Path, ...] = ()  # trained run folders to reuse instead of training
    threads: int = 1
    log: Callable[[str], None] = print

    def steps_or(self, default: int) -> int:
        return QUICK_STEPS if self.quick else (self.steps or default)


@dataclass
class Experiment:
    name: str
    question: str
    sweep: str  # the swept setting's name, the first key of every row
    run: Callable[[ExperimentConfig], list[dict[str, Any]]]
    plot: Callable[[list[dict[str, Any]], Path], None]
    reading: Callable[[list[dict[str, Any]]], str]
    columns: tuple[str, ...] = field(default_factory=tuple)  # the table's columns after the sweep


class ExperimentError(ValueError):
    """Bad input to an experiment (the CLI prints it as one line, exit 2)."""


# ------------------------------------------------------------------------------------ training


_DATA: dict[tuple[int, bool], TokenData] = {}
QUICK_CHARS = (200_000, 20_000)  # --quick trains and evaluates on the corpus's first characters


def corpus(vocab_size: int, quick: bool = False) -> TokenData:
    """The embedded corpus at ``vocab_size`` (``quick``: its first characters only)."""
    if (vocab_size, quick) not in _DATA:
        full = load_corpus(None)
        if quick:
            full = Corpus(full.train[: QUICK_CHARS[0]], full.valid[: QUICK_CHARS[1]], full.source + " (head)",
                          full.cache_dir)
        _DATA[vocab_size, quick] = prepare(full, vocab_size)
    return _DATA[vocab_size, quick]


def run_config(flags: dict[str, Any], cfg: ExperimentConfig, steps: int, seed: int) -> RunConfig:
    """The tiny preset (or its --quick shrink) under ``flags``, at ``steps`` and ``seed``."""
    extra = QUICK if cfg.quick else {}
    return resolve("tiny", {**extra, **flags, "steps": steps, "seed": seed, "threads": cfg.threads})


def train_one(flags: dict[str, Any], cfg: ExperimentConfig, steps: int, seed: int,
              label: str) -> tuple[dict[str, Any], RunConfig, TokenData]:
    """Train one run in memory (no folder); its summary holds the trained model."""
    run_cfg = run_config(flags, cfg, steps, seed)
    data = corpus(run_cfg.model.vocab_size, cfg.quick)
    run_cfg.model.vocab_size, run_cfg.data.key = data.vocab_size, data.key
    t0 = time.time()
    summary = train(run_cfg, data, None, log=lambda _msg: None)
    cfg.log(f"[{label}] val CE {summary['val_ce']:.4f} in {time.time() - t0:.0f} s "
            f"({summary['rollbacks']} rollbacks)")
    return summary, run_cfg, data


def load_runs(paths: tuple[Path, ...]) -> list[ckpt.TrainedModel]:
    """``--runs``: trained run folders, each with a config and a checkpoint."""
    out = []
    for p in paths:
        try:
            out.append(ckpt.load_trained(p))
        except ckpt.CheckpointError as e:
            raise ExperimentError(f"--runs {p}: {e}") from None
    return out


# ------------------------------------------------------------------------------------ measures


def measure(model: EquilibriumLM, run_cfg: RunConfig, data: TokenData, full: bool = True) -> dict[str, Any]:
    """The trained operator under the fingerprint's names: cos(EP, implicit) with the run's AsymEP
    and without (``cos_ep_implicit_none``), the free phase's F-evals, ω(J), the spectral abscissa,
    the non-normality, the symmetric fraction and ρ(S⁻¹A) at z* of the first sequence."""
    idx, targets = operator_batch(run_cfg, data)
    opts = ep_options(run_cfg)
    report, stats = fidelity_report(model, idx, targets, opts)
    none, _ = fidelity_report(model, idx, targets, {**opts, "asym": "none"})
    out = {"cos_ep_implicit": report["cos_ep_implicit"], "cos_ep_implicit_none": none["cos_ep_implicit"],
           "cos_bptt_implicit": report["cos_bptt_implicit"], "residual": report["residual_max"],
           "free_fevals": report["free_fevals"]}
    with torch.no_grad():
        x = model.inject(idx[:1])
    out.update(operator_report(model, x, stats["z_star"][:1], full=full))
    return out


# ------------------------------------------------------------------------------------ outputs


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()} {threads}-thread, {platform.system()}, torch {torch.__version__}"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def table(exp: Experiment, rows: list[dict[str, Any]]) -> str:
    cols = [exp.sweep, *([c for c in exp.columns] or [k for k in rows[0] if k != exp.sweep])]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(exp: Experiment, record: dict[str, Any], out: Path) -> None:
    """NAME.png and NAME.md from a record: a plot or a reading can change without retraining."""
    rows = record["rows"]
    exp.plot(rows, out / f"{exp.name}.png")
    md = (f"# {exp.name}: {exp.question}\n\n    {record['command']}\n\n{record['date']}, commit "
          f"{record['commit']}, {record['machine']}, {record['wall_s']} s.\n\n{table(exp, rows)}\n\n"
          f"{exp.reading(rows)}\n")
    (out / f"{exp.name}.md").write_text(md)


def write_outputs(exp: Experiment, cfg: ExperimentConfig, rows: list[dict[str, Any]], wall: float,
                  command: str) -> dict[str, Any]:
    """NAME.json (every number, with config, seeds, commit, machine, wall time), NAME.png, NAME.md."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    rows = [{k: _clean(v) for k, v in r.items()} for r in rows]
    record = {"experiment": exp.name, "question": exp.question, "sweep": exp.sweep, "command": command,
              "seeds": list(cfg.seeds), "steps": cfg.steps, "quick": cfg.quick, "commit": _commit(),
              "machine": _machine(), "date": time.strftime("%Y-%m-%d"), "wall_s": round(wall, 1),
              "rows": rows}
    (cfg.out / f"{exp.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    render(exp, record, cfg.out)
    return record
