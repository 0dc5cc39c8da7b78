"""Pure answer-building rules of the sandbox (no process needed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from teegate.sandbox.answers import plan_answers, sentence_pieces, split_even
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


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


def test_a_tool_not_called_yet_comes_first_and_results_end_in_text() -> None:
    tools = [_tool("lookup"), _tool("final_result")]
    asked = {"role": "user", "content": "go"}
    first = plan_answers({"messages": [asked], "tools": tools}, "m", 4)[0]
    assert first.tool_name == "lookup"
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    history = [asked, {"role": "assistant", "tool_calls": [call]}]
    result = {"role": "tool", "tool_call_id": "c1", "content": "42"}
    text = plan_answers({"messages": [*history, result], "tools": tools}, "m", 4)[0]
    assert text.tool_name is None and "42" in text.text
    retry = {"role": "user", "content": "please call a tool"}
    again = plan_answers({"messages": [*history, result, retry], "tools": tools}, "m", 4)[0]
    assert again.tool_name == "final_result"


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_seed_changes_the_words_whatever_the_chunking(chunks: int) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    texts = {seed: plan_answers({**body, "seed": seed}, "m", chunks)[0].text for seed in range(6)}
    assert len(set(texts.values())) > 1
    assert texts[3] == plan_answers({**body, "seed": 3}, "m", chunks)[0].text
