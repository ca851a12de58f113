"""Validation cross-entropy over a whole split, and sampling.

An EP model is evaluated at its fixed point: its own free-phase solver (``--solver``, to ``res_est``)
under no_grad, then the readout. A ``bptt`` model runs the unroll it was trained through; a ``bp``
model its explicit forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ept.baseline import explicit_hidden
from ept.config import RunConfig, SolverConfig
from ept.data import EVAL_MASK_SEED, eval_windows, mlm_eval_windows
from ept.grad.common import free_phase, n_targets
from ept.model import EquilibriumLM


@dataclass
class Predictor:
    """Hidden states of a trained model: the relaxed fixed point, or the explicit forward (bp)."""

    model: EquilibriumLM
    mode: str  # "ep" | "bptt" | "bp"
    solver: SolverConfig
    layers: int = 1

    @classmethod
    def for_run(cls, model: EquilibriumLM, cfg: RunConfig) -> Predictor:
        """How a run's model computes: EP's at its fixed point, relaxed by the run's own free-phase
        solver to res_est (a trained block can have several equilibria, and a secant solver can
        settle on a saddle the training relaxation never visits); BPTT's by the very unroll it was
        trained through (T1 plain steps: that finite computation is its model); BP's by its
        explicit forward."""
        if cfg.train.mode == "bptt":
            evals = cfg.solver.T1 + 1  # T1 updates, then F at the last state (the solver returns that one)
            solver = dataclasses.replace(cfg.solver, method="fixed_point", T1=evals, t1max=evals, res_est=0.0)
        else:
            solver = dataclasses.replace(cfg.solver, T1=0)
        # Evaluated in the model's own precision whatever --dtype trained the free phase, so val CEs compare.
        solver = dataclasses.replace(solver, dtype="float32")
        return cls(model, cfg.train.mode, solver, cfg.train.layers)

    @torch.no_grad()
    def hidden(self, idx: Tensor, z0: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        idx = idx.to(self.model.wte.weight.device)
        if self.mode == "bp":
            return explicit_hidden(self.model, idx, self.layers), {}
        x = self.model.inject(idx)
        z, stats = free_phase(self.model, x, self.solver, z0=z0)
        return z, {"fevals": stats.fevals, "residual": stats.residual, "residual_max": stats.residual_max}


@torch.no_grad()
def _ce(predictor: Predictor, batches: Iterable[tuple[Tensor, Tensor]], max_batches: int | None,
        chars: np.ndarray | None) -> dict[str, Any]:
    """Mean CE over the targets >= 0 of ``batches``; with ``chars`` (characters per token id), also
    nats per character of those targets."""
    total, count, n_chars, res, res_max, fevals, n = 0.0, 0, 0, 0.0, 0.0, 0, 0
    for i, (idx, targets) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        z, stats = predictor.hidden(idx)
        logits = predictor.model.readout(z)
        total += F.cross_entropy(logits.flatten(0, -2), targets.to(logits.device).flatten(),
                                 reduction="sum").item()
        count += n_targets(targets)
        if chars is not None:
            n_chars += int(chars[targets[targets >= 0].numpy()].sum())
        if stats:
            n += 1
            res += stats["residual"]
            res_max = max(res_max, stats["residual_max"])
            fevals += stats["fevals"]
    out: dict[str, Any] = {"val_ce": total / max(count, 1), "tokens": count}
    if chars is not None:
        out["nats_per_char"] = total / max(n_chars, 1)
    if n:
        out.update(val_residual=res / n, val_residual_max=res_max, val_fevals=fevals / n)
    return out


def mean_ce(predictor: Predictor, tokens: np.ndarray, T: int, B: int, max_batches: int | None = None,
            chars: np.ndarray | None = None) -> dict[str, Any]:
    """Mean next-token CE over every target of ``tokens`` (or the first ``max_batches`` batches);
    ``chars`` (:func:`ept.data.token_chars`) adds ``nats_per_char``."""
    return _ce(predictor, eval_windows(tokens, T, B), max_batches, chars)


def masked_ce(predictor: Predictor, tokens: np.ndarray, T: int, B: int, rate: float,
              max_batches: int | None = None, chars: np.ndarray | None = None,
              seed: int = EVAL_MASK_SEED) -> dict[str, Any]:
    """Mean CE over the masked tokens of ``tokens`` (:func:`ept.data.mlm_eval_windows`: every window,
    the same masks at every call), as ``masked_ce`` and ``val_ce``; ``tokens`` counts the masked
    ones. ``chars`` adds ``nats_per_char``: CE × masked tokens / their characters."""
    mask_id = predictor.model.mask_id
    if mask_id is None:
        raise ValueError("masked-token CE needs a model trained with --objective mlm (it reads a mask token)")
    out = _ce(predictor, mlm_eval_windows(tokens, T, B, rate, mask_id, seed), max_batches, chars)
    return {"masked_ce": out["val_ce"], **out}


def validation(predictor: Predictor, tokens: np.ndarray, cfg: RunConfig, B: int,
               max_batches: int | None = None, chars: np.ndarray | None = None) -> dict[str, Any]:
    """The run's validation CE on ``tokens``: next-token CE for an LM, masked-token CE (at the run's
    ``--mask_rate``) for an MLM."""
    if cfg.model.objective == "mlm":
        return masked_ce(predictor, tokens, cfg.model.T, B, cfg.train.mask_rate, max_batches, chars)
    return mean_ce(predictor, tokens, cfg.model.T, B, max_batches, chars)


def unigram_ce(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """CE of the add-one unigram model of ``train`` on ``valid``: the bar "visibly learns" must clear."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(valid, dtype=np.int64)].mean())


