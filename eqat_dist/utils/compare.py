"""Comparing the settings a run was made with to those of the command resuming it."""
from __future__ import annotations


def describe_differences(before: dict, now: dict, keys=None) -> str:
    """'lr: was 0.001, now 0.002; ...' over `keys` (default: every key of either), '' when they agree."""
    keys = set(before) | set(now) if keys is None else keys
    return "; ".join(f"{k}: was {before.get(k)!r}, now {now.get(k)!r}"
                     for k in sorted(keys) if before.get(k) != now.get(k))
