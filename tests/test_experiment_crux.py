"""``ept experiment crux --quick``: every lever trains, with its ω(J) trajectory in the record."""

import pytest
from test_experiments import run_quick

from ept.experiments.crux import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_crux_rows_hold_each_recipes_trajectories(tmp_path, capsys):
    rows = run_quick("crux", tmp_path, capsys)
    assert [r["recipe"] for r in rows] == list(RECIPES)
    by = {r["recipe"]: r for r in rows}
    for r in rows:
        assert r["diverged_at"] is None and r["val_ce"] < 6.0  # a few steps from init: all contractive
        assert r["numerical_abscissa_curve"] and all(w < 0 for _, w in r["numerical_abscissa_curve"])
    # the warm start begins from a trained operator, not from the initial one
    assert by["warm_start"]["val_ce"] != by["none"]["val_ce"]
