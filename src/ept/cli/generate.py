"""``ept generate --ckpt RUN --prompt TEXT``: sample a continuation from a trained run.

An equilibrium model relaxes to its fixed point on the (last T tokens of the) context for every new
token and samples from the last position's logits."""

from __future__ import annotations

import argparse
import json

import torch

from ept.cli import UsageError
from ept.cli.eval import load_run
from ept.evaluate import generate


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a trained run", description=__doc__,
                              allow_abbrev=False)
    p.add_argument("--ckpt", required=True, metavar="RUN", help="run folder (or one of its ckpt-* folders)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--tokens", type=int, default=200, help="number of tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0: greedy)")
    p.add_argument("--top_k", type=int, default=40, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--best", action="store_true", help="the run's best-val checkpoint (RUN/best)")
    p.add_argument("--json", action="store_true", help="print one last JSON line with the text")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.tokens <= 0:
        raise UsageError(f"--tokens must be positive, got {args.tokens}")
    if args.temperature < 0 or args.top_k < 0:
        raise UsageError("--temperature and --top_k must be >= 0 (0: greedy / no top-k cut)")
    run = load_run(args.ckpt, raw=args.raw, best=args.best)
    if run.cfg.model.objective == "mlm":
        raise UsageError(f"run '{args.ckpt}' was trained with --objective mlm: it fills masked tokens, it "
                         "does not continue text; measure it with 'ept eval --ckpt RUN --data FILE' "
                         "(masked-token CE)")
    prompt = run.tokens.encode(args.prompt) if args.prompt else []
    prompt = prompt or [run.tokens.eot_id]  # an empty prompt starts a new document
    gen = torch.Generator().manual_seed(args.seed)
    T, top_k = run.cfg.model.T, args.top_k or None
    ids = generate(run.predictor, prompt, args.tokens, T, args.temperature, top_k, gen)
    text = run.tokens.decode(ids)
    print(args.prompt + text)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": len(ids)}))
    return 0
