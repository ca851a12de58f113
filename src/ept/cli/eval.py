"""``ept eval --ckpt RUN --data FILE``: mean next-token cross-entropy over a whole text file, with the
run's own tokenizer and its EMA weights (the raw weights with ``--raw`` or when the run had no EMA).

A run trained with ``--objective mlm`` is measured by its masked-token CE instead: every window of
the file, a ``--mask_rate`` fraction of each masked by a fixed seed (the same positions at every
evaluation). Both report nats per character, the CE summed over the predicted tokens divided by
their characters, which compares across tokenizers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ept import checkpoint as ckpt
from ept.cli import UsageError
from ept.data import EOT, DataError, TokenData, load_tokenizer, token_chars
from ept.evaluate import Predictor, validation
from ept.presets import RunConfig


@dataclass
class LoadedRun:
    cfg: RunConfig
    tokens: TokenData  # the run's tokenizer (no token arrays)
    predictor: Predictor
    step: int
    weights: str  # "ema" or "model"


def best_folder(path: str | Path) -> Path:
    """``RUN/best``, the run's best-val checkpoint; UsageError naming the fix when it has none."""
    p = Path(path)
    if p.name != ckpt.BEST and ckpt.best_pointer(p) is None:
        raise UsageError(f"'{p}' holds no best checkpoint ({ckpt.BEST}/ is written by 'ept train' at each "
                         "periodic evaluation that lowers val CE): give its run folder, or drop --best")
    return p if p.name == ckpt.BEST else p / ckpt.BEST


def load_run(path: str | Path, raw: bool = False, best: bool = False) -> LoadedRun:
    """A trained run, ready to evaluate or sample (``best``: its best-val checkpoint), with its own
    tokenizer. Bad folders raise UsageError."""
    try:
        trained = ckpt.load_trained(best_folder(path) if best else path, raw=raw,
                                    fallback=lambda msg: print(f"ept eval: warning: {msg}", file=sys.stderr))
    except ckpt.CheckpointError as e:
        raise UsageError(str(e)) from None
    cfg, run = trained.cfg, ckpt.run_folder_of(trained.ckpt)
    try:
        tok = load_tokenizer(run / ckpt.TOKENIZER_FILE)
    except (OSError, ValueError) as e:
        raise UsageError(f"run folder '{run}' lacks a readable {ckpt.TOKENIZER_FILE} ({e}): give the --out "
                         "folder of an 'ept train' run") from None
    if tok.get_vocab_size() != cfg.model.vocab_size:
        raise UsageError(f"'{run / ckpt.TOKENIZER_FILE}' has {tok.get_vocab_size()} tokens but the model "
                         f"{cfg.model.vocab_size}: the folder mixes two runs; restore its tokenizer.json")
    empty = np.zeros(0, dtype=np.int64)
    tokens = TokenData(tok, empty, empty, tok.get_vocab_size(), tok.token_to_id(EOT), cfg.data.key)
    return LoadedRun(cfg, tokens, Predictor.for_run(trained.model, cfg), trained.step, trained.weights)


def read_text_file(path: str) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"data file '{p}' does not exist: give a text file to evaluate on") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read data file '{p}' as UTF-8 text ({e}): give a readable text file") \
            from None
    if not text.strip():
        raise UsageError(f"data file '{p}' is empty: give a text file with some text in it")
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="validation cross-entropy of a trained run on a text file",
                              description=__doc__, allow_abbrev=False)
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder (or one of its ckpt-* folders)")
    p.add_argument("--data", required=True, metavar="FILE", help="text file to evaluate on")
    p.add_argument("--B", type=int, default=32, help="sequences per batch")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--best", action="store_true", help="the run's best-val checkpoint (RUN/best) instead of "
                   "its latest")
    p.add_argument("--json", action="store_true", help='print one last line {"val_ce": ..., "tokens": ..., '
                   '"nats_per_char": ...} (an MLM run adds "masked_ce")')
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.B <= 0:
        raise UsageError(f"--B must be positive, got {args.B}: pass a batch size > 0")
    run = load_run(args.ckpt, raw=args.raw, best=args.best)
    ids = np.asarray(run.tokens.encode(read_text_file(args.data)), dtype=np.int64)
    if len(ids) < 2:
        raise UsageError(f"data file '{args.data}' has {len(ids)} token(s): evaluation needs at least 2")
    t0 = time.time()
    try:
        out = validation(run.predictor, ids, run.cfg, args.B, chars=token_chars(run.tokens.tokenizer))
    except DataError as e:
        raise UsageError(str(e)) from None
    which = "best" if args.best else "latest"
    mlm = run.cfg.model.objective == "mlm"
    what = f"masked-token CE (mask rate {run.cfg.train.mask_rate:g})" if mlm else "val CE"
    print(f"{what} {out['val_ce']:.4f} nats/token, {out['nats_per_char']:.4f} nats/char over {out['tokens']} "
          f"{'masked ' if mlm else ''}tokens ({run.weights} weights, {which} checkpoint, step {run.step}, "
          f"{time.time() - t0:.1f} s)")
    if args.json:
        keys = ["val_ce", *(["masked_ce"] if mlm else []), "tokens", "nats_per_char"]
        print(json.dumps({k: out[k] for k in keys}))
    return 0
