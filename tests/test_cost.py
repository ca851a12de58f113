"""``ept cost``: a hand-computed case, F-evals read from a run folder, plan 002's band, bad input."""

from __future__ import annotations

import json

import pytest

from ept.cli import main
from ept.cost import Shape, parse_count, width_for


def _cost(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["cost", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_hand_computed_case(capsys: pytest.CaptureFixture[str]) -> None:
    out = _cost(capsys, "--params", "1M", "--d", "64", "--vocab", "100", "--ctx", "10", "--ffn_mult", "4",
                "--free_fevals", "20", "--polish_fevals", "2", "--T2", "5", "--nudged_states", "2",
                "--asym", "fixed", "--tokens", "1e9", "--gpu", "a100", "--mfu", "0.5", "--price", "2",
                "--gpus", "4", "--bp_hours", "10")
    # N_block = (4+2·4)·64² + (9+4)·64 = 49152 + 832 = 49984
    assert out["n_block"] == 49984
    # model = N_block + (2·100 + 10)·64 = 49984 + 13440 = 63424
    assert out["n_model"] == 63424
    # f_eval = 2·49984 + 4·T·C = 99968 + 4·10·64 = 99968 + 2560 = 102528
    assert out["f_eval"] == 102528
    # free + polish: (20 + 2)·102528 = 2255616
    assert out["ep_free"] == 2255616
    # nudged: S·T2·(k_fixed·f_eval + 4·V·C) = 2·5·(3·102528 + 4·100·64) = 10·(307584 + 25600) = 3331840
    assert out["ep_nudged"] == 3331840
    # update: 3·f_eval + 6·V·C = 307584 + 38400 = 345984
    assert out["ep_update"] == 345984
    # EP = 2255616 + 3331840 + 345984 = 5933440 FLOPs/token; BP = 6·1e6 = 6e6
    assert out["ep_per_token"] == 5933440
    assert out["bp_per_token"] == 6e6
    assert out["factor"] == pytest.approx(5933440 / 6e6, rel=1e-12)  # 0.98890666...
    # F-eval equivalents per step: 20 + 2 + 2·5·3 + 3 = 55
    assert out["fevals_per_step"] == 55
    # GPU-hours: 5933440 · 1e9 / (312e12 · 0.5) / 3600 = 5.93344e15 / 1.56e14 / 3600 = 0.0105652...
    hours = 5933440 * 1e9 / (312e12 * 0.5) / 3600
    assert hours == pytest.approx(0.010565242165242165, rel=1e-12)
    assert out["ep_gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert out["bp_gpu_hours"] == pytest.approx(6e6 * 1e9 / (312e12 * 0.5) / 3600, rel=1e-12)
    assert out["ep_days"] == pytest.approx(hours / 4 / 24, rel=1e-12)
    assert out["ep_dollars"] == pytest.approx(hours * 2, rel=1e-12)
    # anchored: factor × the BP run's 10 hours = 9.8890666...
    assert out["anchored_ep_hours"] == pytest.approx(5933440 / 6e6 * 10, rel=1e-12)


def test_parse_count_and_width() -> None:
    assert parse_count("1B") == 1e9 and parse_count("350M") == 350e6 and parse_count("1e9") == 1e9
    assert parse_count("20k") == 20e3
    for bad in ("-3", "0", "abc", "1X"):
        with pytest.raises(ValueError):
            parse_count(bad)
    for n in (124e6, 350e6, 1e9, 7e9):
        shape = Shape(C=width_for(n))
        assert shape.C % 64 == 0
        assert abs(shape.n_total - n) / n < 0.03  # the derived ept shape holds about N


def test_run_folder_fevals(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        {"step": 0, "val_ce": 6.2, "val_fevals": 7.0},  # an evaluation: no T1, skipped
        {"step": 10, "lr": 1e-3, "it_s": 1.0, "T1": 30.0, "polish_fevals": 10.0, "T2": 4.0,
         "nudged_states": 2.0, "loss": 6.0},
        {"step": 20, "lr": 1e-3, "it_s": 1.0, "T1": 50.0, "polish_fevals": 20.0, "T2": 6.0,
         "nudged_states": 2.0, "loss": 5.0},
        {"step": 20, "event": "final", "T1": 999.0},  # an event: skipped
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut')
    (tmp_path / "config.json").write_text(json.dumps({"ep": {"asym": "none"}}))
    small = ["--params", "1M", "--d", "64", "--vocab", "100", "--ctx", "10"]
    out = _cost(capsys, *small, "--run", str(tmp_path), "--tokens", "1e9")
    # means: T1 40 (polish included), polish 15 -> free 25; T2 5; S 2; asym none (k = 1)
    assert out["fevals"] == {"free": 25.0, "polish": 15.0, "T2": 5.0, "nudged_states": 2.0, "asym": "none"}
    # (25 + 15)·102528 + 2·5·(102528 + 25600) + 345984 = 4101120 + 1281280 + 345984
    assert out["ep_per_token"] == 4101120 + 1281280 + 345984
    # a flag beside --run overrides the run's value
    out = _cost(capsys, *small, "--run", str(tmp_path), "--T2", "0")
    assert out["fevals"]["T2"] == 0.0 and out["ep_nudged"] == 0


def test_plan_002_band(capsys: pytest.CaptureFixture[str]) -> None:
    # Plan 002: relaxing the whole 1B model (2N per F-eval) for T1 150-300 steps against BP's 6N is
    # ~50-100x. A 1B block (C 9088: N_block 0.99e9) with the free phase alone lands there.
    lo = _cost(capsys, "--params", "1B", "--d", "9088", "--free_fevals", "150", "--T2", "0")
    hi = _cost(capsys, "--params", "1B", "--d", "9088", "--free_fevals", "300", "--T2", "0")
    assert 50 <= lo["factor"] <= 55 and 100 <= hi["factor"] <= 105
    # ept's own 1B shape keeps ~59% of N in embeddings and head, which the relaxation never touches.
    own = _cost(capsys, "--params", "1B", "--free_fevals", "150", "--T2", "0")
    assert own["n_block"] < 0.5e9 and own["factor"] < lo["factor"] / 2


@pytest.mark.parametrize("argv, words", [
    (["--params", "-3", "--free_fevals", "10"], "--params"),
    (["--params", "0", "--free_fevals", "10"], "--params"),
    (["--params", "1B", "--free_fevals", "10", "--gpu", "v100"], "v100"),
    (["--params", "1B", "--free_fevals", "10", "--mfu", "1.5"], "mfu"),
    (["--params", "1B"], "--free_fevals"),
    (["--params", "1B", "--free_fevals", "-1"], ">= 0"),
    (["--params", "1B", "--run", "RUN"], "no metrics.jsonl"),
    (["--params", "1B", "--run", "RUN/missing"], "no such folder"),
])
def test_bad_input(tmp_path, capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    argv = [a.replace("RUN", str(tmp_path)) for a in argv]
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ept cost: error:") and words in err and err.count("\n") == 1


def test_run_without_windows(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_ce": 6.0}) + "\n")
    assert main(["cost", "--params", "1B", "--run", str(tmp_path)]) == 2
    assert "no training window" in capsys.readouterr().err
