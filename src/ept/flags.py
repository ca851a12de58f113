"""``ept train``'s flag vocabulary, generated from the config dataclasses' fields.

One :class:`Flag` per field (its help text is the field's own, :func:`ept.config.setting`); the
flag's name is the preset key and the config.json key too.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ept.config import SECTIONS


@dataclass(frozen=True)
class Flag:
    """One ``ept train`` flag: the setting it sets, its type and its help."""

    name: str  # the CLI spelling (without dashes), also the preset key
    section: str  # the RunConfig section
    field: str  # the section's field
    type: type
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    optional: bool = False  # the field may be None: the flag takes 'none'


def _scalar(hint: Any) -> type:
    """int for ``int | None``, str for ``str | None``, the type itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def section_flags(section: str) -> list[Flag]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return [Flag(f.metadata.get("flag", f.name), section, f.name, _scalar(hints[f.name]), f.default,
                 f.metadata["help"], f.metadata.get("aliases", ()), f.metadata.get("choices"),
                 type(None) in typing.get_args(hints[f.name]))
            for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _all_flags() -> dict[str, Flag]:
    out: dict[str, Flag] = {}
    for section in SECTIONS:
        for flag in section_flags(section):
            for name in (flag.name, *flag.aliases):
                if name in out:
                    raise RuntimeError(f"flag --{name} is set by both {out[name].section} and {section}")
            out[flag.name] = flag
    return out


FLAGS: dict[str, Flag] = _all_flags()  # every config flag of ``ept train``, by its CLI name
