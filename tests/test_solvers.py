"""The relaxation solvers on the block's field and on linear problems with known answers."""

import pytest
import torch
from conftest import batch, small_model

import ept
from ept.solvers import residual_per_seq


def block_field(scale: float, seed: int = 0):
    model = small_model(scale=scale, seed=seed)
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    return (lambda z: model.field(z, x)), x


def linear_problem(n: int = 20, rows: int = 3, seed: int = 0):
    """F(z) = b - A z with A = I + (a non-normal, stable perturbation): known solution A⁻¹ b."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    b = torch.randn(rows, n, generator=g, dtype=torch.float64)
    return (lambda z: b - z @ A.T), torch.linalg.solve(A, b.T).T


@pytest.mark.parametrize("method", ["anderson", "fixed_point"])
def test_solution_and_true_residual(method):
    f, exact = linear_problem()
    z, st = ept.solve(f, torch.zeros_like(exact), method=method, tol=1e-10, max_iter=500)
    assert st.converged and not st.diverged
    torch.testing.assert_close(z, exact, rtol=1e-8, atol=1e-9)
    # The reported residual is the undamped ||F(z)|| / ||z|| of the returned state, per sequence.
    torch.testing.assert_close(st.residual_per_seq, residual_per_seq(f(z), z))
    assert st.residual_max == pytest.approx(st.residual_per_seq.max().item())
    assert st.residual_max <= 1e-10
    assert len(st.history) == st.fevals


def test_anderson_needs_at_most_half_the_evaluations_of_plain_iteration():
    """Measured on this block (weights ×2, seed 1): plain iteration at the default step oscillates
    (an eigenvalue of J beyond -2/eps) and has not converged after 400 F-evals; Anderson: ~71."""
    f, x = block_field(scale=2.0, seed=1)
    _, plain = ept.solve(f, torch.zeros_like(x), method="fixed_point", tol=1e-6, max_iter=400)
    _, anderson = ept.solve(f, torch.zeros_like(x), method="anderson", tol=1e-6, max_iter=400)
    plain_cost = plain.fevals if plain.converged else 2 * plain.fevals  # a lower bound on its cost
    assert plain_cost >= 50
    assert anderson.converged and anderson.fevals <= plain_cost / 2


def test_anderson_accelerates_a_slow_linear_relaxation():
    """A linear field whose slowest mode contracts by 0.98 per plain step (≈ 680 steps to 1e-6):
    Anderson, a GMRES in disguise on linear problems, needs a small fraction of that."""
    n = 30
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.04, 1.9, n, dtype=torch.float64)) @ q.T
    A = A + 0.05 * torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64), 1)  # non-normal
    b = torch.randn(2, n, generator=g, dtype=torch.float64)

    def f(z):
        return b - z @ A.T

    _, plain = ept.solve(f, torch.zeros_like(b), method="fixed_point", tol=1e-6, max_iter=2000)
    _, anderson = ept.solve(f, torch.zeros_like(b), method="anderson", tol=1e-6, max_iter=2000)
    assert plain.converged and plain.fevals >= 50
    assert anderson.converged and anderson.fevals <= plain.fevals / 2


def test_anderson_handles_complex_states():
    model = small_model(scale=2.0)
    idx, _ = batch(model)
    x = model.inject(idx).detach().to(torch.complex128) * (1 + 0.05j)
    z, st = ept.solve(lambda z: model.field(z, x), torch.zeros_like(x), tol=1e-10, max_iter=500)
    assert st.converged and z.is_complex()
    assert residual_per_seq(model.field(z, x), z).max() <= 1e-10


def test_seed_flag_names_and_min_iterations():
    f, exact = linear_problem()
    _, st = ept.solve(f, torch.zeros_like(exact), method="fixed_point", T1=40, t1max=60, res_est=1e-3)
    assert st.fevals == 40 and st.converged  # T1 forces the minimum even when already converged
    _, st = ept.solve(f, torch.zeros_like(exact), method="fixed_point", res_est=1e-14, t1max=7)
    assert st.fevals == 7 and not st.converged and not st.diverged


def test_divergence_is_reported_not_hidden():
    f, x = block_field(scale=3.0)
    z, st = ept.solve(f, torch.zeros_like(x), method="fixed_point", eps=1.5, tol=1e-8, max_iter=500)
    assert st.diverged and not st.converged
    assert torch.isfinite(z).all()  # the last finite state, not a scrubbed one
    assert st.fevals < 500


def test_nonfinite_field_is_divergence():
    def f(z):
        return torch.where(z > 1.0, torch.full_like(z, float("nan")), 1.0 - 0.1 * z + 2.0)

    z, st = ept.solve(f, torch.zeros(2, 3, dtype=torch.float64), method="fixed_point", tol=1e-8)
    assert st.diverged and torch.isfinite(z).all()


def test_divergence_names_the_rows_that_blew_up():
    """Rows are independent systems: the stats say which one grew, so a caller can drop just it."""
    rate = torch.tensor([-1.0, 0.6, -1.0], dtype=torch.float64).view(3, 1)

    def f(z):
        return rate * (z - 1.0)

    z0 = torch.full((3, 4), 0.5, dtype=torch.float64)
    _, st = ept.solve(f, z0, method="fixed_point", tol=1e-12, max_iter=500)
    assert st.diverged and st.unstable.tolist() == [False, True, False]


def _blows_up_at(calls: set[int], row: int, f):
    """``f`` whose value on ``row`` is 1e12 on the listed calls (1-based): a wild point on that row."""
    n = {"calls": 0}

    def g(z):
        n["calls"] += 1
        out = f(z)
        if n["calls"] in calls:
            out = out.clone()
            out[row] = 1e12
        return out

    return g


@pytest.mark.parametrize("method", ["anderson", "broyden", "momentum"])
def test_a_secant_solve_puts_a_blown_up_row_back_at_its_best_point(method):
    """A row that blows up once under a secant solver is put back at its lowest-residual point, its
    history forgotten, and the solve goes on to the exact solution; plain iteration, the dynamics
    itself, still reports divergence. A row that keeps blowing up is divergence after two resets."""
    f, exact = linear_problem(rows=3)
    z0 = torch.zeros_like(exact)
    z, st = ept.solve(_blows_up_at({6}, 1, f), z0, method=method, tol=1e-10, max_iter=300)
    assert st.converged and not st.diverged and st.recovered == 1
    assert torch.allclose(z, exact, atol=1e-8)
    _, plain = ept.solve(_blows_up_at({6}, 1, f), z0, method="fixed_point", tol=1e-10, max_iter=300)
    assert plain.diverged and plain.unstable.tolist() == [False, True, False]
    _, again = ept.solve(_blows_up_at({6, 9, 12}, 2, f), z0, method=method, tol=1e-10, max_iter=300)
    assert again.diverged and again.recovered == 2 and again.unstable.tolist() == [False, False, True]


def test_monitor_stops_early():
    f, exact = linear_problem()
    calls = []

    def monitor(z, fz):
        calls.append(1)
        return len(calls) == 5

    _, st = ept.solve(f, torch.zeros_like(exact), tol=1e-14, max_iter=100, monitor=monitor)
    assert st.stopped_by_monitor and st.fevals == 5


def test_unknown_and_bad_options_are_refused():
    f, exact = linear_problem()
    with pytest.raises(TypeError, match="did you mean 'eps'"):
        ept.solve(f, exact, epss=0.1)
    with pytest.raises(ValueError, match="method"):
        ept.solve(f, exact, method="newton")


def test_anderson_stall_guard_gets_past_a_ghost_fixed_point():
    """F(z) = -0.1 (z² + δ)(z - 3): one root at z = 3, and near z = 0 a "ghost" where |F| has a
    local minimum ≈ 0.3δ but no root. Plain iteration crawls past it; unguarded Anderson, which
    extrapolates to where the secant model vanishes, sits at the ghost (as on a trained tiny
    operator). The stall guard hands such sequences to the dynamics, with projective long steps."""

    def f(z):
        return -0.1 * (z**2 + 1e-2) * (z - 3.0)

    z0 = torch.linspace(-1.5, -0.5, 16, dtype=torch.float64).repeat(2, 1)
    _, plain = ept.solve(f, z0, method="fixed_point", tol=1e-8, max_iter=600)
    z, guarded = ept.solve(f, z0, method="anderson", tol=1e-8, max_iter=600)
    _, unguarded = ept.solve(f, z0, method="anderson", tol=1e-8, max_iter=600, stall=10**6)
    assert plain.converged and guarded.converged
    torch.testing.assert_close(z, torch.full_like(z, 3.0), rtol=0, atol=1e-6)
    assert not unguarded.converged and unguarded.residual_max > 1e-3
    # The guard waits `stall` steps without halving before it hands over. With plain steps only,
    # waiting 32 costs more than plain iteration from the start (248 vs 237 F-evals); the long steps
    # cross the ghost faster than plain iteration does (the default stall of 12: 128; 32: 197).
    _, plain_escape = ept.solve(f, z0, method="anderson", tol=1e-8, max_iter=600, proj_jump=0, stall=32)
    _, late = ept.solve(f, z0, method="anderson", tol=1e-8, max_iter=600, stall=32)
    assert plain_escape.converged and plain_escape.fevals > plain.fevals
    assert guarded.fevals <= late.fevals <= 0.9 * plain.fevals


def test_stall_escape_takes_long_steps_only_along_a_steady_drift():
    """A constant field (a drift that never ends: the residual never halves, so the guard hands over
    after `stall` steps) gets a long step (1 + proj_jump)·eps every proj_every + 1 steps; a field
    whose direction flips at every call (an oscillation) gets none."""
    z0 = torch.full((2, 3), 1e6, dtype=torch.float64)
    z, st = ept.solve(lambda z: torch.ones_like(z), z0, tol=1e-12, max_iter=60, stall=4)
    assert not st.converged and st.fevals == 60
    without, _ = ept.solve(lambda z: torch.ones_like(z), z0, tol=1e-12, max_iter=60, stall=4, proj_jump=0)
    torch.testing.assert_close(without - z0, torch.full_like(z0, 59 * 0.5))  # 59 plain steps
    steps = (z - z0)[0, 0].item() / 0.5  # in units of a plain step
    assert steps > 59 + 4 * 8  # at least four long ones (8 extra each)
    flips = []

    def flipping(z):
        flips.append(None)
        return torch.ones_like(z) * (-1) ** len(flips)

    z, _ = ept.solve(flipping, z0, tol=1e-12, max_iter=60, stall=4)
    assert (z - z0).abs().max().item() <= 0.5  # plain steps back and forth: never a long one


def _rates_field(rates):
    """F(z) = r·(1 - z) per row: plain iteration at eps=0.5 converges at rate 1 - r/2, row by row."""
    from ept.solvers import RowwiseField

    rate = torch.tensor(rates, dtype=torch.float64).view(-1, 1)
    calls = []

    def fn(z, r):
        calls.append(z.shape[0])
        return r * (1.0 - z)

    return RowwiseField(fn, (rate,)), calls


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "momentum"])
def test_a_converged_row_is_frozen_and_the_field_cut_to_the_moving_rows(method):
    """Rows are independent: each stops where its own solve would, and once the moving rows are at
    most half of those evaluated the field is evaluated on them alone."""
    rates = [1.0, 0.05, 0.9, 1.0]
    field, calls = _rates_field(rates)
    z0 = torch.zeros(4, 3, dtype=torch.float64)
    z, st = ept.solve(field, z0, method=method, tol=1e-8, max_iter=2000)
    assert st.converged and st.done.all()
    alone = []
    for i, r in enumerate(rates):
        f1, _ = _rates_field([r])
        z1, st1 = ept.solve(f1, z0[i:i + 1], method=method, tol=1e-8, max_iter=2000)
        torch.testing.assert_close(z[i:i + 1], z1, rtol=0, atol=1e-15)  # bit for bit, in effect
        alone.append(st1.fevals)
    assert st.fevals == max(alone)
    assert st.row_fevals == sum(calls) < 4 * st.fevals
    assert calls[-1] == 1  # the slow row, alone
    assert max(st.residual_per_seq.tolist()) <= 1e-8


def test_a_monitor_can_freeze_single_rows():
    field, _ = _rates_field([1.0, 1.0, 0.5])
    seen = []

    def monitor(z, fz):
        seen.append(z.clone())
        return torch.tensor([len(seen) >= 2, False, len(seen) >= 3])

    z, st = ept.solve(field, torch.zeros(3, 2, dtype=torch.float64), method="fixed_point", tol=0.0,
                      max_iter=6, monitor=monitor)
    assert st.flagged.tolist() == [True, False, True] and not st.stopped_by_monitor
    torch.testing.assert_close(z[0], seen[1][0])  # frozen where the monitor flagged it
    torch.testing.assert_close(z[2], seen[2][2])
    assert st.fevals == 6 and z[1, 0] > seen[2][1, 0]  # the unflagged row went on
    z, st = ept.solve(field, torch.zeros(3, 2, dtype=torch.float64), method="fixed_point", tol=0.0,
                      max_iter=50, monitor=lambda z, fz: torch.ones(3, dtype=torch.bool))
    assert st.stopped_by_monitor and st.fevals == 1


def test_anderson_masks_forgotten_slots_as_if_they_were_gone():
    """A restart forgets a sequence's history: its next step equals that of a fresh Anderson fed only
    the iterates since the restart (the masked slots get exactly zero weight)."""
    from ept.solvers.anderson import AndersonMixing

    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 6, generator=g, dtype=torch.float64) for _ in range(7)]
    fs = [torch.randn(2, 6, generator=g, dtype=torch.float64) * 0.5**i for i in range(7)]
    kept = AndersonMixing(5, 1e-3, 1.0)
    for i in range(4):
        kept.step(zs[i], fs[i], 0.5)
    restart = torch.tensor([True, False])
    fresh = AndersonMixing(5, 1e-3, 1.0)
    out_kept = kept.step(zs[4], fs[4], 0.5, restart)
    out_fresh = fresh.step(zs[4], fs[4], 0.5)
    torch.testing.assert_close(out_kept[0], out_fresh[0])
    for i in (5, 6):
        out_kept, out_fresh = kept.step(zs[i], fs[i], 0.5), fresh.step(zs[i], fs[i], 0.5)
        torch.testing.assert_close(out_kept[0], out_fresh[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out_kept[1], out_fresh[1])  # the other row kept its history


def _anderson_reference(xs: list[torch.Tensor], fs: list[torch.Tensor], lam: float,
                        mix: float) -> torch.Tensor:
    """Type-II Anderson from the definition: min ||f + ΔF γ|| + Tikhonov ``lam`` on the columns
    scaled to unit norm, ΔFᵢ = fᵢ − f over the window's older points, then z = x + ΔX γ + mix·(f + ΔF γ)."""
    x, f = xs[-1], fs[-1]
    dF = torch.stack([fi - f for fi in fs[:-1]], 1)  # (B, k, n)
    dX = torch.stack([xi - x for xi in xs[:-1]], 1)
    scale = dF.norm(dim=-1)
    A = dF / scale.unsqueeze(-1)
    gram = A @ A.transpose(1, 2) + lam * torch.eye(dF.shape[1], dtype=f.dtype)
    gamma = torch.linalg.solve(gram, -(A @ f.unsqueeze(-1)).squeeze(-1)) / scale
    return x + (gamma.unsqueeze(1) @ dX).squeeze(1) + mix * (f + (gamma.unsqueeze(1) @ dF).squeeze(1))


