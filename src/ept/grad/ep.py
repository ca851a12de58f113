"""Equilibrium Propagation: λ from the displacement of nudged equilibria, then one local vjp.

The nudged phase relaxes

    ż = F(z) - β·∂L/∂z(z) - (J - Jᵀ)(z - z*)

from z*. The last term (AsymEP) turns the nudged linearisation from J into Jᵀ, so to first order
z_β - z* = β·J⁻ᵀg = -β·λ for a non-conservative F too. All the β's an estimator needs are relaxed
together as one stacked batch (rows are independent systems), complex ones in complex arithmetic,
and a real field's conjugate nudges are never relaxed: z_{β̄} = conj(z_β).
"""

from __future__ import annotations

import cmath
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from ept.config import EPConfig, SolverConfig
from ept.distributed import SINGLE, Group
from ept.grad.common import Grads, free_phase, local_update, loss_grad_z, n_targets, solve_summary
from ept.model import EquilibriumLM
from ept.solvers import SolveStats, relax


def contour(cfg: EPConfig) -> tuple[list[complex], list[complex]]:
    """Nudges to relax and their weights: λ ≈ -Re Σ_k w_k (z_{β_k} - z*).

    Holomorphic N-point (Laborieux & Zenke): β_k = r·e^{2πik/N}, w_k = e^{-2πik/N}/(N r), error O(r^N).
    Only k ≤ N/2 is relaxed; each skipped conjugate doubles its partner's (real-part) weight.
    """
    r = complex(cfg.hr)
    if cfg.estimator == "onesided":
        return [r], [1 / r]
    if cfg.estimator == "centred":
        return [r, -r], [1 / (2 * r), -1 / (2 * r)]
    n = cfg.holo
    betas, weights = [], []
    for k in range(n // 2 + 1):
        unit = cmath.exp(2j * cmath.pi * k / n)
        beta = complex(round((r * unit).real, 15), round((r * unit).imag, 15))
        paired = 1 if (k == 0 or 2 * k == n) else 2
        betas.append(beta)
        weights.append(paired / (n * r * unit))
    return betas, weights


def _transpose_apply(vjp_fn: Callable[[Tensor], tuple[Tensor]], d: Tensor) -> Tensor:
    """Jᵀd from PyTorch's vjp, which returns J^H d for complex (holomorphic) maps."""
    return vjp_fn(d.conj())[0].conj() if d.is_complex() else vjp_fn(d)[0]


def _split_apply(op: Callable[[Tensor], Tensor], d: Tensor) -> Tensor:
    """Apply a real linear operator to a possibly complex vector."""
    if d.is_complex():
        return torch.complex(op(d.real.contiguous()), op(d.imag.contiguous()))
    return op(d)


LinearMap = Callable[[Tensor], Tensor]


def linearisation(f: LinearMap, z: Tensor) -> tuple[LinearMap, LinearMap]:
    """(d ↦ J d, d ↦ Jᵀ d) of ``f`` at ``z``, both from graphs recorded once.

    Jᵀ is the saved vjp. J is the vjp of that vjp (the map u ↦ Jᵀu is linear, so its own vjp is J):
    a second reverse pass through a recorded graph, 3-4× cheaper on CPU than a fresh forward-mode jvp
    per call, and it records the field once, so J and Jᵀ are transposes of the same (possibly noisy)
    operator. Real maps only; :func:`_split_apply` takes complex vectors apart.
    """
    with torch.enable_grad():
        _, jt_fn = vjp(f, z)
        _, j_fn = vjp(lambda u: jt_fn(u)[0], torch.zeros_like(z))
    return (lambda d: j_fn(d)[0]), (lambda d: jt_fn(d)[0])


class NudgedField:
    """G(z) = F(z) - β·∂(Σ CE)/∂z - (J - Jᵀ)(z - z*) over a stack of nudged states.

    Rows are independent systems, so :meth:`rows` cuts it to a sub-batch (re-linearising there):
    the solver then relaxes only the sequences whose estimate has not settled.

    With ``asym="linear"`` the field is F's linearisation at z* instead, G(z) = F(z*) + Jᵀ(z - z*) -
    β·∂(Σ CE)/∂z: it drops F's remainder F(z) - F(z*) - J(z - z*), which is O(β²), so the β¹
    coefficient the estimators extract is unchanged and the centred and holomorphic estimates keep
    their order, while a step costs one vjp and the nudge
    (~2.5x less than F, J and Jᵀ). The nudged phase is then the relaxation of the linear response
    (the adjoint system, with the loss still nonlinear), not the nonlinear system's own.
    """

    def __init__(self, model: EquilibriumLM, x: Tensor, targets: Tensor, z_star: Tensor, beta: Tensor,
                 asym: str):
        self.model, self.x, self.targets = model, x, targets
        self.z_star, self.beta, self.asym = z_star, beta, asym
        # The nudge is β·∂(Σ CE)/∂z over the targets >= 0: counted once here, not at every step.
        self.n_targets = n_targets(targets)
        if asym == "fixed":
            self._j, self._jt = linearisation(self._unfused, z_star)
        elif asym == "linear":
            with torch.enable_grad():  # a single reverse pass, which SDPA has: the fused field
                f_star, jt_fn = vjp(lambda z: self.model.field(z, self.x), z_star)
            self._f_star, self._jt = f_star.detach(), (lambda d: jt_fn(d)[0])

    def _unfused(self, z: Tensor) -> Tensor:
        # SDPA has neither a forward-mode nor a double-backward derivative.
        return self.model.field(z, self.x, fused=False)

    def __call__(self, z: Tensor) -> Tensor:
        nudge = self.beta * loss_grad_z(self.model, z, self.targets, scale=self.n_targets,
                                        count=self.n_targets)
        if self.asym == "none":
            return self.model.field(z, self.x) - nudge
        d = z - self.z_star
        if self.asym == "linear":
            return self._f_star - nudge + _split_apply(self._jt, d)
        if self.asym == "fixed":
            return self.model.field(z, self.x) - nudge - _split_apply(lambda u: self._j(u) - self._jt(u), d)
        with torch.enable_grad():
            fz, jt = vjp(self._unfused, z)
        jd = jvp(self._unfused, (z,), (d,))[1]
        return fz.detach() - nudge - (jd - _transpose_apply(jt, d)).detach()

    def rows(self, idx: Tensor) -> NudgedField:
        return NudgedField(self.model, self.x[idx], self.targets[idx], self.z_star[idx], self.beta[idx],
                           self.asym)


def ep_gradient(
    model: EquilibriumLM, idx: Tensor, targets: Tensor, solver: SolverConfig, cfg: EPConfig,
    group: Group = SINGLE,
) -> tuple[Grads, dict[str, Any]]:
    """EP's gradient of the mean loss (over the targets >= 0) of the sequences that reached an
    equilibrium; a sequence with no target is not relaxed and contributes nothing.

    With ``cfg.polish_res`` > 0, z* is first refined by Anderson (:func:`polish`), and ``drop_res``
    judges the refined residual. Sequences whose free residual is above ``cfg.drop_res`` are left
    out, and so are those whose adaptive nudged estimate never settled (``cfg.drop_unsettled``;
    unless none did). A nudged phase that blows up is relaxed once more (``cfg.retry_hr`` > 0)
    without the sequences whose rows blew up, at hr·retry_hr. With no sequence left, or with a free
    phase that blew up, the direct term is returned, flagged ``diverged``, at no further cost.

    Under data parallelism (``group``, this rank's slice of the global batch in ``idx``) every one
    of those decisions is taken over the global batch, so each rank takes the branch one process
    holding the whole batch would; the gradient is the mean over this rank's kept targets
    (``stats["kept_targets"]`` weighs it in :func:`ept.distributed.all_reduce_grads`).
    """
    x = model.inject(idx).detach()
    z_star, free_stats = free_phase(model, x, solver)
    polish_fevals = 0
    if cfg.polish_res > 0 and not free_stats.diverged:
        z_star, free_stats, polish_fevals = polish(model, x, z_star, free_stats, solver, cfg)
    free_diverged = group.any(free_stats.diverged)
    if free_diverged != free_stats.diverged:  # a peer's free phase blew up: so has the global batch's
        free_stats = dataclasses.replace(free_stats, diverged=True)
    B = idx.shape[0]
    keep = torch.zeros(B, dtype=torch.bool)
    if not free_diverged:
        keep = (free_stats.residual_per_seq <= cfg.drop_res).cpu()
    # No sequence reached drop_res although none blew up: a stalled free phase, not a nudged blow-up.
    free_unsettled = not free_diverged and not group.any(bool(keep.any()))
    # A sequence with no target (an MLM row without a masked token) has no nudge and no λ: it
    # contributes nothing, so it is not relaxed, and is not counted as dropped.
    has_target = (targets >= 0).any(-1).cpu()
    keep &= has_target
    lam = torch.zeros_like(z_star)
    nudge_stats, retried, nudge_diverged = SolveStats(method="skipped", diverged=True), False, True
    # A rank with no kept sequence while a peer has some relaxes nothing (its gradient weighs 0).
    idle = SolveStats(method="skipped", diverged=False)

    def any_blew_up() -> bool:  # a nudged phase that ran on some rank blew up
        return group.any(bool(keep.any()) and nudge_stats.diverged)

    if group.any(bool(keep.any())):
        lam_k, nudge_stats = _lambda_of(model, x, targets, z_star, keep, solver, cfg) if bool(keep.any()) \
            else (lam, idle)
        if any_blew_up() and cfg.retry_hr > 0:
            retried = True
            if bool(keep.any()) and nudge_stats.unstable is not None:
                kept = keep.nonzero().flatten()  # the stacked rows are (nudge, kept sequence)
                keep[kept[nudge_stats.unstable.cpu().view(-1, len(kept)).any(0)]] = False
            if group.any(bool(keep.any())):
                lam_k, nudge_stats = (_lambda_of(model, x, targets, z_star, keep, solver,
                                                 dataclasses.replace(cfg, hr=cfg.hr * cfg.retry_hr))
                                      if bool(keep.any()) else (lam, idle))
        nudge_diverged = any_blew_up() or not group.any(bool(keep.any()))
        if not nudge_diverged:
            kept = keep.nonzero().flatten()
            late = unsettled(nudge_stats, cfg, len(kept)) if len(kept) else torch.zeros(0, dtype=torch.bool)
            n_late, n_kept = group.sum([int(late.sum()), len(kept)])
            if cfg.drop_unsettled and 0 < n_late < n_kept and len(kept):
                # λ is for the mean loss: over fewer targets, each one weighs more.
                kt = targets[kept.to(targets.device)]
                left = n_targets(kt[~late.to(kt.device)])
                lam_k = lam_k[~late.to(lam_k.device)] * (n_targets(kt) / left if left else 0.0)
                keep[kept[late]] = False
            if bool(keep.any()):
                lam[keep.to(lam.device)] = lam_k
        elif not nudge_stats.diverged:
            nudge_stats = dataclasses.replace(nudge_stats, diverged=True)  # the global batch's did
    if nudge_diverged:
        keep = torch.ones(B, dtype=torch.bool)  # the flagged step reports its direct term on the whole batch
    k = keep.to(idx.device)
    grads = local_update(model, idx[k], targets[k], z_star[k], lam[k])
    with torch.no_grad():
        loss = model.loss(z_star, targets).item()
    stats = {"loss": loss, **solve_summary("free", free_stats), **solve_summary("nudged", nudge_stats)}
    dropped = float(int((~keep & has_target).sum()))
    kept_targets = n_targets(targets[k]) if not nudge_diverged else 0
    stats.update(T2=nudge_stats.fevals, polish_fevals=polish_fevals, free_unsettled=free_unsettled,
                 nudged_states=len(contour(cfg)[0]),
                 nudged_retry=float(retried),
                 dropped_seqs=dropped, dropped_seqs_max=dropped,
                 kept_targets=kept_targets, kept=keep, z_star=z_star, lam=lam)
    return grads, stats


_POLISH_STALL = 16
_NUDGE_STALL = 32


def polish(model: EquilibriumLM, x: Tensor, z_star: Tensor, stats: SolveStats, solver: SolverConfig,
           cfg: EPConfig) -> tuple[Tensor, SolveStats, int]:
    """z* refined by Anderson to ``cfg.polish_res`` (see :class:`EPConfig`), the free phase's stats
    updated to the refined state (its F-evals included), and the polishing F-evals.

    Only the rows within ``cfg.polish_from`` × ``solver.res_est`` are polished; a row keeps its
    free-phase state unless polishing lowered its residual; a polish that blows up changes nothing.
    """
    assert stats.residual_per_seq is not None
    # Next to an equilibrium the secant model is good from the first step: no plain-step gate, and
    # the nudged phase's short, lightly regularised memory (it too starts next to its solution). A
    # sequence polishing has not halved in 16 steps has no equilibrium nearby (polishing is bimodal:
    # docs/experiments/polishing.md): the stall guard hands it to plain steps whatever the free
    # solver's own ``stall``, and without the long steps of the stall escape, which would carry it
    # along the dynamics away from the attractor the free phase found: polishing refines z*, it does
    # not travel.
    pcfg = dataclasses.replace(solver, method="anderson", T1=0, t1max=cfg.polish_max, res_est=cfg.polish_res,
                               accel_from=math.inf, m=cfg.nudge_m, lam=cfg.nudge_lam, stall=_POLISH_STALL,
                               proj_jump=0.0, dtype="float32")
    before = stats.residual_per_seq
    near = before.to(x.device) <= solver.res_est * cfg.polish_from
    if not bool(near.any()):
        return z_star, stats, 0
    rows = near.nonzero().flatten()
    zn, pst = free_phase(model, x[rows], pcfg, z0=z_star[rows])
    out = dataclasses.replace(stats, fevals=stats.fevals + pst.fevals, history=stats.history + pst.history,
                              row_fevals=stats.row_fevals + pst.row_fevals)
    if pst.diverged or pst.residual_per_seq is None:
        return z_star, out, pst.fevals
    res, z = before.clone(), z_star.clone()
    better = pst.residual_per_seq.to(before.device) < before[rows.cpu()]
    res[rows.cpu()[better]] = pst.residual_per_seq.to(before.device)[better]
    z[rows[better.to(rows.device)]] = zn[better.to(zn.device)]
    out.residual_per_seq, out.residual, out.residual_max = res, res.mean().item(), res.max().item()
    out.converged = bool((res <= solver.res_est).all())
    return z, out, pst.fevals


def _lambda_of(model: EquilibriumLM, x: Tensor, targets: Tensor, z_star: Tensor, keep: Tensor,
               solver: SolverConfig, cfg: EPConfig) -> tuple[Tensor, SolveStats]:
    """λ for the mean loss over the kept sequences."""
    k = keep.to(x.device)
    return ep_lambda(model, x[k], targets[k], z_star[k], solver, cfg)


def ep_lambda(
    model: EquilibriumLM, x: Tensor, targets: Tensor, z_star: Tensor, solver: SolverConfig, cfg: EPConfig
) -> tuple[Tensor, SolveStats]:
    """The EP estimate of λ = -J⁻ᵀ ∂L/∂z (for the mean loss over the targets >= 0) from nudged
    relaxations at z*."""
    z_beta, stats, estimate = nudged_phase(model, x, targets, z_star, solver, cfg)
    return estimate(z_beta) / max(n_targets(targets), 1), stats


def unsettled(stats: SolveStats, cfg: EPConfig, n_seq: int) -> Tensor:
    """The sequences whose adaptive nudged estimate had not settled when the phase stopped."""
    if cfg.T2 is not None or stats.flagged is None:
        return torch.zeros(n_seq, dtype=torch.bool)
    return ~stats.flagged.cpu().view(-1, n_seq).all(0)


def contour_estimate(z: Tensor, zs: Tensor, w: Tensor, S: int) -> Tensor:
    """-Re Σ_k w_k (z_{β_k} - z*) over S nudged states stacked along the batch (λ for the summed loss)."""
    shape = (S, zs.shape[0] // S, *zs.shape[1:])
    v = -(w.view(-1, *([1] * (len(shape) - 1))) * (z - zs).view(shape)).sum(0)
    return v.real if v.is_complex() else v


def nudged_phase(
    model: EquilibriumLM, x: Tensor, targets: Tensor, z_star: Tensor, solver: SolverConfig, cfg: EPConfig
) -> tuple[Tensor, SolveStats, Callable[[Tensor], Tensor]]:
    """Relax every nudge of the estimator from z*, stacked along the batch.

    Returns the stacked states, the relaxation's stats, and the estimator mapping stacked states to
    λ for the summed loss. Adaptive T2 freezes a sequence once its estimate's relative change is
    below ``t2_tol`` (its rows stop there, the others go on, on a sub-batch) and stops when every
    sequence is frozen or at ``t2sel``; :func:`unsettled` names the sequences that never froze.
    """
    betas, weights = contour(cfg)
    S, B = len(betas), z_star.shape[0]
    complex_nudges = any(b.imag != 0 for b in betas)
    dtype = z_star.dtype
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    sdtype = cdtype if complex_nudges else dtype

    def stack(t: Tensor) -> Tensor:
        return t.repeat(S, *([1] * (t.dim() - 1)))

    zs, xs, ts = stack(z_star), stack(x), stack(targets)
    if not complex_nudges:
        betas, weights = [b.real for b in betas], [c.real for c in weights]
    beta = torch.tensor(betas, dtype=sdtype).repeat_interleave(B).view(-1, *([1] * (z_star.dim() - 1)))
    w = torch.tensor(weights, dtype=sdtype)

    def estimate(z: Tensor) -> Tensor:
        return contour_estimate(z, zs, w, S)

    field = NudgedField(model, xs, ts, zs, beta, cfg.asym)
    adaptive = cfg.T2 is None
    prev: dict[str, Tensor] = {}

    def settled(z: Tensor, _: Tensor) -> Tensor:
        # Per sequence: one hard sequence must not keep the settled ones relaxing (and drifting:
        # on a trained block a settled estimate can wander off again).
        v = estimate(z).flatten(1)
        last = prev.get("v")
        prev["v"] = v
        if last is None:
            return torch.zeros(S * B, dtype=torch.bool, device=z.device)
        norm = torch.linalg.vector_norm
        change = norm(v - last, dim=1) / norm(v, dim=1).clamp_min(1e-30)
        return (change < cfg.t2_tol).repeat(S)

    steps = cfg.t2sel if adaptive else cfg.T2
    # z* is a good point to extrapolate from, so Anderson starts at once (no plain-step gate).
    # The stall guard is the free phase's (a ghost of a root); the nudged phase keeps the 32 steps its
    # settings were measured with, whatever the free solver's own ``stall``.
    nudge_cfg = dataclasses.replace(solver, method=cfg.nudge_solver, T1=0 if adaptive else steps, t1max=steps,
                                    res_est=0.0, accel_from=math.inf, m=cfg.nudge_m, lam=cfg.nudge_lam,
                                    stall=_NUDGE_STALL)
    with torch.no_grad():
        z_beta, stats = relax(field, zs.to(sdtype), nudge_cfg, monitor=settled if adaptive else None)
    return z_beta, stats, estimate
