"""Converting a GPTQ-v2 export (a run's output) into a serving format, block by block, never the whole
model in memory: into a run's stage beside its GPTQ v2 files, or on its own (`eqat-dist export`), staged
and moved into the output when complete so that a failed conversion leaves nothing half-written."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .formats import NATIVE, refusal, serving_format
from .packed_source import PackedExport
from .safetensors_format import copy_side_files
from .staging import INDEX, new_stage, publish


def copy_gptq_v2(source: PackedExport, folder: Path) -> None:
    """The GPTQ v2 model alone, as a run left it (without its results, checkpoints and logs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in [*source.folder.glob("model*.safetensors"), source.folder / INDEX, source.folder / "config.json",
                 source.folder / "quantize_config.json"]:
        if path.exists():
            shutil.copy2(path, folder / path.name)
    copy_side_files(source.folder, folder)


def write_format(source: PackedExport, name: str, folder: Path, shown: Path | None = None) -> Path:
    """Write format `name` of the export `source` into the new folder `folder` (a stage: the log names
    `shown`, where it will be)."""
    problem = refusal(name, source.quant, source.config.get("model_type"))
    if problem:
        raise ValueError(problem)
    started = time.time()
    if name == NATIVE:
        copy_gptq_v2(source, folder)
    else:
        serving_format(name).write(source, folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"[export] {name}: {shown or folder} ({size / 2**20:.1f} MiB, {time.time() - started:.0f} s)", flush=True)
    return folder


def write_serving_formats(stage: Path, names, run_folder) -> None:
    """A run's serving formats, converted from the GPTQ v2 export just written into `stage`, each into
    its `export-FORMAT/` folder there (moved into the output with the rest)."""
    if names:
        source = PackedExport(stage)
        for name in names:
            write_format(source, name, run_folder.serving_export(name, within=stage),
                         shown=run_folder.serving_export(name))


def _is_earlier_export(folder: Path) -> bool:
    """What `overwrite` may replace: a folder this command (or a run) wrote, recognised by its files."""
    config = folder / "config.json"
    return any(folder.glob("*.gguf")) or (config.exists() and "eqat-dist" in config.read_text())


def check_conversion(source_folder: Path, name: str, output: Path, overwrite: bool) -> PackedExport:
    """Everything that can be refused before writing: ValueError with one line."""
    source = PackedExport(source_folder)  # CheckpointError when it is not a packed export
    problem = refusal(name, source.quant, source.config.get("model_type"))
    if problem:
        raise ValueError(problem)
    if output.resolve() == source.folder.resolve():
        raise ValueError(f"`output` {output} is the export converted from; name another folder")
    if output.exists() and not output.is_dir():
        raise ValueError(f"`output` {output} is a file; name a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ValueError(f"`output` {output} is not empty; name a new folder, or add `overwrite` to replace "
                             "an earlier export there")
        if not _is_earlier_export(output):
            raise ValueError(f"`output` {output} holds files that are not an eqat-dist export; `overwrite` "
                             "replaces only those: name another folder")
    return source


def convert(source_folder: Path, name: str, output: Path, overwrite: bool = False) -> Path:
    """`eqat-dist export`: the format into `output` (new or empty, or an earlier export with `overwrite`);
    the output changes only once the whole conversion is written."""
    source = check_conversion(source_folder, name, output, overwrite)
    stage = new_stage(output)
    try:
        write_format(source, name, stage, shown=output)
        if output.is_dir():
            for item in output.iterdir():  # an earlier export (checked above): replaced whole
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        return publish(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
