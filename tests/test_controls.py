"""Stability controls: each penalty's gradient against an independent dense/finite-difference check,
the jacreg controller's dynamics, resume, and eigreg actually lowering ω.

Tolerances: deterministic gradients 1e-6 relative (float64); the Hutchinson estimate of
||J + (1+c)I||_F²/n within 10% of the dense value with 200 probes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ept import EPTConfig, EquilibriumLM
from ept.controls import ControlConfig, Controller, symmetric_extremes, top_symmetric_eig
from ept.diagnostics import dense_blocks, dense_jacobian


def make(std: float = 0.25, c: float = 0.3, B: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    model = EquilibriumLM(EPTConfig(vocab_size=24, C=8, H=2, T=4, c=c, init_std=std)).double()
    x = model.inject(torch.randint(0, 24, (B, 4))).detach()
    z = x + 0.5 * torch.randn_like(x)
    return model, x, z


def graph_jacobians(model, x, z):
    """Each sequence's dense J at z, differentiable in the parameters: (B, n, n)."""
    n = z[0].numel()
    return torch.stack([
        torch.autograd.functional.jacobian(
            lambda s, b=b: model.field(s, x[b : b + 1], fused=False), z[b : b + 1], create_graph=True
        ).reshape(n, n)
        for b in range(z.shape[0])
    ])


def grads_of(model, scalar):
    params = dict(model.named_parameters())
    gs = torch.autograd.grad(scalar, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), gs, strict=True)}


def assert_grads_close(got, want, rel=1e-6):
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(want)])  # noqa: E731
    g, w = flat({k: got.get(k, torch.zeros_like(v)) for k, v in want.items()}), flat(want)
    assert w.norm() > 0
    assert (g - w).norm() / w.norm() < rel


def test_config_defaults_off_and_validation():
    assert not ControlConfig().active
    assert ControlConfig(eigreg=0.1).active
    with pytest.raises(ValueError, match="jr_floor"):
        ControlConfig(jr_floor=20.0, jr_max=16.0)
    with pytest.raises(TypeError, match="did you mean 'jacreg'"):
        ControlConfig.from_dict({"jacrge": 0.1})
    model, x, z = make()
    assert Controller(ControlConfig()).penalty_grads(model, x, z, {}) == ({}, {})


def test_resreg_gradient_matches_finite_differences():
    model, x, z = make()
    ctrl = Controller(ControlConfig(resreg=0.7))
    grads, logs = ctrl.penalty_grads(model, x, z, {"free_residual": 0.1})

    def penalty() -> float:
        with torch.no_grad():
            f = model.field(z, x)
            return 0.7 * (f.pow(2).sum() / z.pow(2).sum()).item()

    assert logs["penalty"] == pytest.approx(penalty(), rel=1e-12)
    for name, index in (("attn.q.weight", (1, 2)), ("ffn.fc1.bias", (3,)), ("ln2.weight", (0,))):
        p, h = dict(model.named_parameters())[name], 1e-6
        with torch.no_grad():
            p[index] += h
            up = penalty()
            p[index] -= 2 * h
            down = penalty()
            p[index] += h
        assert grads[name][index].item() == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-10)
    assert grads["wte.weight"].abs().max() == 0  # local to the block: x is held fixed


def test_jacreg_gradient_matches_dense_autograd_for_the_same_probe():
    model, x, z = make()
    ctrl = Controller(ControlConfig(jacreg=0.3, jr_floor=0.3, jr_target=1.0, seed=5))
    grads, logs = ctrl.penalty_grads(model, x, z, {"free_residual": 0.01})  # on target: stays at the floor
    e = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).reshape(-1)
    with torch.enable_grad():
        f = lambda s: model.field(s, x, fused=False)  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, z, create_graph=True)
        K = jac.reshape(z.numel(), z.numel()) + (1 + model.cfg.c) * torch.eye(z.numel(), dtype=z.dtype)
        pen = 0.3 * (K.T @ e).pow(2).sum() / z.numel()
        want = grads_of(model, pen)
    assert logs["jac_fro2"] == pytest.approx(pen.item() / 0.3, rel=1e-10)
    assert logs["jr_weight"] == 0.3
    assert_grads_close(grads, want)


