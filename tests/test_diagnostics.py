"""The operator instruments against dense linear algebra on a small float64 block.

Deterministic estimators (Lanczos/Arnoldi/MINRES, the FTLE recursion, one-probe non-normality)
must match dense results to 1e-6 relative; the randomized non-normality ratio estimator must be
within 10% of ||J-Jᵀ||_F/||J||_F with 60 probes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ept import EPTConfig, EquilibriumLM
from ept.diagnostics import (
    JacobianOps,
    compare,
    dense_blocks,
    dense_jacobian,
    fingerprint,
    ftle,
    gradient_cosines,
    hopf_warning,
    nonnormality,
    nonnormality_dense,
    numerical_abscissa,
    rho_SinvA,
    spectral_abscissa,
)

REL = 1e-6


def make(C: int = 8, T: int = 4, H: int = 2, c: float = 0.3, std: float = 0.25, B: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = EquilibriumLM(EPTConfig(vocab_size=24, C=C, H=H, T=T, c=c, init_std=std)).double()
    idx = torch.randint(0, 24, (B, T))
    x = model.inject(idx).detach()
    z = x + 0.5 * torch.randn_like(x)  # any state will do: the estimators are pointwise in z
    return model, x, z


@pytest.fixture(scope="module")
def small():
    model, x, z = make()
    jac = dense_jacobian(model, x, z)
    return model, x, z, jac


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_matrix_free_products_match_dense_jacobian(small):
    model, x, z, jac = small
    ops = JacobianOps(model, x, z)
    v = torch.randn_like(z)
    assert torch.allclose(ops.J(v).reshape(-1), jac @ v.reshape(-1), atol=1e-12)
    assert torch.allclose(ops.JT(v).reshape(-1), jac.T @ v.reshape(-1), atol=1e-12)
    op = ops.linear_operator("S")
    s_dense = 0.5 * (jac + jac.T)
    assert np.allclose(op.matvec(v.reshape(-1).numpy()), (s_dense @ v.reshape(-1)).numpy(), atol=1e-12)
    # The leak shows up where it should: J + (1+c)I is the block's own Jacobian.
    assert torch.allclose(torch.diagonal(jac).mean(), torch.tensor(-(1 + 0.3), dtype=jac.dtype), atol=0.5)


def test_dense_blocks_are_the_diagonal_blocks_of_the_batch_jacobian():
    model, x, z = make(B=2)
    full, blocks = dense_jacobian(model, x, z), dense_blocks(model, x, z)
    m = blocks.shape[1]
    assert torch.allclose(full[:m, :m], blocks[0]) and torch.allclose(full[m:, m:], blocks[1])
    assert full[:m, m:].abs().max() == 0  # sequences do not talk to each other


def test_numerical_abscissa_lanczos_matches_dense(small):
    model, x, z, jac = small
    want = torch.linalg.eigvalsh(0.5 * (jac + jac.T))[-1].item()
    assert rel(numerical_abscissa(model, x, z, dense_max=0), want) < REL
    assert rel(numerical_abscissa(model, x, z), want) < REL  # the dense path


def test_spectral_abscissa_arnoldi_matches_dense(small):
    model, x, z, jac = small
    vals = torch.linalg.eigvals(jac)
    top = vals[vals.real.argmax()]
    alpha, imag = spectral_abscissa(model, x, z, dense_max=0)
    assert rel(alpha, top.real.item()) < REL
    assert abs(imag - abs(top.imag.item())) < 1e-6 * max(1.0, abs(top.imag.item()))
    # ω bounds α from above (the log-norm bounds every eigenvalue's real part).
    assert numerical_abscissa(model, x, z) >= alpha - 1e-12


def test_rho_SinvA_matches_dense():
    model, x, z = make(C=4, std=0.4)  # n = 16: the matrix-free path nests MINRES in Arnoldi
    jac = dense_jacobian(model, x, z)
    s, a = 0.5 * (jac + jac.T), 0.5 * (jac - jac.T)
    want = torch.linalg.eigvals(torch.linalg.solve(s, a)).abs().max().item()
    assert rel(rho_SinvA(model, x, z, dense_max=0), want) < REL
    assert rel(rho_SinvA(model, x, z), want) < REL


def test_nonnormality_one_probe_is_exact_and_many_probes_estimate_the_frobenius_ratio(small):
    model, x, z, jac = small
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).reshape(-1)
    want_one = (torch.linalg.vector_norm((jac - jac.T) @ v) / torch.linalg.vector_norm(jac @ v)).item()
    got_one = nonnormality(model, x, z, probes=1, generator=torch.Generator().manual_seed(7))
    assert rel(got_one, want_one) < REL
    frob = nonnormality_dense(jac)
    many = nonnormality(model, x, z, probes=60, generator=torch.Generator().manual_seed(1))
    assert rel(many, frob) < 0.1
    assert frob > 0.05  # untied attention: J really is non-normal here


def test_ftle_matches_the_dense_tangent_recursion():
    model, x, _ = make()
    steps, eps = 12, 0.4
    got = ftle(model, x, steps=steps, eps=eps, generator=torch.Generator().manual_seed(3))
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).reshape(-1)
    d, z, log_growth = d / d.norm(), torch.zeros_like(x), 0.0
    for _ in range(steps):
        jac = dense_jacobian(model, x, z)
        with torch.no_grad():
            z = z + eps * model.field(z, x)
        d = d + eps * (jac @ d)
        log_growth += math.log(d.norm().item())
        d = d / d.norm()
    assert rel(got, log_growth / (steps * eps)) < REL


def test_ftle_sign_tracks_contraction():
    model, x, _ = make(std=0.02, c=1.0)  # a weak block: J ≈ -(1+c)I, the relaxation contracts
    assert ftle(model, x, steps=30, eps=0.5) < -1.0


def test_hopf_warning_fires_on_oscillating_stall_not_on_convergence():
    oscillating = [{"residual": 0.05 + 0.01 * (-1) ** k} for k in range(10)]
    converging = [{"residual": 0.05 * 0.7**k} for k in range(10)]
    slow_noisy = [{"residual": 0.05 * 0.8**k * (1 + 0.05 * (-1) ** k)} for k in range(10)]
    msg = hopf_warning(oscillating)
    assert msg is not None and "--eigreg" in msg and "\n" not in msg
    assert hopf_warning(converging) is None
    assert hopf_warning(slow_noisy) is None
    # A raw relaxation trajectory (SolveStats.history tuples) works too.
    assert hopf_warning([(0.02 + 0.005 * (-1) ** k, 0.03) for k in range(12)]) is not None


def test_hopf_warning_on_the_spectral_abscissa():
    near = [{"spectral_abscissa": -1.0}, {"spectral_abscissa": -0.04, "spectral_imag": 1.7}]
    msg = hopf_warning(near)
    assert msg is not None and "-0.04" in msg and "1.7" in msg
    assert hopf_warning([{"spectral_abscissa": -0.5}]) is None
    assert hopf_warning([]) is None


def test_compare_cosines_and_groups():
    a = {"attn.q.weight": torch.ones(2, 2), "head.weight": torch.tensor([[1.0, 0.0]])}
    b = {"attn.q.weight": -torch.ones(2, 2), "head.weight": torch.tensor([[2.0, 0.0]])}
    out = compare(a, b, "x")
    assert out["cos_x_attn"] == pytest.approx(-1.0) and out["cos_x_head"] == pytest.approx(1.0)
    assert out["relnorm_x"] == pytest.approx(math.sqrt(5) / math.sqrt(8))
    assert math.isnan(compare(a, {k: torch.zeros_like(v) for k, v in a.items()}, "y")["cos_y"])


@pytest.fixture(scope="module")
def contractive():
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=24, C=8, H=2, T=4, c=1.0, init_std=0.05)).double()
    idx = torch.randint(0, 24, (2, 4))
    return model, idx, torch.roll(idx, -1, 1)


OPTS = {"res_est": 1e-10, "t1max": 200, "t2_tol": 1e-9, "t2sel": 120, "T1": 60, "hr": 1e-3}


def test_gradient_cosines_ep_agrees_with_implicit_at_a_contractive_point(contractive):
    model, idx, targets = contractive
    out = gradient_cosines(model, idx, targets, OPTS)
    assert out["cos_ep_implicit"] > 0.999 and abs(out["relnorm_ep_implicit"] - 1) < 0.01
    for group in ("attn", "ffn", "ln", "embed", "head"):
        assert out[f"cos_ep_implicit_{group}"] > 0.99
    assert out["cos_ep_bptt"] > 0.99  # 60 unrolled steps reach the same fixed point here
    assert all(isinstance(v, float) for v in out.values())


def test_gradient_cosines_compare_over_the_sequences_ep_kept(contractive, monkeypatch):
    """A sequence EP leaves out (no equilibrium) is left out of the references too: EP's gradient
    is the mean over the kept ones. Simulated: EP keeps sequence 0 of 2 (its gradient on it alone)."""
    from ept.diagnostics import fidelity

    model, idx, targets = contractive
    real = fidelity.gradient

    def ep_keeps_the_first(m, i, t, route, **opts):
        if route != "ep":
            return real(m, i, t, route, **opts)
        grads, stats = real(m, i[:1], t[:1], route, **opts)
        return grads, {**stats, "kept": torch.tensor([True, False])}

    monkeypatch.setattr(fidelity, "gradient", ep_keeps_the_first)
    out = gradient_cosines(model, idx, targets, OPTS)
    assert out["kept_seqs"] == 1.0 and out["cos_ep_implicit"] > 0.999 and out["cos_ep_bptt"] > 0.99


def test_fingerprint_keys_and_val_ce(contractive):
    model, idx, targets = contractive
    batches = [(idx, targets), (idx[:1], targets[:1])]
    fp = fingerprint(model, batches, OPTS)
    for key in ("residual", "cos_ep_implicit", "cos_ep_bptt", "numerical_abscissa", "spectral_abscissa",
                "nonnormality", "rho_SinvA", "val_ce", "ftle"):
        assert isinstance(fp[key], float) and math.isfinite(fp[key]), key
    assert fp["spectral_abscissa"] < 0 and fp["residual"] < 1e-8
    # val_ce is the token-weighted mean of the two batches' CE at their fixed points.
    with torch.no_grad():
        from ept.config import SolverConfig
        from ept.grad.common import free_phase

        solver = SolverConfig(res_est=1e-10, t1max=200)
        ces = [model.loss(free_phase(model, model.inject(i), solver)[0], t).item() for i, t in batches]
    assert fp["val_ce"] == pytest.approx((2 * ces[0] + ces[1]) / 3, rel=1e-6)


def test_contraction_watch_warns_once_per_signal_and_not_on_a_steady_run() -> None:
    from ept.diagnostics import ContractionWatch

    def log(step, fevals, dropped=0.0):
        return {"step": step, "loss": 4.0, "T1": fevals, "dropped_seqs_max": dropped}

    steady = ContractionWatch("try X")
    assert not any(steady.update(log(10 * i, 20 + i % 3)) for i in range(40))
    assert not steady.update({"step": 400, "event": "diag", "numerical_abscissa": -0.3})

    watch = ContractionWatch("try X")
    got = [w for i in range(5) for w in watch.update(log(10 * i, 20))]
    got += [w for i in range(5, 7) for w in watch.update(log(10 * i, 45))]
    assert got == []  # the median of the last three logs is still 20
    (w,) = watch.update(log(70, 45))
    assert w["signal"] == "fevals" and "from 20 to 45" in w["message"] and w["message"].endswith("try X")
    assert watch.update(log(80, 90)) == []  # once
    assert watch.update(log(90, 90, 1.0)) == [] and watch.update(log(100, 90, 2.0)) == []
    (w,) = watch.update(log(110, 90, 1.0))
    assert w["signal"] == "dropped" and "up to 2" in w["message"]
    assert watch.update({"step": 120, "event": "diag", "numerical_abscissa": 0.2}) == []  # never held
    assert watch.update({"step": 130, "event": "diag", "numerical_abscissa": -0.4}) == []
    (w,) = watch.update({"step": 140, "event": "diag", "numerical_abscissa": -0.01})
    assert w["signal"] == "omega"


def test_the_warning_names_the_margin_the_schedule_loosens_to():
    from ept.runlog import contraction_hint

    fixed = contraction_hint({"eigreg": 1.0, "eig_margin": 0.5, "eig_margin_end": None})
    assert "--eig_margin above 0.5" in fixed and "eig_margin_end" not in fixed
    sched = contraction_hint({"eigreg": 1.0, "eig_margin": 0.5, "eig_margin_end": -1.5})
    assert "--eig_margin_end above -1.5" in sched
    assert "--eigreg 1" in contraction_hint({"eigreg": 0.0})


def test_the_watch_reads_drops_as_a_share_and_omega_against_the_loosened_hold() -> None:
    from ept.diagnostics import ContractionWatch

    def log(step, mean, most, margin=None):
        rec = {"step": step, "loss": 4.0, "T1": 20, "dropped_seqs": mean, "dropped_seqs_max": most}
        return rec if margin is None else {**rec, "eig_margin": margin}

    # One sequence of 8 in a fifth of the steps, three logs running: 2.5% of the batch, under 5%.
    watch = ContractionWatch("try X", batch=8)
    assert not any(watch.update(log(10 * i, 0.2, 1.0)) for i in range(6))
    (w,) = watch.update(log(60, 1.0, 2.0))  # (0.2 + 0.2 + 1.0) / 3 / 8 = 5.8% of the batch
    assert w["signal"] == "dropped" and "of the batch" in w["message"]

    # The schedule loosened the hold to -1.0 (omega may reach +1.0): +0.4 is not a warning, +1.2 is.
    watch = ContractionWatch("try X", batch=8)
    watch.update({"step": 100, "event": "diag", "numerical_abscissa": -0.4})
    watch.update(log(110, 0.0, 0.0, margin=-1.0))
    assert watch.update({"step": 120, "event": "diag", "numerical_abscissa": 0.4}) == []
    (w,) = watch.update({"step": 130, "event": "diag", "numerical_abscissa": 1.2})
    assert w["signal"] == "omega" and "+1.00" in w["message"]
    # While the margin is still positive the bar stays just below 0.
    watch = ContractionWatch("try X", batch=8)
    watch.update({"step": 100, "event": "diag", "numerical_abscissa": -0.4})
    watch.update(log(110, 0.0, 0.0, margin=0.35))
    (w,) = watch.update({"step": 120, "event": "diag", "numerical_abscissa": -0.01})
    assert "no contraction margin left" in w["message"]
