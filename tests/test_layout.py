"""The layout docs/architecture.md describes: dependencies point one way, and a web app's import stays light.

Read from the sources (every ``import`` statement, at the top of a module or inside a function), so a new
import that breaks the rule fails here, not in a user's web app.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONTRACT = {"producer.contract", "producer.contract.settings", "producer.contract.errors", "producer.contract.checks",
            "producer.contract.wire", "producer.contract.stream", "producer.contract.milvus",
            "producer.contract.redis_check", "producer.contract.settings_doc", "producer.contract.redis_conn",
            "producer.contract.redis_urls"}
"""What both sides share: names, keys, payloads and their codec, settings, errors. Nothing else of the project."""
COMPOSITION_ROOT = "producer.cli"
"""The one module that may import both sides (lazily, inside the command that needs the worker)."""


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("producer", "worker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported project module, whether at module level) for each import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.append((target, id(node) in top_level))
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def test_the_producer_side_never_imports_the_worker_but_the_cli_lazily():
    wrong = [(name, target, top) for name in MODULES if name.startswith("producer")
             for target, top in GRAPH[name] if target.startswith("worker")
             if name != COMPOSITION_ROOT or top]
    assert wrong == [], "producer modules importing worker modules (module, import, at module level)"


def test_the_contract_imports_nothing_else_of_the_project():
    wrong = [(name, target) for name in CONTRACT for target, _ in GRAPH[name] if target not in CONTRACT]
    assert wrong == []
    for name in CONTRACT:
        assert name in MODULES, f"{name} is named in the contract but does not exist"


def test_the_worker_imports_nothing_of_producer_but_the_contract():
    wrong = [(name, target) for name in MODULES if name.startswith("worker")
             for target, _ in GRAPH[name] if target.startswith("producer") and target not in CONTRACT]
    assert wrong == [], "the worker reaches past the contract (module, import)"


def test_no_producer_module_is_imported_only_by_the_worker():
    importers: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, imports in GRAPH.items():
        for target, _ in imports:
            importers[target].add(name)
    worker_only = [name for name in MODULES if name.startswith("producer.") and importers[name]
                   and all(i.startswith("worker") for i in importers[name])]
    assert worker_only == [], "worker code living under producer/: move it to worker/"


def test_no_import_cycles():
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(path[path.index(name):] + [name])
            return
        if name in done:
            return
        for target, _ in GRAPH[name]:
            if target != "producer":  # the package's lazy __getattr__ table names modules, it does not import them
                visit(target, path + [name])
        done.add(name)

    for name in MODULES:
        visit(name, [])
    assert cycles == []


@pytest.mark.parametrize("statement", [
    "import producer", "from producer import Client, Settings",
    "import producer.contract.wire, producer.contract.stream, producer.contract.checks, producer.contract.errors"])
def test_a_web_apps_import_loads_neither_torch_nor_scipy_nor_pymilvus(statement):
    heavy = ("scipy", "torch", "pymilvus", "transformers", "worker")
    code = f"{statement}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
