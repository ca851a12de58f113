"""Gradient routes behind one function.

    grads, stats = ept.gradient(model, idx, targets, route="ep")          # EP, centred + AsymEP
    grads, stats = ept.gradient(model, idx, targets, route="implicit")    # the exact oracle
    grads, stats = ept.gradient(model, idx, targets, route="bptt", T1=150)

``grads`` maps ``model.named_parameters()`` names to tensors; nothing is written to ``.grad``.
Options are the fields of the route's config (:class:`~ept.config.EPConfig`,
:class:`~ept.config.ImplicitConfig`, :class:`~ept.config.BPTTConfig`) plus, for the routes that
relax to z*, the free-phase solver's (:class:`~ept.config.SolverConfig`, with ``solver`` naming
its method). A name that belongs to no option of the route is an error. The configs themselves
work too: ``ept.gradient(model, idx, targets, solver=SolverConfig(...), ep=EPConfig(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from ept.config import BPTTConfig, EPConfig, ImplicitConfig, SolverConfig, unknown_option_error
from ept.distributed import SINGLE, Group
from ept.grad.bptt import bptt_gradient
from ept.grad.common import Grads
from ept.grad.ep import ep_gradient
from ept.grad.implicit import implicit_gradient
from ept.model import EquilibriumLM

ROUTES = ("implicit", "bptt", "ep")
_ROUTE_CONFIG = {"implicit": ImplicitConfig, "bptt": BPTTConfig, "ep": EPConfig}


def _solver_options(opts: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(SolverConfig)} - {"method"}
    out = {k: opts.pop(k) for k in list(opts) if k in names}
    if "solver" in opts:
        out["method"] = opts.pop("solver")
    return out


def split_options(route: str, opts: dict[str, Any]) -> tuple[SolverConfig | None, Any]:
    """Parse ``opts`` into (free-phase solver config, route config), refusing unknown names.

    ``solver`` may be a :class:`SolverConfig` and the route's own name its config (``ep=EPConfig(...)``,
    ``implicit=``, ``bptt=``); the other options then replace those configs' fields.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown gradient route '{route}': choose one of {', '.join(ROUTES)}")
    opts = dict(opts)
    cls = _ROUTE_CONFIG[route]
    base = opts.pop(route, None)
    if base is not None and not isinstance(base, cls):
        raise TypeError(f"{route}= takes an {cls.__name__}, got {type(base).__name__}")
    given_solver = route != "bptt" and isinstance(opts.get("solver"), SolverConfig)
    base_solver = opts.pop("solver") if given_solver else None
    route_names = [f.name for f in dataclasses.fields(cls)]
    route_opts = {k: opts.pop(k) for k in list(opts) if k in route_names}
    route_cfg = cls(**route_opts) if base is None else dataclasses.replace(base, **route_opts)
    solver = None
    if route != "bptt":
        solver_opts = _solver_options(opts)
        solver = SolverConfig(**solver_opts) if base_solver is None else dataclasses.replace(base_solver,
                                                                                             **solver_opts)
    for key in opts:
        valid = route_names + ([] if route == "bptt" else ["solver", *SolverConfig.__dataclass_fields__])
        raise unknown_option_error(f"'{route}' route", key, [v for v in valid if v != "method"])
    return solver, route_cfg


def gradient(
    model: EquilibriumLM, idx: Tensor, targets: Tensor, route: str = "ep", *, group: Group = SINGLE,
    **opts: Any
) -> tuple[Grads, dict[str, Any]]:
    """The loss gradient by the named route, and the stats of the relaxations that produced it.

    ``stats`` always holds ``loss``, ``free_residual``, ``free_residual_max``, ``free_fevals`` and
    ``diverged`` (True when a relaxation blew up or a gradient is not finite; the gradient is then
    returned as computed, never NaN-scrubbed, and the caller must not apply it).
    """
    solver, cfg = split_options(route, opts)
    if route == "implicit":
        grads, stats = implicit_gradient(model, idx, targets, solver, cfg)
    elif route == "bptt":
        grads, stats = bptt_gradient(model, idx, targets, cfg)
    else:
        grads, stats = ep_gradient(model, idx, targets, solver, cfg, group)
    finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
    stats["route"] = route
    stats["grads_finite"] = finite
    stats["diverged"] = (not finite) or any(v for k, v in stats.items() if k.endswith("_diverged"))
    return grads, stats


__all__ = ["gradient", "split_options", "ROUTES"]