def test_hutchinson_estimates_the_block_jacobian_norm():
    model, x, z = make()
    ctrl = Controller(ControlConfig(jacreg=1.0, hutch=200, jr_target=1.0))
    _, logs = ctrl.penalty_grads(model, x, z, {"free_residual": 0.0})
    K = dense_jacobian(model, x, z) + (1 + model.cfg.c) * torch.eye(z.numel(), dtype=z.dtype)
    want = K.pow(2).sum().item() / z.numel()
    assert abs(logs["jac_fro2"] - want) / want < 0.1


def test_lanczos_top_eigenpair_is_the_largest_algebraic():
    model, x, z = make(B=2)
    jac = dense_blocks(model, x, z)
    s = 0.5 * (jac + jac.transpose(1, 2))
    want = torch.linalg.eigvalsh(s)  # (B, n) ascending
    assert (want[:, 0].abs() > want[:, -1].abs()).all()  # magnitude would pick the other end
    apply_s = lambda v: (s @ v.reshape(2, -1, 1)).reshape(v.shape)  # noqa: E731
    theta, u = top_symmetric_eig(apply_s, torch.randn_like(z), iters=z[0].numel())
    assert torch.allclose(theta, want[:, -1], rtol=1e-9)
    resid = apply_s(u) - theta.view(-1, 1, 1) * u
    assert resid.norm() < 1e-7


def test_eigreg_gradient_is_the_gradient_of_the_top_eigenvalue():
    model, x, z = make(B=2)
    n = z[0].numel()
    ctrl = Controller(ControlConfig(eigreg=0.5, eig_margin=10.0, eig_iters=n))
    grads, logs = ctrl.penalty_grads(model, x, z, {})
    with torch.enable_grad():
        jac = graph_jacobians(model, x, z)
        omega = torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))[:, -1]
        pen = 0.5 * torch.relu(omega + 10.0).pow(2).mean()
        want = grads_of(model, pen)
    assert logs["eig_omega"] == pytest.approx(omega.max().item(), rel=1e-8)
    assert_grads_close(grads, want)


def test_lanczos_bottom_eigenpair_is_the_smallest_algebraic():
    model, x, z = make(B=2)
    jac = dense_blocks(model, x, z)
    s = 0.5 * (jac + jac.transpose(1, 2))
    want = torch.linalg.eigvalsh(s)
    apply_s = lambda v: (s @ v.reshape(2, -1, 1)).reshape(v.shape)  # noqa: E731
    top, _, bottom, v = symmetric_extremes(apply_s, torch.randn_like(z), iters=z[0].numel())
    assert torch.allclose(top, want[:, -1], rtol=1e-9) and torch.allclose(bottom, want[:, 0], rtol=1e-9)
    assert (apply_s(v) - bottom.view(-1, 1, 1) * v).norm() < 1e-7
    # A short run's bottom Ritz value is an upper bound on the bottom eigenvalue, as the top's a lower one.
    top3, _, bottom3, _ = symmetric_extremes(apply_s, torch.randn_like(z), iters=3)
    assert (bottom3 >= want[:, 0] - 1e-9).all() and (top3 <= want[:, -1] + 1e-9).all()


def test_eigreg_logs_the_stiff_end_without_a_floor():
    """The Lanczos run's bottom Ritz value is logged as eig_bottom with no floor set, and it adds
    nothing to the penalty."""
    model, x, z = make(B=2)
    n = z[0].numel()
    with torch.enable_grad():
        jac = graph_jacobians(model, x, z)
        ev = torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))
    plain = Controller(ControlConfig(eigreg=0.5, eig_margin=-10.0, eig_iters=n))
    grads, logs = plain.penalty_grads(model, x, z, {})
    assert logs["eig_bottom"] == pytest.approx(ev[:, 0].min().item(), rel=1e-8)
    assert logs["penalty"] == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_eig_floor_gradient_is_the_gradient_of_the_bottom_eigenvalue():
    """The floor's penalty relu(-L - λ_min(S))² beside the margin's, against dense eigvalsh."""
    model, x, z = make(B=2)
    n = z[0].numel()
    ctrl = Controller(ControlConfig(eigreg=0.5, eig_margin=-10.0, eig_floor=0.5, eig_iters=n))
    grads, logs = ctrl.penalty_grads(model, x, z, {})
    with torch.enable_grad():
        jac = graph_jacobians(model, x, z)
        ev = torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(1, 2)))
        assert (ev[:, 0] < -0.5).all() and (ev[:, -1] < 10.0).all()  # only the floor is active
        pen = 0.5 * torch.relu(-0.5 - ev[:, 0]).pow(2).mean()
        want = grads_of(model, pen)
    assert logs["eig_bottom"] == pytest.approx(ev[:, 0].min().item(), rel=1e-8)
    assert_grads_close(grads, want)
    with pytest.raises(ValueError, match="eig_floor"):
        ControlConfig(eigreg=1.0, eig_floor=0.0)


