"""E2E-QP checkpoints: where to resume from, on how many ranks, into which settings, and how many to keep.

DeepSpeed writes one `stepN` folder per save and a `latest` file naming the newest complete one. Its
ZeRO optimizer partitions are tied to the number of ranks that wrote them; on another number of ranks
the checkpoint is first converted to DeepSpeed's universal format (one file per parameter) and loaded
from there, so a run moved from 8 GPUs to 4 resumes instead of starting over.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..blockap.checkpoint import ResumeError
from ..utils.compare import describe_differences
from .ds_setup import convert_to_universal_format, load_engine_checkpoint

STEP_TAG = re.compile(r"step(\d+)")
UNIVERSAL_SUFFIX = "-universal"


def _restart_hint(ckpt_dir: Path) -> str:
    return f"delete {ckpt_dir} to run E2E-QP again from its start (the model it starts from is untouched)"


@dataclass
class ResumePoint:
    tag: str
    saved_by_ranks: int  # 0 when the checkpoint holds no ZeRO partitions (stage 0: every rank has all)
    reshard: bool  # ZeRO partitions of another number of ranks: load through the universal format

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.reshard else self.tag


def find_resume_point(ckpt_dir: Path, world: int, zero: bool) -> ResumePoint | None:
    """The checkpoint `latest` names, checked before DeepSpeed reads it (DeepSpeed only warns about a
    missing folder and returns no state). None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest").exists():
        return None
    tag = (ckpt_dir / "latest").read_text().strip()
    folder = ckpt_dir / tag
    if not tag or not folder.is_dir() or not any(folder.glob("*model_states.pt")):
        raise ResumeError(f"{ckpt_dir / 'latest'} names {tag!r}, which is not a complete DeepSpeed checkpoint "
                          f"(a kill while saving?); point it at an older step folder if one is left, or "
                          f"{_restart_hint(ckpt_dir)}")
    shards = len(list(folder.glob("*zero_pp_rank_*optim_states.pt")))
    return ResumePoint(tag, shards, reshard=zero and shards not in (0, world))


def convert_to_universal(ckpt_dir: Path, point: ResumePoint) -> Path:
    """DeepSpeed's own converter; on one rank only."""
    target = Path(ckpt_dir) / point.load_tag
    shutil.rmtree(target, ignore_errors=True)  # a conversion cut short earlier
    done = convert_to_universal_format(Path(ckpt_dir) / point.tag, target)
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise ResumeError(f"the E2E-QP checkpoint {Path(ckpt_dir) / point.tag} was written by {point.saved_by_ranks} "
                          f"ranks and converting it for another number of ranks failed ({done.stderr[-500:]}); "
                          f"resume with {point.saved_by_ranks} ranks, or {_restart_hint(Path(ckpt_dir))}")
    return target


def remove_universal_copy(ckpt_dir: Path, point: ResumePoint) -> None:
    """Once loaded, the converted copy is of no further use (new saves are per-rank again)."""
    shutil.rmtree(Path(ckpt_dir) / point.load_tag, ignore_errors=True)
    (Path(ckpt_dir) / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to it


def load_resume_point(engine, ckpt_dir: Path, point: ResumePoint, plan: dict) -> tuple[int, dict]:
    """Load the checkpoint into the engine; returns the step to go on from and the per-step history
    (losses, step seconds) of the steps before it, so results.json holds the whole run."""
    try:
        path, client = load_engine_checkpoint(engine, Path(ckpt_dir), point.load_tag)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files: say which and what to do
        raise ResumeError(f"the E2E-QP checkpoint {Path(ckpt_dir) / point.tag} cannot be loaded "
                          f"({type(err).__name__}: {str(err)[:300]}); {_restart_hint(Path(ckpt_dir))}") from err
    if path is None or not client or "step" not in client:
        raise ResumeError(f"the E2E-QP checkpoint {Path(ckpt_dir) / point.tag} is incomplete; "
                          f"{_restart_hint(Path(ckpt_dir))}")
    check_same_plan(client.get("plan"), plan, Path(ckpt_dir))
    step = int(client["step"])
    history = {k: list(client.get("history", {}).get(k, []))[:step] for k in ("losses", "step_seconds")}
    return step, history


def resume_plan(settings, data) -> dict:
    """What fixes the sequence of optimizer steps: a checkpoint resumes only into the same plan. `data`:
    the training rows (data/windows.TextWindows or data/chat.ChatExamples)."""
    return {"epochs": settings.epochs, "global_batch": settings.global_batch, "lr": settings.lr,
            "warmup": settings.warmup, "max_grad_norm": settings.max_grad_norm, "seed": settings.seed,
            **data.fingerprint()}


def check_same_plan(before: dict | None, now: dict, ckpt_dir: Path) -> None:
    if before is None:  # written before plans were recorded
        return
    detail = describe_differences(before, now)
    if detail:
        raise ResumeError(f"the E2E-QP checkpoint in {ckpt_dir} was made with other settings ({detail}); run with "
                          f"the original E2E-QP settings to resume, or {_restart_hint(ckpt_dir)}")


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest `stepN` checkpoints, never the one `latest` names (DeepSpeed
    moves `latest` only once a checkpoint is written, so a kill mid-save still resumes from the last
    whole one). Returns the deleted tags."""
    if keep <= 0:
        return []
    ckpt_dir = Path(ckpt_dir)
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = sorted((int(m.group(1)), d.name) for d in ckpt_dir.iterdir()
                  if d.is_dir() and (m := STEP_TAG.fullmatch(d.name)))
    doomed = [name for _, name in tags[:-keep] if name != latest]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)  # another node sharing the folder may race us
    return doomed
