"""``ept experiment asymmetry --quick``: its record's schema, and κ = 0 conservative on the MLM task."""

import json

import pytest

from ept.cli import main
from ept.experiments import EXPERIMENTS
from ept.experiments.asymmetry import KAPPAS

pytestmark = pytest.mark.usefixtures("one_thread")


def test_asymmetry_vanishes_at_kappa_zero_and_rises_with_kappa(tmp_path, capsys):
    assert main(["experiment", "asymmetry", "--quick", "--out", str(tmp_path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for suffix in ("json", "png", "md"):
        assert (tmp_path / f"asymmetry.{suffix}").stat().st_size > 0
    assert record == json.loads((tmp_path / "asymmetry.json").read_text())
    keys = {"experiment", "question", "command", "seeds", "commit", "machine", "wall_s", "rows"}
    assert keys <= set(record)
    rows = record["rows"]
    assert EXPERIMENTS["asymmetry"].sweep == "kappa"
    assert rows and all(next(iter(r)) == "kappa" for r in rows)
    assert [r["kappa"] for r in rows] == list(KAPPAS)
    for key in ("val_ce", "nats_per_char", "asymmetry", "symmetric_fraction", "rho_SinvA", "nonnormality",
                "cos_ep_implicit", "cos_ep_implicit_none", "free_fevals"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    zero = rows[0]
    assert zero["asymmetry"] <= 1e-10  # the bidirectional energy block is exactly conservative
    assert zero["cos_ep_implicit_none"] >= 0.9999  # so EP needs no AsymEP there
    asym = [r["asymmetry"] for r in rows]
    assert all(b > a for a, b in zip(asym, asym[1:], strict=False))
    md = (tmp_path / "asymmetry.md").read_text()
    assert "| kappa |" in md and "sweet spot" in md
