"""The heavy-ball relaxation (method="momentum"): its rate, its spectrum estimate, its safeguards, and
that it follows the dynamics to an attractor where a root finder settles on a saddle."""

import pytest
import torch
from conftest import batch, small_model

import ept
from ept.solvers import residual_per_seq
from ept.solvers.momentum import ritz_top as ritz_top_of_products


def relaxation_problem(spectrum: torch.Tensor, rows: int = 2, seed: int = 0):
    """F(z) = b - A z whose relaxation map z + 0.5·F(z) has exactly ``spectrum`` (a symmetric A)."""
    n = len(spectrum)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(2 * (1 - spectrum)) @ q.T
    b = torch.randn(rows, n, generator=g, dtype=torch.float64)
    return (lambda z: b - z @ A.T), torch.linalg.solve(A, b.T).T


def ritz_top(dz: torch.Tensor, dr: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """:func:`ritz_top` from the steps themselves (the solver keeps their products up to date)."""
    return ritz_top_of_products(dz @ dz.transpose(1, 2), dz @ dr.transpose(1, 2), ok)


def test_momentum_reaches_the_solution_in_a_third_of_plain_iterations_steps():
    """A relaxation map with real eigenvalues in [-0.1, 0.97]: plain iteration contracts its slowest
    mode by 0.97 a step; the heavy ball tuned to the interval by ~0.7."""
    f, exact = relaxation_problem(torch.linspace(-0.1, 0.97, 40, dtype=torch.float64))
    z0 = torch.zeros_like(exact)
    _, plain = ept.solve(f, z0, method="fixed_point", tol=1e-8, max_iter=3000)
    z, mom = ept.solve(f, z0, method="momentum", tol=1e-8, max_iter=3000)
    assert plain.converged and plain.fevals > 300
    assert mom.converged and mom.fevals <= plain.fevals / 3
    torch.testing.assert_close(z, exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mom.residual_per_seq, residual_per_seq(f(z), z))


def test_ritz_top_reads_the_largest_eigenvalue_off_plain_steps():
    """Eight plain steps of a linear map span a Krylov space whose top Ritz value is the map's top
    eigenvalue (0.9 here, apart from the rest in [0, 0.6]); slots not in use are ignored."""
    spectrum = torch.cat([torch.tensor([0.9]), torch.linspace(0.0, 0.6, 29)]).to(torch.float64)
    f, exact = relaxation_problem(spectrum, rows=1)
    zs = [torch.zeros_like(exact)]
    for _ in range(9):
        zs.append(zs[-1] + 0.5 * f(zs[-1]))
    dz = torch.stack([b - a for a, b in zip(zs[:-1], zs[1:], strict=False)], 1)  # (1, 9, n)
    dr = torch.stack([0.5 * (f(b) - f(a)) for a, b in zip(zs[:-1], zs[1:], strict=False)], 1)
    ok = torch.ones(1, 8, dtype=torch.bool)
    top = ritz_top(dz[:, :8], dr[:, :8], ok)
    assert abs(top.item() - 0.9) < 1e-3
    # A slot that is not in use (here: filled with a step from another map entirely) changes nothing.
    bad = dz.clone()[:, :8], dr.clone()[:, :8]
    bad[1][:, 3] = 5.0 * bad[0][:, 3]  # the slot's own Ritz value would be 6
    ok[:, 3] = False
    masked = ritz_top(*bad, ok)
    kept = torch.cat([dz[:, :3], dz[:, 4:8]], 1), torch.cat([dr[:, :3], dr[:, 4:8]], 1)
    torch.testing.assert_close(masked, ritz_top(*kept, torch.ones(1, 7, dtype=torch.bool)))


def test_momentum_follows_the_dynamics_where_a_root_finder_takes_the_saddle():
    """dz/dt = F(z) = -z (z - 1)(z - 2): attractors at 0 and 2, a repeller at 1. From 0.9 the dynamics
    flows to 0; Broyden, a root finder, converges to the nearer root 1, which the dynamics leaves.
    The heavy ball's fixed points and their stability are the dynamics': it ends at 0."""

    def f(z):
        return -z * (z - 1) * (z - 2)

    z0 = torch.tensor([[0.9], [0.91], [0.92]], dtype=torch.float64)
    zp, plain = ept.solve(f, z0, method="fixed_point", tol=1e-10, max_iter=2000)
    zm, mom = ept.solve(f, z0, method="momentum", tol=1e-10, max_iter=2000)
    zb, broyden = ept.solve(f, z0, method="broyden", tol=1e-10, max_iter=2000)
    assert plain.converged and mom.converged and broyden.converged
    torch.testing.assert_close(zp, torch.zeros_like(zp), rtol=0, atol=1e-8)
    torch.testing.assert_close(zm, torch.zeros_like(zm), rtol=0, atol=1e-8)
    torch.testing.assert_close(zb, torch.ones_like(zb), rtol=0, atol=1e-8)


@pytest.mark.parametrize("low", [-0.6, -1.5, -3.3, -6.0])
def test_the_lower_edge_follows_a_stiff_mode_the_steps_reveal(low):
    """A relaxation map with an eigenvalue below mom_lo (-0.3): a heavy ball tuned to [-0.3, hi]
    amplifies that mode, so its lower edge is read off the window's lowest Ritz value. The solve
    converges at the heavy ball's rate, ~√κ steps (κ = (1 - lo) / (1 - hi)), without the restart
    safeguard, also where plain iteration diverges; -3.3 is the small preset's trained block at
    step 460 (J's stiff end -8.6 at eps 0.5), below the edge's old floor of -3."""
    spectrum = torch.cat([torch.tensor([low]), torch.linspace(0.0, 0.95, 19)]).to(torch.float64)
    f, exact = relaxation_problem(spectrum)
    z0 = torch.zeros_like(exact)
    _, plain = ept.solve(f, z0, method="fixed_point", tol=1e-8, max_iter=1000)
    for safeguard in ({}, {"mom_restart": 1e30}):
        z, st = ept.solve(f, z0, method="momentum", tol=1e-8, max_iter=1000, **safeguard)
        assert st.converged and not st.diverged and st.fevals <= 12 * ((1 - low) / (1 - 0.95)) ** 0.5
        torch.testing.assert_close(z, exact, rtol=1e-6, atol=1e-6)
    assert plain.converged == (low > -1) and (not plain.converged or plain.fevals > 300)


def test_momentum_on_a_random_block_and_on_complex_states():
    """A random block (weights x1.5) is where momentum has nothing to offer: its relaxation map's
    eigenvalues fill a disk of radius ~0.6 (real parts -0.59..0.54, imaginary up to 0.65), which no
    polynomial contracts faster than plain iteration does, and the modes near -0.6 grow under the
    heavy ball. The safeguards hand those sequences to plain steps: the solve converges, at a cost
    bounded by a few times plain iteration's (measured: 94 against 41 F-evals). Complex states (the
    holomorphic estimator's) are relaxed as their real view."""
    model = small_model(scale=1.5)
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    z0 = torch.zeros_like(x)
    _, plain = ept.solve(lambda z: model.field(z, x), z0, method="fixed_point", tol=1e-8, max_iter=400)
    z, mom = ept.solve(lambda z: model.field(z, x), z0, method="momentum", tol=1e-8, max_iter=400)
    assert plain.converged and mom.converged and mom.fevals <= 3 * plain.fevals
    assert residual_per_seq(model.field(z, x), z).max() <= 1e-8
    xc = x.to(torch.complex128) * (1 + 0.05j)
    z, st = ept.solve(lambda z: model.field(z, xc), torch.zeros_like(xc), method="momentum", tol=1e-10,
                      max_iter=400)
    assert st.converged and z.is_complex()
    assert residual_per_seq(model.field(z, xc), z).max() <= 1e-10


def test_bad_momentum_settings_are_refused():
    f, exact = relaxation_problem(torch.linspace(0.0, 0.5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="mom_lo"):
        ept.solve(f, exact, method="momentum", mom_lo=0.7)
    with pytest.raises(ValueError, match="mom_restart"):
        ept.solve(f, exact, method="momentum", mom_restart=1.0)
    with pytest.raises(ValueError, match="mom_m"):
        ept.solve(f, exact, method="momentum", mom_m=1)


def test_the_spectral_window_is_mom_m_not_andersons_memory():
    spectrum = torch.cat([torch.linspace(-0.2, 0.6, 30), torch.linspace(0.8, 0.97, 10)]).double()
    f, exact = relaxation_problem(spectrum)
    z0 = torch.zeros_like(exact)

    def fevals(**opts):
        return ept.solve(f, z0, method="momentum", tol=1e-9, max_iter=2000, **opts)[1].fevals

    assert fevals(m=2) == fevals(m=12) == fevals()
    assert fevals(mom_m=2) != fevals(mom_m=8)


def test_heavy_ball_contraction_is_sqrt_b_on_its_interval_and_more_beside_it():
    from ept.solvers.momentum import contraction, heavy_ball_params

    lo, hi = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    _, b = heavy_ball_params(lo, hi)
    inside = torch.linspace(-0.3, 0.9, 13, dtype=torch.float64).to(torch.complex128)
    torch.testing.assert_close(contraction(lo, hi, inside), b.sqrt().expand(13), rtol=1e-6, atol=1e-6)
    # Above hi still contracting, slower; a complex mode beside the interval slower than √b too.
    above = contraction(lo, hi, torch.tensor(0.95 + 0j, dtype=torch.complex128))
    beside = contraction(lo, hi, torch.tensor(0.0 + 0.2j, dtype=torch.complex128))
    assert b.sqrt() < above < 1 and b.sqrt() + 0.05 < beside < 1
    # Plain iteration is the case lo = hi = 0: each mode contracts by |μ|.
    mu = torch.tensor([0.5 + 0.3j, -0.2 + 0j, 0.9 + 0j], dtype=torch.complex128)
    zero = torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(contraction(zero, zero, mu), mu.abs())


def _step_coefficients(out: torch.Tensor, x: torch.Tensor, r: torch.Tensor,
                       px: torch.Tensor) -> tuple[float, float]:
    """(a, b) of the step out = x + a·r + b·(x − px) the heavy ball just took."""
    basis = torch.stack([r.flatten(), (x - px).flatten()], 1)
    ab = torch.linalg.lstsq(basis, (out - x).flatten().unsqueeze(1)).solution.flatten()
    return float(ab[0]), float(ab[1])


def test_a_stiff_mode_once_revealed_is_not_forgotten():
    """A trained small-preset block's relaxation map had a mode at -2.39 (J's eigenvalue -6.8 at eps
    0.5): the heavy ball tuned to it damped it, the mode left the 4-step window, the edge drifted back
    to -0.7, the tuned ball regrew it (x4.7 a step) until the restarts handed the sequence to plain
    steps, which grow it by 2.39 a step: the free phase blew up. Here a window first holds a stiff
    step, then only mild ones; the step taken then must still contract the stiff mode."""
    from ept.config import SolverConfig
    from ept.solvers.momentum import HeavyBall, step_contraction

    mu = torch.tensor([-2.4, 0.9, 0.6, 0.3], dtype=torch.float64)  # the relaxation map's (4 = mom_m)
    cfg = SolverConfig(method="momentum", eps=0.5)
    g = torch.Generator().manual_seed(0)
    hb = HeavyBall.from_config(cfg)
    z = torch.randn(1, 4, generator=g, dtype=torch.float64)
    out = x = px = r = z
    for k in range(12):
        stiff = k < 4  # the first steps move along the stiff mode too, the later ones do not
        along = torch.tensor([1.0 if stiff else 0.0, 1, 1, 1], dtype=torch.float64)
        dz = torch.randn(1, 4, generator=g, dtype=torch.float64) * along
        px, x = x, x + 0.1 * dz
        fz = (mu - 1) * x / cfg.eps  # F = (g - I) z / eps with the fixed point at 0
        r = cfg.eps * fz
        out = hb.step(x, fz, torch.tensor([0.01 * 0.9**k], dtype=torch.float64), None, cfg)
    a, b = _step_coefficients(out, x, r, px)
    stiff_mode = torch.tensor(complex(mu[0]), dtype=torch.complex128)
    assert step_contraction(torch.tensor(a), torch.tensor(b), stiff_mode) < 1


def test_plain_steps_shrink_to_the_stiff_end_revealed():
    """Without momentum (far from the solution, or after the restarts) a step a = 1 grows a mode
    below -1; the plain step is 1 above it and Richardson's optimum below, contracting both ends."""
    from ept.solvers.momentum import plain_step

    lo = torch.tensor([-0.8, -2.5], dtype=torch.float64)
    hi = torch.tensor([0.9, 0.9], dtype=torch.float64)
    a = plain_step(lo, hi)
    assert a[0] == 1.0
    for mode in (lo[1], hi[1]):
        assert abs(1 + a[1] * (mode - 1)) < 1
