"""Validation cross-entropy over a whole split, and sampling.

An EP model is evaluated at its fixed point: its own free-phase solver (``--solver``, to ``res_est``)
under no_grad, then the readout. A ``bptt`` model runs the unroll it was trained through; a ``bp``
model its explicit forward.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ept.baseline import explicit_hidden
from ept.config import RunConfig, SolverConfig
from ept.data import eval_windows
from ept.grad.common import free_phase
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
        return cls(model, cfg.train.mode, solver, cfg.train.layers)

    @torch.no_grad()
    def hidden(self, idx: Tensor, z0: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        if self.mode == "bp":
            return explicit_hidden(self.model, idx, self.layers), {}
        x = self.model.inject(idx)
        z, stats = free_phase(self.model, x, self.solver, z0=z0)
        return z, {"fevals": stats.fevals, "residual": stats.residual, "residual_max": stats.residual_max}


@torch.no_grad()
def mean_ce(predictor: Predictor, tokens: np.ndarray, T: int, B: int, max_batches: int | None = None) -> dict:
    """Mean next-token CE over every target of ``tokens`` (or the first ``max_batches`` batches)."""
    total, count, res, res_max, fevals, n = 0.0, 0, 0.0, 0.0, 0, 0
    for i, (idx, targets) in enumerate(eval_windows(tokens, T, B)):
        if max_batches is not None and i >= max_batches:
            break
        z, stats = predictor.hidden(idx)
        logits = predictor.model.readout(z)
        total += F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum").item()
        count += targets.numel()
        if stats:
            n += 1
            res += stats["residual"]
            res_max = max(res_max, stats["residual_max"])
            fevals += stats["fevals"]
    out = {"val_ce": total / max(count, 1), "tokens": count}
    if n:
        out.update(val_residual=res / n, val_residual_max=res_max, val_fevals=fevals / n)
    return out


def unigram_ce(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """CE of the add-one unigram model of ``train`` on ``valid``: the bar "visibly learns" must clear."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(valid, dtype=np.int64)].mean())


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
        ids.append(pick_token(predictor.model.readout(z[:, -1:])[0, -1], temperature, top_k, gen))
    return ids[len(prompt):]
