"""Gradient fidelity: EP against the implicit oracle and against BPTT, overall and per group."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ept.config import SolverConfig
from ept.grad import gradient
from ept.grad.common import Grads
from ept.model import EquilibriumLM

# Parameter groups by name prefix; the report gives one cosine per group and one overall.
GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.",),
    "ffn": ("ffn.",),
    "ln": ("ln1.", "ln2.", "ln_f."),
    "embed": ("wte.", "wpe."),
    "head": ("head.",),
}

SOLVER_FIELDS = {f.name for f in dataclasses.fields(SolverConfig)} | {"solver"}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def _flat(grads: Grads, names: list[str]) -> Tensor:
    return torch.cat([grads[n].reshape(-1).to(torch.float64) for n in names])


def compare(a: Grads, b: Grads, label: str) -> dict[str, float]:
    """cos, relnorm = ||a||/||b|| and relerr = ||a-b||/||b|| of ``a`` against the reference ``b``.

    Keys ``cos_<label>``, ``relnorm_<label>``, ``relerr_<label>`` and ``cos_<label>_<group>``.
    A group whose reference gradient is zero gets NaN (nothing to align with), not a fake 1.
    """
    out: dict[str, float] = {}
    names = list(b)
    by_group: dict[str, list[str]] = {}
    for n in names:
        by_group.setdefault(group_of(n), []).append(n)
    for suffix, subset in [("", names)] + [(f"_{g}", ns) for g, ns in by_group.items()]:
        va, vb = _flat(a, subset), _flat(b, subset)
        na, nb = torch.linalg.vector_norm(va).item(), torch.linalg.vector_norm(vb).item()
        ok = na > 0 and nb > 0
        out[f"cos_{label}{suffix}"] = (va @ vb).item() / (na * nb) if ok else float("nan")
        if not suffix:
            out[f"relnorm_{label}"] = na / nb if nb > 0 else float("nan")
            out[f"relerr_{label}"] = torch.linalg.vector_norm(va - vb).item() / nb if nb > 0 else float("nan")
    return out


def reference_options(
    grad_opts: dict[str, Any], dtype: torch.dtype = torch.float64
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The implicit and BPTT options matching an EP route's options.

    Implicit reuses the free-phase solver, with an adjoint tolerance the model's precision can
    reach (a float32 model never meets 1e-10, and GMRES would then run to its iteration cap).
    BPTT unrolls the seed's plain iteration for T1 steps (t1max when T1 is unset), same step ε.
    """
    solver = {k: v for k, v in grad_opts.items() if k in SOLVER_FIELDS}
    defaults = SolverConfig()
    T1 = solver.get("T1") or solver.get("t1max", defaults.t1max)
    adj_tol = 1e-10 if dtype == torch.float64 else 1e-5
    implicit = {**solver, "adj_tol": adj_tol, "adj_max_iter": 50}
    return implicit, {"T1": int(T1), "eps": solver.get("eps", defaults.eps)}


def gradient_cosines(
    model: EquilibriumLM,
    idx: Tensor,
    targets: Tensor,
    grad_opts: dict[str, Any] | None = None,
    implicit_opts: dict[str, Any] | None = None,
    bptt_opts: dict[str, Any] | None = None,
) -> dict[str, float]:
    """EP's gradient against the implicit and BPTT ones (see :func:`compare` for the keys).

    ``grad_opts`` are the EP route's options (as passed to ``ept.gradient``); the references'
    options default to :func:`reference_options` of them.
    """
    return fidelity_report(model, idx, targets, grad_opts, implicit_opts, bptt_opts)[0]


def fidelity_report(
    model: EquilibriumLM,
    idx: Tensor,
    targets: Tensor,
    grad_opts: dict[str, Any] | None = None,
    implicit_opts: dict[str, Any] | None = None,
    bptt_opts: dict[str, Any] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """:func:`gradient_cosines` and the EP route's stats (whose ``z_star`` the operator probes reuse)."""
    grad_opts = dict(grad_opts or {})
    imp_default, bptt_default = reference_options(grad_opts, model.head.weight.dtype)
    ep, ep_stats = gradient(model, idx, targets, "ep", **grad_opts)
    # EP's gradient is the mean over the sequences it kept (those that reached an equilibrium): the
    # references are taken over the same ones, else a batch holding one sequence with no
    # equilibrium compares two different means (cos 0.27 on a trained tiny block).
    kept = ep_stats.get("kept")
    if kept is not None and 0 < int(kept.sum()) < len(kept):
        k = kept.to(idx.device)
        idx, targets = idx[k], targets[k]
    imp, _ = gradient(model, idx, targets, "implicit", **(implicit_opts or imp_default))
    bptt, bptt_stats = gradient(model, idx, targets, "bptt", **(bptt_opts or bptt_default))
    out: dict[str, float] = {}
    out.update(compare(ep, imp, "ep_implicit"))
    out.update(compare(ep, bptt, "ep_bptt"))
    out["cos_bptt_implicit"] = compare(bptt, imp, "x")["cos_x"]
    out["residual"] = float(ep_stats["free_residual"])
    out["residual_max"] = float(ep_stats["free_residual_max"])
    out["free_fevals"] = float(ep_stats["free_fevals"])
    out["bptt_residual"] = float(bptt_stats["free_residual"])
    out["loss"] = float(ep_stats["loss"])
    out["kept_seqs"] = float(idx.shape[0])
    return out, ep_stats
