"""An export as one step for the user: the weights, config, results.json and report.md of a phase are
written into a stage folder beside the output, and moved in together; until then the output keeps its
earlier state whole.

The move itself is several renames, so it is journalled: `.eqat-publish.json` in the output names the
stage and the files it brings, and is written before the first rename. A run killed between renames
finishes the move when it starts again (`recover`); a stage left by a run killed before its move is
deleted (nothing in it was published, and the phase that wrote it runs again).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

INDEX = "model.safetensors.index.json"
from ..run_folder import PUBLISH_JOURNAL as JOURNAL, RunFolder


def _folder(out) -> Path:
    """The output folder, given as a path or a RunFolder."""
    return out.root if isinstance(out, RunFolder) else Path(out)


def _stage_prefix(out_dir: Path) -> str:
    return RunFolder(out_dir).stage_prefix()


def new_stage(out_dir: str | os.PathLike) -> Path:
    """An empty folder on the output's filesystem (so the move is renames, not copies)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_stage_prefix(out_dir), dir=out_dir.parent))


def publish(stage: Path, out_dir: Path) -> Path:
    """Move everything in `stage` into `out_dir`, replacing an earlier export's weights (a single file or
    shards, whichever it was) and keeping the user's other files there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps({"stage": stage.name, "items": sorted(p.name for p in stage.iterdir())}))
    os.replace(tmp, out_dir / JOURNAL)
    _finish(out_dir)
    return out_dir


def _finish(out_dir: Path) -> None:
    journal = json.loads((out_dir / JOURNAL).read_text())
    stage, items = out_dir.parent / journal["stage"], set(journal["items"])
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / INDEX]:
        if stale.name not in items:  # the earlier export's weights: a loader must not pick them up
            stale.unlink(missing_ok=True)
    for stale in RunFolder(out_dir).serving_exports():
        if stale.name not in items:  # converted from the earlier weights: not this export any more
            shutil.rmtree(stale)
    for name in sorted(items):
        item, target = stage / name, out_dir / name
        if not item.exists():
            continue  # moved before the kill
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(stage, ignore_errors=True)
    (out_dir / JOURNAL).unlink()


def recover(out_dir) -> list[str]:
    """Finish a move a kill interrupted and delete stages that were never published; returns what was
    done, for the log. Call with the output's lock held."""
    out_dir, done = _folder(out_dir), []
    if (out_dir / JOURNAL).exists():
        _finish(out_dir)
        done.append(f"finished moving an export into {out_dir} that a stopped run had begun")
    for stage in RunFolder(out_dir).stages():
        if stage.is_dir():
            shutil.rmtree(stage, ignore_errors=True)
            done.append(f"removed {stage}, an export a stopped run had not finished")
    return done


def settled(out_dir, name: str) -> Path:
    """Where the output's file `name` is once an interrupted move is finished: in the stage when the
    journal says it was still to come, else in the output itself."""
    return RunFolder(_folder(out_dir)).settled(name)


@contextmanager
def staged(out):
    """A stage folder for an export (a path or a RunFolder), deleted if the export fails before its move."""
    stage = new_stage(_folder(out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
