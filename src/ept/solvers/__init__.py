"""Relaxation to a fixed point F(z) = 0 of any field callable: damped iteration, Anderson, Broyden,
heavy-ball momentum.

The solvers know nothing about transformers: the free phase, the nudged phases and the adjoint
iteration all call :func:`solve` with their own field. States may be real or complex (complex
states are relaxed as their real view), of any shape whose first dimension indexes independent
systems (sequences): the residual is reported per row, mean and worst.

Rows are independent, so a row that is done (converged, or flagged by a monitor) is frozen where it
is while the others go on. A field that can be cut to a sub-batch (:class:`RowField`) is then
evaluated on the rows still moving only: one slow sequence no longer costs a whole batch per step.
"""

from ept.solvers.common import (
    Field,
    Monitor,
    RowField,
    RowwiseField,
    SolveStats,
    residual_per_seq,
)
from ept.solvers.loop import relax, solve

__all__ = ["Field", "Monitor", "RowField", "RowwiseField", "SolveStats", "relax", "residual_per_seq", "solve"]
