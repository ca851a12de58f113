"""``ept train``'s flags are generated from the config dataclasses: each setting is one field, its
help text the field's own, and a flag lands in the field it names."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from ept.cli import build_parser
from ept.cli.train import resolve_new
from ept.config import SECTIONS
from ept.flags import FLAGS
from ept.solvers.registry import SOLVERS


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_flag_of_ept_train_has_help_text():
    actions = [a for a in train_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 100  # the config's flags and the analog devices'
    assert [a.option_strings[0] for a in actions if not (a.help or "").strip()] == []


def test_every_config_field_is_a_flag_unless_marked_otherwise():
    options = {s for a in train_parser()._actions for s in a.option_strings}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                assert f"--{f.metadata.get('flag', f.name)}" in options, (section, f.name)
    assert "--seed" in options and FLAGS["seed"].section == "train"  # not the controls' own seed


def test_the_solver_flags_offer_exactly_the_registry():
    actions = {a.dest: a for a in train_parser()._actions}
    assert list(actions["solver"].choices) == list(SOLVERS)
    assert list(actions["nudge_solver"].choices) == list(SOLVERS)


def test_a_generated_flag_lands_in_its_field():
    args = train_parser().parse_args(["--mix", "0.7", "--no-bias", "--solver", "broyden", "--vocab", "300",
                                      "--eig_dir", "slow", "--div_patience", "7", "--no-qknorm"])
    cfg = resolve_new({k: v for k, v in vars(args).items() if not k.startswith("analog") and k != "func"})
    assert cfg.solver.mix == 0.7 and cfg.solver.method == "broyden"
    assert cfg.model.bias is False and cfg.model.qknorm is False and cfg.model.vocab_size == 300
    assert cfg.control["eig_dir"] == "slow" and cfg.train.div_patience == 7


def test_an_optional_setting_takes_none_to_unset_the_presets_value(capsys):
    def control(argv: list[str]) -> dict:
        args = vars(train_parser().parse_args(argv))
        flags = {k: v for k, v in args.items() if not k.startswith("analog") and k != "func"}
        return resolve_new(flags).control

    assert control([])["eig_margin_end"] == -1.5  # the tiny preset loosens the hold over the decay
    assert control(["--eig_margin_end", "none"])["eig_margin_end"] is None  # a fixed margin
    assert control(["--eig_margin_end", "0.25"])["eig_margin_end"] == 0.25
    with pytest.raises(SystemExit) as stop:
        train_parser().parse_args(["--eig_margin_end", "loose"])
    assert stop.value.code == 2 and "invalid float value: 'loose'" in capsys.readouterr().err
