"""What a training run logs about its operator, the Hopf early warning, and a checkpoint's fingerprint."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ept.config import SolverConfig
from ept.diagnostics.energy import energy_report
from ept.diagnostics.fidelity import SOLVER_FIELDS, fidelity_report
from ept.diagnostics.operators import (
    DENSE_MAX,
    ftle,
    nonnormality,
    numerical_abscissa,
    rho_SinvA,
    spectral_abscissa,
    symmetric_fraction,
)
from ept.grad.common import free_phase, n_targets
from ept.model import EquilibriumLM

NAN = float("nan")


def operator_report(
    model: EquilibriumLM,
    x: Tensor,
    z: Tensor,
    full: bool = False,
    dense_max: int = DENSE_MAX,
    tol: float = 1e-6,
    seed: int = 0,
) -> dict[str, float]:
    """The abscissas and non-normality of J at (x, z); ``full`` adds ρ(S⁻¹A) (inner solves: costly)."""
    out = dict.fromkeys(("numerical_abscissa", "spectral_abscissa", "spectral_imag", "nonnormality"), NAN)
    if full:
        out["rho_SinvA"] = out["symmetric_fraction"] = NAN
    if not bool(torch.isfinite(z).all()):  # a blown-up free phase has no operator worth probing
        return out
    out["numerical_abscissa"] = numerical_abscissa(model, x, z, dense_max=dense_max, tol=tol)
    alpha, imag = spectral_abscissa(model, x, z, dense_max=dense_max, tol=tol)
    out["spectral_abscissa"], out["spectral_imag"] = alpha, imag
    out["nonnormality"] = nonnormality(model, x, z, probes=2, generator=torch.Generator().manual_seed(seed))
    if full:
        out["rho_SinvA"] = rho_SinvA(model, x, z, dense_max=dense_max, tol=tol)
        out["symmetric_fraction"] = symmetric_fraction(model, x, z, probes=2,
                                                       generator=torch.Generator().manual_seed(seed))
    return out


def training_diagnostics(
    model: EquilibriumLM,
    idx: Tensor,
    targets: Tensor,
    grad_opts: dict[str, Any] | None = None,
    max_seqs: int = 2,
    dense_max: int = DENSE_MAX,
) -> dict[str, float]:
    """The set to log every ``--diag_cos`` steps: residual, cosines (overall and per group),
    numerical and spectral abscissa, non-normality.

    The operator is probed on the first ``max_seqs`` sequences only (J is block diagonal over
    sequences, so this is a sample of the batch's blocks, not an approximation of one).
    """
    report, ep_stats = fidelity_report(model, idx, targets, grad_opts)
    z = ep_stats["z_star"][:max_seqs]
    with torch.no_grad():
        x = model.inject(idx[:max_seqs])
    report.update(operator_report(model, x, z, dense_max=dense_max))
    return report


def _series(history: Sequence[Any], key: str) -> list[float]:
    """Values of ``key`` from records (dicts), or the first entries of tuples, or plain numbers."""
    out = []
    for h in history:
        if isinstance(h, Mapping):
            if key in h and h[key] is not None:
                out.append(float(h[key]))
        elif isinstance(h, (tuple, list)):
            out.append(float(h[0]))
        elif key == "residual":
            out.append(float(h))
    return out


def _stalled_oscillating(res: list[float], res_target: float) -> bool:
    """No downward progress over the window, above target, with the direction flipping often."""
    if len(res) < 6 or not all(np.isfinite(res)):
        return False
    half = len(res) // 2
    above = min(res) > res_target
    stalled = min(res[half:]) > 0.5 * min(res[:half])
    steps = np.sign(np.diff(res))
    flips = np.mean(steps[1:] * steps[:-1] < 0) if len(steps) > 1 else 0.0
    return above and stalled and flips >= 0.5


def hopf_warning(
    history: Sequence[Any],
    margin: float = 0.1,
    window: int = 8,
    res_target: float = 1e-3,
) -> str | None:
    """A one-line warning when the operator nears the Hopf boundary, naming the control to try.

    ``history``: logged records (dicts with ``spectral_abscissa`` and/or ``residual``, oldest
    first), or a residual trajectory (numbers, or ``SolveStats.history`` tuples). Fires when the
    latest spectral abscissa is above ``-margin``, or when the last ``window`` residuals stay above
    ``res_target`` without halving while their direction keeps flipping (a limit cycle, not a
    slow convergence). None otherwise.
    """
    alpha = _series(history, "spectral_abscissa")
    imag = _series(history, "spectral_imag")
    if alpha and np.isfinite(alpha[-1]) and alpha[-1] > -margin:
        pair = f" (eigenvalue pair {alpha[-1]:+.3g} ± {imag[-1]:.3g}i)" if imag else ""
        return (
            f"Hopf warning: spectral abscissa {alpha[-1]:+.3g} is within {margin:g} of 0{pair}; the free "
            "phase is losing contraction: try --eigreg 0.1 --eig_margin 1.0 (or --jacreg 0.1 --jr_floor 0.1)"
        )
    res = _series(history, "residual")[-window:]
    if _stalled_oscillating(res, res_target):
        return (
            f"Hopf warning: the free-phase residual stalls near {res[-1]:.2g} while oscillating over "
            f"the last {len(res)} records (a limit cycle, not slow convergence): try --eigreg 0.1 "
            "--eig_margin 1.0 or --jacreg 0.1 --jr_floor 0.1 (--resreg 0.2 damps the residual directly)"
        )
    return None


class ContractionWatch:
    """Early warning that training is drifting the operator off contraction, from the logged records.

    Three signals, each reported once (the step, what moved, the control that holds it):
    - ``fevals``: the free phase's median F-evals over the last ``recent`` logs exceed ``factor`` ×
      their median over the run's first ``baseline`` logs (a slowing relaxation: its slowest mode
      nears 0);
    - ``dropped``: sequences left out of EP (no equilibrium below drop_res) in ``recent`` logs
      running, on average at least ``drop_share`` of the ``batch`` (without a batch size: any);
    - ``omega``: the logged numerical abscissa ω(J) (``--diag_cos``) rising above ``-omega_margin``
      after it had been below (a block that was never contractive in norm, as most trained ones are
      not, would warn at its first record and say nothing). Where eigreg's schedule has loosened
      the hold past 0 (the records' ``eig_margin`` < 0), the bar is the loosened bound ``-eig_margin``:
      the tiny preset lets ω reach +1.5 over its decay by design.
    """

    def __init__(self, control: str, factor: float = 2.0, baseline: int = 5, recent: int = 3,
                 omega_margin: float = 0.05, batch: int | None = None, drop_share: float = 0.05):
        self.control, self.factor, self.baseline, self.recent = control, factor, baseline, recent
        self.omega_margin, self.batch, self.drop_share = omega_margin, batch, drop_share
        self.fevals: list[float] = []
        self.dropped: list[tuple[float, float]] = []  # (mean a step, most in one step) per log
        self.fired: set[str] = set()
        self.omega_held = False  # a record had ω below -omega_margin
        self.margin: float | None = None  # eigreg's margin in force, from the last record that logged it

    def _fire(self, signal: str, what: str) -> dict[str, Any] | None:
        if signal in self.fired:
            return None
        self.fired.add(signal)
        return {"signal": signal, "message": f"contraction warning: {what}; {self.control}"}

    def _omega_bar(self) -> float:
        return max(-self.omega_margin, -self.margin) if self.margin is not None else -self.omega_margin

    def update(self, rec: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Feed one metrics record (a log window or a diag record); returns the warnings it raised."""
        out = []
        if rec.get("eig_margin") is not None:
            self.margin = float(rec["eig_margin"])
        if rec.get("T1") is not None and "loss" in rec:
            self.fevals.append(float(rec["T1"]))
            most = float(rec.get("dropped_seqs_max", rec.get("dropped_seqs", 0.0)))
            self.dropped.append((float(rec.get("dropped_seqs", most)), most))
            if len(self.fevals) >= self.baseline + self.recent:
                base = float(np.median(self.fevals[: self.baseline]))
                now = float(np.median(self.fevals[-self.recent:]))
                if now > self.factor * base:
                    out.append(self._fire("fevals", f"the free phase's F-evals rose from {base:.0f} to "
                                                    f"{now:.0f} (median of the last {self.recent} logs)"))
            last = self.dropped[-self.recent:]
            share = sum(mean for mean, _ in last) / len(last) / self.batch if self.batch else 1.0
            if len(last) == self.recent and min(most for _, most in last) > 0 and share >= self.drop_share:
                what = f"up to {max(most for _, most in last):.0f} a step left out of EP"
                if self.batch:
                    what += f", {share:.0%} of the batch"
                out.append(self._fire("dropped", f"sequences found no equilibrium in {self.recent} logs "
                                                 f"running ({what})"))
        omega = rec.get("numerical_abscissa")
        if omega is not None and np.isfinite(omega) and omega <= -self.omega_margin:
            self.omega_held = True
        elif omega is not None and np.isfinite(omega) and self.omega_held and omega > self._omega_bar():
            bar = "no contraction margin left" if self._omega_bar() < 0 else (
                f"above {self._omega_bar():+.2f}, the bound eigreg's loosened schedule holds now")
            out.append(self._fire("omega", f"the numerical abscissa ω(J) is {omega:+.3f}, {bar}"))
        return [w for w in out if w is not None]


def fingerprint(
    model: EquilibriumLM,
    batches: Iterable[tuple[Tensor, Tensor]],
    grad_opts: dict[str, Any] | None = None,
    max_seqs: int = 2,
    dense_max: int = DENSE_MAX,
) -> dict[str, float]:
    """A checkpoint's operator and gradient fingerprint, and its cross-entropy over ``batches``.

    Keys: residual, residual_max, cos_ep_implicit, cos_ep_bptt (and the per-group cosines),
    numerical_abscissa, spectral_abscissa, spectral_imag, nonnormality, rho_SinvA, ftle, val_ce.
    The operator and gradients are measured on the first batch; val_ce averages over all of them.
    """
    grad_opts = dict(grad_opts or {})
    solver = SolverConfig(**{("method" if k == "solver" else k): v for k, v in grad_opts.items()
                             if k in SOLVER_FIELDS})
    out: dict[str, float] = {}
    losses, weights = [], []
    for i, (idx, targets) in enumerate(batches):
        if i == 0:
            report, ep_stats = fidelity_report(model, idx, targets, grad_opts)
            out.update(report)
            z = ep_stats["z_star"][:max_seqs]
            with torch.no_grad():
                x = model.inject(idx[:max_seqs])
            out.update(operator_report(model, x, z, full=True, dense_max=dense_max))
            out["ftle"] = ftle(model, x, steps=max(solver.T1, 50), eps=solver.eps,
                               generator=torch.Generator().manual_seed(0))
            if model.cfg.attn_mode == "energy":  # the Lyapunov check, at a step below the stiff end
                out.update(energy_report(model, x, eps=0.1, steps=100))
            losses.append(out["loss"])
        else:
            with torch.no_grad():
                z_star, _ = free_phase(model, model.inject(idx), solver)
                losses.append(model.loss(z_star, targets).item())
        weights.append(n_targets(targets))  # val_ce is the mean over the targets >= 0
    if not losses:
        raise ValueError("fingerprint needs at least one batch")
    out["val_ce"] = float(np.average(losses, weights=weights))
    return out
