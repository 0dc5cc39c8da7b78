"""Pure answer-building rules of the sandbox (no process needed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from teegate.sandbox.answers import sentence_pieces, split_even
from teegate.sandbox.schema_values import value_for_schema


@given(st.text(), st.integers(min_value=1, max_value=64))
def test_split_even_keeps_the_text(text: str, parts: int) -> None:
    pieces = split_even(text, parts)
    assert "".join(pieces) == text
    assert len(pieces) == min(parts, len(text))
    assert all(pieces)


@given(st.integers(min_value=1, max_value=50))
def test_sentence_has_one_piece_per_chunk(chunks: int) -> None:
    pieces = sentence_pieces("org/M-TEE", chunks)
    assert len(pieces) == chunks and all(pieces)
    assert "org/M-TEE" in "".join(pieces)


def test_value_for_schema_fills_required_properties_only() -> None:
    schema = {
        "type": "object",
        "properties": {
            "s": {"type": "string"},
            "n": {"type": "number"},
            "b": {"type": "boolean"},
            "e": {"enum": ["x", "y"]},
            "o": {"type": "object", "properties": {"i": {"type": "integer"}}, "required": ["i"]},
            "skip": {"type": "string"},
        },
        "required": ["s", "n", "b", "e", "o"],
    }
    assert value_for_schema(schema) == {"s": "sandbox", "n": 1, "b": True, "e": "x", "o": {"i": 1}}
