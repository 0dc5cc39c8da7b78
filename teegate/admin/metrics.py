"""``GET /metrics``: the request path's counters plus gauges read at scrape time.

The gauges describe state rather than events (attestation verdicts, catalog age, open
reservations), so :class:`StateCollector` reads them from the live objects on every scrape
instead of keeping copies that could go stale.

Multi-process (``--workers``): with ``PROMETHEUS_MULTIPROC_DIR`` set in every process's
environment before it starts, prometheus_client writes each process's counters and histograms
to files there; :func:`exposition` then answers from a fresh registry that merges all of them
(``MultiProcessCollector``) plus this process's state gauges. Without it, the meter's own
registry is served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from teegate.addons.attestation import AttestationSync
from teegate.addons.catalogsync import CatalogSync
from teegate.addons.ledgerlink import LedgerLink
from teegate.addons.metrics import Meter, model_label

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(eq=False)  # registries key collectors by identity
class StateCollector(Collector):
    catalog: CatalogSync
    attestation: AttestationSync
    ledger: LedgerLink

    def describe(self) -> list[Metric]:
        return []  # computed per scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        snap = self.catalog.catalog.snapshot if self.catalog.catalog is not None else None
        fresh = GaugeMetricFamily(
            "teegate_catalog_fresh", "1 while a catalog younger than its staleness bound is held."
        )
        fresh.add_metric([], 1 if snap is not None else 0)
        yield fresh
        if snap is not None:
            age = GaugeMetricFamily(
                "teegate_catalog_age_seconds", "Seconds since the catalog was last refreshed."
            )
            age.add_metric([], max(now - snap.fetched_at, 0.0))
            yield age
            verified = GaugeMetricFamily(
                "teegate_attestation_verified",
                "Per confidential model: 1 while a passing verdict lets the gate serve it, else 0.",
                labels=["model"],
            )
            since = GaugeMetricFamily(
                "teegate_attestation_age_seconds",
                "Per confidential model: seconds since its evidence was last verified.",
                labels=["model"],
            )
            known = snap.models.keys()
            for model in snap.models:
                label = model_label(model, known)
                verified.add_metric([label], 1 if self.attestation.refusal(model) is None else 0)
                v = self.attestation.verdict(model)
                if v is not None:
                    since.add_metric([label], max(now - v.verified_at, 0.0))
            yield verified
            yield since
        ledger = self.ledger.ledger
        if ledger is not None:
            held = GaugeMetricFamily(
                "teegate_reservations_open",
                "Reservations held open by this process (chat requests in flight).",
            )
            held.add_metric([], ledger.open_count)
            yield held


def exposition(meter: Meter, state: StateCollector) -> bytes:
    """The Prometheus text of every metric (see the module docstring for several processes)."""
    registry = CollectorRegistry()  # per scrape: the counters' source, then the state gauges
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(meter.registry)
    registry.register(state)
    return generate_latest(registry)
