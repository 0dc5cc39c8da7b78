"""What the wheel installs: every source package, under the one import name ``teegate``.

The folders the project is laid out in (addons/, catalog/, ...) are mapped to ``teegate.<name>``
by ``pyproject.toml``; a new subpackage that is not listed there would be missing from the wheel
while every test (run from the checkout) still passed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _source_packages() -> set[str]:
    """Every folder with an ``__init__.py`` under a mapped folder, by its installed name."""
    found = set()
    for name, folder in SETUPTOOLS["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_source_package_is_installed_under_teegate() -> None:
    packages = set(SETUPTOOLS["packages"])
    assert _source_packages() == packages
    assert all(p == "teegate" or p.startswith("teegate.") for p in packages)


def test_every_top_level_source_folder_is_mapped_except_bench_and_tests() -> None:
    mapped = set(SETUPTOOLS["package-dir"].values())
    folders = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert folders - mapped == {"bench", "tests"}


def test_no_module_imports_a_source_folder_by_its_bare_name() -> None:
    bare = set(SETUPTOOLS["package-dir"].values()) - {"teegate"}
    offenders = []
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                top = words[1].split(".")[0]
                if top in bare:
                    offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert offenders == []


def test_no_test_imports_a_conftest() -> None:
    """Shared fixtures live in tests/conftest.py, shared helpers in tests/support/: a conftest
    imported from elsewhere runs twice under two names and hides which fixtures apply."""
    offenders = []
    for path in (REPO / "tests").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if words[:1] in (["from"], ["import"]) and words[1].split(".")[-1] == "conftest":
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
