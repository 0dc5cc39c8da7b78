"""The matrix itself: README shows exactly its rendering, every cell that is not green says
why, every Python cell that should run has a function, and the versions it names are the
installed ones. (No processes: these run even where the cells' batches are deselected.)"""

from __future__ import annotations

import json
from importlib.metadata import version

from tests.compat import render
from tests.compat.matrix import (
    CLIENTS,
    FEATURE_IDS,
    MODES,
    NA,
    NODE_DIR,
    OK,
    No,
    cells,
    expected,
)
from tests.compat.py_cells import load


def test_readme_carries_the_rendered_table() -> None:
    assert render.current() == render.block(), (
        "README.md's compatibility table differs from tests/compat/matrix.py: "
        "run `python -m tests.compat.render --write`"
    )


def test_the_table_sits_in_a_compatibility_section() -> None:
    text = render.README.read_text(encoding="utf-8")
    section = text.index("\n## Compatibility\n")
    assert section < text.index(render.BEGIN) < text.index("\n## ", section + 1)


def test_every_cell_is_ok_or_says_why() -> None:
    for client in CLIENTS:
        for feature in FEATURE_IDS:
            for mode in MODES:
                expect = expected(client.id, feature, mode)
                if expect == OK:
                    continue
                assert isinstance(expect, No | NA), expect
                assert len(expect.reason) > 20, (client.id, feature, mode, expect)
                if isinstance(expect, No):
                    assert expect.error, (client.id, feature, expect)
    # The table shows the reason of every cell that is not green, except in a row left out
    # because nothing in it runs.
    table = render.render_table()
    for client in CLIENTS:
        for mode in MODES:
            shown = [expected(client.id, f, mode) for f in FEATURE_IDS]
            if client.excluded is None and all(isinstance(e, NA) for e in shown):
                continue
            for expect in shown:
                if expect != OK:
                    assert expect.reason in table, (client.id, mode, expect)


def test_every_python_cell_that_runs_has_its_function() -> None:
    for client, feature, _mode in cells("py"):
        assert (client, feature) in load(), (client, feature)


def test_the_table_names_the_installed_versions() -> None:
    for client in CLIENTS:
        for package, pinned in client.pins:
            if client.runner == "py":
                installed = version(package)
            else:
                meta = NODE_DIR / "node_modules" / package / "package.json"
                installed = json.loads(meta.read_text())["version"]
            assert installed == pinned, (client.id, package, installed)
            assert pinned in client.label, client
