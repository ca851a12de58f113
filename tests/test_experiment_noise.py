"""``ept experiment noise --quick``: the record's schema, and that noise costs gradient fidelity."""

import pytest
from test_experiments import run_quick

pytestmark = pytest.mark.usefixtures("one_thread")


def test_noise_ideal_devices_are_exact_and_read_noise_is_not(tmp_path, capsys):
    rows = {r["setting"]: r for r in run_quick("noise", tmp_path, capsys)}
    assert list(rows) == ["ideal", "rram_es", "w_noise=0.1", "bits=4"]
    assert rows["ideal"]["cos_analog_implicit"] >= 0.9999  # the ideal substrate is digital EP
    assert rows["w_noise=0.1"]["cos_analog_implicit"] < rows["ideal"]["cos_analog_implicit"] - 0.01
    for r in rows.values():
        assert r["writes_max"] > 0 and r["projected_writes_max"] >= r["writes_max"]
        assert isinstance(r["endurance_holds"], bool) and isinstance(r["claim_holds"], bool)
