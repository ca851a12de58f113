"""The ``ept`` command: a thin dispatcher. Each subcommand lives in its own module exposing
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``ept --help`` lists them. A module that is missing (a partial
# install) is skipped rather than breaking the whole command.
SUBCOMMANDS = ("train", "eval", "generate", "gradcheck", "bench", "experiment", "fingerprint", "spectrum",
               "plot", "cost")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (error and where to look), not usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ept", description="Equilibrium Propagation for transformers: train, check, measure."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"ept.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"ept.cli.{name}":
                raise
            continue
        if id(module) not in seen:
            seen.add(id(module))
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"ept {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
