"""The house rules that keep the layout readable, checked on the source (no imports run).

* every package folder is listed in pyproject.toml (the mapping cannot find them itself);
* the only top-level import name is ``lastkd``;
* imports flow one way: services -> library core -> featurestore; the core imports no web,
  queue or settings code; the teacher and the student never import each other (teacher
  fine-tuning takes only generic helpers from the student side); lastkd.ntu imports nothing of lastkd;
* no module imports another that imports it back (directly or through others).
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import PROJECT_ROOT

FOLDERS = {
    "lastkd": PROJECT_ROOT / "lastkd",
    "lastkd.featurestore": PROJECT_ROOT / "featurestore",
    "lastkd.services": PROJECT_ROOT / "services",
}
SERVICE_ONLY = ("fastapi", "starlette", "celery", "kombu", "uvicorn", "pydantic_settings", "lastkd.services")
# Small torch-free rule modules any layer may use (they import nothing of lastkd but errors).
LEAVES = (
    "lastkd.errors",
    "lastkd.hashing",
    "lastkd.jsonsafe",
    "lastkd.ids",
    "lastkd.validation",
    "lastkd.sse",
    "lastkd.atomic",
)


def _modules() -> Iterator[tuple[str, Path]]:
    for base_name, folder in sorted(FOLDERS.items(), key=lambda kv: -len(kv[0])):
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([base_name, *parts])
            if base_name == "lastkd" and parts and parts[0] in ("featurestore", "services"):
                continue
            yield name, path


MODULES = dict(_modules())
_MODULE_NAMES = set(MODULES)


def _imports(name: str, path: Path) -> set[str]:
    """Modules imported by ``path`` anywhere but under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from pkg import submodule` imports the submodule, not the package's re-exports
            # (Python loads pkg/__init__ for any submodule import; that is not a dependency).
            names = [f"{mod}.{alias.name}" for alias in node.names]
            submodules = [n for n in names if n in _MODULE_NAMES]
            found.update(submodules)
            if len(submodules) < len(names):
                found.add(mod)
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES and m != name} for name, path in MODULES.items()}
RAW = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert on_disk == listed


def test_only_lastkd_is_imported_at_the_top_level() -> None:
    bad = {n: sorted(m for m in mods if m.split(".")[0] in ("services", "featurestore")) for n, mods in RAW.items()}
    assert {n: m for n, m in bad.items() if m} == {}


def _violations(prefix: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out = {}
    for name, mods in RAW.items():
        if not name.startswith(prefix) or any(name == e or name.startswith(e + ".") for e in exempt):
            continue
        hits = sorted(m for m in mods if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            out[name] = hits
    return out


def test_the_library_core_imports_no_service_code() -> None:
    assert _violations("lastkd", SERVICE_ONLY, exempt=("lastkd.services",)) == {}


def test_the_featurestore_knows_nothing_of_models_or_services() -> None:
    others = tuple(m for m in ("lastkd.models", "lastkd.teacher", "lastkd.student", "lastkd.services", "torch"))
    assert _violations("lastkd.featurestore", others) == {}


def test_teacher_and_student_never_import_each_other() -> None:
    assert _violations("lastkd.teacher", ("lastkd.student", "lastkd.finetune")) == {}
    assert _violations("lastkd.student", ("lastkd.teacher", "lastkd.models.videomae", "lastkd.finetune")) == {}


def test_teacher_fine_tuning_takes_only_generic_helpers_from_the_student_side() -> None:
    # RNG states, atomic saves and top-k; never the student's model, data pipeline or training loop
    allowed = ("lastkd.student.rng", "lastkd.student.checkpoints", "lastkd.student.evaluate")
    used = {m for name, mods in RAW.items() if name.startswith("lastkd.finetune") for m in mods}
    student = {m for m in used if m.startswith("lastkd.student")}
    assert {m for m in student if not m.startswith(allowed)} == set()


def test_the_ntu_file_rules_import_nothing_of_lastkd() -> None:
    outside = {
        name: sorted(m for m in mods if m.startswith("lastkd") and not m.startswith("lastkd.ntu"))
        for name, mods in RAW.items()
        if name.startswith("lastkd.ntu")
    }
    assert {n: m for n, m in outside.items() if m} == {}


def test_the_small_rule_modules_stay_leaves() -> None:
    assert {n: sorted(GRAPH[n] - {"lastkd.errors"}) for n in LEAVES if GRAPH[n] - {"lastkd.errors"}} == {}


def _cycle_from(start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_cycles(module: str) -> None:
    # A package importing its own submodules (re-exports in __init__) is not a cycle of concerns.
    cycle = _cycle_from(module)
    if (
        cycle is not None
        and all(c.startswith(module + ".") or c == module for c in cycle)
        and MODULES[module].name == "__init__.py"
    ):
        cycle = None
    assert cycle is None, " -> ".join(cycle or [])
