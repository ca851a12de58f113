"""``ept experiment``: each experiment's --quick form, its record's schema and a physical fact."""

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


def test_damping_scales_the_symmetric_part_on_a_fixed_operator(tmp_path, capsys):
    rows = run_quick("damping", tmp_path, capsys)
    assert [r["c"] for r in rows] == [0.25, 0.5, 1.0, 2.0, 4.0]
    fixed = [r["rho_SinvA_fixed"] for r in rows]
    assert all(b < a for a, b in zip(fixed, fixed[1:], strict=False))  # S − (c−1)I grows, A does not
    assert all(r["numerical_abscissa"] < -r["c"] for r in rows)  # the leak alone holds ω(J) ≤ −(1+c) + …
    for key in ("val_ce_ep", "val_ce_bptt", "rho_SinvA", "spectral_abscissa", "nonnormality",
                "symmetric_fraction", "cos_ep_implicit", "cos_ep_implicit_none", "free_fevals"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key


def test_an_unknown_experiment_lists_the_valid_ones(capsys):
    assert main(["experiment", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(name in err for name in EXPERIMENTS)


def test_runs_without_a_run_folder_is_refused(tmp_path, capsys):
    assert main(["experiment", "damping", "--runs", str(tmp_path)]) == 2
    assert "holds no ept run" in capsys.readouterr().err
