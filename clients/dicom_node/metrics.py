"""Prometheus metrics of the node (prometheus-client), served when ``metrics_port`` is set (on loopback unless
``metrics_host`` says otherwise).

Counts and times only: no UID, name or path is ever a label.
"""

from __future__ import annotations

from typing import Any

from satseg_clients.dicom_node.jobs import DONE, JobStore


class _Off:
    """Stands in for a metric when metrics are off."""

    def inc(self, amount: float = 1.0) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def labels(self, *values: str) -> _Off:
        return self


class Metrics:
    """``sat_dicom_node_*``: instances received (counted by the database), series sent, failed and skipped,
    the queue length and the seconds per job. With ``port`` 0 nothing is registered or served."""

    def __init__(self, store: JobStore, port: int, host: str = "127.0.0.1") -> None:
        self.sent: Any = _Off()
        self.failed: Any = _Off()
        self.skipped: Any = _Off()
        self.job_seconds: Any = _Off()
        self.refused: Any = _Off()
        if port:
            self._serve(store, port, host)

    def _serve(self, store: JobStore, port: int, host: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        registry = CollectorRegistry()
        self.sent = Counter("sat_dicom_node_series_sent", "Results sent to the destination", registry=registry)
        self.failed = Counter("sat_dicom_node_series_failed", "Series parked with a reason", registry=registry)
        self.skipped = Counter("sat_dicom_node_series_skipped", "Series no route takes", registry=registry)
        self.job_seconds = Histogram(
            "sat_dicom_node_job_seconds",
            "From taking a complete series to its result being sent",
            buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 3600),
            registry=registry,
        )
        self.refused = Counter(
            "sat_dicom_node_instances_refused",
            "Instances refused by limit: instance_size, free_disk, spool_bytes, open_series (A700, the PACS"
            " retries later), series_instances (C000)",
            ["limit"],
            registry=registry,
        )
        queue = Gauge("sat_dicom_node_queue_length", "Series received and not yet done", registry=registry)
        queue.set_function(lambda: sum(n for state, n in store.counts().items() if state not in DONE))
        spool = Gauge("sat_dicom_node_spool_bytes", "Bytes received for series not yet done", registry=registry)
        spool.set_function(lambda: store.spool_bytes())
        received = Gauge("sat_dicom_node_instances_received", "Instances on record", registry=registry)
        received.set_function(lambda: store.instance_count())
        start_http_server(port, addr=host, registry=registry)
