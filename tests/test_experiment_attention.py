"""``ept experiment attention --quick``: its record's schema, equal F-evals, and EP without AsymEP
exact on the bidirectional energy block only."""

import json

import pytest

from ept.cli import main
from ept.experiments import EXPERIMENTS
from ept.experiments.attention import at_budget, feval_curve
from ept.experiments.common import QUICK_STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_energy_attention_needs_no_asymep_on_masked_tokens(tmp_path, capsys):
    assert main(["experiment", "attention", "--quick", "--out", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for suffix in ("json", "png", "md"):
        assert (tmp_path / f"attention.{suffix}").stat().st_size > 0
    assert record == json.loads((tmp_path / "attention.json").read_text())
    keys = {"experiment", "question", "command", "seeds", "commit", "machine", "wall_s", "rows"}
    assert keys <= set(record)
    assert EXPERIMENTS["attention"].sweep == "block"
    rows = record["rows"]
    assert rows and all(next(iter(r)) == "block" for r in rows)
    by = {r["block"]: r for r in rows}
    assert list(by) == ["thick", "energy", "thick_mlm", "energy_mlm"]
    for key in ("val_ce", "nats_per_char", "free_fevals", "cos_ep_implicit", "cos_ep_implicit_none",
                "total_free_fevals", "fevals_budget", "val_ce_equal_fevals", "step_equal_fevals"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    for task in ("lm", "mlm"):
        pair = [r for r in rows if r["task"] == task]
        budget = min(r["total_free_fevals"] for r in pair)
        assert all(r["fevals_budget"] == budget for r in pair)
        assert all(0 < r["step_equal_fevals"] <= QUICK_STEPS for r in pair)
        assert max(r["step_equal_fevals"] for r in pair) == QUICK_STEPS  # the cheaper run, at its end
    assert by["energy_mlm"]["cos_ep_implicit_none"] >= 0.9999
    # (the float64 gap between EP without correction on thick and on energy is tests/test_blocks.py's;
    # at quick scale in float32 the two cosines differ by ~1e-8, within rounding)
    assert by["energy_mlm"]["symmetric_fraction"] > by["thick_mlm"]["symmetric_fraction"]


def test_equal_fevals_interpolates_the_cumulative_curve():
    records = [{"step": 0, "val_ce": 6.0}, {"step": 5, "val_ce": 5.0}, {"step": 5, "T1": 10.0, "loss": 1.0},
               {"event": "rollback", "step": 8, "to_step": 5}, {"step": 10, "val_ce": 4.0},
               {"step": 10, "T1": 20.0, "loss": 1.0}]
    curve = feval_curve(records)
    assert curve == [(0.0, 6.0, 0), (50.0, 5.0, 5), (150.0, 4.0, 10)]
    assert at_budget(curve, 100.0) == (4.5, 7.5)
    assert at_budget(curve, 200.0) == (None, None)
