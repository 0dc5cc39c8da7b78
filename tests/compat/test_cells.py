"""One test per cell of tests/compat/matrix.py that runs: the client's outcome, and the gateway's
record of it.

An OK cell passes only if the client's answer is the sandbox's (its fixed reply, the tool
result quoted back, a schema instance), every upstream request the cell caused went through
the gateway (the sandbox saw the gateway's ``x-request-id`` and the upstream key, never the
client's key) and the ledger settled a charge for each. A No cell passes only if the client
failed with the stated error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.compat.matrix import No, cell_id, cells, expected
from tests.support.billing import usage_row
from tests.support.gateway_proc import GatewayProc
from tests.support.sandbox_proc import SandboxProc
from tests.support.testdata import TEE

REPLY = f"Sandbox reply from {TEE}"


def _header(record: dict[str, Any], name: str) -> str | None:
    return next((v for k, v in record["headers"] if k.lower() == name), None)


def _cell_requests(records: list[dict[str, Any]], cid: str) -> list[dict[str, Any]]:
    marker = f"[compat {cid}]"
    return [r for r in records if marker in (r.get("body_text") or "")]


def _check_outcome(feature: str, cid: str, result: dict[str, Any]) -> None:
    kind = feature.removeprefix("responses_")
    if kind == "structured":
        data = result["data"]
        assert isinstance(data, dict) and set(data) == {"name", "population"}, data
        assert isinstance(data["name"], str) and isinstance(data["population"], int), data
        return
    assert REPLY in result["text"], result["text"]
    if kind == "stream":
        assert result["chunks"] >= 2, result  # it really streamed, in pieces
    if kind == "tools":
        assert result["tool_calls"] >= 1, result
        assert f"using the tool result: sunny-{cid}" in result["text"], result["text"]


@pytest.mark.parametrize("client,feature,mode", cells(), ids=lambda v: v)
def test_cell(
    client: str,
    feature: str,
    mode: str,
    outcomes: dict[str, dict[str, Any]],
    upstream_requests: list[dict[str, Any]],
    upstream: SandboxProc,
    gateway: GatewayProc,
) -> None:
    cid = cell_id(client, feature, mode)
    expect = expected(client, feature, mode)
    result = outcomes[cid]
    if isinstance(expect, No):
        assert not result["ok"], f"expected to fail ({expect.reason}), but passed: {result}"
        assert expect.error in result["error"], result["error"]
        reached = bool(_cell_requests(upstream_requests, cid))
        assert reached == expect.reaches_upstream, (reached, expect)
        return
    assert result["ok"], f"{result['error']}\n{result.get('traceback', '')}"
    _check_outcome(feature, cid, result)

    seen = _cell_requests(upstream_requests, cid)
    assert seen, "the sandbox received nothing for this cell"
    tool_results = 0
    for record in seen:
        # The upstream only ever sees chat completions, from the gateway, with its key.
        assert (record["method"], record["path"]) == ("POST", "/v1/chat/completions"), record
        assert _header(record, "authorization") == f"Bearer {upstream.api_key}"
        assert gateway.api_key not in json.dumps(record["headers"])
        rid = _header(record, "x-request-id")
        assert rid and rid.startswith("req_"), record["headers"]
        row = usage_row(gateway.db, rid)
        assert row["state"] == "settled" and row["charge_micro"] > 0, row
        messages = (record.get("json") or {}).get("messages") or []
        tool_results += sum(1 for m in messages if m.get("role") == "tool")
    if feature.endswith("tools"):
        assert len(seen) >= 2 and tool_results >= 1, "no second request carried the tool result"
    if feature.endswith("stream"):
        assert all((r.get("json") or {}).get("stream") is True for r in seen)
