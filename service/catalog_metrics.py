"""Catalog figures as Prometheus gauges, read from SQL at scrape time (every process that answers
/metrics shows the same catalog; counters and histograms are per process)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from service.catalog.stats import compute_stats
from service.catalog.tables import Instance, InstanceState

LOGGER = logging.getLogger(__name__)
_lock = threading.Lock()
_registered = False


class CatalogCollector(Collector):
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.runtime.session_factory() as session:
                stats = compute_stats(session)
                waiting = session.scalar(
                    select(func.count()).select_from(Instance).where(Instance.state == InstanceState.RECEIVED)
                )
        except Exception as exc:
            LOGGER.warning("catalog metrics unavailable", extra={"error": type(exc).__name__})
            return
        states = GaugeMetricFamily("archive_instances", "Catalogued instances by state", labels=["state"])
        for state in InstanceState:
            states.add_metric([str(state)], stats.instances_by_state.get(str(state), 0))
        yield states
        yield GaugeMetricFamily(
            "archive_queue_depth", "Instances received and waiting for compression", value=int(waiting or 0)
        )
        original = GaugeMetricFamily(
            "archive_original_bytes", "Original bytes of archived instances, by codec chosen", labels=["codec"]
        )
        stored = GaugeMetricFamily("archive_stored_bytes", "Stored bytes of archived instances", labels=["codec"])
        for codec, row in stats.by_codec.items():
            original.add_metric([codec], row.original_bytes)
            stored.add_metric([codec], row.stored_bytes)
        yield original
        yield stored


def register_catalog_collector(runtime: Any) -> None:
    global _registered
    with _lock:
        if not _registered:
            REGISTRY.register(CatalogCollector(runtime))
            _registered = True
