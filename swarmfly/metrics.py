"""Prometheus metrics, names prefixed ``swarmfly_``: each service's own, on its /metrics."""

from __future__ import annotations

import asyncio
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from swarmfly import __version__
from swarmfly.errors import SwarmflyError

if TYPE_CHECKING:  # the services that serve /metrics load aiohttp; `swarmfly get` need not
    from aiohttp import web

disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus-client
"""No ``_created`` series: one more series per counter and histogram child, which Prometheus
reads only with created-timestamp ingestion on, and which Grafana's queries never use."""


class Metrics:
    """One service's metrics, on a registry of its own: each service's /metrics says what
    that service did, also where several share a process (`swarmfly up`, a peer and its
    proxy)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.build_info = self.gauge(
            "swarmfly_build_info",
            "Always 1: the swarmfly and Python versions",
            ["version", "python"],
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.contract_failures = self.counter(
            "swarmfly_contract_validation_failures",
            "Requests refused by contract validation",
            ["subject"],
        )

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram(
        self, name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

    async def handler(self, request: web.Request) -> web.Response:
        from aiohttp import web

        response = web.Response(body=generate_latest(self.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response


class SchedulerMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.registrations = self.counter("swarmfly_scheduler_registrations", "Peer registrations")
        self.back_to_source = self.counter(
            "swarmfly_scheduler_back_to_source", "Peers told to read the origin themselves"
        )
        self.schedule_seconds = self.histogram(
            "swarmfly_scheduler_schedule_duration_seconds",
            "Time to answer register and reschedule",
            (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
        )
        self.hosts = self.gauge("swarmfly_scheduler_hosts", "Hosts with live heartbeats")
        self.tasks = self.gauge("swarmfly_scheduler_tasks", "Tasks with at least one peer")


class PeerMetrics(Metrics):
    """A peer's, or a storage's (a seed is a peer that reads the origin first)."""

    def __init__(self) -> None:
        super().__init__()
        self.download_bytes = self.counter(
            "swarmfly_peer_download_bytes", "Verified bytes downloaded", ["source"]
        )
        self.downloads = self.counter(
            "swarmfly_peer_downloads",
            "Downloads (runs of a task: concurrent asks share one) that ended, by result:"
            " succeeded, failed, cancelled; and reason: the error code (not_found,"
            " source_error, integrity, timeout, unavailable, forbidden, bad_request,"
            " internal), disk (a local disk error), or none",
            ["result", "reason"],
        )
        self.downloads.labels("succeeded", "none")  # a ratio of failures needs the series at 0
        self.upload_bytes = self.counter("swarmfly_peer_upload_bytes", "Bytes served to children")
        self.piece_seconds = self.histogram(
            "swarmfly_peer_piece_duration_seconds",
            "Time to fetch and verify one piece",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ["source"],
        )
        self.piece_failures = self.counter(
            "swarmfly_peer_piece_failures",
            "Pieces that failed, by reason: corrupt, slow, failed (a parent), origin (a read of"
            " the origin), contradicted (the swarm's bytes contradict the origin's stat)",
            ["reason"],
        )
        self.upload_refused = self.counter(
            "swarmfly_peer_upload_refused",
            "Piece and availability requests refused, by reason: capability (none, or not"
            " valid for the task), busy (no free upload place), displaced (a needier child took"
            " its place)",
            ["reason"],
        )
        self.gc_evictions = self.counter("swarmfly_peer_gc_evictions", "Cached tasks evicted")
        self.cache_bytes = self.gauge("swarmfly_peer_cache_bytes", "Bytes of cached tasks")
        self.cache_tasks = self.gauge("swarmfly_peer_cache_tasks", "Cached tasks")

    def count_download(self, exc: BaseException | None = None) -> None:
        """Count a download that ended: ``exc`` is why it did not succeed."""
        if exc is None:
            self.downloads.labels("succeeded", "none").inc()
        elif isinstance(exc, asyncio.CancelledError):
            self.downloads.labels("cancelled", "none").inc()
        else:
            self.downloads.labels("failed", download_failure(exc)).inc()


class ProxyMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.requests = self.counter(
            "swarmfly_proxy_requests",
            "Proxy requests by kind: blob (through the swarm), passthrough (registry API to the"
            " upstream), http_swarm, http_passthrough, connect, refused, failed (cut"
            " mid-stream)",
            ["kind"],
        )

    def count(self, kind: str) -> None:
        self.requests.labels(kind=kind).inc()


def download_failure(exc: BaseException) -> str:
    """The ``reason`` label of a failed download."""
    from swarmfly.services.peer.transfer import LocalDiskError  # the peer's, loaded with it

    if isinstance(exc, LocalDiskError):
        return "disk"
    if isinstance(exc, SwarmflyError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "internal"