def test_eigreg_along_the_slow_direction_penalises_the_rayleigh_quotient_of_the_residual():
    """eig_dir slow: ω_b = u_bᵀJu_b with u_b = F(z*)_b/||F(z*)_b|| held fixed (no Lanczos), and its
    gradient is that of relu(ω + m)² through J alone, checked against a dense Jacobian."""
    model, x, z = make(B=2)
    ctrl = Controller(ControlConfig(eigreg=0.5, eig_margin=10.0, eig_dir="slow"))
    grads, logs = ctrl.penalty_grads(model, x, z, {})
    with torch.no_grad():
        r = model.field(z, x, fused=False)
        u = (r / r.flatten(1).norm(dim=1).view(-1, 1, 1)).flatten(1)
    with torch.enable_grad():
        jac = graph_jacobians(model, x, z)
        omega = torch.einsum("bi,bij,bj->b", u, jac, u)
        pen = 0.5 * torch.relu(omega + 10.0).pow(2).mean()
        want = grads_of(model, pen)
    assert logs["eig_omega"] == pytest.approx(omega.max().item(), rel=1e-8)
    assert_grads_close(grads, want)
    assert ctrl.eig_u is None  # no eigenvector was computed or kept
    with pytest.raises(ValueError, match="eig_dir"):
        ControlConfig(eig_dir="top")


def test_eigreg_warm_start_improves_the_estimate():
    model, x, z = make()
    jac = dense_jacobian(model, x, z)
    top = torch.linalg.eigvalsh(0.5 * (jac + jac.T))[-1].item()
    ctrl = Controller(ControlConfig(eigreg=0.1, eig_iters=3))
    errors = []
    for _ in range(4):
        theta, _ = ctrl.top_eigvec(model, x, z)
        errors.append(top - theta.item())
    assert all(e >= -1e-9 for e in errors)  # Ritz values never overshoot
    assert errors[-1] < 0.1 * errors[0]


def test_controller_weight_rises_above_target_and_decays_to_floor():
    ctrl = Controller(ControlConfig(jacreg=0.1, jr_floor=0.05, jr_max=1.0, jr_target=1e-3,
                                    jr_up=2.0, jr_decay=0.5))
    assert ctrl.jr_weight == 0.1
    ups = [ctrl.update_weight(0.1) for _ in range(6)]
    assert ups[:4] == [0.2, 0.4, 0.8, 1.0] and ups[-1] == 1.0  # rises, capped at jr_max
    assert ctrl.update_weight(float("nan")) == 1.0  # a blown-up phase counts as above target
    downs = [ctrl.update_weight(1e-4) for _ in range(8)]
    assert downs[0] == 0.5 and downs[-1] == 0.05 and downs == sorted(downs, reverse=True)


