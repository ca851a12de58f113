"""The masked-token objective (--objective mlm): masking, the gradient routes on ignored targets,
training, resume, eval and generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

import ept
from ept.data import IGNORE, mask_tokens
from ept.grad.common import loss_grad_z, n_targets, readout_ce_grad

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
