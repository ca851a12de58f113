"""The fault benchmark's small form: kill -9 at random moments of real ``ept train`` processes and a
full disk imposed on a live one; every folder stays loadable and every run ends bit-identical."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.mark.skipif(not hasattr(__import__("resource"), "prlimit"), reason="needs Linux prlimit")
def test_kills_and_a_full_disk_lose_nothing():
    chaos = load_benchmark("chaos")
    record = chaos.run(kills=2, rekills=1, seed=1, quick=True, log=lambda msg: None)
    assert record["failures"] == []
    assert record["kills_tried"] >= 2 and record["kills_survived"] == record["kills_tried"]
    assert record["corrupt_folders"] == 0
    assert record["faults_injected"] == record["faults_recovered"] == 1
