"""Analog hardware realism: converters, device responses, pulses, the ledger, the EP loop."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import ept
from ept import checkpoint as ckpt
from ept.analog import (
    CLAIM,
    AnalogTile,
    DeviceConfig,
    IOConfig,
    Lion,
    SGDSaI,
    SimulatedSubstrate,
    UpdateConfig,
    WriteLedger,
    analog_config,
    analog_linear,
    analog_step,
    project,
    quantize,
)
from ept.analog.cli_args import add_arguments, config_from_args
from ept.analog.devices import sample_devices, step_size
from ept.analog.io import NoisePool
from ept.analog.update import stochastic_pulses, threshold_pulses
from ept.config import EPConfig, SolverConfig

TINY = ept.EPTConfig(vocab_size=64, C=16, H=2, T=8)
SOLVER = SolverConfig(T1=8, t1max=40, res_est=1e-6)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)


def _model(seed: int = 0) -> ept.EquilibriumLM:
    torch.manual_seed(seed)
    return ept.EquilibriumLM(TINY)


# ------------------------------------------------------------------------------ converters
@pytest.mark.parametrize("bits", [2, 4, 7])
def test_quantizer_hits_exactly_2_pow_bits_levels(bits: int) -> None:
    x = torch.linspace(-5.0, 5.0, 200_001, dtype=torch.float64)
    levels = torch.unique(quantize(x, bits, 2.0))
    assert levels.numel() == 2**bits
    assert levels.min() == -2.0 and levels.max() < 2.0
    assert (levels == 0).any()
    steps = levels.diff()
    assert torch.allclose(steps, torch.full_like(steps, 2.0 / 2 ** (bits - 1)))


def test_analog_linear_levels_of_adc_and_dac() -> None:
    """A 3-bit DAC and 4-bit ADC: inputs reach 8 codes, outputs at most 16 distinct values per row."""
    torch.manual_seed(0)
    h = torch.randn(1, 4000, 8)
    w = torch.eye(8)
    io = IOConfig(inp_bits=3, out_bits=4, out_bound=1.0)
    with torch.no_grad():
        y = analog_linear(h, w, None, io, 1.0, NoisePool(torch.Generator().manual_seed(0), 1 << 12))
    codes = torch.round(y / h.abs().amax(-1, keepdim=True) / (1.0 / 8))
    assert torch.unique(codes).numel() <= 16
    assert torch.unique(torch.round(h / h.abs().amax(-1, keepdim=True) * 4).clamp(-4, 3)).numel() == 8


def test_ideal_io_is_f_linear_bit_for_bit() -> None:
    h, w, b = torch.randn(3, 5, 16), torch.randn(32, 16), torch.randn(32)
    assert torch.equal(analog_linear(h, w, b, IOConfig(), 0.7, None), F.linear(h, w, b))


def test_fast_and_straight_through_paths_agree() -> None:
    """The fused no-grad path and the differentiable path compute the same read (noise off)."""
    torch.manual_seed(1)
    h, w, b = torch.randn(4, 8, 16), torch.randn(24, 16) * 0.1, torch.randn(24)
    io = IOConfig(inp_bits=6, out_bits=8, out_bound=4.0)
    pool = NoisePool(torch.Generator().manual_seed(0), 1 << 12)
    with torch.no_grad():
        fast = analog_linear(h, w, b, io, 0.25, pool)
    ste = analog_linear(h.requires_grad_(True), w, b, io, 0.25, pool)
    lsb = (4.0 / 128) * 0.25 * h.detach().abs().amax(-1, keepdim=True)
    assert ((fast - ste.detach()).abs() <= lsb * 1.001).all()
    assert (fast - ste.detach()).abs().max() < 1e-4 or (fast != ste.detach()).float().mean() < 0.01
    (g,) = torch.autograd.grad(ste.sum(), h)
    assert g.abs().sum() > 0  # straight-through: rounding does not zero the derivative


# ------------------------------------------------------------------------------ devices
def _dev(cfg: DeviceConfig, n: int = 5) -> tuple:
    return sample_devices(cfg, (n,), torch.Generator().manual_seed(0))


def test_soft_bounds_step_shrinks_to_zero_at_the_bounds() -> None:
    cfg = DeviceConfig(response="soft_bounds", dw_min=0.01, w_min=-1.0, w_max=1.0)
    dev = _dev(cfg, 3)
    g = torch.tensor([-1.0, 0.0, 1.0])
    up = step_size(cfg, dev, g, torch.ones(3, dtype=torch.bool))
    down = step_size(cfg, dev, g, torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(up, torch.tensor([0.02, 0.01, 0.0]), atol=1e-7)
    assert torch.allclose(down, torch.tensor([0.0, 0.01, 0.02]), atol=1e-7)


def test_exp_step_rram_is_asymmetric_and_state_dependent() -> None:
    cfg = analog_config("rram_es").device.replace(dw_min_dtod=0.0, up_down_dtod=0.0, w_max_dtod=0.0,
                                                 w_min_dtod=0.0)
    dev = _dev(cfg, 3)
    g = torch.tensor([-0.5, 0.0, 0.5])
    up = step_size(cfg, dev, g, torch.ones(3, dtype=torch.bool))
    down = step_size(cfg, dev, g, torch.zeros(3, dtype=torch.bool))
    assert (up > 0).all() and (down > 0).all()
    assert up[0] > up[1] > up[2]  # potentiation saturates toward w_max
    assert down[2] > down[1] > down[0]  # depression saturates toward w_min
    assert not torch.allclose(up[1], down[1])  # up/down asymmetry at the origin


def test_linear_step_up_down_asymmetry_follows_aihwkit_convention() -> None:
    cfg = DeviceConfig(response="linear", dw_min=0.01, up_down=0.2)
    dev = _dev(cfg, 1)
    assert torch.allclose(dev.scale_up, torch.tensor([0.01])) and torch.allclose(dev.scale_down,
                                                                                  torch.tensor([0.008]))


# ------------------------------------------------------------------------------ pulses and the ledger
def test_threshold_programming_and_ledger_match_a_hand_computed_case() -> None:
    """Constant-step devices, dw_min 0.1, scale 1 (max |w| = 0.5 at omega 0.5 of range ±1)."""
    dev = DeviceConfig(response="linear", dw_min=0.1)
    update = UpdateConfig("threshold", max_pulses=31, omega=0.5)
    tile = AnalogTile(torch.tensor([[0.5, 0.0, -0.2]]), dev, update, torch.Generator().manual_seed(0),
                      torch.Generator().manual_seed(1))
    assert tile.scale == pytest.approx(1.0)
    ledger = WriteLedger()
    w0 = tile.weight.clone()
    # step 1: +0.25, -0.35, +0.04 -> accumulators 0.25, -0.35, 0.04 -> pulses 2, -3, 0
    p1 = tile.program(w0 + torch.tensor([[0.25, -0.35, 0.04]]))
    ledger.record({"w": p1})
    assert p1.tolist() == [[2, -3, 0]]
    assert torch.allclose(tile.weight, w0 + torch.tensor([[0.2, -0.3, 0.0]]), atol=1e-6)
    # step 2: +0.06 each -> accumulators 0.11, 0.01, 0.10 -> pulses 1, 0, 1
    p2 = tile.program(tile.weight + 0.06)
    ledger.record({"w": p2})
    assert p2.tolist() == [[1, 0, 1]]
    assert ledger.counts["w"].tolist() == [[3, 3, 1]]
    assert tile.writes.tolist() == [[3, 3, 1]]
    stats = ledger.summary()
    assert stats["writes_total"] == 7 and stats["writes_max"] == 3 and stats["devices"] == 3
    proj = project(stats, ledger.steps, target_steps=32_000)
    assert proj["projected_writes_max"] == pytest.approx(3 / 2 * 32_000)
    assert proj["claim_holds"] and "within the 1e+08 claim" in proj["verdict"]


def test_threshold_pulses_are_capped_and_keep_the_remainder() -> None:
    n, acc = threshold_pulses(torch.zeros(2), torch.tensor([5.05, -0.25]), 0.1, 31)
    assert n.tolist() == [31, -2]
    assert torch.allclose(acc, torch.tensor([5.05 - 3.1, -0.05]))


def test_stochastic_pulse_trains_have_the_right_mean() -> None:
    delta = torch.full((200_000,), 0.37)
    n = stochastic_pulses(delta, 0.1, 31, torch.Generator().manual_seed(0))
    assert n.min() >= 0 and n.max() <= 31
    assert n.float().mean().item() == pytest.approx(3.7, abs=0.02)


def test_projection_flags_a_run_over_the_claim() -> None:
    proj = project({"writes_max": 10_000, "writes_p99": 5000.0, "writes_mean": 1.0}, steps=1)
    assert proj["projected_writes_max"] == pytest.approx(3.2e8)
    assert not proj["claim_holds"] and proj["endurance_holds"] and "OVER" in proj["verdict"]
    assert CLAIM == 1e8


# ------------------------------------------------------------------------------ the EP loop
@pytest.mark.parametrize("T2", [12, None])
def test_ideal_preset_reproduces_the_digital_ep_step_exactly(T2: int | None) -> None:
    idx, targets = _batch()
    ep = EPConfig(estimator="centred", asym="fixed", T2=T2, t2sel=40)
    digital = _model()
    grads, _ = ept.gradient(digital, idx, targets, route="ep", T1=8, t1max=40, res_est=1e-6,
                            estimator="centred", asym="fixed", T2=T2, t2sel=40)
    opt_d = torch.optim.SGD(digital.parameters(), lr=0.1)
    for name, p in digital.named_parameters():
        p.grad = grads[name]
    opt_d.step()

    model = _model()
    sub = SimulatedSubstrate(model, analog_config("ideal"), SOLVER, ep, seed=0)
    ledger = WriteLedger()
    report = analog_step(sub, idx, targets, torch.optim.SGD(model.parameters(), lr=0.1), ep, ledger)
    assert report.applied
    for name in grads:
        assert torch.equal(report.grads[name], grads[name]), name
    for (name, p), q in zip(model.named_parameters(), digital.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert ledger.summary()["writes_max"] == 1  # one exact write per changed device


def test_analog_step_trains_and_counts_pulses_it_applied() -> None:
    idx, targets = _batch()
    ep = EPConfig(estimator="centred", asym="fixed", T2=10)
    model = _model()
    sub = SimulatedSubstrate(model, analog_config("ecram"), SOLVER, ep, seed=0)
    ledger = WriteLedger()
    before = {n: t.weight.clone() for n, t in sub.tiles.items()}
    report = analog_step(sub, idx, targets, torch.optim.AdamW(model.parameters(), lr=5e-3), ep, ledger)
    assert report.applied and set(report.pulses) == set(model.weight_matrices())
    for name, tile in sub.tiles.items():
        assert torch.equal(ledger.counts[name], report.pulses[name].abs().long())
        assert torch.equal(tile.writes, ledger.counts[name])
        moved = (tile.weight != before[name])
        assert torch.equal(moved, report.pulses[name] != 0)  # exactly the pulsed devices changed
        assert torch.equal(dict(model.named_parameters())[name].detach(), tile.weight)


def _run(seed: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    idx, targets = _batch()
    ep = EPConfig(estimator="centred", asym="none", T2=8)
    model = _model()
    sub = SimulatedSubstrate(model, analog_config("rram_es", pulse_mode="stochastic"), SOLVER, ep, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = [analog_step(sub, idx, targets, opt, ep).loss for _ in range(2)]
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses


def test_seeded_analog_runs_are_reproducible() -> None:
    a, la = _run(3)
    b, lb = _run(3)
    c, _ = _run(4)
    assert la == lb
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["attn.q.weight"], c["attn.q.weight"])


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("pulse_mode", ["stochastic", "ideal"])
def test_substrate_state_round_trips_through_a_checkpoint(pulse_mode: str) -> None:
    """Rebuilt on other weights and given a step's checkpointed state, a substrate continues exactly
    as the one that never stopped (stochastic trains draw from the write generator; ideal writes keep
    no devices, only the read weights)."""
    idx, targets = _batch()
    ep = EPConfig(estimator="centred", asym="none", T2=4)
    solver = SolverConfig(T1=4, t1max=4)  # the noisy periphery never meets a tight tolerance: cap it
    cfg = analog_config("rram_es", pulse_mode=pulse_mode)
    model = _model()
    sub = SimulatedSubstrate(model, cfg, solver, ep, seed=3)
    opt, ledger = torch.optim.AdamW(model.parameters(), lr=5e-3), WriteLedger()
    analog_step(sub, idx, targets, opt, ep, ledger)
    tensors: dict[str, torch.Tensor] = {}
    live = {"sub": sub.state_dict(), "ledger": ledger.state_dict(), "opt": opt.state_dict(),
            "model": model.state_dict()}
    tree = json.loads(json.dumps(ckpt.flatten(live, tensors)))  # what a checkpoint keeps, nothing shared
    saved = ckpt.unflatten(tree, {k: v.clone() for k, v in tensors.items()})
    a = analog_step(sub, idx, targets, opt, ep, ledger)

    other = _model(seed=5)  # another initial scale per matrix: it must come from the state
    sub2 = SimulatedSubstrate(other, cfg, solver, ep, seed=3)
    for tile in sub2.tiles.values():  # and other device-to-device variation
        if tile.dev is not None:
            tile.dev = sample_devices(cfg.device, tuple(tile.g.shape), torch.Generator().manual_seed(9))
    other.load_state_dict(saved["model"])
    sub2.load_state_dict(saved["sub"])
    opt2, ledger2 = torch.optim.AdamW(other.parameters(), lr=5e-3), WriteLedger()
    opt2.load_state_dict(saved["opt"])
    ledger2.load_state_dict(saved["ledger"])
    b = analog_step(sub2, idx, targets, opt2, ep, ledger2)
    assert a.loss == b.loss and a.pulses.keys() == b.pulses.keys()
    for name in a.pulses:
        assert torch.equal(a.pulses[name], b.pulses[name]), name
        assert torch.equal(sub.tiles[name].weight, sub2.tiles[name].weight), name
        assert torch.equal(ledger.counts[name], ledger2.counts[name]), name
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="read-noise pool"):  # another seed draws another pool
        SimulatedSubstrate(_model(), cfg, solver, ep, seed=4).load_state_dict(saved["sub"])


def test_a_non_finite_proposal_fires_no_pulse() -> None:
    """A NaN increment would become INT_MIN pulses (negative write counts) and a NaN threshold
    accumulator that never recovers: the substrate refuses it before touching any device."""
    model = _model()
    sub = SimulatedSubstrate(model, analog_config("rram_es"), SOLVER, EPConfig())
    before = {n: (t.g.clone(), t.acc.clone(), t.writes.clone()) for n, t in sub.tiles.items()}
    proposed = {n: p.detach().clone() for n, p in model.named_parameters()}
    proposed["ffn.fc2.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="ffn.fc2.weight: non-finite"):
        sub.apply_pulses(proposed)
    for name, tile in sub.tiles.items():
        for old, new in zip(before[name], (tile.g, tile.acc, tile.writes), strict=True):
            assert torch.equal(old, new), name


def test_complex_contour_is_refused_on_a_noisy_substrate() -> None:
    idx, targets = _batch()
    ep = EPConfig(estimator="holomorphic", holo=4, T2=4)
    model = _model()
    sub = SimulatedSubstrate(model, analog_config("rram_es"), SOLVER, ep)
    with pytest.raises(ValueError, match="real states"):
        analog_step(sub, idx, targets, torch.optim.SGD(model.parameters(), lr=0.1), ep)


# ------------------------------------------------------------------------------ configuration
def test_presets_overrides_and_errors() -> None:
    cfg = analog_config("rram_es", fnoise=0.02, out_bits=6, pulse_mode="stochastic", dw_min=0.002)
    assert cfg.io.w_noise == 0.02 and cfg.io.out_bits == 6 and cfg.update.pulse_mode == "stochastic"
    assert cfg.device.dw_min == 0.002 and cfg.device.response == "exp_step"
    with pytest.raises(TypeError, match="did you mean 'dw_min'"):
        analog_config("rram_es", dw_mni=0.1)
    with pytest.raises(ValueError, match="unknown analog preset"):
        analog_config("flash")
    with pytest.raises(ValueError, match="out_bits"):
        analog_config("rram_es", out_bits=-1)


def test_cli_flags_build_the_config_and_refuse_orphans() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--analog", "ecram", "--out_bits", "6", "--fnoise", "0.01",
                                              "--mult_noise", "false"]))
    assert cfg.preset == "ecram" and cfg.io.out_bits == 6 and cfg.io.w_noise == 0.01
    assert cfg.device.mult_noise is False
    assert config_from_args(parser.parse_args([])) is None
    with pytest.raises(ValueError, match="without --analog"):
        config_from_args(parser.parse_args(["--dw_min", "0.01"]))


# ------------------------------------------------------------------------------ pulse optimizers
def test_lion_moves_every_entry_by_exactly_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(100))
    opt = Lion([p], lr=0.01)
    p.grad = torch.randn(100)
    opt.step()
    assert torch.equal(p.detach().abs(), torch.full((100,), 0.01))


def test_sgd_sai_freezes_the_block_scale_at_the_first_gradient() -> None:
    p = torch.nn.Parameter(torch.zeros(50))
    opt = SGDSaI([p], lr=0.1, momentum=0.0)
    g1 = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p.grad = g1
    opt.step()
    gsnr = float(g1.norm() / (g1.std() + 1e-8))
    assert torch.allclose(p.detach(), -0.1 * gsnr * g1, rtol=1e-5)
    p.grad = 3 * g1
    opt.step()
    assert opt.state[p]["gsnr"] == pytest.approx(gsnr)
    assert torch.allclose(p.detach(), -0.1 * gsnr * 4 * g1, rtol=1e-5)


def test_device_variation_and_noise_draw_from_streams_of_their_own() -> None:
    """Device variation must not reuse the numbers that drew the run's initial weights
    (``torch.manual_seed(seed)``), nor the read noise those of another role or of the adjacent seed."""
    from ept.analog.substrate import stream

    seed = 4
    torch.manual_seed(seed)
    model = _model(seed)
    cfg = analog_config("rram_es")
    sub = SimulatedSubstrate(model, cfg, SOLVER, EPConfig(), seed=seed)
    name, tile = next(iter(sub.tiles.items()))
    assert tile.dev is not None
    shape = tuple(tile.dev.bound_max.shape)
    from_run_seed = sample_devices(cfg.device, shape, torch.Generator().manual_seed(seed))
    assert not torch.allclose(tile.dev.bound_max, from_run_seed.bound_max), name
    again = sample_devices(cfg.device, shape, stream(seed, "devices"))
    torch.testing.assert_close(tile.dev.bound_max, again.bound_max)  # and it is that role's stream
    first = {(s, r): torch.randn(64, generator=stream(s, r)) for s in (seed, seed + 1)
             for r in ("devices", "read", "write")}
    firsts = list(first.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])
