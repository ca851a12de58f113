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


def test_steps_to_shrink_counts_the_slowest_mode(structure_bench):
    # Diagonal M: mode i shrinks by |1 + a·m_i| a step; the slowest one sets the count.
    M = torch.diag(torch.tensor([-0.4, -1.0, -2.0], dtype=torch.float64))
    probes = torch.eye(3, dtype=torch.float64)
    k = structure_bench.steps_to_shrink(M, probes, a=0.5)
    assert k == int(torch.tensor(1e-3).log().div(torch.tensor(0.8).log()).ceil())  # 31: 0.8^31 < 1e-3
    # A growing mode never shrinks: None, not a count.
    eye = torch.eye(2, dtype=torch.float64)
    assert structure_bench.steps_to_shrink(eye, eye, a=0.5, cap=50) is None
    # The heavy ball tuned to the interval beats the best plain step on a stiff spectrum.
    M = torch.diag(torch.linspace(-0.1, -1.9, 20, dtype=torch.float64))
    P = torch.eye(20, dtype=torch.float64)
    plain = structure_bench.steps_to_shrink(M, P, a=1.0)
    a, b = 4 / (0.1 ** 0.5 + 1.9 ** 0.5) ** 2, ((1.9 ** 0.5 - 0.1 ** 0.5) / (1.9 ** 0.5 + 0.1 ** 0.5)) ** 2
    assert structure_bench.steps_to_shrink(M, P, a=a, b=b) < plain / 2
