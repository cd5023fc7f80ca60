"""Prometheus metrics of one service: live counters, timing histograms, and figures read at scrape.

Three sources, one page (``/metrics``):

* histograms the service observes as work finishes (:class:`ServiceMetrics`): time from a series'
  last instance to its report and to its delivery, and the worker's drafting time;
* a collector that reads, at each scrape, the SCP's counters, the state database (series by state
  and rejection reason, jobs by state, outbox items by state) and the disk;
* the process-wide default registry, where stage modules keep their own counters (final reports,
  retraining, retention).

No label ever holds patient data or a UID: labels are states, reasons, outcomes and destination names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from neuroscribe.dicom_io.scp import ReceiveCounters
from neuroscribe.log import get_logger
from neuroscribe.store import JobStore, OutboxStore, StateStore

LOG = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds: from a few for a small series on a GPU to the outbox's retry delays.
_LATENCY_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300, 900, 3600)


@dataclass
class ScrapeSources:
    """What the scrape-time collector reads."""

    counters: ReceiveCounters
    state: StateStore
    jobs: JobStore
    outbox: OutboxStore
    storage_root: Path
    worker: Callable[[], dict[str, Any]]


class _ScrapeCollector(Collector):
    def __init__(self, sources: ScrapeSources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        c = s.counters
        for name, value, doc in (
            ("associations", c.associations, "DICOM associations accepted"),
            ("instances_received", c.instances, "instances stored (new and re-sent)"),
            ("instances_duplicate", c.duplicates, "instances re-sent with a known SOP Instance UID"),
            ("bytes_received", c.bytes, "bytes of stored instances"),
        ):
            yield CounterMetricFamily(f"neuroscribe_{name}", doc, value=value)
        refused = CounterMetricFamily("neuroscribe_instances_refused", "C-STORE refusals by reason",
                                      labels=["reason"])
        for reason, n in sorted(dict(c.failures).items()):
            refused.add_metric([reason], n)
        yield refused

        series = GaugeMetricFamily("neuroscribe_series", "series by state (and reason when rejected)",
                                   labels=["state", "reason"])
        for (state, reason), n in sorted(s.state.series_counts().items(), key=lambda kv: str(kv[0])):
            series.add_metric([state.value, reason or ""], n)
        yield series
        jobs = GaugeMetricFamily("neuroscribe_jobs", "report jobs by state", labels=["state"])
        counts = s.jobs.counts()
        for state, n in counts.items():
            jobs.add_metric([state.value], n)
        yield jobs
        yield GaugeMetricFamily("neuroscribe_queue_depth", "jobs waiting for or in inference",
                                value=counts["queued"] + counts["inferring"])
        deliveries = GaugeMetricFamily("neuroscribe_outbox_items", "deliveries by state (pending, "
                                       "delivered, dead, dropped)", labels=["state"])
        for state, n in s.outbox.counts().items():
            deliveries.add_metric([state.value], n)
        yield deliveries

        usage = shutil.disk_usage(s.storage_root)
        yield GaugeMetricFamily("neuroscribe_disk_free_bytes", "free bytes under storage.root",
                                value=usage.free)
        yield GaugeMetricFamily("neuroscribe_spool_bytes", "bytes of recorded instances in the spool",
                                value=s.state.spool_bytes())
        worker = s.worker()
        yield GaugeMetricFamily("neuroscribe_worker_up", "1 while the drafting worker process runs",
                                value=1 if worker["alive"] else 0)
        yield CounterMetricFamily("neuroscribe_worker_restarts", "drafting worker restarts",
                                  value=worker["restarts"])
        model = GaugeMetricFamily("neuroscribe_model_info", "the model the worker serves (1)",
                                  labels=["name", "version", "source", "device"])
        if worker["model"]:
            m = worker["model"]
            model.add_metric([m["name"], m["version"], m["source"], m["device"]], 1)
        yield model


class ServiceMetrics:
    """The service's metrics registry and the histograms it observes."""

    def __init__(self, sources: ScrapeSources) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_report = Histogram(
            "neuroscribe_time_to_report_seconds", "last instance of a series to its report made",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.time_to_delivery = Histogram(
            "neuroscribe_time_to_delivery_seconds",
            "last instance of a series to its report at every destination",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.draft_seconds = Histogram(
            "neuroscribe_inference_seconds", "drafting one report in the worker (volume, model, SR, ORU)",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_ScrapeCollector(sources))

    def render(self) -> bytes:
        """The Prometheus text page: this service's metrics, then the process-wide ones."""
        try:
            own = generate_latest(self.registry)
        except Exception:  # a scrape must not take the service down (e.g. the database is locked)
            LOG.exception("metrics scrape failed")
            own = b""
        return own + generate_latest(REGISTRY)
