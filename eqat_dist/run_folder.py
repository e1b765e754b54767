"""The output folder of a run and everything in it: every path a run writes under `--output` is named
here, with what a folder's contents say (is it an eqat-dist run, which phases finished, with which
settings, what a failed run leaves to resume from).

    OUTPUT/
      config.json, model-*.safetensors, tokenizer...   the export (export/, moved in by export/staging.py)
      export-FORMAT/                                    the export in a serving format (--export-format)
      results.json, report.md                           figures of every phase, with the export
      blockap/                                          finished blocks and their manifest (blockap/checkpoint.py)
      e2e_ckpt/                                         E2E-QP's DeepSpeed checkpoints (e2e/checkpoints.py)
      tb/                                               TensorBoard: tb/ (one rank), tb/rank<r>, tb/e2e..., tb/eval
      acts/                                             disk activation stores, unless --activations-dir
      .eqat-dist.lock, .eqat-dist-heartbeats/, .eqat-dist-shared-check, .eqat-publish.json
    OUTPUT/../.OUTPUT-export-*                          an export being written (a stage, renamed in)

The files inside blockap/ and e2e_ckpt/ are those modules' own formats; this module names the folders.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

RESULTS = "results.json"
REPORT = "report.md"
LOCK = ".eqat-dist.lock"
HEARTBEATS = ".eqat-dist-heartbeats"
SHARED_CHECK = ".eqat-dist-shared-check"
PUBLISH_JOURNAL = ".eqat-publish.json"
BLOCKAP = "blockap"
MANIFEST = "manifest.json"
E2E_CHECKPOINTS = "e2e_ckpt"
TENSORBOARD = "tb"
ACTIVATIONS = "acts"
CONFIG = "config.json"
SERVING_PREFIX = "export-"


class RunFolder:
    """The layout of one output folder. Creating it touches nothing on disk."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -- where things go
    @property
    def blockap(self) -> Path:
        return self.root / BLOCKAP

    @property
    def manifest(self) -> Path:
        return self.blockap / MANIFEST

    @property
    def e2e_checkpoints(self) -> Path:
        return self.root / E2E_CHECKPOINTS

    @property
    def activations(self) -> Path:
        return self.root / ACTIVATIONS

    @property
    def heartbeats(self) -> Path:
        return self.root / HEARTBEATS

    @property
    def shared_check(self) -> Path:
        return self.root / SHARED_CHECK

    @property
    def journal(self) -> Path:
        return self.root / PUBLISH_JOURNAL

    def results(self, within: Path | None = None) -> Path:
        """results.json of the output, or of a stage (`within`) that will be moved into it."""
        return (within or self.root) / RESULTS

    def report(self, within: Path | None = None) -> Path:
        return (within or self.root) / REPORT

    def tensorboard(self, *parts: str) -> Path:
        return self.root.joinpath(TENSORBOARD, *parts)

    def blockap_logs(self, rank: int, world: int) -> Path:
        return self.tensorboard() if world == 1 else self.tensorboard(f"rank{rank}")

    def e2e_logs(self, rank: int, world: int) -> Path:
        return self.tensorboard("e2e" if world == 1 else f"e2e-rank{rank}")

    def eval_logs(self) -> Path:
        return self.tensorboard("eval")

    def stage_prefix(self) -> str:
        """Name prefix of export stages, beside the output (same file system: the move is renames)."""
        return f".{self.root.name}-export-"

    def stages(self) -> list[Path]:
        """Stages a stopped run left, and the `.partial` folder of older versions."""
        return [*self.root.parent.glob(self.stage_prefix() + "*"), self.root.with_name(self.root.name + ".partial")]

    def store_prefix(self) -> str:
        """File-name prefix of this run's disk stores: the same for a resumed run, another for another
        run sharing the folder (an activations folder on a node's scratch disk)."""
        return "eqat-" + hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:10]

    def serving_export(self, name: str, within: Path | None = None) -> Path:
        """The folder of the export in serving format `name` (export/formats.SERVING)."""
        return (within or self.root) / (SERVING_PREFIX + name)

    def serving_exports(self) -> list[Path]:
        return sorted(p for p in self.root.glob(SERVING_PREFIX + "*") if p.is_dir())

    # -- what is there
    def contents(self) -> list[Path]:
        """What the folder holds besides our lock file."""
        return [p for p in self.root.iterdir() if p.name != LOCK] if self.root.is_dir() else []

    def is_eqat_run(self) -> bool:
        """Whether the folder is empty or recognisably an eqat-dist output folder (what an overwrite may delete)."""
        if not self.contents():
            return True
        if any(p.exists() for p in (self.results(), self.manifest, self.e2e_checkpoints)):
            return True
        try:
            meta = json.loads((self.root / "quantize_config.json").read_text()).get("meta", {})
        except (OSError, ValueError, AttributeError):
            return False
        return any(str(q).startswith("eqat-dist") for q in meta.get("quantizer", []))

    def holds_packed_model(self) -> bool:
        config = self.root / CONFIG
        return config.exists() and "quantization_config" in config.read_text()

    def settled(self, name: str) -> Path:
        """Where the output's file `name` is once an export move a kill cut short is finished
        (export/staging.py): in the stage when the move's journal says it was still to come, else here."""
        try:
            journal = json.loads(self.journal.read_text())
        except (OSError, ValueError):
            return self.root / name
        pending = self.root.parent / journal.get("stage", "") / name
        return pending if name in journal.get("items", []) and pending.exists() else self.root / name

    def settled_results(self) -> Path:
        return self.settled(RESULTS)

    def read_results(self) -> dict | None:
        """The finished phases' results.json, None when there is none; ValueError when it is not JSON."""
        path = self.settled_results()
        return json.loads(path.read_text()) if path.exists() else None

    def earlier_settings(self) -> dict:
        """The settings an earlier run in this folder was made with (Block-AP's manifest, else
        results.json), so that a resumed run keeps the schedule it started with; {} when none."""
        for path in (self.manifest, self.settled_results()):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            return data.get("settings", data) if path.name == RESULTS else data
        return {}

    def block_files(self) -> list[Path]:
        """The finished Block-AP blocks' files (blockap/checkpoint.py writes each whole or not at all)."""
        return sorted(self.blockap.glob("block_*.safetensors"))

    def recorded_flags(self) -> dict:
        """The flags the model in this folder was made with, by setting (`wbits`: 2): the record of the
        phase that wrote the export (E2E-QP's, else Block-AP's); for a results.json written before runs
        recorded their flags, its `settings`. {} when the folder has no results.json; ValueError when it
        is not JSON."""
        results = self.read_results() or {}
        for record in (results.get("e2e", {}).get("run"), results.get("run")):
            if record and "flags" in record:
                return dict(record["flags"])
        settings = dict(results.get("settings", {}))
        if "train_norms" in settings:
            settings["no_train_norms"] = not settings.pop("train_norms")
        return settings

    def kept(self) -> list[str]:
        """What a user can resume from after a failure."""
        return [what for what, there in (("Block-AP blocks", bool(self.block_files())),
                                         ("E2E-QP checkpoints", (self.e2e_checkpoints / "latest").exists()),
                                         ("an export", (self.root / CONFIG).exists())) if there]

    def clear_for_overwrite(self) -> None:
        """Everything but the lock and the heartbeats: the folder stays ours meanwhile."""
        import shutil
        for item in self.root.iterdir():
            if item.name not in (LOCK, HEARTBEATS):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
