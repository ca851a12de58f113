"""The block family: energy (F = −∇E), mono (strongly monotone) and the kappa blend, float64."""

import numpy as np
import pytest
import torch
from conftest import batch, small_model

import ept
from ept.blocks.common import GELU_LIP
from ept.cli import main

TIGHT = dict(res_est=1e-12, t1max=2000)
EP_TIGHT = dict(TIGHT, t2_tol=1e-11, t2sel=400)
BIDIR = dict(causal=False, objective="mlm")


def block_model(scale: float = 1.0, **overrides):
    """The presets' embeddings (std 1.0): at 0.02, LayerNorm's 1/σ makes every block stiff."""
    return small_model(scale=scale, **{"emb_std": 1.0, **overrides})


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def compare(a, b):
    va, vb = flat(a), flat(b)
    return (va @ vb / (va.norm() * vb.norm())).item(), (va.norm() / vb.norm()).item()


def dense_jacobian(model, x, z):
    n = z[0].numel()
    jac = torch.autograd.functional.jacobian(lambda v: model.field(v.view_as(z[:1]), x[:1]).flatten(),
                                             z[:1].flatten(), vectorize=True)
    return jac.reshape(n, n)


def asymmetry(J):
    return ((J - J.T).norm() / J.norm()).item()


def equilibrium(model, x, z0=None, tol=1e-13):
    z0 = torch.zeros_like(x) if z0 is None else z0
    z, stats = ept.solve(lambda z: model.field(z, x), z0, method="fixed_point", tol=tol, max_iter=4000)
    assert stats.converged
    return z


# ------------------------------------------------------------------------------------ energy


@pytest.fixture(scope="module")
def energy_model():
    return block_model(scale=3.0, attn_mode="energy", **BIDIR)


def test_energy_block_is_a_gradient_field_with_a_symmetric_jacobian(energy_model):
    model = energy_model
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    z = torch.randn_like(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.energy(z, x).sum(), z)
    field = model.field(z.detach(), x)
    assert (field + grad).abs().max().item() <= 1e-8 * field.abs().max().item()
    assert model.energy(z, x).shape == (x.shape[0],)
    assert asymmetry(dense_jacobian(model, x, z.detach())) <= 1e-10


def test_energy_falls_monotonically_under_plain_relaxation(energy_model):
    model = energy_model
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    z = 2.0 * torch.randn_like(x)
    trace = [model.energy(z, x)]
    for _ in range(200):
        z = z + 0.1 * model.field(z, x)
        trace.append(model.energy(z, x))
    e = torch.stack(trace)
    assert (e[1:] <= e[:-1] + 1e-9).all()
    assert (e[0] - e[-1]).min() > 1.0  # it fell, not merely stayed


def test_energy_field_is_analytic_for_the_holomorphic_estimator(energy_model):
    model = energy_model
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    z, dz = torch.randn_like(x), torch.randn_like(x)
    h = 1e-6
    fc = model.field(z.to(torch.complex128) + 1j * h * dz, x)
    _, jvp = torch.func.jvp(lambda v: model.field(v, x), (z,), (dz,))
    assert (fc.imag / h - jvp).abs().max().item() <= 1e-6 * jvp.abs().max().item()  # complex step = J dz


def test_ep_without_correction_is_exact_on_the_energy_block_and_not_on_thick():
    cos, rel = {}, {}
    for mode in ("energy", "thick"):
        model = block_model(scale=3.0, attn_mode=mode, **BIDIR)
        idx, tgt = batch(model)
        oracle, st = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
        assert st["free_converged"]
        plain, _ = ept.gradient(model, idx, tgt, route="ep", asym="none", hr=1e-3, **EP_TIGHT)
        cos[mode], rel[mode] = compare(plain, oracle)
    assert cos["energy"] >= 0.9999 and rel["energy"] == pytest.approx(1.0, abs=0.01)
    assert 1 - cos["thick"] > 100 * (1 - cos["energy"])


def test_holomorphic_ep_on_the_energy_block_matches_implicit(energy_model):
    model = energy_model
    idx, tgt = batch(model)
    oracle, _ = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    holo, _ = ept.gradient(model, idx, tgt, route="ep", asym="none", estimator="holomorphic", holo=4,
                           hr=0.05, **EP_TIGHT)
    cos, rel = compare(holo, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=0.01)


# ------------------------------------------------------------------------------------ causality


CAUSAL = {
    "thick": dict(attn_mode="thick"),
    "energy": dict(attn_mode="energy"),
    "energy_kappa_half": dict(attn_mode="energy", kappa=0.5),
    "mono": dict(attn_mode="mono"),
    "thick_ffn_lip": dict(attn_mode="thick", ffn_lip=1.0),
    "thick_ffn_tied": dict(attn_mode="thick", ffn_tied=True),
}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_a_causal_block_never_sees_later_tokens(name):
    model = block_model(scale=2.0, **CAUSAL[name])
    idx, _ = batch(model)
    t = 3
    later = idx.clone()
    later[:, t + 1 :] = (idx[:, t + 1 :] + 7) % model.cfg.vocab_size
    z_a, z_b = (equilibrium(model, model.inject(i).detach()) for i in (idx, later))
    assert (z_a[:, : t + 1] - z_b[:, : t + 1]).abs().max().item() <= 1e-10
    assert (model.readout(z_a)[:, : t + 1] - model.readout(z_b)[:, : t + 1]).abs().max().item() <= 1e-10
    assert (z_a[:, t + 1 :] - z_b[:, t + 1 :]).abs().max().item() > 1e-3  # the later tokens do matter


