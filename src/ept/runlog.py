"""What a training run says as it goes: metrics.jsonl, the progress line, the early warning.

The loop in :mod:`ept.train` writes one record per log window, evaluation, diagnostic and event;
:class:`MetricsLog` appends them, :func:`progress_line` is their one-line form, and
:func:`contraction_watch` reads them for the signs of an operator drifting off contraction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ept import checkpoint as ckpt
from ept.config import RunConfig
from ept.plots import read_metrics

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends JSON records to metrics.jsonl (when the run has a folder) and keeps them in memory."""

    def __init__(self, run: Path | None, resume_step: int | None):
        self.path = None if run is None else run / METRICS_FILE
        self.records: list[dict] = []
        if self.path is not None and resume_step is not None and self.path.exists():
            # Records past the checkpoint belong to steps that will be redone.
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            ckpt.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            line = json.dumps(record) + "\n"
            try:
                with open(self.path, "a") as f:
                    f.write(line)
            except OSError as e:
                if e.errno in ckpt.FULL_ERRNOS:
                    raise ckpt.disk_full(e, self.path.parent, len(line)) from None
                raise


def _fmt_time(sec: float) -> str:
    sec = int(max(sec, 0))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def progress_line(rec: dict, steps: int, val: float | None) -> str:
    t2 = f" T2 {rec['T2']:.0f}" if rec.get("T2") is not None else ""
    t1 = f" T1 {rec['T1']:.0f}" if rec.get("T1") is not None else ""
    res = f" res {rec['free_residual']:.1e}" if rec.get("free_residual") is not None else ""
    v = f" val {val:.3f}" if val is not None else ""
    eta = (steps - rec["step"]) / rec["it_s"] if rec["it_s"] > 0 else 0.0
    return (f"step {rec['step']:>{len(str(steps))}}/{steps} loss {rec['loss']:.3f}{v}{res}{t1}{t2} "
            f"lr {rec['lr']:.2e} | {rec['it_s']:.2f} it/s ETA {_fmt_time(eta)}")


def contraction_hint(control: dict[str, Any]) -> str:
    """The control the early warning names (docs/experiments/stability.md measured the levers)."""
    if float(control.get("eigreg", 0)) > 0:
        end = control.get("eig_margin_end")
        if end is not None:  # the hold loosens over the decay, where a warning most often fires
            return (f"raise --eig_margin above {control.get('eig_margin')} (--eig_margin_end above {end} "
                    "if it fires in the decay) or lower --lr")
        return f"raise --eig_margin above {control.get('eig_margin')} or lower --lr"
    return "hold it with --eigreg 1 --eig_margin 0.5 (the tiny preset's) or a lower --lr"


def window_record(window: list[dict[str, Any]], step: int, lr: float, it_s: float) -> dict[str, Any]:
    """Means over the log interval's steps (the worst residual is the max)."""
    rec: dict[str, Any] = {"step": step, "lr": lr, "it_s": it_s}
    keys = {k for st in window for k, v in st.items() if type(v) in (int, float)}
    for k in sorted(keys):
        vals = [float(st[k]) for st in window if type(st.get(k)) in (int, float)]
        rec[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    if "free_fevals" in rec:
        rec["T1"] = rec.pop("free_fevals")
    return rec


def contraction_watch(cfg: RunConfig, history: list[dict[str, Any]]) -> Any:
    """The early warning of an EP run (None for BPTT and BP, which need no equilibrium), caught up
    on a resumed run's earlier records."""
    if cfg.train.mode != "ep":
        return None
    from ept.diagnostics import ContractionWatch

    watch = ContractionWatch(contraction_hint(cfg.control), batch=cfg.train.B)
    for rec in history:
        if rec.get("event") == "contraction_warning":
            watch.fired.add(rec["signal"])
        elif rec.get("event") in (None, "diag"):
            watch.update(rec)
    return watch


def warn(watch: Any, rec: dict[str, Any], metrics: MetricsLog, log: Callable[[str], None]) -> None:
    for w in watch.update(rec) if watch is not None else []:
        metrics.write({"step": rec["step"], "event": "contraction_warning", **w})
        log(f"step {rec['step']}: {w['message']}")
