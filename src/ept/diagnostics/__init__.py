"""Instruments for the Hopf problem: J = ∂F/∂z probed matrix-free, gradient fidelity, warnings.

    from ept.diagnostics import numerical_abscissa, spectral_abscissa, fingerprint
    omega = numerical_abscissa(model, x, z_star)        # λ_max((J+Jᵀ)/2)
    alpha, imag = spectral_abscissa(model, x, z_star)   # rightmost eigenvalue of J
"""

from ept.diagnostics.fidelity import GROUPS, compare, gradient_cosines, group_of
from ept.diagnostics.monitor import (
    ContractionWatch,
    fingerprint,
    hopf_warning,
    operator_report,
    training_diagnostics,
)
from ept.diagnostics.operators import (
    DENSE_MAX,
    JacobianOps,
    dense_blocks,
    dense_jacobian,
    ftle,
    leading_eigenvalues,
    nonnormality,
    nonnormality_dense,
    numerical_abscissa,
    rho_SinvA,
    spectral_abscissa,
    symmetric_fraction,
)

__all__ = [
    "ContractionWatch",
    "DENSE_MAX",
    "GROUPS",
    "JacobianOps",
    "compare",
    "dense_blocks",
    "dense_jacobian",
    "fingerprint",
    "ftle",
    "gradient_cosines",
    "group_of",
    "hopf_warning",
    "leading_eigenvalues",
    "nonnormality",
    "nonnormality_dense",
    "numerical_abscissa",
    "operator_report",
    "rho_SinvA",
    "symmetric_fraction",
    "spectral_abscissa",
    "training_diagnostics",
]