def test_causal_energy_is_conservative_per_position_only():
    """Each position's own block of J is symmetric; the coupling to earlier positions has no transpose."""
    model = block_model(scale=3.0, attn_mode="energy")
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    z = torch.randn_like(x)
    J = dense_jacobian(model, x, z)
    T, C = model.cfg.T, model.cfg.C
    blocks = J.reshape(T, C, T, C)
    for t in range(T):
        own = blocks[t, :, t, :]
        assert asymmetry(own) <= 1e-10
        assert blocks[t, :, t + 1 :, :].abs().max().item() == 0.0 if t + 1 < T else True
    assert asymmetry(J) > 0.01


# ------------------------------------------------------------------------------------ mono


def monotonicity_ratios(model, x, g, n=1000):
    """⟨F(z) − F(y), z − y⟩ / ‖z − y‖² on n random pairs: half far apart at scale 3, half close
    together near small states (scale 0.1, where LayerNorm amplifies most)."""
    shape = (n // 2, *x.shape[1:])
    far = [torch.randn(shape, generator=g, dtype=x.dtype) * 3.0 for _ in range(2)]
    near = torch.randn(shape, generator=g, dtype=x.dtype) * 0.1
    z = torch.cat([far[0], near])
    y = torch.cat([far[1], near + 1e-3 * torch.randn(shape, generator=g, dtype=x.dtype)])
    xs = x.expand(n, -1, -1)
    inner = ((model.field(z, xs) - model.field(y, xs)) * (z - y)).sum(dim=(-2, -1))
    return inner / ((z - y) ** 2).sum(dim=(-2, -1))


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_mono_has_one_fixed_point_and_is_strongly_monotone_at_any_scale(scale):
    model = block_model(scale=scale, attn_mode="mono", mono_m=0.5)
    idx, _ = batch(model, B=2)
    x = model.inject(idx).detach()
    g = torch.Generator().manual_seed(0)
    ends = torch.stack([equilibrium(model, x, 5.0 * torch.randn(x.shape, generator=g, dtype=x.dtype))
                        for _ in range(20)])
    assert (ends - ends.mean(0)).abs().max().item() <= 1e-6
    assert (monotonicity_ratios(model, x[:1], g) <= -model.cfg.mono_m).all()


def test_thick_at_the_same_scale_loses_monotonicity():
    model = block_model(scale=10.0, attn_mode="thick")
    idx, _ = batch(model, B=1)
    x = model.inject(idx).detach()
    ratios = monotonicity_ratios(model, x, torch.Generator().manual_seed(0))
    assert ratios.max().item() > 0.0  # not even monotone: near small states LayerNorm's 1/σ wins


def test_the_gelu_lipschitz_constant_bounds_its_derivative():
    h = torch.linspace(-10, 10, 200001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(torch.nn.functional.gelu(h, approximate="tanh").sum(), h)
    assert d.abs().max().item() < GELU_LIP <= 1.13


# ------------------------------------------------------------------------------------ kappa


def test_kappa_one_is_thick_and_asymmetry_rises_with_kappa():
    thick = block_model(scale=3.0, attn_mode="thick", **BIDIR)
    idx, _ = batch(thick)
    x = thick.inject(idx).detach()
    z = torch.randn_like(x)
    ratios = []
    for kappa in (0.0, 0.25, 0.5, 0.75, 1.0):
        blend = block_model(scale=3.0, attn_mode="energy", kappa=kappa, **BIDIR)
        blend.load_state_dict(thick.state_dict())
        if kappa == 1.0:
            assert (blend.field(z, x) - thick.field(z, x)).abs().max().item() <= 1e-12
        ratios.append(asymmetry(dense_jacobian(blend, x, z)))
    assert all(b > a for a, b in zip(ratios, ratios[1:], strict=False)), ratios


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("flags, needle", [
    (["--attn_mode", "energy", "--kappa", "1.5"], "kappa"),
    (["--kappa", "0.5"], "kappa"),
    (["--attn_mode", "mono", "--mono_m", "0"], "mono_m"),
    (["--attn_mode", "mono", "--mono_m", "-1"], "mono_m"),
    (["--attn_mode", "mono", "--ffn_lip", "1"], "ffn_lip"),
    (["--ffn_lip", "-1"], "ffn_lip"),
    (["--attn_mode", "energy", "--ffn_tied"], "ffn_tied"),
    (["--no-causal"], "no-causal"),
    (["--objective", "mlm"], "no-causal"),
])
def test_bad_block_options_are_one_line_errors(flags, needle, tmp_path, capsys):
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "r").exists()


def test_energy_has_no_energy_on_thick():
    model = block_model()
    x = model.inject(batch(model)[0]).detach()
    with pytest.raises(ValueError, match="no energy"):
        model.energy(torch.zeros_like(x), x)


def test_mono_relaxation_contracts_from_far_starts():
    """The bound the docstring proves: the map z + 0.5·F(z) contracts by ≤ 1 − m/2 at c = 1."""
    model = block_model(scale=10.0, attn_mode="mono", mono_m=0.5)
    idx, _ = batch(model, B=1)
    x = model.inject(idx).detach()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype) * 10
    y = torch.randn(x.shape, generator=g, dtype=x.dtype) * 10
    step = lambda v: v + 0.5 * model.field(v, x)  # noqa: E731
    ratio = ((step(z) - step(y)).norm() / (z - y).norm()).item()
    assert ratio <= 1 - 0.5 / 2 + 1e-12
    assert np.isfinite(ratio)


