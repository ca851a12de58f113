"""Every gradient route against the implicit-gradient oracle, float64, converged free phase."""

import math

import pytest
import torch
from conftest import batch, small_model

import ept
from ept.diagnostics import nonnormality
from ept.grad.ep import contour

TIGHT = dict(res_est=1e-12, t1max=1000)  # free phase converged to machine precision
EP_TIGHT = dict(TIGHT, t2_tol=1e-11, t2sel=400)


def flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def compare(a, b):
    va, vb = flat(a), flat(b)
    return (va @ vb / (va.norm() * vb.norm())).item(), (va.norm() / vb.norm()).item()


@pytest.fixture(scope="module")
def problem():
    model = small_model(scale=1.0)
    idx, tgt = batch(model)
    oracle, stats = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    assert stats["free_converged"] and stats["adj_converged"]
    return model, idx, tgt, oracle


@pytest.fixture(scope="module")
def nonconservative():
    """Weights ×5: non-normality ||Jv - Jᵀv|| / ||Jv|| ≈ 0.84 at z*."""
    model = small_model(scale=5.0)
    idx, tgt = batch(model)
    oracle, _ = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    return model, idx, tgt, oracle


def test_implicit_matches_finite_differences_of_the_equilibrium_loss(problem):
    """The oracle itself: dL(z*(θ))/dθ along a random direction, by central differences."""
    model, idx, tgt, oracle = problem
    g = torch.Generator().manual_seed(7)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}

    def equilibrium_loss(t):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(t * direction[n])
            x = model.inject(idx)
            z, _ = ept.solve(lambda z: model.field(z, x), torch.zeros_like(x), tol=1e-13, max_iter=1000)
            loss = model.loss(z, tgt).item()
            for n, p in model.named_parameters():
                p.sub_(t * direction[n])
        return loss

    h = 1e-5
    fd = (equilibrium_loss(h) - equilibrium_loss(-h)) / (2 * h)
    analytic = sum((oracle[n] * direction[n]).sum().item() for n in oracle)
    assert fd == pytest.approx(analytic, rel=1e-5)  # O(h²) truncation of the difference quotient


def test_gmres_and_anderson_adjoints_agree(problem):
    model, idx, tgt, oracle = problem
    other, stats = ept.gradient(model, idx, tgt, route="implicit", adjoint="anderson", **TIGHT)
    cos, rel = compare(other, oracle)
    assert cos > 1 - 1e-10 and rel == pytest.approx(1, abs=1e-8)


@pytest.mark.parametrize("asym", ["fixed", "track", "linear"])
def test_ep_centred_with_asymep_matches_implicit(problem, asym):
    model, idx, tgt, oracle = problem
    grads, stats = ept.gradient(model, idx, tgt, route="ep", asym=asym, **EP_TIGHT)
    cos, rel = compare(grads, oracle)
    assert not stats["diverged"]
    assert cos >= 0.9999
    assert rel == pytest.approx(1.0, abs=0.01)


def test_ep_defaults_are_centred_with_fixed_correction(problem):
    model, idx, tgt, oracle = problem
    grads, stats = ept.gradient(model, idx, tgt, route="ep")
    assert stats["nudged_states"] == 2  # ±β
    cos, rel = compare(grads, oracle)
    assert cos >= 0.999 and rel == pytest.approx(1.0, abs=0.01)


def test_ep_onesided_has_first_order_bias_that_centred_removes(problem):
    model, idx, tgt, oracle = problem
    big = dict(EP_TIGHT, hr=0.1)
    one, _ = ept.gradient(model, idx, tgt, route="ep", estimator="onesided", **big)
    two, _ = ept.gradient(model, idx, tgt, route="ep", estimator="centred", **big)
    err_one = (flat(one) - flat(oracle)).norm()
    err_two = (flat(two) - flat(oracle)).norm()
    assert err_two < 0.2 * err_one


