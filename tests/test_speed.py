"""The speed benchmark's instruments: peak memory, F-eval counting, the peer column, the Broyden solver."""

import pytest
import torch
from conftest import batch, load_benchmark, small_model

import ept
from ept.bench import fevals as fe
from ept.bench.timing import measure_peak, peak_in_subprocess
from ept.cli import main
from ept.diagnostics.equilibria import equilibrium_gap
from ept.solvers import residual_per_seq


def linear_problem(n: int = 20, rows: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    b = torch.randn(rows, n, generator=g, dtype=torch.float64)
    return (lambda z: b - z @ A.T), torch.linalg.solve(A, b.T).T


def test_peak_memory_sees_a_deliberate_50_mb_allocation():
    def allocate():
        t = torch.ones(50 * 2**20 // 4)  # touched, so resident
        del t

    peak = measure_peak(allocate)
    assert 48 * 2**20 <= peak <= 80 * 2**20
    assert measure_peak(lambda: None) < 8 * 2**20  # and an empty call adds (almost) nothing


def test_ep_peak_memory_is_below_bptt_in_separate_processes():
    """EP's free phase keeps no autograd history; BPTT keeps T1 steps of it (T1=60 here to stay quick)."""
    ep = peak_in_subprocess("ep", "tiny", None, T1=60)
    bptt = peak_in_subprocess("bptt", "tiny", None, T1=60)
    assert ep > 0 and bptt > 0
    assert ep < 0.75 * bptt  # measured at random init: ~60 MB vs ~120 MB


def test_feval_counter_counts_every_call_and_stops_at_the_true_residual():
    f, exact = linear_problem()
    counter = fe.FevalCounter(f, tol=0.0, max_calls=None)
    _, st = ept.solve(counter, torch.zeros_like(exact), method="fixed_point", tol=1e-14, max_iter=7)
    assert counter.calls == st.fevals == 7 and counter.hit is None
    # Stopping at tol: the hit is the first call whose input meets it, the same count ept.solve reports.
    _, ref = ept.solve(f, torch.zeros_like(exact), method="fixed_point", tol=1e-6, max_iter=500)
    counted = fe.ept_fevals(f, torch.zeros_like(exact), "fixed_point", 1e-6, 500)
    assert counted.hit == ref.fevals and counted.residuals[-1] <= 1e-6 < counted.residuals[-2]


def test_equilibrium_gap_tells_two_fixed_points_apart():
    """F(z) = -(z - 1)(z + 1)·sign(z) per entry: roots ±1, both attracting for z <- z + eps F, so
    plain iteration from 0.5 and from -0.5 lands on different ones (gap 2), from 0.5 and 0.9 on one."""
    def f(z):
        return -(z - 1) * (z + 1) * torch.sign(z)

    ends = [fe.ept_fevals(f, torch.full((2, 3), v, dtype=torch.float64), "fixed_point", 1e-8, 500).z
            for v in (0.5, -0.5, 0.9)]
    assert equilibrium_gap(ends[1], ends[0]) == pytest.approx(2.0, abs=1e-6)
    assert equilibrium_gap(ends[2], ends[0]) < 1e-7
    assert equilibrium_gap(None, ends[0]) is None
    row = fe.compare_solvers(f, torch.full((2, 3), 0.5, dtype=torch.float64), 1e-8, 500, peer=False)
    assert row["eq_gap"] < 1e-6


@pytest.mark.skipif(not fe.have_torchdeq(), reason="torchdeq (optional benchmark dependency) not installed")
@pytest.mark.parametrize("method", fe.PEER_METHODS)
def test_torchdeq_peer_is_counted_on_the_same_field(method):
    f, exact = linear_problem()
    counter = fe.torchdeq_fevals(f, torch.zeros_like(exact), method, 1e-8, 300)
    assert counter.hit is not None and counter.hit == counter.calls
    assert counter.residuals[-1] <= 1e-8 and min(counter.residuals[:-1]) > 1e-8


def test_broyden_solves_a_linear_problem_exactly_with_true_residual():
    f, exact = linear_problem()
    z, st = ept.solve(f, torch.zeros_like(exact), method="broyden", tol=1e-10, max_iter=200)
    assert st.converged and not st.diverged
    torch.testing.assert_close(z, exact, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(st.residual_per_seq, residual_per_seq(f(z), z))


def test_broyden_handles_complex_states():
    model = small_model(scale=2.0)
    idx, _ = batch(model)
    x = model.inject(idx).detach().to(torch.complex128) * (1 + 0.05j)
    z, st = ept.solve(lambda z: model.field(z, x), torch.zeros_like(x), method="broyden", tol=1e-10,
                      max_iter=300)
    assert st.converged and z.is_complex()
    assert residual_per_seq(model.field(z, x), z).max() <= 1e-10


def test_broyden_converges_on_a_stiff_field_where_anderson_stalls():
    """Weights ×3, seed 2: plain iteration oscillates and Anderson (m=5) stalls; Broyden: ~92 F-evals."""
    model = small_model(scale=3.0, seed=2)
    idx, _ = batch(model)
    x = model.inject(idx).detach()
    f, z0 = (lambda z: model.field(z, x)), torch.zeros_like(x)
    _, anderson = ept.solve(f, z0, method="anderson", tol=1e-6, max_iter=200)
    _, broyden = ept.solve(f, z0, method="broyden", tol=1e-6, max_iter=200)
    assert not anderson.converged
    assert broyden.converged and broyden.fevals <= 150


def test_broyden_nudged_phase_keeps_ep_matching_implicit():
    model = small_model()
    idx, tgt = batch(model)
    tight = dict(res_est=1e-12, t1max=1000)
    oracle, _ = ept.gradient(model, idx, tgt, route="implicit", **tight)
    grads, st = ept.gradient(model, idx, tgt, route="ep", solver="broyden", nudge_solver="broyden",
                             t2_tol=1e-11, t2sel=400, **tight)
    a = torch.cat([g.flatten() for g in grads.values()])
    b = torch.cat([oracle[k].flatten() for k in grads])
    assert not st["diverged"] and (a @ b / (a.norm() * b.norm())).item() >= 0.9999


@pytest.mark.parametrize("argv, message", [
    (["bench", "--preset", "nope"], "--preset 'nope' is unknown"),
    (["bench", "speed", "--repeats", "0"], "--repeats must be a positive integer"),
    (["bench", "speed", "--starts", "0"], "--starts must be a positive integer"),
    (["bench", "speed", "--set", "t2sle=10"], "did you mean 't2sel'"),
    (["bench", "speed", "--set", "t2sel"], "is not key=value"),
])
def test_bad_bench_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_trained_operator_is_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("EPT_CACHE", str(tmp_path))
    cfg = ept.EPTConfig(vocab_size=50, C=16, H=2, T=8)
    tokens = torch.randint(0, 50, (500,)).numpy()
    opts = dict(t1max=40, t2sel=10)
    model, path = fe.trained_model(cfg, tokens, "k", B=4, steps=3, opts=opts)
    torch.manual_seed(0)
    untrained = ept.EquilibriumLM(cfg)
    assert path.is_file() and path.parent == tmp_path
    assert not torch.equal(model.head.weight, untrained.head.weight)  # the EP steps moved the weights
    again, same = fe.trained_model(cfg, tokens, "k", B=4, steps=3, opts=opts)
    assert same == path
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_an_operator_the_bench_training_blew_up_is_refused_and_never_cached(tmp_path, monkeypatch, capsys):
    """At the small preset the bench's 300 EP steps once took the loss from 7.64 to 13.3; that block was
    cached and would have been measured as "the trained operator" by every later run."""
    cfg = ept.EPTConfig(vocab_size=50, C=16, H=2, T=8)
    torch.manual_seed(0)
    model = ept.EquilibriumLM(cfg)
    assert fe.operator_trouble([7.6, 7.0, 6.1, 5.9, 6.0], model) is None
    assert fe.operator_trouble([7.6, float("nan"), 6.0], model) is None  # a skipped step is no trouble
    assert "rose from 7.600" in fe.operator_trouble([7.6, 7.0, 9.0, 13.0, 13.3], model)
    assert "3 of its 5 EP steps blew up" in fe.operator_trouble([7.6, *[float("nan")] * 3, 7.0], model)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    assert fe.operator_trouble([7.6, 7.0], model) == "its weights are not finite"

    monkeypatch.setenv("EPT_CACHE", str(tmp_path))
    monkeypatch.setattr(fe, "train_ep", lambda *a, **k: [7.6, 9.0, 13.3])
    tokens = torch.randint(0, 50, (500,)).numpy()
    with pytest.raises(fe.OperatorBlewUp, match="13.300"):
        fe.trained_model(cfg, tokens, "k", B=4, steps=3, opts={})
    assert not list(tmp_path.iterdir())  # nothing cached: the next run trains again

    def blown_up(*a, **k):
        raise fe.OperatorBlewUp("the benchmark's own 300-step EP training blew the operator up (x)")

    class Tokens:
        vocab_size, train, key = 50, tokens, "k"

    from ept.bench import report

    monkeypatch.setattr(report, "builtin_tokens", lambda vocab: Tokens)
    monkeypatch.setattr(fe, "trained_model", blown_up)
    assert main(["bench", "speed", "--preset", "small"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ept train --preset small --out RUN" in err and "--ckpt RUN" in err


def test_trained_operator_from_a_checkpoint_is_its_ema_unless_asked(tmp_path, monkeypatch):
    """`bench speed --ckpt` measures the weights eval/generate use (the EMA); --weights model the raw ones."""
    from ept import checkpoint as ck

    monkeypatch.setenv("EPT_CACHE", str(tmp_path / "cache"))
    cfg = ept.EPTConfig(vocab_size=50, C=16, H=2, T=8)
    torch.manual_seed(0)
    raw, ema = ept.EquilibriumLM(cfg), ept.EquilibriumLM(cfg)
    (tmp_path / "run").mkdir()
    ck.save_checkpoint(tmp_path / "run", 5, {"model": raw.state_dict(), "ema": ema.state_dict()}, {})
    tokens = torch.randint(0, 50, (500,)).numpy()
    got = {w: fe.trained_model(cfg, tokens, "k", 4, 3, {}, ckpt=str(tmp_path / "run"), weights=w)
           for w in ("ema", "model")}
    assert torch.equal(got["ema"][0].head.weight, ema.head.weight)
    assert torch.equal(got["model"][0].head.weight, raw.head.weight)
    assert got["ema"][1] != got["model"][1]  # the memory children must not read the other's cache file
    with pytest.raises(ValueError, match="weights 'last'"):
        fe.trained_model(cfg, tokens, "k", 4, 3, {}, ckpt=str(tmp_path / "run"), weights="last")


def test_quality_run_folders_are_complete_runs(tmp_path):
    """`ept bench quality --out` leaves folders that eval/generate load like any `ept train` run."""
    from ept.cli.bench import quality
    from ept.cli.eval import load_run

    quality("tiny", steps=2, modes=("bp",), out=tmp_path / "q", log=lambda _: None)
    loaded = load_run(tmp_path / "q" / "bp")
    assert loaded.cfg.train.mode == "bp" and loaded.step == 2
    assert loaded.tokens.vocab_size == loaded.cfg.model.vocab_size and loaded.cfg.data.key


def test_peer_comparison_takes_each_librarys_best_solver_plain_iteration_included():
    from ept.bench.report import best_fevals, vs_peer

    row = {"ept_fixed_point": 58, "ept_anderson": 118, "ept_broyden": None, "torchdeq_fixed_point_iter": 58,
           "torchdeq_anderson": None, "torchdeq_broyden": 106, "eq_gap": 0.1}
    assert best_fevals(row, "ept_") == 58 and best_fevals(row, "torchdeq_") == 58
    assert vs_peer(best_fevals(row, "ept_"), best_fevals(row, "torchdeq_")) == 1.0
    assert vs_peer(None, 5) == float("inf") and vs_peer(None, None) is None


def test_peer_target_is_judged_on_the_sum_over_fields_and_the_worst_field_is_reported():
    """One row where ept's best took twice TorchDEQ's, others where it took fewer: the sum decides,
    a row only one library solved is charged the cap for the other, a row neither solved is left out."""
    from ept.bench.report import peer_ratios

    def row(ept: int | None, peer: int | None) -> dict:
        return {"ept_fixed_point": None, "ept_anderson": ept, "ept_broyden": None,
                "torchdeq_broyden": peer, "torchdeq_anderson": None}

    table = {"a": row(80, 40), "b": row(30, 50), "c": row(None, 100), "d": row(20, None),
             "e": row(None, None)}
    r = peer_ratios(table, cap=400)
    assert r["ept_over_torchdeq_fevals"] == pytest.approx((80 + 30 + 400 + 20) / (40 + 50 + 100 + 400))
    assert r["ept_over_torchdeq_fevals_worst_field"] == float("inf")  # row c: only TorchDEQ got there
    assert r["ept_anderson_over_torchdeq_fevals"] == r["ept_over_torchdeq_fevals"]
    assert peer_ratios({"e": row(None, None)}, cap=400)["ept_over_torchdeq_fevals"] is None


def test_each_field_is_solved_from_z0_and_from_starts_a_rounding_error_away(monkeypatch):
    """Start 0 is z = 0 itself; start k is 1e-6 away, the same on every call (a seeded draw), and the
    table gets a row per field and start. An operator trained with embeddings at 1.0 also gets the
    random fields at the library's default embedding scale (the hard ones)."""
    from ept.bench.report import START_NOISE, solver_fields, solver_table, start_point
    from ept.bench.timing import SpeedConfig
    from ept.model import EPTConfig, EquilibriumLM

    z0 = torch.zeros(2, 3, 4)
    assert start_point(z0, 0) is z0
    a, b = start_point(z0, 1), start_point(z0, 2)
    assert torch.equal(a, start_point(z0, 1)) and not torch.equal(a, b)
    assert 0 < a.abs().max() < 10 * START_NOISE
    cfg = SpeedConfig(scales=(2.0,), starts=2, peer=False)
    model = EquilibriumLM(EPTConfig(vocab_size=16, C=8, H=2, T=4, emb_std=1.0))
    idx = torch.randint(0, 16, (2, 4), generator=torch.Generator().manual_seed(0))
    fields = solver_fields(model, [idx], cfg)
    assert list(fields) == ["trained b0", "random x2", "random x2 e0.02"]
    assert fields["random x2 e0.02"][0].cfg.emb_std == 0.0
    starts = []
    monkeypatch.setattr(fe, "compare_solvers", lambda f, z, *a, **k: starts.append(z.clone()) or {})
    table = solver_table(model, [idx], cfg)
    assert list(table) == ["trained b0", "trained b0 s1", "random x2", "random x2 s1",
                           "random x2 e0.02", "random x2 e0.02 s1"]
    assert torch.equal(starts[0], torch.zeros_like(starts[0])) and 0 < starts[1].abs().max() < 1e-5
    default = EquilibriumLM(EPTConfig(vocab_size=16, C=8, H=2, T=4))
    assert list(solver_fields(default, [idx], cfg)) == ["trained b0", "random x2"]


def test_an_equilibrium_plain_iteration_leaves_is_told_from_an_attractor():
    """F(z) = z - z³ per row: 0 is a saddle (F' = 1), ±1 attract (F' = -2). A solver's answer sits a
    residual away from the point itself; from the saddle plain iteration flows off to ±1."""
    from ept.diagnostics.equilibria import leaves_equilibrium

    z_star = torch.tensor([[1e-6, -1e-6], [1.0 + 1e-6, 1.0]], dtype=torch.float64)
    moved = leaves_equilibrium(lambda z: z - z**3, z_star, eps=0.5)
    assert moved[0] > 1.0 and moved[1] < 1e-5


def two_rows_one_without_an_attractor(z):
    """Row 0: F = b - z (attracting root). Row 1: a limit cycle of radius 1 around a repelling
    focus, F = (1 - |z|²) z + ω·rot(z): plain iteration circles forever at a residual of about ω."""
    b = torch.tensor([0.3, -0.7], dtype=z.dtype)
    r2 = (z[1] ** 2).sum()
    rot = torch.stack([-z[1, 1], z[1, 0]])
    return torch.stack([b - z[0], (1 - r2) * z[1] + 0.5 * rot])


def test_counter_records_each_rows_own_count():
    f, exact = linear_problem(rows=4)
    z0 = torch.zeros_like(exact)
    z0[2] = exact[2] * 0.999  # this row starts next to its root: it is done far sooner
    counter = fe.ept_fevals(f, z0, "fixed_point", 1e-8, 500)
    rows = fe.row_evals(counter)
    assert max(rows) == counter.hit and rows[2] < min(rows[i] for i in (0, 1, 3))
    capped = fe.ept_fevals(f, z0, "fixed_point", 1e-8, 5)  # stopped before most rows got there
    assert capped.hit is None and fe.row_evals(capped).count(None) >= 3


def test_settled_rows_leave_out_a_sequence_plain_iteration_never_settles():
    z0 = torch.tensor([[0.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    keep = fe.settled_rows(fe.ept_fevals(two_rows_one_without_an_attractor, z0, "fixed_point", 1e-6, 300))
    assert keep.tolist() == [True, False]


def test_compare_solvers_reuses_a_plain_count_already_taken():
    """The bench's attractor filter already ran plain iteration on the batch: handing that count in
    gives the same row as counting afresh, without running plain iteration again."""
    f, exact = linear_problem(rows=2)
    z0 = torch.zeros_like(exact)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    fresh = fe.compare_solvers(counted, z0, 1e-8, 500, peer=False)
    n_fresh = len(calls)
    plain = fe.ept_fevals(f, z0, "fixed_point", 1e-8, 500)
    calls.clear()
    reused = fe.compare_solvers(counted, z0, 1e-8, 500, peer=False, plain=plain)
    assert reused == fresh
    assert len(calls) == n_fresh - plain.calls and plain.calls > 20


def test_row_ratio_sums_each_sequences_count_and_caps_misses():
    from ept.bench.report import trained_ratio, trained_row_ratio

    table = {"trained b0": {"ept_anderson": 30, "ept_fixed_point": 90,
                            "rows_ept_anderson": [10, 30], "rows_ept_fixed_point": [80, 90]},
             "trained b1": {"ept_anderson": None, "ept_fixed_point": 100,
                            "rows_ept_anderson": [20, None], "rows_ept_fixed_point": [40, 100]},
             "random x2": {"ept_anderson": 1, "ept_fixed_point": 400,
                           "rows_ept_anderson": [1], "rows_ept_fixed_point": [400]}}
    assert trained_ratio(table, cap=200) == pytest.approx((30 + 200) / (90 + 100))
    assert trained_row_ratio(table, cap=200) == pytest.approx((10 + 30 + 20 + 200) / (80 + 90 + 40 + 100))
    momentum = {"trained b0": (25, [5, 25]), "trained b1": (60, [60, 7]), "random x2": (None, [None])}
    for name, counts in momentum.items():
        table[name]["ept_momentum"], table[name]["rows_ept_momentum"] = counts
    assert trained_ratio(table, cap=200, method="momentum") == pytest.approx((25 + 60) / (90 + 100))
    assert trained_row_ratio(table, cap=200, method="momentum") == pytest.approx((5 + 25 + 60 + 7) / 310)


@pytest.mark.parametrize("argv, weights", [([], "ema"), (["--raw"], "model"),
                                           (["--weights", "model"], "model")])
def test_bench_raw_flag_is_spelt_as_in_eval_and_generate(argv, weights, monkeypatch, capsys):
    import ept.bench.report

    def fake_run_speed(cfg, log, compile_field, ckpt, weights):
        raise ValueError(f"reached run_speed with weights={weights}")

    monkeypatch.setattr(ept.bench.report, "run_speed", fake_run_speed)
    assert main(["bench", "speed", "--ckpt", "some/run", *argv]) == 2
    assert f"weights={weights}" in capsys.readouterr().err
    assert main(["bench", "speed", "--raw", "--weights", "ema"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_solver_sweep_counts_only_the_sequences_plain_iteration_settles():
    sweep = load_benchmark("solvers")
    counts = {"plain": [40, None, 90], "anderson": [10, 5, None]}
    cost, left_out = sweep.batch_cost(counts, max_evals=400)
    assert left_out == 1  # the second sequence: plain iteration never settled it
    assert cost == {"plain": (90, 130), "anderson": (400, 410)}  # a miss is charged the cap
    assert sweep.batch_cost({"plain": [None], "anderson": [3]}, 400) == ({}, 1)
    runs = {"a": {"batch": {"plain": 300, "momentum": 90}}, "b": {"batch": {"plain": 100, "momentum": 40}},
            "c": {"batch": {"plain": 200, "momentum": 60}}, "none": {"batch": {"plain": 0, "momentum": 0}}}
    spread = sweep.per_run_spread(runs, ["momentum"])["momentum"]
    # Per run 0.3, 0.4, 0.3 (the run plain iteration settled nothing on is left out); pooled it is 0.317.
    assert spread == {"min": 0.3, "median": 0.3, "max": 0.4, "at_or_under_third": 2, "runs": 3}


def test_the_bench_cosine_is_void_where_the_oracle_refined_z_star_away(monkeypatch):
    """cos(EP, implicit) is taken at EP's own equilibrium: a batch whose oracle refinement moved z*
    by more than the allowed distance is another point's gradient, so it has no cosine and is counted."""
    import ept.bench.timing as sp

    model = small_model().float()
    ep = {"hr": 0.003, "polish_res": 1e-6, "drop_res": 1e-5, "t2_tol": 1e-4, "t2sel": 60}
    ok = sp.cos_ep_implicit(model, [batch(model)], ep)
    assert ok["oracle_failed_batches"] == 0 and ok["cos_ep_implicit"] >= 0.999
    assert 0 < ok["oracle_moved_z"] < 1e-3
    monkeypatch.setattr(sp, "_ORACLE_MOVE", ok["oracle_moved_z"] / 2)
    void = sp.cos_ep_implicit(model, [batch(model)], ep)
    assert void["oracle_failed_batches"] == 1 and void["cos_ep_implicit"] is None


def test_momentum_ceiling_finds_the_interval_of_a_real_spectrum_and_pays_for_a_complex_pair():
    from ept.solvers.momentum import heavy_ball_params

    mc = load_benchmark("momentum_ceiling")
    real = torch.linspace(-0.2, 0.9, 50, dtype=torch.float64).to(torch.complex128)
    rho, lo, hi = mc.best_interval(real)
    assert abs(lo + 0.2) < 0.051 and abs(hi - 0.9) < 0.006
    _, b = heavy_ball_params(torch.tensor(-0.2, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64))
    assert abs(rho - float(b.sqrt())) < 0.01
    pair = torch.tensor([0.3j, -0.3j], dtype=torch.complex128)
    rho_c, lo_c, _ = mc.best_interval(torch.cat([real, pair]))
    assert rho_c > rho + 0.02 and lo_c < lo  # a wider interval below: the pair sits inside its ellipse
    assert mc.fevals_share(0.9, 0.9) == 1.0 and mc.fevals_share(0.9, 1.0) is None


def test_a_slow_passage_plain_iteration_itself_meets_the_residual_at_is_no_saddle():
    """F(z) = -0.1((z - 5)² + δ)(z - 8): a ghost at z ≈ 5 where the residual dips below the target
    on the way to the root at 8. Plain iteration meets the target there too, so a solver that does
    the same found no saddle: the sequence counts as a passage, for neither solver as a saddle."""
    def f(z):
        return -0.1 * ((z - 5.0) ** 2 + 1e-3) * (z - 8.0)

    row = fe.compare_solvers(f, torch.full((2, 1), 2.0, dtype=torch.float64), 1e-4, 2000, peer=False)
    assert row["ept_fixed_point"] is not None and row["passages"] == 2
    assert row["momentum_saddles"] == 0 and row["anderson_saddles"] == 0
