"""The training curves of a run as one PNG (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; a torn last line (a crash mid-append) is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def series(records: list[dict], *keys: str) -> tuple[list[int], list[float]]:
    """(step, value) of the records that have a step and one of ``keys`` (the first one present)."""
    xs, ys = [], []
    for r in records:
        for k in keys:
            if r.get(k) is not None and "step" in r:
                xs.append(r["step"])
                ys.append(float(r[k]))
                break
    return xs, ys


def _legend(ax: plt.Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and val CE; free-phase residual; T1 and T2 used, each against the step."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    for key, label in (("loss", "train loss"), ("val_ce", "val CE")):
        xs, ys = series(records, key)
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if key == "val_ce" else None, ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    _legend(ax)
    ax = axes[1]
    for key, label in (("free_residual", "mean"), ("free_residual_max", "worst sequence")):
        xs, ys = series(records, key)
        if xs and all(y > 0 for y in ys):
            ax.semilogy(xs, ys, label=label)
    ax.set(xlabel="step", ylabel="||F(z)|| / ||z||", title="free-phase residual")
    _legend(ax)
    ax = axes[2]
    for key, label in (("T1", "T1 (free F-evals)"), ("T2", "T2 (nudged steps)")):
        xs, ys = series(records, key)
        if xs:
            ax.plot(xs, ys, label=label)
    ax.set(xlabel="step", ylabel="iterations", title="relaxation cost")
    _legend(ax)
    return finish_run_figure(fig, axes, records, path, title, rollback_ls="--")


def finish_run_figure(fig: plt.Figure, axes: list[plt.Axes], records: list[dict], path: str | Path,
                      title: str = "", rollback_ls: str = "--") -> Path:
    """Mark every rollback (red) and early warning (orange) of the run on every panel, add the
    title, and save the PNG."""
    colours = {"rollback": "red", "contraction_warning": "orange", "hopf_warning": "orange"}
    for r in records:
        if r.get("event") in colours and "step" in r:
            ls = rollback_ls if r["event"] == "rollback" else ":"
            for a in axes:
                a.axvline(r["step"], color=colours[r["event"]], lw=0.8, ls=ls)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig: plt.Figure, path: str | Path) -> Path:
    """Write and close ``fig``; temp file + rename, so a reader never sees a half-written PNG."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
