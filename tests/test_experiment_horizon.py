"""``ept experiment horizon --quick``: the record's schema, and BPTT converging on the implicit
gradient as its horizon T1 grows."""

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


def test_bptt_approaches_the_implicit_gradient_as_the_horizon_grows(tmp_path, capsys):
    rows = run_quick("horizon", tmp_path, capsys)
    assert [r["T1"] for r in rows] == [5, 10, 20, 50, 150, "ep"]
    for key in ("val_ce", "cos_fixed", "residual_fixed", "cos_own", "residual_own",
                "equilibrium_residual_own"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    by = {r["T1"]: r for r in rows}
    # On one fixed (EP-trained) operator the unroll settles as T1 grows, and its gradient with it.
    assert by[150]["cos_fixed"] >= by[5]["cos_fixed"]
    assert 1 - by[5]["cos_fixed"] > 1 - by[150]["cos_fixed"]
    assert by[150]["residual_fixed"] < by[5]["residual_fixed"]
    assert by["ep"]["cos_fixed"] > 0.99  # EP's own estimate against the same oracle
