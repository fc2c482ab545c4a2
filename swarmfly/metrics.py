"""Prometheus metrics, names prefixed ``swarmfly_``, served on every service's /metrics."""

from __future__ import annotations

import asyncio
import platform
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
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

BUILD_INFO = Gauge(
    "swarmfly_build_info", "Always 1: the swarmfly and Python versions", ["version", "python"]
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

SCHEDULER_REGISTRATIONS = Counter("swarmfly_scheduler_registrations", "Peer registrations")
SCHEDULER_BACK_TO_SOURCE = Counter(
    "swarmfly_scheduler_back_to_source", "Peers told to read the origin themselves"
)
SCHEDULER_SCHEDULE_SECONDS = Histogram(
    "swarmfly_scheduler_schedule_duration_seconds",
    "Time to answer register and reschedule",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
SCHEDULER_HOSTS = Gauge("swarmfly_scheduler_hosts", "Hosts with live heartbeats")
SCHEDULER_TASKS = Gauge("swarmfly_scheduler_tasks", "Tasks with at least one peer")

PEER_DOWNLOAD_BYTES = Counter(
    "swarmfly_peer_download_bytes", "Verified bytes downloaded", ["source"]
)
PEER_DOWNLOADS = Counter(
    "swarmfly_peer_downloads",
    "Downloads (runs of a task: concurrent asks share one) that ended, by result: succeeded,"
    " failed, cancelled; and reason: the error code (not_found, source_error, integrity,"
    " timeout, unavailable, forbidden, bad_request, internal), disk (a local disk error), or"
    " none",
    ["result", "reason"],
)
PEER_DOWNLOADS.labels("succeeded", "none")  # a ratio of failures needs the series at 0
PEER_UPLOAD_BYTES = Counter("swarmfly_peer_upload_bytes", "Bytes served to children")
PEER_PIECE_SECONDS = Histogram(
    "swarmfly_peer_piece_duration_seconds",
    "Time to fetch and verify one piece",
    ["source"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PEER_PIECE_FAILURES = Counter(
    "swarmfly_peer_piece_failures",
    "Pieces that failed, by reason: corrupt, slow, failed (a parent), origin (a read of the"
    " origin)",
    ["reason"],
)
PEER_UPLOAD_REFUSED = Counter(
    "swarmfly_peer_upload_refused",
    "Piece and availability requests refused, by reason: capability (none, or not valid for"
    " the task), busy (no free upload place), displaced (a needier child took its place)",
    ["reason"],
)
PEER_GC_EVICTIONS = Counter("swarmfly_peer_gc_evictions", "Cached tasks evicted")
PEER_CACHE_BYTES = Gauge("swarmfly_peer_cache_bytes", "Bytes of cached tasks")
PEER_CACHE_TASKS = Gauge("swarmfly_peer_cache_tasks", "Cached tasks")
PROXY_REQUESTS = Counter(
    "swarmfly_proxy_requests",
    "Proxy requests by kind: blob (through the swarm), passthrough (registry API to the"
    " upstream), http_swarm, http_passthrough, connect, refused, failed (cut mid-stream)",
    ["kind"],
)
CONTRACT_FAILURES = Counter(
    "swarmfly_contract_validation_failures", "Requests refused by contract validation", ["subject"]
)


def count_download(exc: BaseException | None = None) -> None:
    """Count a download that ended: ``exc`` is why it did not succeed."""
    if exc is None:
        PEER_DOWNLOADS.labels("succeeded", "none").inc()
    elif isinstance(exc, asyncio.CancelledError):
        PEER_DOWNLOADS.labels("cancelled", "none").inc()
    else:
        PEER_DOWNLOADS.labels("failed", download_failure(exc)).inc()


def download_failure(exc: BaseException) -> str:
    """The ``reason`` label of a failed download."""
    from swarmfly.services.peer.conductor import LocalDiskError  # the peer's, loaded with it

    if isinstance(exc, LocalDiskError):
        return "disk"
    if isinstance(exc, SwarmflyError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "internal"


async def handler(request: web.Request) -> web.Response:
    from aiohttp import web

    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response
