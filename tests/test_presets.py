"""Each preset's first EP step works: a preset whose initial operator cannot relax never trains."""

import pytest
import torch

from ept.grad.ep import ep_gradient
from ept.model import EquilibriumLM
from ept.presets import PRESETS, resolve
from ept.speed import fixed_batch, load_tokens

# c512 (the seed's recipe, GPU scale; a step takes minutes on CPU, so the test does not run it): at
# init_std 0.02 its initial free phase ends at worst residuals 1-2 with plain iteration and Anderson
# (Broyden: 2e-4 after 150 F-evals); at 0.005 the free phase settles (2e-4) but the nudged phase
# then ends at residual 2.8. Open: needs a GPU to fix and validate.
KNOWN_BROKEN = {"c512"}


@pytest.mark.parametrize("preset", [
    pytest.param(p, marks=pytest.mark.xfail(run=False, reason="the initial operator does not relax"))
    if p in KNOWN_BROKEN else p for p in sorted(PRESETS)])
def test_the_first_ep_step_of_every_preset_keeps_its_sequences(preset):
    """The small preset at init_std 0.02 (C=128, T=128) failed here: plain iteration at eps 0.5
    oscillates on its initial operator, Anderson left 4 of 16 sequences above drop_res, and the
    nudged phase of the kept ones blew up (five rollbacks at step 0, then `ept train` stopped)."""
    cfg = resolve(preset, {})
    torch.manual_seed(cfg.train.seed)
    model = EquilibriumLM(cfg.model)
    idx, targets = fixed_batch(load_tokens(cfg.model.vocab_size).train, cfg.train.B, cfg.model.T, seed=0)
    _, stats = ep_gradient(model, idx, targets, cfg.solver, cfg.ep)
    assert not stats["free_diverged"] and not stats["nudged_diverged"]
    assert stats["dropped_seqs"] <= cfg.train.B // 4, (preset, stats["dropped_seqs"])
