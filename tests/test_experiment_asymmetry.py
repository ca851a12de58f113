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


def _rows(ce: dict[int, list[float]]) -> list[dict]:
    """Synthetic rows from val CE per seed at each κ index, the other measures fixed."""
    seeds = len(ce[0])
    return [{"kappa": KAPPAS[i], "seed": s, "val_ce": ce[i][s], "asymmetry": KAPPAS[i] / 10,
             "rho_SinvA": KAPPAS[i] / 2} for s in range(seeds) for i in range(len(KAPPAS))]


def test_a_sweet_spot_must_beat_both_ends_by_more_than_the_seeds_disagree():
    reading = EXPERIMENTS["asymmetry"].reading
    dip = {0: [5.0], 1: [4.99], 2: [4.9], 3: [4.99], 4: [5.0]}
    assert "rerun with --seeds" in reading(_rows(dip))  # one seed shows no noise level
    tight = {0: [5.0, 5.01], 1: [4.99, 5.0], 2: [4.9, 4.91], 3: [4.99, 5.0], 4: [5.0, 5.01]}
    assert "a partially conservative sweet spot" in reading(_rows(tight))
    loose = {0: [5.0, 5.2], 1: [4.99, 5.2], 2: [4.9, 5.1], 3: [4.99, 5.2], 4: [5.0, 5.2]}
    assert "no resolved sweet spot" in reading(_rows(loose))
    edge = {0: [4.8], 1: [4.99], 2: [4.9], 3: [4.99], 4: [5.0]}
    assert "no interior sweet spot" in reading(_rows(edge))


def test_render_redraws_the_record_without_training(tmp_path, capsys):
    assert main(["experiment", "asymmetry", "--render", "--out", str(tmp_path)]) == 2
    assert "run 'ept experiment asymmetry" in capsys.readouterr().err
    rows = _rows({0: [5.0], 1: [4.99], 2: [4.9], 3: [4.99], 4: [5.0]})
    for r in rows:
        r.update(nats_per_char=2.7, symmetric_fraction=0.9, cos_ep_implicit=1.0, cos_ep_implicit_none=0.99)
    record = {"experiment": "asymmetry", "command": "ept experiment asymmetry", "date": "2026-12-03",
              "commit": "abc1234", "machine": "test", "wall_s": 1.0, "rows": rows}
    (tmp_path / "asymmetry.json").write_text(json.dumps(record))
    assert main(["experiment", "asymmetry", "--render", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "asymmetry.md").read_text()
    assert "commit abc1234" in md and "| 0.5 | 0 | 4.9 |" in md
    assert (tmp_path / "asymmetry.png").stat().st_size > 0
    (tmp_path / "asymmetry.json").write_text(json.dumps({**record, "experiment": "damping"}))
    assert main(["experiment", "asymmetry", "--render", "--out", str(tmp_path)]) == 2
    assert "not a record of the asymmetry experiment" in capsys.readouterr().err
