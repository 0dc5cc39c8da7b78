"""Endpoints answered by the gateway itself: the model list, refusals, unknown paths."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from tests.support.testdata import TEE, TEST_MODELS

# The 16 models of ../shared/tee-models.json, as copied into the test catalog (with its public
# prices); the copy is checked against the shared file in tests/sandbox where that is present.
SHARED = {
    "models": [
        m for m in json.loads(TEST_MODELS.read_text())["models"] if not m["id"].startswith("test/")
    ]
}

# What the gateway itself asks the upstream in the background (catalog, attestation, and the
# response signature of each chat it served).
BACKGROUND = {"GET /v1/models", "GET /v1/attestation/report"}
SIGNATURES = "GET /v1/signature/"


def forwarded(upstream) -> int:
    """Upstream calls other than the gateway's own background ones."""
    routes = upstream.stats()["by_route"]
    return sum(
        n for route, n in routes.items()
        if route not in BACKGROUND and not route.startswith(SIGNATURES)
    )  # fmt: skip


def test_model_list_is_the_confidential_catalog_at_public_prices(client, upstream):
    before = upstream.stats()["by_route"].get("GET /v1/models", 0)
    models = {m.id: m for m in client.models.list()}
    expected = {m["id"] for m in json.loads(TEST_MODELS.read_text())["models"]}
    assert set(models) == expected
    for spec in SHARED["models"]:
        m = models[spec["id"]].model_dump()
        assert m["object"] == "model" and m["owned_by"] and isinstance(m["created"], int)
        assert m["confidential_compute"] is True
        assert m["context_length"] == spec["context_length"]
        assert Decimal(m["pricing"]["input"]) == Decimal(spec["price_usd_per_1m"]["input"])
        assert Decimal(m["pricing"]["output"]) == Decimal(spec["price_usd_per_1m"]["output"])
        assert m["capabilities"]["tools"] is ("tools" in spec["features"])
    assert "deepseek-ai/DeepSeek-V3" not in models
    # Served from the gateway's cache: listing does not hit the upstream per call.
    client.models.list()
    assert upstream.stats()["by_route"].get("GET /v1/models", 0) - before <= 1


def test_one_model_by_id_with_slashes(client):
    m = client.models.retrieve(TEE)
    assert m.id == TEE and m.model_dump()["confidential_compute"] is True


def test_non_confidential_and_unknown_model_ids(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("deepseek-ai/DeepSeek-V3")
    assert exc.value.body["code"] == "model_not_confidential"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("nobody/nothing")
    assert exc.value.body["code"] == "model_not_found"


def test_embeddings_are_not_available(client, upstream):
    with pytest.raises(openai.InternalServerError) as exc:
        client.embeddings.create(model="any", input="hello")
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "not_available"
    assert forwarded(upstream) == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v1/audio/speech"),
        ("POST", "/v1/videos"),
        ("POST", "/v1/moderations"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/fine_tuning/jobs/ftjob-1"),
        ("POST", "/v1/fine-tunes"),
    ],
)
def test_unavailable_endpoints(http, upstream, method, path):
    resp = http.request(method, path, json={})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_available"
    assert f"{method} {path}" not in upstream.stats()["by_route"]
    assert forwarded(upstream) == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/completions", 404),
        ("GET", "/", 404),
        ("POST", "/v2/chat/completions", 404),
    ],
)
def test_unknown_paths_and_wrong_methods(http, upstream, method, path, status):
    resp = http.request(method, path)
    assert resp.status_code == status
    assert set(resp.json()["error"]) == {"message", "type", "param", "code", "status"}
    if status == 405:
        assert resp.headers["allow"]
    assert forwarded(upstream) == 0


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/v1/completions"), ("GET", "/v1/assistants"), ("GET", "/")]
)
def test_a_404_names_the_endpoints_that_exist(http, upstream, method, path):
    resp = http.request(method, path, json={})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "not_found"
    for endpoint in (
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "GET /v1/models",
        "GET /v1/models/{id}",
        "GET /v1/attestation/report",
    ):
        assert endpoint in error["message"]
    assert resp.headers["x-should-retry"] == "false"
    assert forwarded(upstream) == 0
