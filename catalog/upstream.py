"""The upstream's model list, fetched with the upstream's own key."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx


class CatalogFetchError(Exception):
    """The upstream catalog could not be fetched or was not a model list."""


class UpstreamCatalogClient:
    """Fetches ``GET {base_url}/v1/models``.

    JSON numbers are parsed as :class:`~decimal.Decimal` so prices written as
    numbers reach the markup exact.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        verify: str | bool = True,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            verify=verify,
            timeout=timeout,
            trust_env=False,
        )
        self._headers = {"authorization": f"Bearer {api_key}", "accept": "application/json"}

    async def fetch_rows(self) -> list[Any]:
        try:
            resp = await self._client.get("/v1/models", headers=self._headers)
        except httpx.HTTPError as e:
            raise CatalogFetchError(f"upstream catalog unreachable: {type(e).__name__}") from e
        if resp.status_code != 200:
            raise CatalogFetchError(f"upstream catalog answered HTTP {resp.status_code}")
        try:
            doc = json.loads(resp.content, parse_float=Decimal)
        except ValueError as e:
            raise CatalogFetchError("upstream catalog is not JSON") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise CatalogFetchError("upstream catalog has no 'data' list")
        return doc["data"]

    async def aclose(self) -> None:
        await self._client.aclose()
