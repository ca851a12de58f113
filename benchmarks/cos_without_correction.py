"""cos(EP, implicit) with the run's AsymEP and without any correction, on trained run folders.

    python benchmarks/cos_without_correction.py runs/quality_blocks/energy_mlm-ep runs/quality_blocks/thick-ep

Each run's raw weights, its operator batch (``ept.bench.quality.operator_batch``), over the
sequences EP kept. Prints a line per run and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import json

from ept.bench.quality import operator_batch
from ept.checkpoint import load_trained
from ept.diagnostics.fidelity import fidelity_report
from ept.experiments.common import corpus
from ept.train import ep_options

DEFAULT = ["runs/quality_blocks/" + n for n in ("energy_mlm-ep", "thick_mlm-ep", "energy-ep", "thick-ep")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", default=DEFAULT, help="run folders ('ept bench quality --out' rows)")
    args = ap.parse_args()
    out = {}
    for run in args.runs:
        trained = load_trained(run, raw=True)
        idx, targets = operator_batch(trained.cfg, corpus(trained.cfg.model.vocab_size))
        opts = ep_options(trained.cfg)
        with_asym, _ = fidelity_report(trained.model, idx, targets, opts)
        without, _ = fidelity_report(trained.model, idx, targets, {**opts, "asym": "none"})
        out[run] = {"cos_ep_implicit": with_asym["cos_ep_implicit"],
                    "cos_ep_implicit_none": without["cos_ep_implicit"]}
        print(run, out[run], flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
