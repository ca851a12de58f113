"""benchmarks/operator_structure.py --forces: which force lifts the top of S and carries J's antisymmetry."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def structure_bench():
    return load_benchmark("operator_structure")


def _model(seed: int):
    """A trained-looking block: its forces well above the initial scale."""
    return small_model(scale=4.0, seed=seed, C=8, H=2, T=4)


def test_the_abscissa_splits_exactly_by_force(structure_bench):
    model = _model(0)
    x = model.inject(torch.randint(0, 50, (1, 4))).detach()
    z = torch.randn_like(x)
    out = structure_bench.attribution(model, x, z)
    split = out["leak"] + out["attention"]["top_share"] + out["ffn"]["top_share"]
    assert out["numerical_abscissa"] == pytest.approx(split, abs=1e-10)
    J = structure_bench.dense_jacobian(model, x, z).double()
    top = float(torch.linalg.eigvalsh(0.5 * (J + J.T)).max())
    assert out["numerical_abscissa"] == pytest.approx(top, abs=1e-10)


def test_a_silenced_force_owns_nothing(structure_bench):
    model = _model(1)
    with torch.no_grad():
        model.ffn.fc2.weight.zero_()
        if model.ffn.fc2.bias is not None:
            model.ffn.fc2.bias.zero_()
    x = model.inject(torch.randint(0, 50, (1, 4))).detach()
    out = structure_bench.attribution(model, x, torch.randn_like(x))
    assert out["ffn"]["top_share"] == 0.0 and out["ffn"]["antisym_ratio"] == 0.0
    assert out["attention"]["antisym_ratio"] == pytest.approx(1.0)  # all of J's antisymmetry is attention's
    assert out["ffn"]["spectral_abscissa_alone"] == pytest.approx(-2.0)  # the leak alone