def test_holomorphic_four_points_beat_two_at_the_same_radius(problem):
    model, idx, tgt, oracle = problem
    errs = {}
    for n in (2, 4):
        grads, stats = ept.gradient(
            model, idx, tgt, route="ep", estimator="holomorphic", holo=n, hr=0.1, **EP_TIGHT
        )
        errs[n] = (flat(grads) - flat(oracle)).norm() / flat(oracle).norm()
        assert stats["nudged_states"] == n // 2 + 1  # conjugate nudges are never relaxed
    # Measured: 1.4e-3 (N=2) vs 3.3e-5 (N=4) at r = 0.1: O(r²) against O(r⁴).
    assert errs[4] < 0.1 * errs[2]
    assert errs[4] < 1e-4


def test_holomorphic_two_points_is_the_centred_estimator(problem):
    model, idx, tgt, _ = problem
    holo, _ = ept.gradient(model, idx, tgt, route="ep", estimator="holomorphic", holo=2, **EP_TIGHT)
    centred, _ = ept.gradient(model, idx, tgt, route="ep", estimator="centred", **EP_TIGHT)
    torch.testing.assert_close(flat(holo), flat(centred))


def test_contour_weights_recover_the_first_coefficient():
    """Σ w_k β_k^n (with conjugates) is 1 for n = 1 and 0 for 2 ≤ n < N+1: error O(r^N)."""
    for n_points in (2, 3, 4, 6):
        cfg = ept.EPConfig(estimator="holomorphic", holo=n_points, hr=0.3)
        betas, weights = contour(cfg)
        for power in range(1, n_points + 1):
            total = sum((w * b**power).real for b, w in zip(betas, weights, strict=True))
            assert total == pytest.approx(1.0 if power == 1 else 0.0, abs=1e-12)


def test_bptt_with_enough_steps_matches_implicit(problem):
    model, idx, tgt, oracle = problem
    grads, stats = ept.gradient(model, idx, tgt, route="bptt", T1=200)
    cos, rel = compare(grads, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=1e-3)
    assert stats["free_residual"] < 1e-10


def test_bptt_with_too_few_steps_is_measurably_off(problem):
    model, idx, tgt, oracle = problem
    grads, stats = ept.gradient(model, idx, tgt, route="bptt", T1=3)
    cos, rel = compare(grads, oracle)
    assert stats["free_residual"] > 1e-2
    assert abs(rel - 1) > 1e-3 or cos < 0.9999


def test_asymep_correction_matters_on_a_nonconservative_operator(nonconservative):
    model, idx, tgt, oracle = nonconservative
    x = model.inject(idx).detach()
    z, _ = ept.solve(lambda z: model.field(z, x), torch.zeros_like(x), tol=1e-12, max_iter=1000)
    assert nonnormality(model, x, z) >= 0.5
    plain, _ = ept.gradient(model, idx, tgt, route="ep", asym="none", **EP_TIGHT)
    fixed, _ = ept.gradient(model, idx, tgt, route="ep", asym="fixed", **EP_TIGHT)
    track, _ = ept.gradient(model, idx, tgt, route="ep", asym="track", **EP_TIGHT)
    linear, _ = ept.gradient(model, idx, tgt, route="ep", asym="linear", **EP_TIGHT)
    cos_plain, _ = compare(plain, oracle)
    cos_fixed, rel_fixed = compare(fixed, oracle)
    cos_track, _ = compare(track, oracle)
    cos_linear, rel_linear = compare(linear, oracle)
    assert cos_fixed >= 0.999 and cos_track >= 0.999 and cos_linear >= 0.999
    assert rel_linear == pytest.approx(1.0, abs=0.01)
    assert rel_fixed == pytest.approx(1.0, abs=0.01)
    assert cos_plain < 0.99  # without the correction EP follows J⁻¹, not J⁻ᵀ
    assert (1 - cos_plain) > 100 * (1 - cos_fixed)