MLM_GENERATE = ("the model was trained with --objective mlm: it fills masked tokens, it does not continue "
                "text; measure it with 'ept eval' (masked-token CE)")


def pick_token(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """Sample one id from a 1-D logit vector (temperature 0 is greedy)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.double() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(predictor: Predictor, prompt: list[int], n_tokens: int, T: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Continue ``prompt`` by ``n_tokens`` ids, relaxing on the last ``T`` tokens for each one.

    With causal attention the fixed point of a prefix does not change when a token is appended, so
    until the context is cropped the previous z* warm-starts the next relaxation.
    """
    if predictor.model.mask_id is not None:
        raise ValueError(MLM_GENERATE)
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    gen = generator or torch.Generator().manual_seed(0)
    ids = list(prompt)
    z_prev: Tensor | None = None
    for _ in range(n_tokens):
        ctx = ids[-T:]
        idx = torch.tensor([ctx], dtype=torch.long)
        z0 = None
        if z_prev is not None and len(ctx) == z_prev.shape[1] + 1:
            z0 = torch.cat([z_prev, torch.zeros_like(z_prev[:, :1])], dim=1)
        z, _ = predictor.hidden(idx, z0=z0)
        z_prev = z if predictor.mode != "bp" else None
        ids.append(pick_token(predictor.model.readout(z[:, -1:])[0, -1].cpu(), temperature, top_k, gen))
    return ids[len(prompt):]


@torch.no_grad()
def fill_masks(predictor: Predictor, inputs: Tensor) -> Tensor:
    """``inputs`` with every mask token replaced by the model's likeliest token there (one relaxation)."""
    mask_id = predictor.model.mask_id
    if mask_id is None:
        raise ValueError("filling masks needs a model trained with --objective mlm")
    z, _ = predictor.hidden(inputs)
    best = predictor.model.readout(z).argmax(-1).cpu()
    return torch.where(inputs == mask_id, best, inputs)


def render_fill(ids: list[int], masked: list[bool], decode: Callable[[list[int]], str]) -> str:
    """The text of ``ids`` with each masked position's token in [brackets]."""
    out, run = [], []
    for i, m in zip(ids, masked, strict=True):
        if m:
            out.append(decode(run) + "[" + decode([i]) + "]")
            run = []
        else:
            run.append(i)
    return "".join(out) + decode(run)
