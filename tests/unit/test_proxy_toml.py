"""The shipped proxy.toml documents every setting, with its default.

Each key of every section of :class:`teegate.config.Settings` must appear under its
``[section]``, either set (``key = value``) or commented out (``# key = value``), and the
value written must be the default, so the file cannot drift from ``teegate/config.py``.
Two kinds of default cannot be written as a value: ``None`` (TOML has no null; the comment
shows an example instead) and a default computed at start (a ``default_factory``, such as
the shipped LLM host list, shown as ``...`` or ``[...]``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from teegate import config

PROXY_TOML = Path(__file__).resolve().parents[2] / "proxy.toml"
_SECTION = re.compile(r"^\[(\w+)\]$")
_KEY = re.compile(r"^(# )?([a-z][a-z0-9_]*) = (.+)$")


def _documented() -> dict[tuple[str, str], tuple[str, bool]]:
    """``{(section, key): (value as written, set)}`` for every key line of the file."""
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    section = ""
    for line in PROXY_TOML.read_text(encoding="utf-8").splitlines():
        if m := _SECTION.match(line):
            section = m[1]
        elif m := _KEY.match(line):
            assert (section, m[2]) not in found, f"{section}.{m[2]} documented twice"
            found[(section, m[2])] = (m[3], m[1] is None)
    return found


def _settings_keys() -> list[tuple[str, str, type[BaseModel]]]:
    keys = []
    for section, field in config.Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        keys += [(section, key, model) for key in model.model_fields]
    return keys


DOCUMENTED = _documented()
KEYS = _settings_keys()


def test_every_documented_key_is_a_setting():
    known = {(section, key) for section, key, _ in KEYS}
    assert sorted(set(DOCUMENTED) - known) == []


def test_the_file_is_the_defaults():
    shipped = tomllib.loads(PROXY_TOML.read_text(encoding="utf-8"))
    set_keys = {k for k, (_, is_set) in DOCUMENTED.items() if is_set}
    assert {(s, k) for s, table in shipped.items() for k in table} == set_keys


@pytest.mark.parametrize(
    ("section", "key", "model"), [pytest.param(*k, id=f"{k[0]}.{k[1]}") for k in KEYS]
)
def test_key_is_documented_with_its_default(section: str, key: str, model: type[BaseModel]):
    assert (section, key) in DOCUMENTED, f"proxy.toml does not mention {section}.{key}"
    text, is_set = DOCUMENTED[(section, key)]
    field = model.model_fields[key]
    if field.default_factory is not None:
        assert text in ("...", "[...]") and not is_set, f"{section}.{key}: write `# {key} = ...`"
        return
    if field.default is None:
        assert not is_set, f"{section}.{key}: no TOML value means None; comment it out"
        return
    written: Any = tomllib.loads(f"v = {text}")["v"]
    parsed = getattr(model.model_validate({key: written}), key)
    assert parsed == field.default, f"{section}.{key} = {text}, the default is {field.default!r}"
