"""The fault benchmark's small form: kill -9 at random moments of real ``ept train`` processes and a
full disk imposed on a live one; every folder stays loadable and every run ends bit-identical."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

CHAOS = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs Linux prlimit")
def test_kills_and_a_full_disk_lose_nothing():
    spec = importlib.util.spec_from_file_location("chaos", CHAOS)
    chaos = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = chaos  # its dataclasses look their module up
    spec.loader.exec_module(chaos)
    record = chaos.run(kills=2, rekills=1, seed=1, quick=True, log=lambda msg: None)
    assert record["failures"] == []
    assert record["kills_tried"] >= 2 and record["kills_survived"] == record["kills_tried"]
    assert record["corrupt_folders"] == 0
    assert record["faults_injected"] == record["faults_recovered"] == 1
