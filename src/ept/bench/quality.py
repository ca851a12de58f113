"""Quality at equal steps (``ept bench quality``): each block variant trained by EP, BPTT and BP on
the same data for the same steps, its val CE, nats per character, and on each trained equilibrium
operator cos(EP, implicit) and the free phase's F-evals.

    summary = quality("tiny", blocks=("thick", "energy"))
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ept.config import RunConfig
from ept.data import TokenData, fixed_batch, get_mlm_batch, load_corpus, prepare
from ept.diagnostics.fidelity import fidelity_report
from ept.evaluate import unigram_ce
from ept.model import EquilibriumLM
from ept.presets import resolve
from ept.train import MODES, ep_options, train, write_run_files

EP_TARGET = 0.05  # EP's val CE within this of BPTT's, on the default block

# Block variants: name -> the flags over the preset. thick is every preset's causal LM; the
# *_mlm rows are bidirectional and trained on masked tokens, the task where a symmetric coupling
# between tokens is legitimate.
BLOCKS: dict[str, dict[str, Any]] = {
    "thick": {},
    "energy": {"attn_mode": "energy"},
    "kappa05": {"attn_mode": "energy", "kappa": 0.5},
    "mono": {"attn_mode": "mono"},
    "energy_mlm": {"attn_mode": "energy", "causal": False, "objective": "mlm"},
    "thick_mlm": {"causal": False, "objective": "mlm"},
}


def operator_batch(cfg: RunConfig, data: TokenData) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed training batch every trained operator is probed on."""
    m, t = cfg.model, cfg.train
    if m.objective == "mlm":
        windows, masks = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1235)
        return get_mlm_batch(data.train, t.B, m.T, windows, masks, t.mask_rate, m.vocab_size)
    return fixed_batch(data.train, t.B, m.T, seed=1234)


def probe_operator(model: EquilibriumLM, cfg: RunConfig, data: TokenData) -> dict[str, Any]:
    """cos(EP, implicit) over the sequences EP kept, and the free phase's F-evals, on the trained block."""
    idx, targets = operator_batch(cfg, data)
    report, stats = fidelity_report(model, idx, targets, ep_options(cfg))
    return {"cos_ep_implicit": report["cos_ep_implicit"], "free_fevals": stats["free_fevals"],
            "dropped_seqs": stats.get("dropped_seqs", 0.0)}


def quality(preset: str = "tiny", steps: int | None = None, modes: tuple[str, ...] = MODES,
            out: Path | None = None, log: Callable[[str], None] = print,
            blocks: tuple[str, ...] = ("thick",), probe: bool | None = None) -> dict[str, Any]:
    """Train each block × mode at ``preset`` for the same steps on the same data. ``probe``
    (default: when more than the thick block is asked for) measures each equilibrium operator."""
    probe = (blocks != ("thick",)) if probe is None else probe
    flags: dict[str, Any] = {} if steps is None else {"steps": steps}
    base = resolve(preset, flags)
    data = prepare(load_corpus(base.data.data), base.model.vocab_size)
    rows: list[dict[str, Any]] = []
    for block in blocks:
        for mode in modes:
            cfg = resolve(preset, {**flags, **BLOCKS[block], "mode": mode})
            cfg.model.vocab_size = data.vocab_size
            cfg.data.key = data.key
            name = mode if blocks == ("thick",) else f"{block}-{mode}"
            run = None
            if out is not None:
                # A complete run folder, as `ept train --out` writes it: eval, fingerprint and
                # `bench speed --ckpt` read its config and tokenizer.
                run = out / name
                run.mkdir(parents=True, exist_ok=False)
                write_run_files(run, cfg, data)
            t0 = time.time()
            s = train(cfg, data, run, log=lambda msg, name=name: log(f"[{name}] {msg}"))
            keep = ("val_ce", "initial_val_ce", "train_loss", "steps", "rollbacks")
            row = {"block": block, "mode": mode, **{k: s[k] for k in keep},
                   "nats_per_char": s.get("nats_per_char"), "seconds": round(time.time() - t0, 1)}
            if probe and mode != "bp":
                row.update(probe_operator(s["model"], cfg, data))
            rows.append(row)
    summary: dict[str, Any] = {"bench": "quality", "preset": preset, "steps": base.train.steps,
                               "unigram_ce": unigram_ce(data.train, data.valid, data.vocab_size),
                               "rows": rows,
                               "results": {r["mode"]: r for r in rows if r["block"] == blocks[0]}}
    first = summary["results"]
    if "ep" in first and "bptt" in first:
        gap = first["ep"]["val_ce"] - first["bptt"]["val_ce"]
        summary.update(ep_minus_bptt=gap, target=EP_TARGET, target_met=bool(gap <= EP_TARGET))
    return summary


def _fmt(v: Any, spec: str) -> str:
    """``format(v, spec)``, or a dash as wide, for a figure that does not apply to the row."""
    width = re.match(r">(\d+)", spec)
    return format("—", f">{width.group(1) if width else ''}") if v is None else format(v, spec)


def format_table(summary: dict[str, Any]) -> str:
    rows = [f"quality @ preset {summary['preset']}, {summary['steps']} steps "
            f"(unigram baseline {summary['unigram_ce']:.3f} nats)",
            f"{'block':<11}{'mode':<6}{'val CE':>9}{'nats/char':>10}{'initial':>9}{'train':>9}{'seconds':>9}"
            f"{'rollbacks':>10}{'cos(EP,imp)':>12}{'F-evals':>8}"]
    for r in summary["rows"]:
        rows.append(f"{r['block']:<11}{r['mode']:<6}{r['val_ce']:>9.4f}{_fmt(r['nats_per_char'], '>10.4f')}"
                    f"{r['initial_val_ce']:>9.4f}{_fmt(r['train_loss'], '>9.4f')}{r['seconds']:>9.1f}"
                    f"{r['rollbacks']:>10d}{_fmt(r.get('cos_ep_implicit'), '>12.5f')}"
                    f"{_fmt(r.get('free_fevals'), '>8d')}")
    if "ep_minus_bptt" in summary:
        verdict = "met" if summary["target_met"] else "NOT met"
        rows.append(f"EP - BPTT = {summary['ep_minus_bptt']:+.4f} on {summary['rows'][0]['block']} "
                    f"(target <= {EP_TARGET}: {verdict})")
    return "\n".join(rows)
