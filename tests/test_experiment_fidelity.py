"""``ept experiment fidelity --quick``: the record's schema, and AsymEP's estimate holding while
ρ(S⁻¹A) < 1 along one training run's checkpoints."""

import json

import pytest

from ept.cli import main
from ept.experiments import EXPERIMENTS

pytestmark = pytest.mark.usefixtures("one_thread")


def run_quick(name, out, capsys):
    assert main(["experiment", name, "--quick", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for suffix in ("json", "png", "md"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    assert record == json.loads((out / f"{name}.json").read_text())
    keys = {"experiment", "question", "command", "seeds", "commit", "machine", "wall_s", "rows"}
    assert keys <= set(record)
    sweep = EXPERIMENTS[name].sweep
    assert record["rows"] and all(next(iter(r)) == sweep for r in record["rows"])
    return record["rows"]


def test_asym_ep_holds_while_rho_stays_below_one(tmp_path, capsys):
    rows = run_quick("fidelity", tmp_path, capsys)
    steps = [r["step"] for r in rows]
    assert len(rows) >= 3 and steps == sorted(steps) and len(set(steps)) == len(steps)
    for key in ("cos_fixed", "cos_track", "cos_linear", "cos_none", "rho_SinvA", "residual", "ftle"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    below = [r for r in rows if r["rho_SinvA"] < 1]
    assert below
    for r in below:
        assert min(r["cos_fixed"], r["cos_track"], r["cos_linear"]) >= 0.99, r
    assert all(r["ftle"] < 0 for r in rows)  # the relaxation contracts at every checkpoint
    # The run folder keeps every checkpoint it was measured at.
    kept = sorted(p.name for p in (tmp_path / "fidelity_run").glob("ckpt-*"))
    assert kept == [f"ckpt-{s:07d}" for s in steps]
    # --runs measures the same checkpoints again, and finds the same operator.
    assert main(["experiment", "fidelity", "--runs", str(tmp_path / "fidelity_run"), "--quick",
                 "--out", str(tmp_path / "again"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["step"] for r in again] == steps
    assert again[-1]["rho_SinvA"] == pytest.approx(rows[-1]["rho_SinvA"], rel=1e-6)
