"""Comparing the settings a run was made with to those of the command resuming it."""
from __future__ import annotations


def describe_differences(before: dict, now: dict, keys=None, absent: dict | None = None) -> str:
    """'lr: was 0.001, now 0.002; ...' over `keys` (default: every key of either), '' when they agree.
    `absent`: what a key missing from a record stands for (records leave out choices at their old value)."""
    absent = absent or {}
    keys = set(before) | set(now) if keys is None else set(keys) | (set(before) & set(absent))
    return "; ".join(f"{k}: was {before.get(k, absent.get(k))!r}, now {now.get(k, absent.get(k))!r}"
                     for k in sorted(keys) if before.get(k, absent.get(k)) != now.get(k, absent.get(k)))
