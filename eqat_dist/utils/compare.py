"""Comparing the settings a run was made with to those of the command resuming it."""
from __future__ import annotations

# The method's choices at the paper's values (config/recipes.py's `paper`). A run's record leaves a choice out
# at this value, so records from before the choice existed compare equal; a missing key reads as this.
PAPER_CHOICES = {"init": "minmax", "loss": "mse"}
# What a record leaves out reads as this (the recipe's choices at the paper's, the grid asymmetric)
RECORD_DEFAULTS = PAPER_CHOICES | {"grid": "asym"}


def _value(record: dict, key: str):
    return record.get(key, RECORD_DEFAULTS.get(key))


def describe_differences(before: dict, now: dict, keys=None) -> str:
    """'lr: was 0.001, now 0.002; ...' over `keys` (default: every key of either), '' when they agree."""
    keys = set(before) | set(now) if keys is None else set(keys) | (set(before) & set(RECORD_DEFAULTS))
    return "; ".join(f"{k}: was {_value(before, k)!r}, now {_value(now, k)!r}"
                     for k in sorted(keys) if _value(before, k) != _value(now, k))


def recipe_hint(before: dict, now: dict) -> str:
    """For a resume refused over a recipe choice: how to continue a run made under an earlier default."""
    if all(_value(before, k) == _value(now, k) for k in PAPER_CHOICES):
        return ""
    return " (a run made under an earlier default recipe continues with `recipe` paper or with its `init` and `loss`)"
