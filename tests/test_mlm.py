"""The masked-token objective (--objective mlm): masking, the gradient routes on ignored targets,
training, resume, eval and generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_model
from test_cli_train import SMALL as CLI_SMALL
from test_train import quiet, small_cfg

import ept
from ept import checkpoint as ckpt
from ept.cli import main
from ept.data import EOT, IGNORE, mask_tokens, mlm_eval_windows, token_chars
from ept.grad.common import loss_grad_z, n_targets, readout_ce_grad
from ept.train import train

TIGHT = dict(res_est=1e-12, t1max=1000)  # free phase converged to machine precision
EP_TIGHT = dict(TIGHT, t2_tol=1e-11, t2sel=400)

pytestmark = pytest.mark.usefixtures("one_thread")


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def cos_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    va, vb = flat(a), flat(b)
    return (va @ vb / (va.norm() * vb.norm())).item(), (va.norm() / vb.norm()).item()


def mlm_model(**overrides):
    return small_model(objective="mlm", causal=False, **overrides)


def mlm_batch(model, B: int = 3, rate: float = 0.3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, model.cfg.vocab_size, (B, model.cfg.T), generator=g)
    return mask_tokens(windows, rate, model.mask_id, g)


@pytest.fixture(scope="module")
def problem():
    model = mlm_model()
    idx, tgt = mlm_batch(model)
    oracle, stats = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    assert stats["free_converged"] and stats["adj_converged"]
    return model, idx, tgt, oracle


# ---------------------------------------------------------------------------------- masking


def test_mask_tokens_masks_a_fraction_of_every_row_and_targets_the_token_itself():
    windows = torch.arange(40).view(4, 10)
    inputs, targets = mask_tokens(windows, 0.3, 99, torch.Generator().manual_seed(0))
    masked = targets >= 0
    assert masked.sum(1).tolist() == [3, 3, 3, 3]
    assert torch.equal(targets[masked], windows[masked])  # the token itself, not the next one
    assert (inputs[masked] == 99).all() and torch.equal(inputs[~masked], windows[~masked])
    assert (targets[~masked] == IGNORE).all()
    again = mask_tokens(windows, 0.3, 99, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    # At least one per sequence, however low the rate.
    _, few = mask_tokens(windows, 0.01, 99, torch.Generator().manual_seed(0))
    assert ((few >= 0).sum(1) == 1).all()


# -------------------------------------------------------------------------------- gradients


def test_the_closed_form_nudge_has_zero_rows_where_targets_are_ignored(problem):
    model, idx, tgt, _ = problem
    z = torch.randn(*idx.shape, model.cfg.C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g = readout_ce_grad(model, z, tgt)
    assert (g[tgt < 0] == 0).all()
    zz = z.clone().requires_grad_(True)
    logits = model.readout(zz)
    keep = tgt >= 0
    (auto,) = torch.autograd.grad(F.cross_entropy(logits[keep], tgt[keep], reduction="sum"), zz)
    torch.testing.assert_close(g, auto)
    mean = loss_grad_z(model, z, tgt)  # the mean over the masked positions only
    torch.testing.assert_close(mean, auto / int(keep.sum()))
    assert n_targets(tgt) == int(keep.sum())


def test_implicit_equals_autograd_of_the_masked_loss_through_a_converged_unroll(problem):
    """The oracle with ignored targets against a loss built on the masked positions alone (no
    ignore_index), differentiated by autograd through an unroll long enough to reach z*."""
    model, idx, tgt, oracle = problem
    keep = tgt >= 0
    with torch.enable_grad():
        x = model.inject(idx)
        z = torch.zeros_like(x)
        for _ in range(300):  # contraction ~0.5 per step: z* to machine precision
            z = z + 0.5 * model.field(z, x)
        loss = F.cross_entropy(model.readout(z)[keep], tgt[keep])
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(loss, list(params.values()))
    unrolled = dict(zip(params, grads, strict=True))
    for name in oracle:
        torch.testing.assert_close(oracle[name], unrolled[name], rtol=1e-7, atol=1e-10, msg=name)
    bptt, _ = ept.gradient(model, idx, tgt, route="bptt", T1=300)
    cos, rel = cos_rel(bptt, oracle)
    assert cos > 1 - 1e-12 and rel == pytest.approx(1.0, abs=1e-9)


def test_ep_matches_implicit_on_an_mlm_batch(problem):
    model, idx, tgt, oracle = problem
    grads, stats = ept.gradient(model, idx, tgt, route="ep")
    cos, rel = cos_rel(grads, oracle)
    assert not stats["diverged"] and cos >= 0.999 and rel == pytest.approx(1.0, abs=0.01)
    tight, _ = ept.gradient(model, idx, tgt, route="ep", **EP_TIGHT)
    cos, rel = cos_rel(tight, oracle)
    assert cos >= 0.9999 and rel == pytest.approx(1.0, abs=1e-3)


def test_ep_matches_implicit_through_the_autograd_nudge_of_ln_f():
    """With ln_f the nudge is autograd of the masked mean times its count (not the closed form); the
    readout LayerNorm's curvature wants a small β (at hr 0.02 an LM batch is off by as much)."""
    model = mlm_model(ln_f=True)
    idx, tgt = mlm_batch(model)
    oracle, _ = ept.gradient(model, idx, tgt, route="implicit", **TIGHT)
    grads, _ = ept.gradient(model, idx, tgt, route="ep", hr=1e-4, **EP_TIGHT)
    cos, rel = cos_rel(grads, oracle)
    assert cos > 1 - 1e-8 and rel == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("route", ["implicit", "ep", "bptt"])
