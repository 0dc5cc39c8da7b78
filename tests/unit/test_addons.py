"""Request-path addons with mitmproxy's own test harness (taddons/tflow)."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from mitmproxy.test import taddons, tflow, tutils

from teegate.addons import flowstate
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.errors import guarded
from teegate.addons.flowstate import Route, Stage
from teegate.addons.gate import Gate
from teegate.addons.routes import Router
from teegate.addons.seal import Seal
from teegate.addons.upstream import UpstreamRewrite
from teegate.addons.validate import ChatValidator
from teegate.catalog.store import Catalog
from teegate.config import Settings

TEE = "deepseek-ai/DeepSeek-V3.2-TEE"
ROWS = [
    {
        "id": TEE,
        "confidential_compute": True,
        "context_length": 100_000,
        "supported_features": ["tools", "json_mode"],
        "pricing": {"prompt": "0.1", "completion": "0.2"},
    },
    {
        "id": "deepseek-ai/DeepSeek-V3",
        "confidential_compute": False,
        "context_length": 100_000,
        "pricing": {"prompt": "0.1", "completion": "0.2"},
    },
]


class Rows:
    def __init__(self, rows):
        self.rows = rows

    async def fetch_rows(self):
        return self.rows


class Unreachable:
    async def fetch_rows(self):
        raise ConnectionError("upstream down")


def chat_flow(body: dict | bytes, path: bytes = b"/v1/chat/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = tutils.treq(method=b"POST", path=path, content=content)
    req.headers["authorization"] = "Bearer client-secret"
    req.headers["proxy-authorization"] = "Basic x"
    return tflow.tflow(req=req)


DEFAULTS = Settings()


def catalog_sync() -> CatalogSync:
    return CatalogSync(DEFAULTS.catalog, DEFAULTS.upstream)


async def _loaded_sync() -> CatalogSync:
    sync = catalog_sync()
    sync.catalog = Catalog(Rows(ROWS), markup=Decimal("1.85"), max_staleness_s=60)
    await sync.catalog.refresh()
    return sync


async def run_chain(flow, sync: CatalogSync):
    upstream = DEFAULTS.upstream.model_validate(
        {"base_url": "https://up.example:8443", "api_key": "up-key"}
    )
    chain = [
        Router(sync),
        ChatValidator(DEFAULTS.defaults, DEFAULTS.request, DEFAULTS.limits),
        Gate(sync),
        UpstreamRewrite(upstream),
        Seal(("validate", "gate", "upstream")),
    ]
    with taddons.context(sync, *chain):
        for addon in chain:
            result = addon.request(flow)
            if result is not None:
                await result
    return flow


async def test_approved_chat_is_rebuilt_for_the_upstream():
    flow = await run_chain(
        chat_flow({"model": TEE, "messages": [{"role": "user", "content": "x"}]}),
        await _loaded_sync(),
    )
    assert flow.response is None
    r = flow.request
    assert (r.scheme, r.host, r.port) == ("https", "up.example", 8443)
    assert r.headers["authorization"] == "Bearer up-key"
    assert "proxy-authorization" not in r.headers
    assert json.loads(r.content)["max_tokens"] == 1024


async def test_refused_chat_never_reaches_the_rewrite():
    flow = await run_chain(
        chat_flow(
            {"model": "deepseek-ai/DeepSeek-V3", "messages": [{"role": "user", "content": "x"}]}
        ),
        await _loaded_sync(),
    )
    assert flow.response.status_code == 400
    assert json.loads(flow.response.content)["error"]["code"] == "model_not_confidential"
    assert flow.request.headers["authorization"] == "Bearer client-secret"  # untouched


async def test_stale_catalog_fails_closed():
    sync = catalog_sync()
    now = [0.0]
    sync.catalog = Catalog(Rows(ROWS), markup=Decimal(1), max_staleness_s=5, timer=lambda: now[0])
    await sync.catalog.refresh()
    sync.catalog._source = Unreachable()
    now[0] = 6.0
    flow = await run_chain(
        chat_flow({"model": TEE, "messages": [{"role": "user", "content": "x"}]}), sync
    )
    assert flow.response.status_code == 503
    assert json.loads(flow.response.content)["error"]["code"] == "catalog_unavailable"


def test_seal_refuses_a_chat_flow_missing_a_stage():
    flow = chat_flow({"model": TEE})
    flowstate.set_route(flow, Route.CHAT)
    flowstate.passed(flow, Stage.VALIDATE)
    flowstate.passed(flow, Stage.UPSTREAM)  # the gate never approved it
    Seal((Stage.VALIDATE, Stage.GATE, Stage.UPSTREAM)).request(flow)
    assert flow.response.status_code == 500


def test_seal_refuses_an_unrouted_flow():
    flow = chat_flow({"model": TEE})
    Seal((Stage.VALIDATE,)).request(flow)
    assert flow.response.status_code == 500


@pytest.mark.parametrize("is_async", [False, True])
async def test_guarded_hook_turns_an_exception_into_a_500(is_async):
    class Broken:
        if is_async:

            @guarded
            async def request(self, flow):
                raise KeyError("secret prompt text")
        else:

            @guarded
            def request(self, flow):
                raise KeyError("secret prompt text")

    flow = chat_flow({"model": TEE})
    result = Broken().request(flow)
    if result is not None:
        await result
    assert flow.response.status_code == 500
    assert b"secret" not in flow.response.content


def test_streamed_request_bodies_are_refused_at_configuration():
    """mitmproxy sends a streamed request body upstream before any request hook runs."""
    from mitmproxy import exceptions
    from mitmproxy.addons.proxyserver import Proxyserver

    rewrite = UpstreamRewrite(DEFAULTS.upstream)
    with taddons.context(catalog_sync(), Proxyserver(), rewrite) as tctx:
        with pytest.raises(exceptions.OptionsError, match="bypass the gate"):
            tctx.configure(rewrite, stream_large_bodies="1m")
