"""Print the compatibility table, or (``--write``) put it into README.md between its markers.

``python -m tests.compat.render --write`` after changing tests/compat/matrix.py;
tests/compat/test_matrix.py fails while README's block differs from the rendering.
"""

from __future__ import annotations

import sys

from tests.compat.matrix import render_table
from tests.support.testdata import REPO_ROOT

README = REPO_ROOT / "README.md"
BEGIN, END = "<!-- compat:begin -->", "<!-- compat:end -->"


def block() -> str:
    """What README carries between (and including) the markers."""
    return f"{BEGIN}\n{render_table()}{END}"


def current() -> str | None:
    """README's block as it is, or None without markers."""
    text = README.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(END)]


def write() -> None:
    text = README.read_text(encoding="utf-8")
    old = current()
    if old is None:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    README.write_text(text.replace(old, block()), encoding="utf-8")


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        write()
    else:
        print(block())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
