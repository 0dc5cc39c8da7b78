"""The project's shape: which package may import which, and how long a module may grow.

``catalog``, ``ledger`` and ``egress`` are the gateway's policy and money; the request
path (``teegate.addons``) and the wiring (``teegate.commands``, ``teegate.runner``,
``teegate.cli``) use them, never the other way round, and they do not use each other:
only the shared money text (``teegate.money``, which imports no project module) is common
ground. Read from the source with :mod:`ast`, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Folder -> the name it is installed under (pyproject.toml's package-dir).
POLICY_PACKAGES = {
    "catalog": "teegate.catalog",
    "ledger": "teegate.ledger",
    "egress": "teegate.egress",
}
SHARED = "teegate.money"
MAX_LINES = 400
LONG_REASON = "Why this module is long:"


def _modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def _package_of(path: Path, folder: str, installed: str) -> str:
    """The package a module is in, by its installed name (for relative imports)."""
    rel = path.parent.relative_to(REPO / folder)
    return ".".join([installed, *rel.parts])


def imported(source: str, package: str) -> set[str]:
    """Every module a source imports, anywhere in it, relative imports resolved."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize(
    "source, package, expected",
    [
        ("import teegate.addons.gate", "teegate.ledger", {"teegate.addons.gate"}),
        ("from teegate.commands import ledger_cmds", "teegate.ledger", {"teegate.commands"}),
        ("def f():\n    from teegate.runner import x\n", "teegate.ledger", {"teegate.runner"}),
        ("from .keys import new_key", "teegate.ledger", {"teegate.ledger.keys"}),
        ("from ..binding import x", "teegate.catalog.attestation", {"teegate.catalog.binding"}),
        ("from . import inputs", "teegate.ledger", {"teegate.ledger"}),
    ],
)
def test_imports_are_read_from_the_source(source: str, package: str, expected: set[str]) -> None:
    assert imported(source, package) == expected


@pytest.mark.parametrize("folder", sorted(POLICY_PACKAGES))
def test_policy_packages_import_only_themselves_and_the_shared_money_module(folder: str) -> None:
    installed = POLICY_PACKAGES[folder]
    offending = []
    for path in _modules(folder):
        package = _package_of(path, folder, installed)
        for name in imported(path.read_text(), package):
            if not _within(name, "teegate"):
                continue  # the standard library and third-party packages
            if _within(name, installed) or name == SHARED:
                continue
            offending.append(f"{path.relative_to(REPO)} imports {name}")
    assert offending == []


def test_the_shared_money_module_imports_only_the_standard_library() -> None:
    names = imported((REPO / "teegate" / "money.py").read_text(), "teegate")
    assert {n for n in names if n.split(".")[0] not in sys.stdlib_module_names} == set()


@pytest.mark.parametrize("folder", [*sorted(POLICY_PACKAGES), "teegate", "addons", "sandbox"])
def test_no_module_is_long_without_saying_why(folder: str) -> None:
    long = []
    for path in _modules(folder):
        text = path.read_text()
        if len(text.splitlines()) <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if LONG_REASON not in doc:
            long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
    assert long == []
