"""Free-phase cost: F-evaluations to a true residual, for ept's solvers and TorchDEQ's, on the same fields.

Every solver is handed the same field wrapped in :class:`FevalCounter`, which counts the calls and
measures the true residual ||F(z)||/||z|| (worst sequence) at each point it is called on, so the
count does not depend on a solver's own (damped or relative) stopping rule. A solve stops the moment
a call sees the target residual, by raising :class:`Reached`. ept's solvers freeze each sequence
once it meets the residual (as the library runs); TorchDEQ's iterate the whole batch until its worst
sequence meets it (as TorchDEQ runs).

The operator that matters is a trained one (at initialisation every solver is quick), so
:func:`trained_model` trains a tiny model with EP for a few hundred steps and caches its weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import ept
from ept.diagnostics.equilibria import equilibrium_gap, leaves_equilibrium
from ept.model import EquilibriumLM
from ept.solvers import residual_per_seq

Field = Callable[[Tensor], Tensor]
EPT_METHODS = ("fixed_point", "anderson", "broyden", "momentum")
# Plain iteration on both sides: on a trained operator it is sometimes the fastest (an accelerated
# solver can land on another equilibrium, or stall near a fold), and a user would pick it there.
PEER_METHODS = ("fixed_point_iter", "anderson", "broyden")
CKPT_WEIGHTS = ("ema", "model")


class Reached(Exception):
    """Raised by :class:`FevalCounter` once an evaluated point meets the target residual."""


class FevalCounter:
    """Wrap a field: count calls, record each call's true worst-sequence residual, stop at ``tol``."""

    def __init__(self, field_fn: Field, tol: float = 0.0, max_calls: int | None = None):
        self.field_fn, self.tol, self.max_calls = field_fn, tol, max_calls
        self.calls = 0
        self.residuals: list[float] = []
        self.hit: int | None = None  # the call count at which ``tol`` was first met
        self.z: Tensor | None = None  # ... and the point it was met at
        self.row_hits: Tensor | None = None  # per row, the call count it first met ``tol`` at (0: never)

    def __call__(self, z: Tensor) -> Tensor:
        fz = self.field_fn(z)
        self.calls += 1
        per_row = residual_per_seq(fz, z).cpu()
        if self.row_hits is None:
            self.row_hits = torch.zeros(per_row.shape[0], dtype=torch.long)
        self.row_hits[(per_row <= self.tol) & (self.row_hits == 0)] = self.calls
        worst = per_row.max().item()
        self.residuals.append(worst)
        if self.hit is None and worst <= self.tol:
            self.hit, self.z = self.calls, z.detach().clone()
            raise Reached
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise Reached
        return fz


def ept_fevals(field_fn: Field, z0: Tensor, method: str, tol: float, max_evals: int,
               eps: float = 0.5, **opts: Any) -> FevalCounter:
    """ept's ``method`` (with any further :func:`ept.solve` options) counted to ``tol``, run as the
    library runs it: each sequence freezes once it meets ``tol`` (its residual, the counter's
    criterion, stays there), so the count is the call at which the last sequence met it."""
    counter = FevalCounter(field_fn, tol, max_evals)
    try:
        ept.solve(counter, z0, method=method, tol=tol, max_iter=max_evals, eps=eps, **opts)
    except Reached:
        pass
    return counter


def have_torchdeq() -> bool:
    return importlib.util.find_spec("torchdeq") is not None


def torchdeq_fevals(field_fn: Field, z0: Tensor, method: str, tol: float, max_evals: int,
                    eps: float = 0.5) -> FevalCounter:
    """TorchDEQ's solver on the fixed-point map z + eps·F(z) (its own solvers seek f(z) = z)."""
    from torchdeq.solver import get_solver  # optional benchmark dependency

    counter = FevalCounter(field_fn, tol, max_evals)
    solver = get_solver(method)

    def fixed_point_map(z: Tensor) -> Tensor:
        return z + eps * counter(z)

    try:
        # tol=0 and a cap above ours: only the counter decides when to stop.
        solver(fixed_point_map, z0, max_iter=max_evals + 2, tol=0.0, stop_mode="rel")
    except Reached:
        pass
    return counter


