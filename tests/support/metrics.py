"""Reading a real gateway's ``/metrics`` the way Prometheus does (its own text parser)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway_proc import GatewayProc


def counted(gateway: GatewayProc, sample: str, **labels: str) -> float:
    """The value of ``sample`` (e.g. ``teegate_requests_total``) summed over the series whose
    labels include ``labels``; 0 when none exists yet."""
    text = httpx.get(gateway.urls["admin"] + "/metrics", timeout=30).text
    want = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and want <= set(s.labels.items())
    )