def test_anderson_step_is_the_textbook_least_squares_step_even_where_residuals_stagnate():
    """The running products give the same system as the definition, after the ring buffer has
    wrapped, and where the residuals barely change (differences 1e-9 of the residuals, as at a
    ghost): products of the residuals themselves, not of their differences, lose every digit there."""
    from ept.solvers.anderson import AndersonMixing

    g = torch.Generator().manual_seed(3)
    m, n = 4, 12
    base = torch.randn(2, n, generator=g, dtype=torch.float64)
    for size in (1.0, 1e-9):
        xs = [torch.randn(2, n, generator=g, dtype=torch.float64) for _ in range(m + 3)]
        fs = [base + size * torch.randn(2, n, generator=g, dtype=torch.float64) for _ in range(m + 3)]
        acc = AndersonMixing(m, 1e-3, 1.0)
        for i in range(m + 3):
            out = acc.step(xs[i], fs[i], 1.0)
        ref = _anderson_reference(xs[-m:], fs[-m:], 1e-3, 1.0)
        torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)


def test_the_registry_is_what_the_config_accepts_and_every_entry_relaxes():
    from ept.config import SolverConfig, solver_methods
    from ept.solvers.registry import SOLVERS

    assert solver_methods() == tuple(SOLVERS) and "momentum" in SOLVERS
    with pytest.raises(ValueError, match="not one of anderson, fixed_point"):
        SolverConfig(method="newton")
    A = -torch.eye(3, dtype=torch.float64) * 1.5
    b = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    for name in SOLVERS:  # each one's step, driven by the one loop, finds the root of b + A z
        z, stats = ept.solvers.solve(lambda z: b + z @ A.T, torch.ones_like(b), method=name, tol=1e-8,
                                     max_iter=200)
        assert stats.converged, name
        assert torch.allclose(z, b / 1.5, atol=1e-6), name