def variants_arg(text: str | None, default: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A benchmark's ``--variants``: a JSON object of option objects (``default`` when not given);
    ValueError naming what is wrong."""
    if text is None:
        return default
    variants = json.loads(text)
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise ValueError("expected an object of objects")
    return variants


def evals_to(counter: FevalCounter) -> int | None:
    return counter.hit


def row_evals(counter: FevalCounter) -> list[int | None]:
    """Per row, the F-evaluations it took to meet the residual (None: not within the solve)."""
    hits = [] if counter.row_hits is None else counter.row_hits.tolist()
    return [h or None for h in hits]


def settled_rows(plain: FevalCounter) -> Tensor:
    """The rows (sequences) that plain iteration, the physical relaxation, settled to the counter's
    residual. The others have no attracting equilibrium within reach: a root finder may still meet
    the residual there, at a saddle the dynamics never rests at, so "F-evals to the same residual"
    is not defined for them (EP leaves them out of its gradient, by ``drop_res``)."""
    return torch.tensor([h is not None for h in row_evals(plain)], dtype=torch.bool)


def compare_solvers(field_fn: Field, z0: Tensor, tol: float, max_evals: int, peer: bool = True,
                    plain: FevalCounter | None = None) -> dict[str, int | float | None]:
    """F-evaluations to ``tol`` for each ept method and (when installed) TorchDEQ's; None: not reached.

    ``rows_ept_<method>`` lists each row's own count (a solve runs until the worst row is done; with
    row freezing a row costs only its own count).
    ``eq_gap`` is :func:`equilibrium_gap` between ept's Anderson and plain-iteration solutions;
    ``anderson_saddles`` counts the sequences where Anderson met the residual at a point plain
    iteration leaves (:func:`leaves_equilibrium`): F-evals to a state the physical dynamics never rests at;
    ``momentum_saddles`` the same for the heavy ball (0 expected: it follows the dynamics). A
    sequence where plain iteration's own point at ``tol`` is left too is no saddle but a slow passage
    the dynamics itself crosses there (``passages``), and is not counted for either.
    ``plain``: plain iteration's count on this same field and start, already taken (it is not rerun).
    """
    out: dict[str, int | float | None] = {}
    ends = {}
    with torch.no_grad():
        for m in EPT_METHODS:
            reuse = m == "fixed_point" and plain is not None
            counter = plain if reuse else ept_fevals(field_fn, z0, m, tol, max_evals)
            out[f"ept_{m}"], ends[m] = evals_to(counter), counter.z
            out[f"rows_ept_{m}"] = row_evals(counter)
        if peer and have_torchdeq():
            for m in PEER_METHODS:
                out[f"torchdeq_{m}"] = evals_to(torchdeq_fevals(field_fn, z0, m, tol, max_evals))
    out["eq_gap"] = equilibrium_gap(ends["anderson"], ends["fixed_point"])
    left = {m: None if ends[m] is None else leaves_equilibrium(field_fn, ends[m], 0.5) > 1e-2
            for m in ("fixed_point", "anderson", "momentum")}
    passage = left["fixed_point"]
    out["passages"] = None if passage is None else int(passage.sum())
    for m in ("anderson", "momentum"):
        saddle = left[m] if left[m] is None or passage is None else left[m] & ~passage
        out[f"{m}_saddles"] = None if saddle is None else int(saddle.sum())
    return out


def scaled_copy(model: EquilibriumLM, scale: float) -> EquilibriumLM:
    """The same block with its weight matrices multiplied by ``scale`` (harder, stiffer fields)."""
    other = EquilibriumLM(model.cfg)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.weight_matrices().values():
            p.mul_(scale)
    return other


# ------------------------------------------------------------------ the trained operator, cached


def cache_dir() -> Path:
    return Path(os.environ.get("EPT_CACHE") or Path.home() / ".cache" / "ept")


def _train_key(cfg: ept.EPTConfig, steps: int, opts: dict[str, Any], data_key: str) -> str:
    # v2: v1 cached whatever the training left, blown up or not (operator_trouble now refuses those).
    blob = json.dumps([cfg.to_dict(), steps, opts, data_key, "speed-v2"], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_ep(model: EquilibriumLM, tokens: Any, B: int, steps: int, opts: dict[str, Any], lr: float = 3e-3,
             seed: int = 0, log: Callable[[str], None] | None = None) -> list[float]:
    """A few hundred EP steps with AdamW: enough to move the operator away from its easy initial state.
    Returns each step's loss at its free equilibrium (nan where the step blew up and was skipped)."""
    from ept.data import get_batch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    losses: list[float] = []
    for step in range(steps):
        idx, tgt = get_batch(tokens, B, model.cfg.T, gen)
        grads, stats = ept.gradient(model, idx, tgt, route="ep", **opts)
        losses.append(math.nan if stats["diverged"] else float(stats["loss"]))
        if stats["diverged"]:
            continue
        for name, p in params.items():
            p.grad = grads[name]
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"train step {step}: loss {stats['loss']:.3f}, free fevals {stats['free_fevals']}")
    return losses