def test_a_sequence_without_a_masked_token_contributes_nothing(problem, route):
    model, idx, tgt, _ = problem
    opts = {"implicit": TIGHT, "ep": EP_TIGHT, "bptt": {"T1": 60}}[route]
    alone, _ = ept.gradient(model, idx, tgt, route=route, **opts)
    extra_idx = torch.cat([idx, idx[:1]])
    extra_tgt = torch.cat([tgt, torch.full_like(tgt[:1], IGNORE)])
    grads, stats = ept.gradient(model, extra_idx, extra_tgt, route=route, **opts)
    assert not stats["diverged"]
    for name in alone:
        torch.testing.assert_close(grads[name], alone[name], rtol=1e-6, atol=1e-9, msg=name)
    if route == "ep":
        assert stats["dropped_seqs"] == 0  # left out of the nudge, not counted as dropped


def test_dropping_an_unsettled_sequence_rescales_lambda_by_the_targets_left(problem, monkeypatch):
    """λ is for the mean over the targets: the late sequence holds 8 of the 14, so the rescale is by
    targets (14/6), not sequences (4/3)."""
    model, idx, tgt, _ = problem
    idx, tgt = torch.cat([idx, idx[:1]]), torch.cat([tgt, tgt[:1]])
    tgt[1] = torch.randint(0, model.cfg.vocab_size, tgt[1].shape, generator=torch.Generator().manual_seed(5))
    late = torch.tensor([False, True, False, False])
    monkeypatch.setattr("ept.grad.ep.unsettled", lambda stats, cfg, n: late[:n])
    grads, stats = ept.gradient(model, idx, tgt, route="ep", drop_unsettled=True, **EP_TIGHT)
    monkeypatch.undo()
    assert stats["kept"].tolist() == (~late).tolist()
    ref, _ = ept.gradient(model, idx[~late], tgt[~late], route="ep", **EP_TIGHT)
    cos, rel = cos_rel(grads, ref)
    assert cos > 1 - 1e-9 and rel == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------------------------- data and eval