def test_the_symmetric_fraction_is_one_on_the_energy_block_only():
    from ept.diagnostics import symmetric_fraction

    fractions = {}
    for mode in ("energy", "thick"):
        model = block_model(scale=3.0, attn_mode=mode, **BIDIR)
        x = model.inject(batch(model, B=1)[0]).detach()
        fractions[mode] = symmetric_fraction(model, x, equilibrium(model, x),
                                             generator=torch.Generator().manual_seed(0))
    assert fractions["energy"] == pytest.approx(1.0, abs=1e-12)
    assert 0.5 < fractions["thick"] < 0.99


def test_the_energy_report_sees_the_lyapunov_descent_from_the_blocks_start(energy_model):
    from ept.diagnostics.energy import energy_report

    x = energy_model.inject(batch(energy_model)[0]).detach()
    assert energy_report(energy_model, x, eps=0.1, steps=100)["energy_falls"]
    assert not energy_report(energy_model, x, eps=1.5, steps=20)["energy_falls"]  # past the stiff end


# ------------------------------------------------------------------------------------ ffn_lip


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_the_bounded_ffn_keeps_its_lipschitz_bound_at_any_scale(scale):
    """Far pairs at scale 3 and close pairs near small states (scale 0.1), where LayerNorm's 1/σ
    makes the free pre-LN FFN steepest."""
    model = block_model(scale=scale, ffn_lip=0.7)
    x = model.inject(batch(model, B=1)[0]).detach()
    g = torch.Generator().manual_seed(0)
    shape = (100, *x.shape[1:])
    near = torch.randn(shape, generator=g, dtype=x.dtype) * 0.1
    z = torch.cat([torch.randn(shape, generator=g, dtype=x.dtype) * 3.0, near])
    y = torch.cat([torch.randn(shape, generator=g, dtype=x.dtype) * 3.0,
                   near + 1e-3 * torch.randn(shape, generator=g, dtype=x.dtype)])
    xs = x.expand(200, -1, -1)

    def lipschitz_ratios(m):
        moved = (m.forces(z, xs)[1] - m.forces(y, xs)[1]).flatten(1).norm(dim=1)
        return moved / (z - y).flatten(1).norm(dim=1)

    assert lipschitz_ratios(model).max().item() <= 0.7
    if scale > 1:  # the same weights in the free pre-LN FFN: far over the bound
        assert lipschitz_ratios(block_model(scale=scale)).max().item() > 0.7


def test_the_tied_ffn_has_a_symmetric_per_token_jacobian_and_the_free_one_does_not():
    asym = {}
    for tied in (True, False):
        model = block_model(scale=5.0, ffn_tied=tied)
        x = model.inject(batch(model, B=1)[0]).detach()
        z = torch.randn_like(x)
        T, C = model.cfg.T, model.cfg.C
        J = torch.autograd.functional.jacobian(lambda v, m=model, x=x: m.forces(v, x)[1], z)
        J = J.reshape(T, C, T, C)
        own = torch.stack([J[t, :, t, :] for t in range(T)])
        asym[tied] = ((own - own.transpose(1, 2)).norm() / own.norm()).item()
    assert asym[True] <= 1e-12 and asym[False] > 0.1


@pytest.mark.parametrize("ffn", [dict(ffn_lip=1.0), dict(ffn_tied=True)], ids=["bounded", "tied"])
def test_ep_matches_implicit_on_the_ffn_variants(ffn):
    model = block_model(scale=3.0, **ffn)
    idx, tgt = batch(model)
    oracle, st = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    assert st["free_converged"]
    grads, _ = ept.gradient(model, idx, tgt, route="ep", asym="linear", **EP_TIGHT)
    cos, rel = compare(grads, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=0.01)
    if model.cfg.ffn_tied:
        assert grads["ffn.fc2.weight"].abs().max().item() == 0.0  # tied: W2 is not in the block
