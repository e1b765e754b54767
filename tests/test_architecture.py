"""The codebase's floors hold (docs/architecture.md): settings reach the library only as a RunConfig,
the output layout is spelled only in run_folder.py, no two folders import each other (directly or
round a circle), and the supported model families are the ones models/family.py names."""
import ast
import re
from pathlib import Path

import pytest

from eqat_dist import run_folder

PACKAGE = Path(__file__).resolve().parents[1] / "eqat_dist"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_no_module_below_the_command_line_reads_the_parsed_flags():
    """Only cli.py and the RunConfig builder see argparse's Namespace."""
    allowed = {"cli.py", "config/from_flags.py"}
    readers = [f"{_rel(p)}:{n}" for p in SOURCES if _rel(p) not in allowed
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if re.search(r"(?<![\w.])(args|flags)\.[a-z]", line)]
    assert readers == []


def _layout_names() -> set[str]:
    """Every name the run folder's layout gives (module constants of run_folder.py)."""
    return {v for k, v in vars(run_folder).items() if k.isupper() and isinstance(v, str)} - {run_folder.CONFIG}


def test_the_output_layout_is_spelled_only_in_run_folder():
    names = _layout_names()
    assert {"results.json", "blockap", "e2e_ckpt", "tb", "acts", ".eqat-dist.lock"} <= names
    spelled = []
    for path in SOURCES:
        if _rel(path) == "run_folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                spelled.append(f"{_rel(path)}:{node.lineno} {node.value!r}")
    assert spelled == []


def _unit(module: str) -> str:
    """A folder of the package (blockap, export, ...), or a top-level module by its name."""
    return module.split(".")[0]


def _imports() -> dict[str, set[str]]:
    """unit -> units it imports (module-level and function-level imports alike)."""
    graph: dict[str, set[str]] = {}
    for path in SOURCES:
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        here = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        package = parts[:-1]
        unit = _unit(here)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - (node.level - 1)])
                if node.module:
                    targets = [".".join(base + node.module.split("."))]
                else:  # from .. import x: x is a module of that package, or a name of its __init__
                    targets = [".".join(base + [a.name]) if (PACKAGE.joinpath(*base, a.name + ".py").exists() or
                                                            PACKAGE.joinpath(*base, a.name).is_dir())
                               else ".".join(base) or "__init__" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eqat_dist."):
                targets = [node.module.removeprefix("eqat_dist.")]
            for target in targets:
                if _unit(target) != unit:
                    graph.setdefault(unit, set()).add(_unit(target))
    return graph


# The floors of docs/architecture.md, top first: a unit imports only units on floors below its own.
FLOORS = [
    {"cli"},
    {"runner"},
    {"preflight", "phases", "settle"},
    {"planning"},
    {"pipelines", "e2e"},
    {"blockap", "export", "eval", "cluster"},
    {"models"},
    {"config"},
    {"quant", "data", "utils"},
    {"kernels", "run_folder", "__init__"},
]


def test_every_import_goes_down_the_floors_of_the_architecture_page():
    """Each folder (or top-level module) has its floor, and imports only what lies below it: a new
    folder must be given a floor here and in docs/architecture.md, and an import up or sideways fails."""
    floor = {unit: n for n, units in enumerate(FLOORS) for unit in units}
    graph = _imports()
    units = {_unit(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) for p in SOURCES}
    assert units - set(floor) == set(), "give these a floor in FLOORS and in docs/architecture.md"
    upward = sorted(f"{unit} -> {target}" for unit, targets in graph.items() for target in targets
                    if floor[target] <= floor[unit])
    assert upward == []
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    drawn = [{word.removesuffix("/").removesuffix(".py") for word in line.split() if word.endswith(("/", ".py"))}
             for line in page.split("```")[1].strip().splitlines()]
    assert drawn == [units - {"__init__"} for units in FLOORS]  # the page's drawing: one line per floor, top first


def test_no_import_circle_between_folders():
    graph = _imports()
    assert "export" in graph["phases"] and "run_folder" in graph["export"]  # the scan sees real imports
    circles = []

    def visit(unit, trail):
        for nxt in sorted(graph.get(unit, ())):
            if nxt in trail:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < 12:
                visit(nxt, trail + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert circles == []


def test_the_supported_families_are_the_ones_the_tests_build():
    """tests/conftest.py builds a tiny model of each family models/family.py lists, and of no other."""
    from transformers import AutoConfig

    from conftest import TINY_FAMILIES, tiny_config
    from eqat_dist.models.family import SUPPORTED_FAMILIES

    assert set(TINY_FAMILIES) == set(SUPPORTED_FAMILIES)
    for model_type, name in TINY_FAMILIES.items():
        assert tiny_config(name).model_type == model_type
        assert isinstance(AutoConfig.for_model(model_type), type(tiny_config(name)))


@pytest.mark.parametrize("message, flag_text", [
    ("`group_size` 48 does not divide 576; use `group_size` 32 or 64", "--group-size 48 does not divide 576; use --group-size 32 or 64"),
    ("pass `from_dir` DIR, or `overwrite`", "pass --from DIR, or --overwrite"),
    ("`unknown_thing` stays a name", "unknown_thing stays a name"),
])
def test_library_messages_name_settings_and_the_command_line_shows_flags(message, flag_text):
    from eqat_dist.cli import flag_message
    assert flag_message(message) == flag_text


def test_no_bench_script_shadows_an_installed_module():
    """`python bench/x.py` puts bench/ first on sys.path, so a script named like an installed package
    replaces it for every import in the run: bench/kernels.py hid the `kernels` package, and
    transformers' `from kernels import ...` broke every benchmark that loads a model."""
    import importlib.util

    shadowing = [p.name for p in sorted((PACKAGE.parent / "bench").glob("*.py")) if importlib.util.find_spec(p.stem) is not None]
    assert not shadowing, f"bench scripts named like installed modules (rename them): {shadowing}"


def test_the_command_line_starts_without_the_heavy_libraries():
    """`--help`, `plan` and every pre-flight refusal answer before transformers, DeepSpeed or the
    harness are imported (each costs seconds a process); the phases import them when they run."""
    import subprocess
    import sys

    code = ("import sys, eqat_dist.cli; "
            "print(sorted(m for m in ('transformers', 'deepspeed', 'lm_eval', 'mpi4py') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
