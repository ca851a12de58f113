"""A run's model is evaluated the way it computes: EP at its fixed point, BPTT by its own unroll."""

import dataclasses

import pytest
import torch
from conftest import batch, small_model

from ept.evaluate import Predictor
from ept.presets import resolve


def test_bptt_runs_are_evaluated_through_their_training_unroll():
    model = small_model(scale=2.0)
    idx, _ = batch(model)
    cfg = resolve("tiny", {"mode": "bptt", "T1": 7})
    cfg.solver = dataclasses.replace(cfg.solver, eps=0.5)
    z, _ = Predictor.for_run(model, cfg).hidden(idx)
    x = model.inject(idx).detach()
    manual = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(7):
            manual = manual + 0.5 * model.field(manual, x)
    torch.testing.assert_close(z, manual)


@pytest.mark.parametrize("solver, scale", [("momentum", 1.0), ("fixed_point", 1.0), ("anderson", 2.0)])
def test_ep_runs_are_evaluated_at_the_fixed_point_their_own_solver_finds(solver, scale):
    """The tiny preset relaxes by the heavy ball (the physical dynamics, accelerated); a run trained
    with --solver anderson is evaluated with it (here on a stiff field plain iteration cannot solve)."""
    model = small_model(scale=scale)
    idx, _ = batch(model)
    cfg = resolve("tiny", {"mode": "ep", "res_est": 1e-9, "t1max": 500, "solver": solver})
    predictor = Predictor.for_run(model, cfg)
    z, stats = predictor.hidden(idx)
    assert predictor.solver.method == solver and stats["residual_max"] <= 1e-9