def test_float32_ep_is_usable(problem):
    model64, idx, tgt, oracle = problem
    model = small_model().float()
    grads, stats = ept.gradient(model, idx, tgt, route="ep", res_est=1e-6, t2_tol=1e-5)
    cos, _ = compare({k: v.double() for k, v in grads.items()}, oracle)
    assert cos >= 0.999


def test_grads_cover_every_parameter_and_leave_dot_grad_alone(problem):
    model, idx, tgt, oracle = problem
    assert set(oracle) == {n for n, _ in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert all(oracle[n].shape == p.shape for n, p in model.named_parameters())


def test_divergent_configuration_is_flagged_not_raised():
    """A step too large for the operator: the relaxation blows up, the stats say so."""
    model = small_model(scale=3.0)
    idx, tgt = batch(model)
    unstable = dict(solver="fixed_point", eps=1.5)  # 1 + eps·λ < -1 for λ ≈ -(1+c): plain steps blow up
    for route, opts in [("ep", unstable), ("implicit", unstable), ("bptt", dict(eps=1.5, T1=300))]:
        grads, stats = ept.gradient(model, idx, tgt, route=route, **opts)
        assert stats["diverged"], route
        finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
        assert finite == stats["grads_finite"]
        assert not math.isnan(stats["free_residual"]) or stats["diverged"]


@pytest.mark.parametrize(
    "route,opts,message",
    [
        ("ep", {"estimatr": "centred"}, "did you mean 'estimator'"),
        ("ep", {"T1": 5, "hr": 0.1, "trak": True}, "unknown 'ep' route option 'trak'"),
        ("bptt", {"estimator": "centred"}, "unknown 'bptt' route option 'estimator'"),
        ("implicit", {"holo": 4}, "unknown 'implicit' route option 'holo'"),
    ],
)
def test_unknown_options_are_refused(problem, route, opts, message):
    model, idx, tgt, _ = problem
    with pytest.raises(TypeError, match=message):
        ept.gradient(model, idx, tgt, route=route, **opts)


def test_bad_option_values_and_routes_are_refused(problem):
    model, idx, tgt, _ = problem
    with pytest.raises(ValueError, match="route"):
        ept.gradient(model, idx, tgt, route="backprop")
    with pytest.raises(ValueError, match="estimator"):
        ept.gradient(model, idx, tgt, route="ep", estimator="twosided")
    with pytest.raises(ValueError, match="AsymEP"):
        ept.gradient(model, idx, tgt, route="ep", asym="both")


def test_blown_up_nudged_phase_is_relaxed_again_at_a_smaller_beta(problem, monkeypatch):
    """A nudged phase that diverges at hr is retried once at hr·retry_hr; retry_hr=0 reports it."""
    import ept.grad.ep as ep_mod

    model, idx, tgt, oracle = problem
    real, seen = ep_mod.ep_lambda, []

    def blows_up_at_big_beta(model, x, targets, z_star, solver, cfg):
        seen.append(cfg.hr)
        lam, st = real(model, x, targets, z_star, solver, cfg)
        st.diverged = cfg.hr > 0.01
        return (lam * math.nan if st.diverged else lam), st

    monkeypatch.setattr(ep_mod, "ep_lambda", blows_up_at_big_beta)
    grads, stats = ept.gradient(model, idx, tgt, route="ep", hr=0.02, **EP_TIGHT)
    assert seen == [0.02, 0.005] and stats["nudged_retry"] == 1.0 and not stats["diverged"]
    assert compare(grads, oracle)[0] >= 0.9999
    seen.clear()
    _, stats = ept.gradient(model, idx, tgt, route="ep", hr=0.02, retry_hr=0.0, **EP_TIGHT)
    assert seen == [0.02] and stats["diverged"]


def test_a_sequence_off_its_equilibrium_is_left_out_of_the_ep_gradient(problem, monkeypatch):
    """A sequence whose free residual is above drop_res contributes nothing: the EP gradient is the
    exact gradient of the mean loss over the others."""
    import ept.grad.ep as ep_mod

    model, idx, tgt, _ = problem
    real = ep_mod.free_phase

    def second_sequence_unsettled(model, x, solver):
        z, st = real(model, x, solver)
        st.residual_per_seq = st.residual_per_seq.clone()
        st.residual_per_seq[1] = 0.5
        return z, st

    monkeypatch.setattr(ep_mod, "free_phase", second_sequence_unsettled)
    grads, stats = ept.gradient(model, idx, tgt, route="ep", **EP_TIGHT)
    assert stats["dropped_seqs"] == 1.0 and not stats["diverged"]
    rest = torch.tensor([0, 2])
    oracle, _ = ept.gradient(model, idx[rest], tgt[rest], route="implicit", **TIGHT)
    cos, rel = compare(grads, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=0.01)
    _, kept = ept.gradient(model, idx, tgt, route="ep", drop_res=math.inf, **EP_TIGHT)
    assert kept["dropped_seqs"] == 0.0


def test_sequences_whose_nudged_rows_blew_up_are_dropped_on_the_retry(problem, monkeypatch):
    import ept.grad.ep as ep_mod

    model, idx, tgt, _ = problem
    real, calls = ep_mod.ep_lambda, []

    def first_sequence_blows_up(model, x, targets, z_star, solver, cfg):
        calls.append((x.shape[0], cfg.hr))
        lam, st = real(model, x, targets, z_star, solver, cfg)
        if len(calls) == 1:
            st.diverged = True
            st.unstable = torch.tensor([True, False, False, False, False, False])  # row 0 of +β
        return lam, st

    monkeypatch.setattr(ep_mod, "ep_lambda", first_sequence_blows_up)
    grads, stats = ept.gradient(model, idx, tgt, route="ep", hr=0.02, **EP_TIGHT)
    assert calls == [(3, 0.02), (2, 0.005)]
    assert stats["dropped_seqs"] == 1.0 and stats["nudged_retry"] == 1.0 and not stats["diverged"]
    oracle, _ = ept.gradient(model, idx[1:], tgt[1:], route="implicit", **TIGHT)
    assert compare(grads, oracle)[0] >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_closed_form_loss_gradient_matches_autograd(dtype):
    """The nudge's ∂L/∂z in closed form (linear readout) equals autograd's holomorphic derivative."""
    from ept.grad.common import readout_ce_grad

    model = small_model()
    idx, tgt = batch(model)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(*idx.shape, model.cfg.C, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        z = torch.complex(z, 0.1 * torch.randn(z.shape, generator=g, dtype=torch.float64))
    zr = z.clone().requires_grad_(True)
    loss = model.loss(zr, tgt) * tgt.numel()
    (auto,) = torch.autograd.grad(loss, zr, grad_outputs=torch.ones_like(loss))
    auto = auto.conj() if dtype.is_complex else auto
    torch.testing.assert_close(readout_ce_grad(model, z, tgt), auto, rtol=1e-10, atol=1e-12)


def test_a_sequence_whose_nudged_estimate_never_settled_is_left_out(problem, monkeypatch):
    """Adaptive T2 freezes each sequence once its estimate settles; with drop_unsettled one that never
    did is dropped and the EP gradient is the exact one over the others (unless no sequence settled:
    then all stay). By default it stays."""
    import ept.grad.ep as ep_mod

    model, idx, tgt, _ = problem
    from ept.grad import split_options

    real = ep_mod.unsettled
    solver, cfg = split_options("ep", dict(EP_TIGHT))
    z_star = ept.gradient(model, idx, tgt, route="ep", **EP_TIGHT)[1]["z_star"]
    _, st = ep_mod.ep_lambda(model, model.inject(idx).detach(), tgt, z_star, solver, cfg)
    assert st.flagged.all() and not real(st, cfg, 3).any()  # every sequence settles when tight

    def second_sequence_late(stats, cfg, n_seq):
        late = real(stats, cfg, n_seq).clone()
        late[1] = True
        return late

    monkeypatch.setattr(ep_mod, "unsettled", second_sequence_late)
    grads, stats = ept.gradient(model, idx, tgt, route="ep", drop_unsettled=True, **EP_TIGHT)
    assert stats["dropped_seqs"] == 1.0 and stats["kept"].tolist() == [True, False, True]
    rest = torch.tensor([0, 2])
    oracle, _ = ept.gradient(model, idx[rest], tgt[rest], route="implicit", **TIGHT)
    cos, rel = compare(grads, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=0.01)
    _, kept = ept.gradient(model, idx, tgt, route="ep", **EP_TIGHT)
    assert kept["dropped_seqs"] == 0.0
    monkeypatch.setattr(ep_mod, "unsettled", real)
    capped = {**EP_TIGHT, "t2sel": 2, "drop_unsettled": True}
    _, none_settled = ept.gradient(model, idx, tgt, route="ep", **capped)
    assert none_settled["dropped_seqs"] == 0.0 and not none_settled["diverged"]


def test_a_free_phase_that_settled_no_sequence_is_not_called_a_nudged_blow_up(problem):
    """Every sequence above drop_res: no nudged phase runs and the step is flagged as a stalled free
    phase (the training rollback then says so), with the direct term as its gradient."""
    model, idx, tgt, _ = problem
    _, stats = ept.gradient(model, idx, tgt, route="ep", **{**EP_TIGHT, "drop_res": 1e-300, "t1max": 3})
    assert stats["diverged"] and stats["free_unsettled"] and not stats["free_diverged"]
    _, fine = ept.gradient(model, idx, tgt, route="ep", **EP_TIGHT)
    assert not fine["free_unsettled"] and not fine["diverged"]


def test_polishing_a_loose_free_phase_brings_ep_to_the_exact_gradient(problem):
    """z*'s residual enters EP's estimate through the nudged response's curvature: with a free phase
    stopped at 1e-2 EP is measurably off, and polishing z* by Anderson removes the error."""
    model, idx, tgt, oracle = problem
    loose = dict(solver="fixed_point", res_est=1e-2, t1max=1000, t2_tol=1e-11, t2sel=400, hr=1e-3)

    def error(grads):
        return ((flat(grads) - flat(oracle)).norm() / flat(oracle).norm()).item()

    rough, st0 = ept.gradient(model, idx, tgt, route="ep", **loose)
    fine, st1 = ept.gradient(model, idx, tgt, route="ep", polish_res=1e-10, polish_max=100, **loose)
    assert st0["polish_fevals"] == 0 and st0["free_residual_max"] > 1e-3
    assert st1["free_residual_max"] <= 1e-10 and st1["polish_fevals"] > 0
    assert st1["free_fevals"] == st0["free_fevals"] + st1["polish_fevals"]  # the polish is counted
    assert error(rough) > 1e-5 and error(fine) < 1e-3 * error(rough)


def test_a_row_polishing_cannot_improve_keeps_its_free_phase_state(problem):
    import dataclasses

    from ept.grad import split_options
    from ept.grad.common import free_phase
    from ept.grad.ep import polish

    model, idx, tgt, _ = problem
    opts = dict(solver="fixed_point", res_est=1e-3, polish_res=1e-10, polish_max=100)
    solver, cfg = split_options("ep", opts)
    x = model.inject(idx).detach()
    z, st = free_phase(model, x, solver)
    claimed = st.residual_per_seq.clone()
    claimed[1] = 0.0  # nothing can beat this row's (claimed) residual
    z2, st2, n = polish(model, x, z, dataclasses.replace(st, residual_per_seq=claimed), solver, cfg)
    assert n > 0 and torch.equal(z2[1], z[1])
    assert not torch.equal(z2[0], z[0]) and not torch.equal(z2[2], z[2])
    assert st2.residual_per_seq[1] == 0.0 and st2.residual_max <= 1e-10


def test_polishing_leaves_rows_the_free_phase_did_not_bring_near_an_equilibrium(problem):
    """A root finder started far from the attractor travels to roots the relaxation never reaches:
    rows above polish_from × res_est keep their state and residual (and drop_res then judges them)."""
    import dataclasses

    from ept.grad import split_options
    from ept.grad.common import free_phase
    from ept.grad.ep import polish

    model, idx, _, _ = problem
    solver, cfg = split_options("ep", dict(solver="fixed_point", res_est=1e-3, polish_res=1e-10,
                                           polish_max=100, polish_from=3.0))
    x = model.inject(idx).detach()
    z, st = free_phase(model, x, solver)
    claimed = st.residual_per_seq.clone()
    claimed[2] = 3.1e-3  # just beyond 3 × res_est: too far to polish
    z2, st2, n = polish(model, x, z, dataclasses.replace(st, residual_per_seq=claimed), solver, cfg)
    assert n > 0 and torch.equal(z2[2], z[2]) and st2.residual_per_seq[2] == claimed[2]
    assert not torch.equal(z2[0], z[0]) and st2.residual_per_seq[0] <= 1e-10
    far = dataclasses.replace(st, residual_per_seq=torch.full_like(claimed, 1.0))
    z3, st3, n3 = polish(model, x, z, far, solver, cfg)  # nothing near: no polish at all
    assert n3 == 0 and torch.equal(z3, z) and st3 is far


def test_polishing_refines_in_place_without_the_stall_escapes_long_steps(problem, monkeypatch):
    """A sequence polishing stalls on has no equilibrium near z*: it takes plain steps, never the
    free solver's long projective ones, which would carry it towards another attractor."""
    from ept.grad import ep as ep_module
    from ept.grad import split_options
    from ept.grad.common import free_phase

    model, idx, _, _ = problem
    solver, cfg = split_options("ep", dict(solver="fixed_point", res_est=1e-3, polish_res=1e-10,
                                           proj_jump=8.0))
    x = model.inject(idx).detach()
    z, st = free_phase(model, x, solver)
    seen = []

    def recording(m, x, c, z0):
        seen.append(c)
        return free_phase(m, x, c, z0=z0)

    monkeypatch.setattr(ep_module, "free_phase", recording)
    ep_module.polish(model, x, z, st, solver, cfg)
    assert solver.proj_jump == 8.0 and [c.proj_jump for c in seen] == [0.0]


def test_bad_polish_settings_are_refused():
    from ept.config import EPConfig

    with pytest.raises(ValueError, match="polish_res >= 0"):
        EPConfig(polish_res=-1e-6)
    with pytest.raises(ValueError, match="polish_max >= 1"):
        EPConfig(polish_max=0)


def test_the_routes_take_their_configs_as_objects_too(problem):
    from ept.config import EPConfig, ImplicitConfig, SolverConfig

    model, idx, tgt, oracle = problem
    by_name, _ = ept.gradient(model, idx, tgt, route="ep", solver="anderson", hr=0.01, **EP_TIGHT)
    solver = SolverConfig(method="anderson", res_est=1e-12, t1max=1000)
    by_config, _ = ept.gradient(model, idx, tgt, route="ep", solver=solver,
                                ep=EPConfig(hr=0.01, t2_tol=1e-11, t2sel=400))
    assert all(torch.equal(by_name[k], by_config[k]) for k in by_name)
    # a keyword next to a config replaces that one field
    mixed, _ = ept.gradient(model, idx, tgt, route="implicit", solver=solver, implicit=ImplicitConfig(),
                            t1max=1000)
    assert compare(mixed, oracle)[0] > 1 - 1e-9
    with pytest.raises(TypeError, match="ep= takes an EPConfig"):
        ept.gradient(model, idx, tgt, route="ep", ep=solver)