class OperatorBlewUp(ValueError):
    """The bench's own short EP training did not give a trained operator to measure."""


_BLOWN_UP = 1.1  # the last tenth's median loss over the first step's: an operator training made worse


def operator_trouble(losses: list[float], model: EquilibriumLM) -> str | None:
    """Why the operator :func:`train_ep` left is not a trained one to measure, or None.

    Its weights are not finite; most steps blew up; or the loss rose (the last tenth's median above
    1.1x the first step's): a blown-up block's equilibria are not what training gives. At the small
    preset the bench's 300 steps took the loss from 7.64 to 13.3 with the free phase at its cap.
    """
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return "its weights are not finite"
    taken = [x for x in losses if math.isfinite(x)]
    if len(taken) <= len(losses) / 2:
        return f"{len(losses) - len(taken)} of its {len(losses)} EP steps blew up"
    tail = statistics.median(taken[-max(1, len(taken) // 10):])
    if tail > _BLOWN_UP * taken[0]:
        return f"its loss rose from {taken[0]:.3f} at the first step to {tail:.3f} over the last tenth"
    return None


def trained_model(cfg: ept.EPTConfig, tokens: Any, data_key: str, B: int, steps: int, opts: dict[str, Any],
                  log: Callable[[str], None] | None = None,
                  ckpt: str | None = None, weights: str = "ema") -> tuple[EquilibriumLM, Path]:
    """The EP-trained model, from the cache when an identical run was done before, or from ``ckpt``
    (an ``ept train`` checkpoint of the same shapes). The weights file is what the memory children load.

    ``weights`` picks a checkpoint's parameter EMA (what ``ept eval``, ``generate`` and ``fingerprint``
    use, falling back to the raw weights when the run kept no EMA) or its raw last iterate ("model").
    """
    if weights not in CKPT_WEIGHTS:
        raise ValueError(f"weights '{weights}' is not one of {', '.join(CKPT_WEIGHTS)}")
    key = _train_key(cfg, steps, opts, data_key) if ckpt is None else hashlib.sha256(
        f"{Path(ckpt).resolve()}|{weights}".encode()).hexdigest()[:16]
    path = cache_dir() / f"speed-trained-{key}.safetensors"
    torch.manual_seed(0)
    model = EquilibriumLM(cfg)
    if ckpt is not None:
        from ept.checkpoint import load_checkpoint, load_weights_into

        loaded = load_checkpoint(ckpt, only=("ema", "model"))
        load_weights_into(model, loaded.eval_weights(raw=weights == "model")[1], str(loaded.path))
    elif path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model, path
    else:
        if log:
            log(f"training the benchmark's operator ({steps} EP steps); cached as {path}")
        losses = train_ep(model, tokens, B, steps, opts, log=log)
        trouble = operator_trouble(losses, model)
        if trouble:  # never cached: a later run would measure it without this warning
            raise OperatorBlewUp(f"the benchmark's own {steps}-step EP training blew the operator up "
                                 f"({trouble})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)  # never a half-written cache entry
    return model, path
