"""``ept fingerprint``: a checkpoint's operator and gradient fingerprint, and its val CE.

    ept fingerprint --ckpt runs/demo            # a table
    ept fingerprint --ckpt runs/demo --json     # ... and one JSON object as the last line
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from typing import Any

from ept.checkpoint import CheckpointError, load_trained
from ept.cli import UsageError
from ept.config import RunConfig
from ept.model import EquilibriumLM

FINGERPRINT_KEYS = ("residual", "cos_ep_implicit", "cos_ep_bptt", "numerical_abscissa", "spectral_abscissa",
                    "nonnormality", "symmetric_fraction", "rho_SinvA", "ftle", "val_ce")
ENERGY_KEYS = ("energy_end", "energy_max_rise", "energy_falls")  # the energy block's, along plain relaxation


def load_run(path: str) -> tuple[RunConfig, EquilibriumLM]:
    """(RunConfig, model with the weights evaluation uses: the EMA's when the run kept one).

    ``path`` is a run folder (its latest checkpoint) or one of its ckpt-* folders.
    """
    try:
        trained = load_trained(path)
    except (CheckpointError, ValueError, KeyError) as err:
        raise UsageError(str(err).splitlines()[0] if str(err) else f"cannot load '{path}'") from None
    return trained.cfg, trained.model


def valid_batches(cfg: Any, B: int, n: int) -> list:
    """The first ``n`` full (B, T) windows of the run's validation split (an MLM run's masked as
    its evaluation masks them)."""
    from ept.data import DataError, eval_windows, load_corpus, mlm_eval_windows, prepare

    try:
        data = prepare(load_corpus(cfg.data.data), cfg.model.vocab_size)
    except DataError as err:
        raise UsageError(str(err)) from None
    m = cfg.model
    every = (mlm_eval_windows(data.valid, m.T, B, cfg.train.mask_rate, m.vocab_size) if m.objective == "mlm"
             else eval_windows(data.valid, m.T, B))
    windows = (w for w in every if w[0].shape[1] == m.T)
    return list(itertools.islice(windows, n))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fingerprint", help="operator fingerprint: residual, cosines, abscissas")
    p.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a ckpt-* folder")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--B", type=int, default=4, help="sequences per validation batch")
    p.add_argument("--batches", type=int, default=2, help="validation batches for val_ce")
    p.add_argument("--max_seqs", type=int, default=1, help="sequences whose operator is probed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ept.diagnostics import fingerprint
    from ept.train import ep_options

    if args.B <= 0 or args.batches <= 0 or args.max_seqs <= 0:
        raise UsageError("--B, --batches and --max_seqs must be positive integers")
    cfg, model = load_run(args.ckpt)
    batches = valid_batches(cfg, args.B, args.batches)
    if not batches:
        raise UsageError(f"the validation split is shorter than one window of T={cfg.model.T}: use more data")
    fp = fingerprint(model, batches, ep_options(cfg), max_seqs=args.max_seqs)
    print(f"fingerprint of {args.ckpt} (C={cfg.model.C} T={cfg.model.T} c={cfg.model.c})")
    for key in FINGERPRINT_KEYS + tuple(k for k in ENERGY_KEYS if k in fp):
        print(f"  {key:<20} {fp[key]: .6g}")
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in fp.items()}))
    return 0
