"""Each setting declared once: a field of a RunConfig part (config/run_config.py) or of quant.QuantConfig,
whose metadata holds its flag. From these declarations come the parser (cli.py builds it with
`add_flags`), the RunConfig parts (`part_from_flags`, the one reader of a flag's value) and the checks of
a value's range (`check_ranges`); `declared()` lists them for the tests that keep the parser, RunConfig
and the planner in agreement.

A new setting is one field, e.g. in BlockAPConfig:

    warmup_steps: int = setting(0, help="steps at a rising learning rate", minimum=0)

and it is a flag (--warmup-steps), a value of `cfg.blockap`, a key of results.json's `run.settings`, and
read by the trainer (blockap.trainer.BlockAPSettings is BlockAPConfig plus what the machine adds).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

FLAG = "eqat_flag"  # the metadata key of a field's flag


@dataclass(frozen=True)
class Flag:
    """How a setting is given on the command line and in a config file (keys as the flags)."""
    dest: str  # the flag's name with underscores (`e2e_lr`): config file key, message name (`e2e_lr`)
    help: str | None = None
    choices: tuple | None = None
    metavar: str | None = None
    option: str | None = None  # the flag when it is not --dest-with-hyphens (--from)
    negated: bool = False  # --no-DEST: the flag given sets the setting False
    listed: bool = False  # a comma list on the command line, a tuple in the settings
    to_value: Callable[[Any], Any] | None = None  # flag text -> setting (a Path, ...)
    minimum: float | None = None  # checked before any work: "`dest` must be >= minimum unit (why)"
    unit: str = ""
    why: str = ""
    finite: bool = False  # a finite number >= 0 (learning rates, norms)
    by_rule: bool = False  # left out, a rule chooses (the recipe's, the width's): the flag's default is None
    kind: type | None = None  # argparse's type; default: from the field's annotation

    @property
    def option_string(self) -> str:
        return self.option or "--" + self.dest.replace("_", "-")


def setting(default: Any = MISSING, *, dest: str | None = None, **flag: Any):
    """A dataclass field that is also a flag: its default is the setting's one default (None where a
    rule resolves it, e.g. per width: say so in `help`). `dest` defaults to the part's FLAG_PREFIX + the
    field's name."""
    return field(default=default, metadata={FLAG: (dest, flag)})


def flag_of(part: type, f) -> Flag | None:
    """The Flag of field `f` of dataclass `part`, or None when the field is not a setting of the command line."""
    if FLAG not in f.metadata:
        return None
    dest, options = f.metadata[FLAG]
    return Flag(dest=dest or getattr(part, "FLAG_PREFIX", "") + f.name, **options)


def declared(parts: tuple[type, ...]) -> list[tuple[type, Any, Flag]]:
    """(part, field, flag) of every declared setting of these dataclasses, in declaration order."""
    return [(part, f, flag) for part in parts for f in fields(part) if (flag := flag_of(part, f)) is not None]


def flag_default(f, flag: Flag) -> Any:
    """The parser's default for a setting: the field's default as the command line writes it."""
    default = None if f.default is MISSING or flag.by_rule else f.default
    if flag.negated:
        return False
    if flag.listed and default is not None:
        return ",".join(default)
    if isinstance(default, Path):
        return str(default)
    return default


def _argparse_type(f, flag: Flag):
    if flag.kind is not None:
        return flag.kind
    annotation = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if annotation.split(" | ")[0] == name:
            return kind
    return None


def add_flags(parser, parts: tuple[type, ...], titles: dict[type, str] | None = None,
              owned: dict[str, dict] | None = None) -> None:
    """Every declared setting of `parts` as a flag of `parser`, in groups titled by `titles`. `owned`: what
    a layer above config/ knows of a setting (dest -> Flag fields: the choices and help of names it owns)."""
    groups = {}
    for part, f, flag in declared(parts):
        flag = replace(flag, **(owned or {}).get(flag.dest, {}))
        title = (titles or {}).get(part)
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        target = groups[title]
        kwargs = {"dest": flag.dest, "help": flag.help}
        if flag.negated or str(f.type) == "bool":
            target.add_argument(flag.option_string, action="store_true", **kwargs)
            continue
        kwargs |= {"default": flag_default(f, flag), "type": _argparse_type(f, flag)}
        if flag.choices is not None:
            kwargs["choices"] = list(flag.choices)
        if flag.metavar is not None:
            kwargs["metavar"] = flag.metavar
        target.add_argument(flag.option_string, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def comma_list(value) -> tuple[str, ...]:
    """'a,b' (a flag), or a list (a config file) -> ('a', 'b'); '' -> ()."""
    items = value.split(",") if isinstance(value, str) else list(value or ())
    return tuple(str(item).strip() for item in items if str(item).strip())


def value_of(flag: Flag, raw: Any) -> Any:
    """A flag's value as its setting holds it."""
    if flag.negated:
        return not raw
    if flag.listed:
        return comma_list(raw)
    if flag.to_value is not None and raw is not None:
        return flag.to_value(raw)
    return raw


def part_from_flags(part: type, flags, **resolved) -> Any:
    """An instance of `part` with each declared setting read from the parsed `flags` (a Namespace); the
    fields in `resolved` (and those that are no flag) as given there."""
    values = {f.name: value_of(flag, getattr(flags, flag.dest))
              for _, f, flag in declared((part,)) if f.name not in resolved}
    return part(**values, **resolved)


class RangeError(ValueError):
    """A value out of its declared range; the message names the setting in backquotes."""


def check_ranges(parts: tuple[type, ...], flags) -> None:
    """Each declared minimum and finiteness, in declaration order, on the flags as given (None = left out)."""
    for _, f, flag in declared(parts):
        value = getattr(flags, flag.dest, None)
        if value is None or isinstance(value, bool):
            continue
        if flag.finite and (not math.isfinite(value) or value < 0):
            raise RangeError(f"`{flag.dest}` {value} must be a finite number >= 0")
        if flag.minimum is not None and value < flag.minimum:
            minimum = int(flag.minimum) if float(flag.minimum).is_integer() else flag.minimum
            raise RangeError(f"`{flag.dest}` must be >= {minimum}" + (f" {flag.unit}" if flag.unit else "")
                             + (f" ({flag.why})" if flag.why else ""))
