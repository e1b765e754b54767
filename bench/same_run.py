"""Whether two run folders hold the same run: the export byte for byte, results.json and report.md equal
but for what a clock or the machine's load decides (seconds, tokens/s, peak memory, time stamps).

    python bench/same_run.py BEFORE AFTER [BEFORE2 AFTER2 ...]

Prints one line per file and exits 1 when anything else differs. Used to show that a refactor left a
run unchanged (docs/benchmarks.md, issue 21).
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

# results.json keys measured by a clock or an allocator, never by the algorithm
VOLATILE = re.compile(r"(seconds|_s$|wall|tok_per_s|tokens_per_s|peak|mib|elapsed|per_step|time|rss|_gib$)")
REPORT_FIGURES = re.compile(r"\d[\d,]*(\.\d+)?\s*(tokens/s|tok/s|s|min|h|MiB|GiB)\b")
SKIP = {"tb", "e2e_ckpt", "blockap"}  # TensorBoard time stamps, DeepSpeed pickles, block files (in the export too)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def command_words(line: str) -> list[str]:
    """An `eqat-dist ...` command line as its flags and values, in flag order: the same command whatever
    the order the parser lists its flags in (results.json's `run.command`, report.md's last line)."""
    words = shlex.split(line)
    pairs, k = [], 1
    while k < len(words):
        value = words[k + 1] if k + 1 < len(words) and not words[k + 1].startswith("--") else None
        pairs.append(words[k] if value is None else f"{words[k]} {value}")
        k += 1 if value is None else 2
    return [words[0], *sorted(pairs)]


def _stable(value, key: str = "", root: str = ""):
    """results.json with every clock- or allocator-made figure replaced by a mark, the run's own folder by
    <run>, and its command line as its flags in order."""
    if isinstance(value, dict):
        return {k: _stable(v, k, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_stable(v, key, root) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and VOLATILE.search(key.lower()):
        return "<measured>"
    if key == "model_dir":
        return "<path>"
    if key == "started":
        return "<clock>"
    if isinstance(value, str) and root:  # the run's folder, and the folder beside it (--from a sibling)
        value = value.replace(root, "<run>").replace(str(Path(root).parent), "<beside>")
    if key == "command" and value.startswith("eqat-dist"):
        return command_words(value)
    return value


def _report_text(path: Path, root: Path) -> str:
    lines = [" ".join(command_words(line)) if line.startswith("eqat-dist ") else line
             for line in path.read_text().replace(str(root), "<run>").replace(str(root.parent), "<beside>").splitlines()]
    return REPORT_FIGURES.sub("#", "\n".join(lines))


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    names = sorted({p.relative_to(before).as_posix() for p in before.rglob("*") if p.is_file()}
                   | {p.relative_to(after).as_posix() for p in after.rglob("*") if p.is_file()})
    for name in names:
        if name.split("/")[0] in SKIP or name.startswith("."):
            continue
        a, b = before / name, after / name
        if not (a.exists() and b.exists()):
            problems.append(f"{name}: only in {'before' if a.exists() else 'after'}")
            continue
        if name == "results.json":
            diff = _differences(_stable(json.loads(a.read_text()), root=str(before)),
                                _stable(json.loads(b.read_text()), root=str(after)))
            diff = [d for d in diff if not d.startswith(("settings.model_dir", "eval.model_dir"))]
            status = "same but for measured figures" if not diff else "DIFFERS: " + "; ".join(diff[:5])
        elif name == "report.md":
            same = _report_text(a, before) == _report_text(b, after)
            status = "same but for measured figures" if same else "DIFFERS"
        else:
            status = "identical" if _digest(a) == _digest(b) else "DIFFERS"
        print(f"  {name:45s} {status}")
        if "DIFFERS" in status:
            problems.append(f"{name}: {status}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    problems = []
    for before, after in zip(argv[::2], argv[1::2]):
        print(f"{before} vs {after}")
        problems += compare(Path(before), Path(after))
    print("SAME RUN" if not problems else f"{len(problems)} difference(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
