"""The operator J = ∂F/∂z at a state, touched only through jvp and vjp, and what it tells.

Every estimator here has two paths: matrix-free (ARPACK/MINRES on a scipy ``LinearOperator``
built from ``torch.func.jvp``/``vjp``, float64 on the numpy side), which scales to real states,
and dense (the explicit Jacobian, one block per sequence) for states small enough to afford it.
The tests hold the first to the second. Sequences are independent systems, so J is block
diagonal over the batch: every abscissa is a maximum over sequences, and the dense path works
block by block.

Conventions: ``x`` is the clamped input ``model.inject(idx)``, ``z`` a state shaped like it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs, eigsh, minres
from torch import Tensor
from torch.func import jvp, linearize, vjp

from ept.model import EquilibriumLM

# States with at most this many entries per sequence use the dense path by default.
DENSE_MAX = 512


class JacobianOps:
    """Jv, Jᵀv, Sv, Av at (model, x, z), with S = (J+Jᵀ)/2 and A = (J-Jᵀ)/2.

    The vjp is linearised once and reused. Jv is the vjp of that linear map w ↦ Jᵀw (its own
    transpose), built on the first call: forward mode through the unfused attention cost 3× as
    much a product (71 ms against 24 at the tiny preset's B 8, 286 against 135 at small's B 16),
    and eigreg's Lanczos run takes one Jv per Lanczos step, every training step.
    ``linearize=True`` traces the forward-mode jvp once (about a second) and replays it: worth it
    for the hundreds of products of a nested solve.
    """

    def __init__(self, model: EquilibriumLM, x: Tensor, z: Tensor, linearize: bool = False):
        self.shape, self.dtype, self.device = z.shape, z.dtype, z.device
        self.n = z.numel()
        x, self.z = x.detach(), z.detach()
        self.f: Callable[[Tensor], Tensor] = lambda s: model.field(s, x, fused=False)
        with torch.enable_grad():
            _, self._vjp = vjp(self.f, self.z)
        self._jvp: Callable[[Tensor], Tensor] | None = None
        self._jv_of_vjp: Callable[[Tensor], tuple[Tensor]] | None = None
        if linearize:
            with warnings.catch_warnings():  # const-folding chatter from the tracer, harmless
                warnings.simplefilter("ignore", UserWarning)
                _, self._jvp = _linearize(self.f, self.z)

    def J(self, v: Tensor) -> Tensor:
        if self._jvp is not None:
            with torch.no_grad():
                return self._jvp(v).detach()
        if self._jv_of_vjp is None:
            with torch.enable_grad():
                _, self._jv_of_vjp = vjp(lambda w: self._vjp(w)[0], torch.zeros_like(self.z))
        return self._jv_of_vjp(v)[0].detach()

    def JT(self, v: Tensor) -> Tensor:
        return self._vjp(v)[0].detach()

    def S(self, v: Tensor) -> Tensor:
        return 0.5 * (self.J(v) + self.JT(v))

    def A(self, v: Tensor) -> Tensor:
        return 0.5 * (self.J(v) - self.JT(v))

    def linear_operator(self, which: str = "J") -> LinearOperator:
        """A float64 scipy operator for J (with Jᵀ as its adjoint), S or A, on flattened states."""
        apply = {"J": self.J, "S": self.S, "A": self.A}[which]
        adjoint = {"J": self.JT, "S": self.S, "A": lambda v: -self.A(v)}[which]
        return LinearOperator(
            (self.n, self.n), matvec=self._numpy(apply), rmatvec=self._numpy(adjoint), dtype=np.float64
        )

    def _numpy(self, op: Callable[[Tensor], Tensor]) -> Callable[[np.ndarray], np.ndarray]:
        def apply(v: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
            out = op(t.to(self.device, self.dtype).reshape(self.shape))
            return out.reshape(-1).to("cpu", torch.float64).numpy()

        return apply


def _linearize(f: Callable[[Tensor], Tensor], z: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    return linearize(f, z)


def dense_jacobian(model: EquilibriumLM, x: Tensor, z: Tensor) -> Tensor:
    """The full J = ∂F/∂z as an (n, n) matrix over the flattened state (only for small states)."""
    x, z = x.detach(), z.detach()
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(
            lambda s: model.field(s, x, fused=False), z, vectorize=True
        )
    return jac.reshape(z.numel(), z.numel())


def dense_blocks(model: EquilibriumLM, x: Tensor, z: Tensor) -> Tensor:
    """J one sequence at a time: (B, m, m) with m = T·C (J is block diagonal over the batch)."""
    return torch.stack([dense_jacobian(model, x[b : b + 1], z[b : b + 1]) for b in range(z.shape[0])])


def _use_dense(z: Tensor, dense_max: int) -> bool:
    return z[0].numel() <= dense_max


def _ncv(n: int, k: int) -> int:
    return min(n - 1, max(2 * k + 1, 40))


def numerical_abscissa(
    model: EquilibriumLM, x: Tensor, z: Tensor, dense_max: int = DENSE_MAX, tol: float = 1e-10
) -> float:
    """ω(J) = λ_max((J+Jᵀ)/2), the log-norm: ω < 0 guarantees ||z(t)-z*|| shrinks monotonically.

    Matrix-free: Lanczos (ARPACK ``eigsh``, largest algebraic) on S.
    """
    if _use_dense(z, dense_max):
        jac = dense_blocks(model, x, z).to(torch.float64)
        return torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1].max().item()
    op = JacobianOps(model, x, z).linear_operator("S")
    vals = eigsh(op, k=1, which="LA", tol=tol, ncv=_ncv(op.shape[0], 1), maxiter=20 * op.shape[0],
                 return_eigenvectors=False)
    return float(vals.max())


def leading_eigenvalues(
    model: EquilibriumLM, x: Tensor, z: Tensor, k: int = 6, dense_max: int = DENSE_MAX, tol: float = 1e-10
) -> np.ndarray:
    """Eigenvalues of J: all of them on the dense path, the ``k`` rightmost by Arnoldi otherwise."""
    if _use_dense(z, dense_max):
        jac = dense_blocks(model, x, z).to(torch.float64)
        return torch.linalg.eigvals(jac).reshape(-1).numpy()
    op = JacobianOps(model, x, z).linear_operator("J")
    k = min(k, op.shape[0] - 2)
    try:
        vals = eigs(op, k=k, which="LR", tol=tol, ncv=_ncv(op.shape[0], k), maxiter=50 * op.shape[0],
                    return_eigenvectors=False)
    except ArpackNoConvergence as err:  # keep the pairs that did converge rather than nothing
        vals = err.eigenvalues
        if len(vals) == 0:
            raise
    return np.asarray(vals)


def spectral_abscissa(
    model: EquilibriumLM, x: Tensor, z: Tensor, dense_max: int = DENSE_MAX, tol: float = 1e-10
) -> tuple[float, float]:
    """(α, |Im|): the largest real part of J's eigenvalues and the imaginary part it carries.

    α crossing 0 with |Im| > 0 is the Hopf bifurcation: the relaxation stops converging.
    """
    vals = leading_eigenvalues(model, x, z, k=4, dense_max=dense_max, tol=tol)
    top = vals[np.argmax(vals.real)]
    return float(top.real), float(abs(top.imag))


def _probes(z: Tensor, n: int, generator: torch.Generator | None) -> list[Tensor]:
    return [
        torch.randn(z.shape, generator=generator, dtype=torch.float64).to(z.device, z.dtype)
        for _ in range(n)
    ]


def nonnormality(
    model: EquilibriumLM, x: Tensor, z: Tensor, probes: int = 4, generator: torch.Generator | None = None
) -> float:
    """sqrt(Σ||(J-Jᵀ)v||² / Σ||Jv||²) over Gaussian probes v (the seed's ||Jv-Jᵀv||/||Jv||).

    With one probe this is the seed's number; the sums make it a ratio estimator of the
    deterministic ||J-Jᵀ||_F / ||J||_F (:func:`nonnormality_dense`), 0 for a conservative field.
    """
    ops = JacobianOps(model, x, z)
    num = den = 0.0
    for v in _probes(z, probes, generator):
        jv = ops.J(v)
        num += torch.linalg.vector_norm(jv - ops.JT(v)).item() ** 2
        den += torch.linalg.vector_norm(jv).item() ** 2
    return math.sqrt(num / max(den, 1e-300))


def symmetric_fraction(
    model: EquilibriumLM, x: Tensor, z: Tensor, probes: int = 4, generator: torch.Generator | None = None
) -> float:
    """‖S‖/(‖S‖ + ‖A‖) in the Frobenius norm, S and A the symmetric and antisymmetric parts of J:
    1 for a conservative block (F = −∇E), 1/2 where rotation is as strong as damping. Estimated by
    Gaussian probes, as :func:`nonnormality`."""
    ops = JacobianOps(model, x, z)
    s2 = a2 = 0.0
    for v in _probes(z, probes, generator):
        jv, jtv = ops.J(v), ops.JT(v)
        s2 += torch.linalg.vector_norm(0.5 * (jv + jtv)).item() ** 2
        a2 += torch.linalg.vector_norm(0.5 * (jv - jtv)).item() ** 2
    s, a = math.sqrt(s2), math.sqrt(a2)
    return s / max(s + a, 1e-300)


def nonnormality_dense(jac: Tensor) -> float:
    """||J-Jᵀ||_F / ||J||_F of an explicit (block-stacked) Jacobian."""
    jt = jac.transpose(-1, -2)
    return (torch.linalg.matrix_norm(jac - jt).norm() / torch.linalg.matrix_norm(jac).norm()).item()


def rho_SinvA(
    model: EquilibriumLM, x: Tensor, z: Tensor, dense_max: int = DENSE_MAX, tol: float = 1e-10,
    shift: float = 0.0,
) -> float:
    """ρ(S⁻¹A): how strongly the antisymmetric (rotating) part dominates the symmetric (damping) one.

    With S negative definite the eigenvalues of S⁻¹A are ±iμ and J = S(I + S⁻¹A): μ ≫ 1 means
    eigenvalues of J with large imaginary parts, an oscillating relaxation, the road to Hopf.
    Matrix-free: Arnoldi on v ↦ S⁻¹Av with MINRES inner solves (S is symmetric, maybe indefinite).
    ``shift`` measures S − shift·I instead: the same operator at the same state with its damping
    raised by ``shift``.
    """
    if _use_dense(z, dense_max):
        jac = dense_blocks(model, x, z).to(torch.float64)
        s, a = 0.5 * (jac + jac.transpose(1, 2)), 0.5 * (jac - jac.transpose(1, 2))
        s = s - shift * torch.eye(s.shape[-1], dtype=s.dtype)
        return torch.linalg.eigvals(torch.linalg.solve(s, a)).abs().max().item()
    ops = JacobianOps(model, x, z, linearize=True)
    s_op, a_op = ops.linear_operator("S"), ops.linear_operator("A")
    if shift:
        base = s_op
        s_op = LinearOperator(base.shape, matvec=lambda v: base.matvec(v) - shift * v, dtype=np.float64)

    def s_inv_a(v: np.ndarray) -> np.ndarray:
        sol, _ = minres(s_op, a_op.matvec(v), rtol=max(tol * 1e-2, 1e-13), maxiter=10 * ops.n)
        return sol

    op = LinearOperator((ops.n, ops.n), matvec=s_inv_a, dtype=np.float64)
    # Eigenvalues come in ±iμ pairs: ask for two so ARPACK does not split a pair.
    vals = eigs(op, k=2, which="LM", tol=tol, ncv=_ncv(ops.n, 2), maxiter=50 * ops.n,
                return_eigenvectors=False)
    return float(np.abs(vals).max())


def ftle(
    model: EquilibriumLM,
    x: Tensor,
    steps: int = 100,
    eps: float = 0.5,
    z0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Finite-time Lyapunov exponent of the relaxation z ← z + εF(z) from z0 (default 0).

    A tangent vector δ rides along, δ ← δ + εJ(z_k)δ (F(z_k) and J(z_k)δ come from one jvp);
    the result is log(||δ_K|| / ||δ_0||) / (Kε), in the relaxation's time units so that it is
    comparable to the spectral abscissa: negative means nearby trajectories converge.
    """
    x = x.detach()
    z = model.start(x) if z0 is None else z0.detach()
    d = _probes(z, 1, generator)[0]
    d = d / torch.linalg.vector_norm(d)
    log_growth = 0.0
    with torch.no_grad():
        for _ in range(steps):
            fz, jd = jvp(lambda s: model.field(s, x, fused=False), (z,), (d,))
            z, d = z + eps * fz, d + eps * jd
            norm = torch.linalg.vector_norm(d)
            log_growth += math.log(max(norm.item(), 1e-300))
            d = d / norm  # renormalise so a growing direction cannot overflow
    return log_growth / (steps * eps)
