"""The training library: schedule, optimisers, EMA, exact resume, rollback on divergence, evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ept import checkpoint as ckpt
from ept.baseline import bp_gradient, explicit_logits
from ept.config import EPTConfig
from ept.evaluate import Predictor, generate, mean_ce, unigram_ce
from ept.model import EquilibriumLM
from ept.optim import Lion, ParamEMA, SGDSaI, wsd_factor
from ept.presets import PRESETS, resolve
from ept.train import METRICS_FILE, grad_options, train

SMALL = dict(
    C=16,
    H=2,
    T=16,
    B=4,
    steps=6,
    vocab_size=300,
    T1=2,
    t1max=30,
    t2sel=10,
    lr=1e-3,
    warmup=0,
    log_every=2,
    eval_every=3,
    eval_batches=1,
    ckpt_every=3,
    sample_tokens=4,
    pema=0.9,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(tokens, **flags):
    cfg = resolve("tiny", {**SMALL, **flags})
    cfg.model.vocab_size = tokens.vocab_size
    return cfg


def quiet(_msg: str) -> None:
    pass


def test_wsd_schedule_warms_up_holds_and_decays_to_zero() -> None:
    f = [wsd_factor(s, 100, 10, 0.25) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:75])
    assert f[75] == pytest.approx(1.0) and f[99] == pytest.approx(1 / 25)
    assert all(a >= b for a, b in zip(f[75:], f[76:], strict=False))
    assert wsd_factor(50, 100, 0, 0.0) == 1.0


@pytest.mark.parametrize("cls", [Lion, SGDSaI])
def test_own_optimisers_minimise_a_quadratic(cls) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(10))
    opt = cls([w], lr=0.05)
    start = float((w.detach() ** 2).sum())
    for _ in range(150):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    assert float((w.detach() ** 2).sum()) < 0.05 * start


def test_parameter_ema_ramps_then_tracks() -> None:
    lin = torch.nn.Linear(2, 2)
    ema = ParamEMA(lin, 0.999)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # first update uses decay 2/11, not 0.999: the average moves most of the way
    assert float(ema.weights()["weight"].mean()) > 0.5
    state = ema.state_dict()
    other = ParamEMA(torch.nn.Linear(2, 2), 0.5)
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.weights()["weight"], ema.weights()["weight"])


@pytest.mark.parametrize("block", [{}, {"attn_mode": "energy", "kappa": 0.5}, {"attn_mode": "mono"}],
                         ids=["thick", "energy_kappa05", "mono"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tokens, tmp_path, block) -> None:
    cfg = small_cfg(tokens, resreg=0.1, **block)  # the controller's state must resume too
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    a = train(cfg, tokens, straight, log=quiet)
    b1 = train(cfg, tokens, split, stop_after=2, log=quiet)  # stops between checkpoints
    assert b1["steps"] == 2 and not b1["finished"]
    b2 = train(cfg, tokens, split, resume=True, log=quiet)
    assert b2["steps"] == cfg.train.steps and b2["finished"]
    ca, cb = ckpt.load_checkpoint(straight), ckpt.load_checkpoint(split)
    for stem in ("model", "ema"):
        for k, v in ca.weights[stem].items():
            assert torch.equal(v, cb.weights[stem][k]), (stem, k)
    assert a["val_ce"] == b2["val_ce"]
    steps = [
        r["step"] for r in map(json.loads, (split / METRICS_FILE).read_text().splitlines()) if "loss" in r
    ]
    assert steps == sorted(set(steps))  # no step logged twice after the resume


def test_divergence_rolls_back_with_a_lower_lr_and_never_saves_nan(tokens, tmp_path) -> None:
    cfg = small_cfg(tokens, mode="bp", ckpt_every=2, steps=6)
    calls = {"n": 0}

    def poisoned_update(model, optimizer, grads, lr, clip):
        from ept.train import apply_update

        calls["n"] += 1
        norm = apply_update(model, optimizer, grads, lr, clip)
        if calls["n"] == 4:  # the 4th update blows up the weights once
            with torch.no_grad():
                model.head.weight.fill_(math.nan)
        return norm

    summary = train(cfg, tokens, tmp_path, log=quiet, update=poisoned_update)
    assert summary["finished"] and summary["rollbacks"] == 1 and math.isfinite(summary["val_ce"])
    events = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    rb = [e for e in events if e.get("event") == "rollback"]
    assert len(rb) == 1 and rb[0]["to_step"] == 2 and rb[0]["lr_scale"] == pytest.approx(0.5)
    for p in tmp_path.glob("ckpt-*"):
        for sd in ckpt.load_checkpoint(p, only=("model", "ema")).weights.values():
            assert all(bool(torch.isfinite(v).all()) for v in sd.values())


def poisoned_after(n: int):
    """An optimizer step that makes the weights infinite once the optimizer has taken n steps."""
    from ept.train import apply_update

    def update(model, optimizer, grads, lr, clip):
        norm = apply_update(model, optimizer, grads, lr, clip)
        if optimizer.state_dict()["state"][0]["step"] > n:
            with torch.no_grad():
                model.head.weight.fill_(math.inf)
        return norm

    return update


def test_persistent_divergence_stops_with_the_last_good_checkpoint(tokens, tmp_path) -> None:
    from ept.train import TrainingDiverged

    cfg = small_cfg(tokens, mode="bp", ckpt_every=2, max_rollbacks=2)

    with pytest.raises(TrainingDiverged, match="lower --lr"):
        train(cfg, tokens, tmp_path, log=quiet, update=poisoned_after(2))
    assert ckpt.load_checkpoint(tmp_path).state["train"]["step"] == 2


def test_the_best_val_checkpoint_is_kept_and_named_when_training_stops(tokens, tmp_path) -> None:
    """RUN/best holds the checkpoint of the lowest periodic val CE, survives the rollbacks (the step
    state they restore must not forget a newer best), and the final error names it."""
    from ept.train import TrainingDiverged

    # Rollbacks return to step 4 (the last logged step), past which steps 5 and 6 are evaluated
    # again, at a lower learning rate: a new best before the rollback must stay the best.
    cfg = small_cfg(tokens, mode="bp", steps=12, ckpt_every=2, eval_every=1, log_every=4, max_rollbacks=2,
                    lr=3e-3)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tokens, tmp_path, log=quiet, update=poisoned_after(6))
    records = map(json.loads, (tmp_path / METRICS_FILE).read_text().splitlines())
    vals = [(r["step"], r["val_ce"]) for r in records if "val_ce" in r and "event" not in r]
    step, best = min(vals, key=lambda v: v[1])
    assert step > 0 and best < vals[0][1]
    pointer = ckpt.best_pointer(tmp_path)
    assert pointer["step"] == step and pointer["val_ce"] == best
    loaded = ckpt.load_checkpoint(tmp_path / ckpt.BEST)
    assert loaded.state["train"]["step"] == step and ckpt.run_folder_of(loaded.path) == tmp_path
    assert f"val CE {best:.4f} at step {step}" in str(err.value) and "--best" in str(err.value)


def test_bp_baseline_is_a_weight_tied_explicit_stack() -> None:
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=30, C=8, H=2, T=6))
    idx = torch.randint(0, 30, (2, 6))
    h = model.inject(idx)
    for _ in range(2):
        h = h + model.attn(model.ln1(h)) + model.ffn(model.ln2(h))
    assert torch.allclose(explicit_logits(model, idx, 2), model.head(h))
    grads, stats = bp_gradient(model, idx, idx, 2)
    assert set(grads) == {k for k, _ in model.named_parameters()} and not stats["diverged"]
    assert float(grads["attn.q.weight"].abs().sum()) > 0


def test_mean_ce_covers_every_target_and_beats_nothing_at_init(tokens) -> None:
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=tokens.vocab_size, C=16, H=2, T=16))
    cfg = small_cfg(tokens)
    out = mean_ce(Predictor(model, "ep", cfg.solver), tokens.valid, 16, 8)
    assert out["tokens"] == len(tokens.valid) - 1
    assert abs(out["val_ce"] - math.log(tokens.vocab_size)) < 0.1  # an untrained model is near uniform
    assert out["val_residual_max"] <= cfg.solver.res_est * 10
    assert unigram_ce(tokens.train, tokens.valid, tokens.vocab_size) < math.log(tokens.vocab_size) - 0.3


def test_generation_is_seeded_and_warm_start_matches_cold() -> None:
    torch.manual_seed(0)
    model = EquilibriumLM(EPTConfig(vocab_size=40, C=16, H=2, T=8))
    solver = resolve("tiny", {}).solver
    pred = Predictor(model, "ep", solver)
    gen = [generate(pred, [1, 2], 10, 8, 1.0, 5, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert gen[0] == gen[1] and len(gen[0]) == 10 and all(0 <= i < 40 for i in gen[0])
    # Greedy with the warm start (T=8 fits 2 + 5 tokens uncropped) equals relaxing from zero each time.
    warm = generate(pred, [1, 2], 5, 8, 0.0)
    cold = []
    ids = [1, 2]
    for _ in range(5):
        z, _ = pred.hidden(torch.tensor([ids]))
        ids.append(int(model.readout(z)[0, -1].argmax()))
        cold.append(ids[-1])
    assert warm == cold


def test_canonical_recipe_maps_onto_the_core_configs() -> None:
    cfg = resolve("c512", {})
    assert (cfg.ep.estimator, cfg.ep.holo, cfg.ep.asym, cfg.ep.T2, cfg.ep.t2sel) == (
        "holomorphic",
        2,
        "track",
        None,
        80,
    )
    assert (cfg.solver.T1, cfg.solver.t1max, cfg.solver.res_est) == (150, 150, 1e-4)
    assert cfg.control["resreg"] == 0.2 and cfg.control["jacreg"] == 0.1 and cfg.control["jr_max"] == 16
    assert cfg.model.qknorm and cfg.train.pema == 0.999 and cfg.train.wsd == 0.25
    fixed = resolve("tiny", {"t2sel": 0, "T2": 7})
    assert fixed.ep.T2 == 7
    opts = grad_options(fixed)
    assert opts["T2"] == 7 and opts["solver"] == "momentum" and "method" not in opts
    assert set(PRESETS) == {"tiny", "small", "c512"}


def test_the_tiny_presets_bptt_unrolls_the_20_steps_its_quality_row_states() -> None:
    """BPTT's unroll is the solver's T1: a free-phase solver change must not shorten it (T1 1 for the
    heavy ball would have made the BPTT baseline a one-step model)."""
    bptt = resolve("tiny", {"mode": "bptt"})
    assert grad_options(bptt) == {"T1": 20, "eps": 0.5}


def test_token_arrays_are_what_training_reads(tokens) -> None:
    assert isinstance(tokens.train, np.ndarray) and tokens.train.max() < tokens.vocab_size


def test_a_rollback_names_the_phase_that_blew_up() -> None:
    from ept.train import TrainConfig, TrainState, divergence

    t = TrainConfig()
    nudged = {"loss": 5.0, "diverged": True, "free_diverged": False, "nudged_diverged": True}
    assert divergence(nudged, TrainState(), t) == "the nudged phase blew up"
    assert divergence({"loss": 5.0, "diverged": True, "free_diverged": True, "nudged_diverged": False},
                      TrainState(), t) == "the free phase blew up"
    both = {"loss": 5.0, "diverged": True, "free_diverged": True, "nudged_diverged": True}
    assert divergence(both, TrainState(), t) == "the free phase blew up"  # the nudged phase never ran
    assert divergence({"loss": math.nan, "diverged": False}, TrainState(), t) == "non-finite loss or gradient"
    stalled = {"loss": 5.0, "diverged": True, "free_diverged": False, "nudged_diverged": True,
               "free_unsettled": True, "free_residual_max": 3.4}
    assert divergence(stalled, TrainState(), t).startswith("no sequence's free phase ended below drop_res")
    assert divergence({"loss": 5.0, "diverged": False, "free_residual": 1e-6}, TrainState(), t) is None


def test_a_rollback_replays_on_fresh_batches(tokens, tmp_path, monkeypatch) -> None:
    """A failure on the batch right after the snapshot must not be replayed on that same batch."""
    import ept.train as tr

    cfg = small_cfg(tokens, mode="bp", ckpt_every=2, steps=4, log_every=2)
    seen, real = [], tr.get_batch
    monkeypatch.setattr(tr, "get_batch", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    calls = {"n": 0}

    def fails_on_third(model, optimizer, grads, lr, clip):
        calls["n"] += 1
        norm = tr.apply_update(model, optimizer, grads, lr, clip)
        if calls["n"] == 3:  # the first step after the step-2 snapshot
            with torch.no_grad():
                model.head.weight.fill_(math.nan)
        return norm

    summary = train(cfg, tokens, tmp_path, log=quiet, update=fails_on_third)
    assert summary["finished"] and summary["rollbacks"] == 1
    failed, replay = seen[2][0], seen[3][0]
    assert not torch.equal(failed, replay)


def test_an_initial_operator_that_does_not_relax_is_named_not_blamed_on_the_lr(tokens, tmp_path,
                                                                              monkeypatch) -> None:
    """Before the first update the operator is the initial one: halving the learning rate cannot
    change a failing step 0, so its retries keep the rate and the final error names the initial
    operator and what changes it."""
    import ept.train as tr

    cfg = small_cfg(tokens, steps=4, max_rollbacks=2)
    stalled = {"loss": 5.0, "diverged": True, "free_diverged": False, "nudged_diverged": True,
               "free_unsettled": True, "free_residual_max": 3.1}
    monkeypatch.setattr(tr, "step_gradient", lambda s, idx, targets: ({}, dict(stalled)))
    with pytest.raises(tr.TrainingDiverged, match="initial operator does not relax.*--solver broyden"):
        train(cfg, tokens, tmp_path, log=quiet)
    events = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    rb = [e for e in events if e.get("event") == "rollback"]
    assert len(rb) == 2 and all(e["lr_scale"] == 1.0 and e["step"] == 0 for e in rb)


def test_a_rollback_tightens_eigregs_margin_by_eig_backoff(tokens, tmp_path, monkeypatch) -> None:
    """With --eig_backoff the replay after a rollback holds ω(J) tighter: the controller is handed
    the accumulated shift from then on (and the checkpointed state keeps it)."""
    import ept.controls as controls
    import ept.train as tr

    cfg = small_cfg(tokens, ckpt_every=2, steps=4, log_every=2, eigreg=1.0, eig_backoff=0.25)
    calls = {"n": 0}
    seen: list[float] = []
    real_penalty = controls.Controller.penalty_grads

    def record(self, *a, tighten=0.0, **k):
        seen.append(tighten)
        return real_penalty(self, *a, tighten=tighten, **k)

    def fails_on_third(model, optimizer, grads, lr, clip):
        calls["n"] += 1
        norm = tr.apply_update(model, optimizer, grads, lr, clip)
        if calls["n"] == 3:
            with torch.no_grad():
                model.head.weight.fill_(math.nan)
        return norm

    monkeypatch.setattr(controls.Controller, "penalty_grads", record)
    summary = train(cfg, tokens, tmp_path, log=quiet, update=fails_on_third)
    assert summary["finished"] and summary["rollbacks"] == 1
    assert seen[:3] == [0.0, 0.0, 0.0] and seen[3:] and all(t == 0.25 for t in seen[3:])
    events = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [e["eig_shift"] for e in events if e.get("event") == "rollback"] == [0.25]
