"""PNG figures of the operator: J's spectrum against the stability boundary, and a run's diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from ept.plots import finish_run_figure, save_png, series  # noqa: E402


def plot_spectrum(eigs: np.ndarray, path: str | Path, eps: float | None = None, title: str = "") -> Path:
    """Eigenvalues of J in the complex plane, with the Hopf boundary Re λ = 0 and, given the step
    ε, the region |1 + ελ| < 1 where the plain relaxation z ← z + εF(z) converges."""
    eigs = np.asarray(eigs)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.axvline(0.0, color="red", lw=1, label="Re λ = 0 (Hopf boundary)")
    if eps is not None:
        t = np.linspace(0, 2 * np.pi, 400)
        ax.plot(-1 / eps + np.cos(t) / eps, np.sin(t) / eps, color="grey", ls="--", lw=1,
                label=f"|1 + ελ| = 1 (ε = {eps:g})")
    unstable = eigs.real >= 0
    ax.scatter(eigs.real[~unstable], eigs.imag[~unstable], s=8, label="eigenvalues")
    if unstable.any():
        ax.scatter(eigs.real[unstable], eigs.imag[unstable], s=14, color="red", label="Re λ ≥ 0")
    top = eigs[np.argmax(eigs.real)]
    ax.set(xlabel="Re λ", ylabel="Im λ",
           title=title or f"spectrum of J: abscissa {top.real:+.3g} (± {abs(top.imag):.3g}i)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return save_png(fig, path)


def plot_run(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and val CE, residual, gradient cosines and abscissas of a run, against the step.

    ``records`` are metrics.jsonl lines: training records (``loss``, ``free_residual``), val
    records (``val_ce``), ``--diag_cos`` records (``cos_ep_*``, ``*_abscissa``) and eigreg's ends of
    (J+Jᵀ)/2 (``eig_omega``, ``eig_bottom``) where the run logs them.
    """
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [
        (axes[0], "cross-entropy", [("loss", ("loss",)), ("val CE", ("val_ce",))], False),
        (axes[1], "||F(z*)|| / ||z*||", [("train", ("free_residual",)), ("diag", ("residual",))], True),
        (axes[2], "cosine", [("EP vs implicit", ("cos_ep_implicit",)), ("EP vs BPTT", ("cos_ep_bptt",))],
         False),
        # eigreg's Lanczos run reads both ends of S = (J+Jᵀ)/2 every step: the top it holds, and the
        # stiff end the heavy ball's step must cover (small_preset.md: -8.6 where the solver failed).
        (axes[3], "abscissa; ends of (J+Jᵀ)/2", [("spectral", ("spectral_abscissa",)),
                                                 ("numerical", ("numerical_abscissa",)),
                                                 ("eigreg: top of S", ("eig_omega",)),
                                                 ("eigreg: bottom of S", ("eig_bottom",))], False),
    ]
    for ax, ylabel, lines, log in panels:
        for label, keys in lines:
            xs, ys = series(records, *keys)
            if not xs:
                continue
            if log and all(y > 0 for y in ys):
                ax.semilogy(xs, ys, label=label, marker="o" if len(xs) < 30 else None, ms=3)
            else:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set(xlabel="step", ylabel=ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[3].axhline(0.0, color="red", lw=1, ls="--")
    steps = [r["step"] for r in records if isinstance(r.get("step"), int | float)]
    for ax in axes:
        if not ax.lines:  # e.g. cosines of a run without --diag_cos: say so, on the run's step range
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        if steps:
            ax.set_xlim(min(steps), max(max(steps), min(steps) + 1))
    return finish_run_figure(fig, axes, records, path, title, rollback_ls=":")
