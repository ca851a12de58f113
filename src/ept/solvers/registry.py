"""Solver name -> class: a new method is one file with a :class:`~ept.solvers.common.Solver` and one
line here (``--solver`` and ``SolverConfig.method`` read their choices from this table)."""

from __future__ import annotations

from ept.solvers.anderson import Anderson
from ept.solvers.broyden import Broyden
from ept.solvers.fixed_point import FixedPoint
from ept.solvers.momentum import HeavyBall

SOLVERS = {
    "anderson": Anderson,
    "fixed_point": FixedPoint,
    "broyden": Broyden,
    "momentum": HeavyBall,
}