def test_state_dict_resumes_exactly():
    model, x, z = make()
    cfg = ControlConfig(jacreg=0.1, jr_target=1e-3, eigreg=0.2, eig_iters=3)
    a = Controller(cfg)
    a.penalty_grads(model, x, z, {"free_residual": 0.5})
    state = copy.deepcopy(a.state_dict())
    b = Controller(cfg)
    b.load_state_dict(state)
    ga, la = a.penalty_grads(model, x, z, {"free_residual": 0.5})
    gb, lb = b.penalty_grads(model, x, z, {"free_residual": 0.5})
    assert la == lb and la["jr_weight"] == 0.4
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_eigreg_lowers_the_numerical_abscissa():
    model, x, z = make(std=0.3, c=0.1)

    def omega() -> float:
        jac = dense_jacobian(model, x, z)
        return torch.linalg.eigvalsh(0.5 * (jac + jac.T))[-1].item()

    before = omega()
    ctrl = Controller(ControlConfig(eigreg=1.0, eig_margin=1.0, eig_iters=6))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(8):
        grads, _ = ctrl.penalty_grads(model, x, z, {})
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt.step()
    after = omega()
    assert before > -1.0  # the margin was violated, so the penalty was active
    assert after < before - 0.1


def test_the_margin_schedule_moves_over_the_decay_and_sets_the_penalty():
    from ept.controls import eig_margin_at
    from ept.optim import decay_left

    cfg = ControlConfig(eigreg=0.5, eig_margin=0.5, eig_margin_end=0.0)
    # 100 steps, the last 30% decaying: held until step 70, halfway at 85, 0 at the end.
    left = [decay_left(s, 100, 0.3) for s in (0, 69, 70, 85, 100)]
    assert left == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.0])
    assert [eig_margin_at(cfg, x) for x in left] == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.0])
    assert eig_margin_at(ControlConfig(eigreg=0.5, eig_margin=0.5), 0.0) == 0.5  # no end: held
    # The penalty at decay d is the fixed-margin penalty at eig_margin_at(cfg, d).
    model, x, z = make(B=2)
    n = z[0].numel()
    sched = Controller(ControlConfig(eigreg=0.5, eig_margin=10.0, eig_margin_end=4.0, eig_iters=n))
    fixed = Controller(ControlConfig(eigreg=0.5, eig_margin=7.0, eig_iters=n))
    g_sched, logs = sched.penalty_grads(model, x, z, {}, decay=0.5)
    g_fixed, _ = fixed.penalty_grads(model, x, z, {})
    assert logs["eig_margin"] == pytest.approx(7.0)
    assert_grads_close(g_sched, g_fixed, rel=1e-10)


def test_eig_every_acts_on_every_nth_step_with_n_times_the_weight():
    model, x, z = make(B=2)
    n = z[0].numel()
    every = Controller(ControlConfig(eigreg=0.5, eig_margin=10.0, eig_iters=n, eig_every=3))
    once = Controller(ControlConfig(eigreg=1.5, eig_margin=10.0, eig_iters=n))
    want, _ = once.penalty_grads(model, x, z, {})
    got, logs = every.penalty_grads(model, x, z, {}, step=6)
    assert "eig_omega" in logs
    assert_grads_close(got, want, rel=1e-9)
    assert every.penalty_grads(model, x, z, {}, step=7) == ({}, {})  # nothing else on: nothing done
    with_res = Controller(ControlConfig(eigreg=0.5, eig_margin=10.0, eig_every=3, resreg=0.7))
    res_only = Controller(ControlConfig(resreg=0.7))
    got, logs = with_res.penalty_grads(model, x, z, {}, step=8)
    assert "eig_omega" not in logs
    assert_grads_close(got, res_only.penalty_grads(model, x, z, {})[0], rel=1e-12)
    with pytest.raises(ValueError, match="eig_every"):
        ControlConfig(eigreg=1.0, eig_every=0)


def test_tighten_adds_to_the_scheduled_margin():
    """A rollback's eig_backoff reaches the penalty as ``tighten``: margin 4 tightened by 3 is margin 7."""
    model, x, z = make(B=2)
    n = z[0].numel()
    tightened = Controller(ControlConfig(eigreg=0.5, eig_margin=4.0, eig_iters=n))
    fixed = Controller(ControlConfig(eigreg=0.5, eig_margin=7.0, eig_iters=n))
    got, logs = tightened.penalty_grads(model, x, z, {}, tighten=3.0)
    assert logs["eig_margin"] == pytest.approx(7.0)
    assert_grads_close(got, fixed.penalty_grads(model, x, z, {})[0], rel=1e-10)
    with pytest.raises(ValueError, match="eig_backoff"):
        ControlConfig(eigreg=1.0, eig_backoff=-0.5)