def test_eval_masks_depend_on_neither_the_batch_size_nor_the_batches_read():
    tokens = np.arange(1000) % 50
    a = torch.cat([t.flatten() for _, t in mlm_eval_windows(tokens, 16, 3, 0.15, 50)])
    b = torch.cat([t.flatten() for _, t in mlm_eval_windows(tokens, 16, 8, 0.15, 50)])
    assert torch.equal(a, b) and len(a) == 1000  # every token once, the last window partial
    assert int((a >= 0).sum()) == 62 * 2 + 1  # 2 of each full window of 16, 1 of the last 8


def test_token_chars_sum_to_the_length_of_the_text(tokens):
    text = "Héllo wörld — naïve 日本語, ROMEO: ay." + EOT + "x"
    ids = tokens.encode(text)
    assert tokens.decode(ids) == text
    assert int(token_chars(tokens.tokenizer)[ids].sum()) == len(text)


# ---------------------------------------------------------------------------------- training


def mlm_cfg(tokens, **flags):
    return small_cfg(tokens, objective="mlm", causal=False, steps=4, **flags)


@pytest.mark.parametrize("mode", ["ep", "bptt", "bp"])
def test_an_mlm_run_trains_and_reports_masked_token_ce(tokens, tmp_path, mode):
    cfg = mlm_cfg(tokens, mode=mode)
    summary = train(cfg, tokens, tmp_path, log=quiet)
    assert summary["finished"] and summary["rollbacks"] == 0
    masked = sum(int((t >= 0).sum()) for _, t in mlm_eval_windows(tokens.valid, cfg.model.T, 32, 0.15, 300))
    assert summary["tokens"] == masked  # the final val CE is over the masked tokens of the split
    assert 0 < summary["val_ce"] < summary["initial_val_ce"] < 7
    assert "[" in summary["sample"]  # the filled masks of the first window


def test_an_mlm_resume_is_bit_identical_to_an_uninterrupted_run(tokens, tmp_path):
    cfg = mlm_cfg(tokens)
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    a = train(cfg, tokens, straight, log=quiet)
    train(cfg, tokens, split, stop_after=1, log=quiet)  # stops between checkpoints
    b = train(cfg, tokens, split, resume=True, log=quiet)
    ca, cb = ckpt.load_checkpoint(straight), ckpt.load_checkpoint(split)
    assert "masks" in cb.state["rng"]
    for stem in ("model", "ema"):
        for k, v in ca.weights[stem].items():
            assert torch.equal(v, cb.weights[stem][k]), (stem, k)
    assert a["val_ce"] == b["val_ce"]


def test_ept_train_eval_and_generate_on_an_mlm_run(corpus_file, tmp_path, capsys):
    run = tmp_path / "mlm"
    argv = ["train", "--data", str(corpus_file), "--out", str(run), *CLI_SMALL, "--objective", "mlm",
            "--no-causal", "--mask_rate", "0.2", "--mode", "bp"]
    assert main(argv) == 0
    capsys.readouterr()
    evals = []
    for _ in range(2):  # the same masks at every evaluation
        assert main(["eval", "--ckpt", str(run), "--data", str(corpus_file), "--json"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        evals.append(json.loads(out[-1]))
        assert out[0].startswith("masked-token CE (mask rate 0.2)")
    assert evals[0] == evals[1]
    assert set(evals[0]) == {"val_ce", "masked_ce", "tokens", "nats_per_char"}
    assert evals[0]["masked_ce"] == evals[0]["val_ce"] and 0 < evals[0]["nats_per_char"] < evals[0]["val_ce"]
    assert main(["generate", "--ckpt", str(run), "--prompt", "ROMEO:"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with --objective mlm: it fills masked tokens" in err[0]


@pytest.mark.parametrize("rate", ["0", "1", "-0.1", "1.5"])
def test_a_mask_rate_outside_0_1_is_a_usage_error(rate, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--mask_rate", rate]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--mask_rate {float(rate)} is outside (0, 1)" in err[0]
