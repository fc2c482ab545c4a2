"""`swarmfly preheat`: put content into the cluster's cache before anyone pulls it.

``preheat url`` preheats one URL. ``preheat image`` resolves an image reference (an index to
the platform's manifest) here, with the caller's credentials, then preheats every blob of it
(config and layers), a few requests at a time; the credentials travel to the hosts in the
request and are never logged or stored. Where it lands is its ``Scope``: the task's home
storage (``seed``), every storage instance (``all-seeds``, the others copying from the
swarm), or every live peer or a rendezvous-chosen share of them (``all-peers``, each
downloading through the swarm). The hosts doing it report their progress themselves, on
``preheat.{job}.progress``; each blob is reported as it finishes on a host, and a summary,
naming each host that failed and why, is given whether every blob made it or not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import platform
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from swarmfly import contracts
from swarmfly.cluster import connect
from swarmfly.config import Config
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import redact_url, task_id
from swarmfly.launch import load_plugins
from swarmfly.oci import MANIFEST_TYPES
from swarmfly.placement import rendezvous

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 * 1024 * 1024
PARALLEL = 4
"""Requests in flight at once by default (``--concurrency``): blobs to storage, or blob and
peer pairs: enough to keep the hosts busy without a thundering herd."""
_REFERENCE = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>[A-Za-z0-9.-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?)/"
    r"(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?\Z"
)
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class ImageRef:
    base: str
    """``scheme://host[:port]`` of the registry API."""
    name: str
    reference: str
    """A tag or a ``sha256:`` digest."""

    def url(self, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{self.name}/{kind}/{reference}"


@dataclass(frozen=True)
class Blob:
    """One thing to seed: a URL, with the digest and size an image manifest gives."""

    url: str
    digest: str | None = None
    size: int | None = None

    @property
    def name(self) -> str:
        """How a line names it: its digest's start, or its URL without credentials."""
        return self.digest[:19] if self.digest else redact_url(self.url)

    @property
    def task_id(self) -> str | None:
        """The task storage seeds it as, when the digest names it (as it does for a blob)."""
        return task_id(self.url, digest=self.digest) if self.digest else None


def parse_image(text: str, *, plain_http: bool = False) -> ImageRef:
    """``[http(s)://]host[:port]/name[:tag][@digest]``; Docker Hub as ``docker.io/…``."""
    match = _REFERENCE.match(text.strip())
    host = match["host"] if match else ""
    if match is None or not ("." in host or ":" in host or host == "localhost"):
        raise SwarmflyError(
            "bad_request",
            "an image looks like registry.example.com/name:tag or …@sha256:<hex>"
            " (docker.io/name for Docker Hub)",
        )
    name = match["name"]
    if host in ("docker.io", "index.docker.io"):
        host = "registry-1.docker.io"
        name = name if "/" in name else f"library/{name}"
    scheme = match["scheme"] or ("http" if plain_http else "https")
    return ImageRef(f"{scheme}://{host}", name, match["digest"] or match["tag"] or "latest")


def basic_auth(username: str, password: str) -> dict[str, str]:
    credential = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credential}"}


def auth_from_file(path: Path, registry_host: str) -> dict[str, str]:
    """Credentials for a registry from a Docker ``config.json`` or containers ``auth.json``."""
    try:
        auths = json.loads(path.read_text()).get("auths", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise SwarmflyError("bad_request", f"cannot read the auth file: {exc}") from None
    aliases = {registry_host}
    if registry_host == "registry-1.docker.io":
        aliases |= {"docker.io", "index.docker.io", "https://index.docker.io/v1/"}
    for key, entry in auths.items():
        host = re.sub(r"^https?://", "", key).split("/", 1)[0]
        if (key in aliases or host in aliases) and isinstance(entry, dict) and entry.get("auth"):
            return {"Authorization": f"Basic {entry['auth']}"}
    raise SwarmflyError("bad_request", f"the auth file has no credentials for {registry_host}")


def host_platform() -> str:
    machine = platform.machine().lower()
    return f"linux/{_ARCH.get(machine, machine)}"


def _pick_platform(index: dict[str, Any], wanted: str) -> str:
    os_name, _, rest = wanted.partition("/")
    arch, _, variant = rest.partition("/")
    for entry in index.get("manifests", []):
        found = entry.get("platform", {})
        if (
            found.get("os") == os_name
            and found.get("architecture") == arch
            and (not variant or found.get("variant") == variant)
        ):
            return str(entry["digest"])
    raise SwarmflyError("not_found", f"the image has no manifest for {wanted}")


async def resolve(
    ref: ImageRef, headers: dict[str, str], wanted_platform: str, config: Config
) -> list[Blob]:
    """Every blob of the image for the platform, config first, then layers."""
    plugins = load_plugins(config)
    try:
        source = plugins.source_for(ref.base)
        reference = ref.reference
        for _ in range(2):  # an index, then the platform's manifest
            body = bytearray()
            async for chunk in source.fetch(
                ref.url("manifests", reference), {**headers, "Accept": MANIFEST_TYPES}
            ):
                body += chunk
                if len(body) > MAX_MANIFEST:
                    raise SwarmflyError("source_error", "the manifest is too large")
            try:
                manifest = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise SwarmflyError("source_error", "the manifest is not JSON") from None
            if "manifests" in manifest:
                reference = _pick_platform(manifest, wanted_platform)
                continue
            if "layers" not in manifest or "config" not in manifest:
                raise SwarmflyError("source_error", "not an image manifest")
            blobs = [manifest["config"], *manifest["layers"]]
            return [
                Blob(ref.url("blobs", str(b["digest"])), str(b["digest"]), int(b.get("size", 0)))
                for b in blobs
            ]
        raise SwarmflyError("source_error", "an index points at another index")
    finally:
        await plugins.close()


SCOPES = ("seed", "all-seeds", "all-peers")
"""Where a preheat lands (Dragonfly's preheat scopes): the task's home storage (and its
``[storage] copies``), every live storage instance, or every live peer (or ``--count`` /
``--percentage`` of them)."""
MAX_CONCURRENCY = 64
MAX_COUNT = 10000
MAX_ITEMS = 10000
"""Blobs one job may preheat: the progress events' item numbers."""


@dataclass(frozen=True)
class Scope:
    """Which hosts a preheat lands on, and how many requests are in flight at once."""

    name: str = "seed"
    count: int | None = None
    percentage: int | None = None
    concurrency: int = PARALLEL

    def __post_init__(self) -> None:
        if self.name not in SCOPES:
            raise SwarmflyError("bad_request", f"--scope is one of {', '.join(SCOPES)}")
        if self.count is not None and self.percentage is not None:
            raise SwarmflyError("bad_request", "give --count or --percentage, not both")
        if (self.count is not None or self.percentage is not None) and self.name != "all-peers":
            raise SwarmflyError(
                "bad_request", "--count and --percentage choose peers: use --scope all-peers"
            )
        if self.count is not None and not 1 <= self.count <= MAX_COUNT:
            raise SwarmflyError("bad_request", f"--count is 1 to {MAX_COUNT}")
        if self.percentage is not None and not 1 <= self.percentage <= 100:
            raise SwarmflyError("bad_request", "--percentage is 1 to 100")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise SwarmflyError("bad_request", f"--concurrency is 1 to {MAX_CONCURRENCY}")

    def choose(self, key: str, peers: set[str]) -> list[str]:
        """The peers to preheat on: the first of ``peers`` in rendezvous order of ``key`` (the
        job's first task), so the same job picks the same peers while they live, and every
        blob of an image lands on the same ones."""
        order = rendezvous(key, peers)[:MAX_COUNT]
        if self.count is not None:
            return order[: self.count]
        if self.percentage is not None:
            return order[: max(1, math.ceil(len(order) * self.percentage / 100))]
        return order


@dataclass
class Summary:
    """What a preheat did, printed whether it finished or not: per blob, every host that was
    to hold it and what it answered."""

    total: int
    scope: str = "seed"
    replies: list[dict[str, Any]] = field(default_factory=list)
    """Every reply: one per blob from storage (its replicas inside), one per blob and peer."""
    errors: list[SwarmflyError] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Each host that does not hold a blob it was to: host_id, blob, code, message."""
    hosts: set[str] = field(default_factory=set)
    """The hosts asked to hold the blobs (for the storage scopes: those that answered)."""
    seconds: float = 0.0
    _done: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    _failed: set[int] = field(default_factory=set)

    def succeeded(self, item: int, name: str, reply: dict[str, Any]) -> None:
        """A host holds blob ``item``; a storage reply names replicas that failed too."""
        self.replies.append(reply)
        self._done.setdefault(item, []).append(reply)
        self.hosts |= {reply["host_id"], *reply.get("replicas", ())}
        for failure in reply.get("failed", ()):
            error = SwarmflyError(failure["code"], failure["message"])
            self.fail(item, failure["host_id"], name, error)

    def fail(self, item: int, host: str, name: str, error: SwarmflyError) -> None:
        self._failed.add(item)
        if host != "storage":
            self.hosts.add(host)
        self.failures.append(
            {"host_id": host, "item": item, "blob": name, "code": error.code}
            | {"message": error.message}
        )
        self.errors.append(error)

    @property
    def preheated(self) -> list[list[dict[str, Any]]]:
        """The replies of each blob every host it was meant for holds."""
        return [r for item, r in sorted(self._done.items()) if item not in self._failed]

    @property
    def cached(self) -> int:
        """Blobs every host already held: nothing read from the origin or from peers."""
        return sum(
            all(r["bytes_origin"] == 0 and r["bytes_p2p"] == 0 for r in replies)
            for replies in self.preheated
        )

    def to_dict(self) -> dict[str, Any]:
        done = self.preheated
        return {
            "tasks": len(done),
            "failed": len(self._failed),
            "cached": self.cached,
            "bytes": sum(replies[0]["content_length"] for replies in done),
            "bytes_origin": sum(r["bytes_origin"] for r in self.replies),
            "seconds": round(self.seconds, 3),
            "task_ids": [replies[0]["task_id"] for replies in done],
            "scope": self.scope,
            "hosts": sorted(self.hosts),
            "failures": [
                {k: v for k, v in f.items() if k != "item"}
                for f in sorted(self.failures, key=lambda f: (f["item"], f["host_id"]))
            ],
        }

    def line(self, noun: str = "task") -> str:
        d = self.to_dict()
        failed = f", {d['failed']} failed" if d["failed"] else ""
        where = "" if self.scope == "seed" else f" on {len(self.hosts)} host(s) ({self.scope})"
        return (
            f"preheated {d['tasks']} of {self.total} {noun}(s){where}{failed},"
            f" {d['bytes'] / 2**20:.1f} MiB"
            f" ({d['cached']} already cached, {d['bytes_origin'] / 2**20:.1f} MiB from the"
            f" origin) in {self.seconds:.1f}s"
        )


OnBlob = Callable[[Blob, str, "dict[str, Any] | SwarmflyError", Summary], None]
"""Called as each blob finishes on a host (the storage scopes: the host id ``storage`` for
a blob that failed before any instance held it): its reply, or its error."""
OnBytes = Callable[[int, "int | None"], None]
"""Bytes preheated so far, as the hosts report them, and the total when known: `swarmfly
get`'s progress bar takes exactly this."""
OnEvent = Callable[[Blob, str, messages.PreheatProgressRequest], None]
"""Each progress event a host sends: the blob, the host's id, what it says."""


def job_id() -> str:
    """The token a preheat's hosts report under (``preheat.{job}.progress``)."""
    return f"ph-{secrets.token_hex(8)}"


async def preheat(
    config: Config,
    blobs: list[Blob],
    headers: dict[str, str],
    *,
    timeout: float,
    scope: Scope | None = None,
    within: float | None = None,
    on_blob: OnBlob | None = None,
    on_bytes: OnBytes | None = None,
    on_event: OnEvent | None = None,
) -> Summary:
    """Preheat every blob on the hosts of ``scope``, ``scope.concurrency`` requests at a time;
    a blob or host that fails does not stop the others. The hosts doing it report their
    progress on ``preheat.{job}.progress``, which feeds ``on_event`` and ``on_bytes``; the
    summary comes from their replies. ``within``: the connect deadline (``cluster.connect``)."""
    scope = scope or Scope()
    if len(blobs) > MAX_ITEMS:
        raise SwarmflyError("bad_request", f"a preheat takes at most {MAX_ITEMS} blobs")
    started = time.monotonic()
    summary = Summary(len(blobs), scope.name)
    sizes = [b.size for b in blobs]
    held: dict[tuple[int, str], int] = {}
    """(blob, host) -> verified bytes the host reported."""
    job = job_id()
    bus = await connect(config, "swarmfly-preheat", within=within)
    hosts: list[str] = []

    def seeded() -> int:
        if scope.name == "all-peers":
            return sum(held.values())
        best: dict[int, int] = {}  # storage: how far the furthest instance is with each blob
        for (item, _), done in held.items():
            best[item] = max(best.get(item, 0), done)
        return sum(best.values())

    def total() -> int | None:
        if None in sizes:
            return None
        return sum(s or 0 for s in sizes) * (len(hosts) if scope.name == "all-peers" else 1)

    def heard(event: messages.PreheatProgressRequest, sender: contracts.Sender | None) -> None:
        if sender is None or event.item >= len(blobs):
            return
        key = (event.item, sender.host_id)
        if event.state != "failed":
            held[key] = max(held.get(key, 0), event.completed_bytes)
        if on_event is not None:
            on_event(blobs[event.item], sender.host_id, event)
        if on_bytes is not None:
            on_bytes(seeded(), total())

    def finished(item: int, host: str, outcome: dict[str, Any] | SwarmflyError) -> None:
        blob = blobs[item]
        if isinstance(outcome, SwarmflyError):
            summary.fail(item, host, blob.name, outcome)
        else:
            summary.succeeded(item, blob.name, outcome)
            held[(item, outcome["host_id"])] = outcome["content_length"]
        if on_blob is not None:
            on_blob(blob, host, outcome, summary)
        if on_bytes is not None:
            on_bytes(seeded(), total())

    async def to_storage(item: int, blob: Blob) -> None:
        source = messages.Source(blob.url, headers or None, blob.digest or None)
        request = messages.PreheatRequest(
            source,
            timeout,
            scope=None if scope.name == "seed" else "all-seeds",
            progress=messages.PreheatProgressTo(job, item),
        )
        try:
            reply = await bus.request(messages.PREHEAT, request, timeout=timeout + 5)
        except SwarmflyError as exc:
            finished(item, "storage", exc)
        else:
            finished(item, reply.host_id, reply.to_dict())

    async def to_peer(item: int, blob: Blob, host: str) -> None:
        source = messages.Source(blob.url, headers or None, blob.digest or None)
        request = messages.PeerPreheatRequest(
            source, timeout, progress=messages.PreheatProgressTo(job, item)
        )
        try:
            reply = await bus.request(
                messages.PEER_PREHEAT, request, timeout=timeout + 5, host_id=host
            )
        except SwarmflyError as exc:
            finished(item, host, exc)
        else:
            finished(item, host, reply.to_dict())

    async def run(work: Iterator[Awaitable[None]]) -> None:
        """``scope.concurrency`` workers take the requests in turn: no more in flight, and
        none made before a worker is free for it (a job may be blobs times peers long)."""

        async def worker() -> None:
            for one in work:
                await one

        await asyncio.gather(*(worker() for _ in range(scope.concurrency)))

    try:
        stop = await bus.listen(
            messages.PREHEAT_PROGRESS, heard, every=(contracts.SENDER,), job=job
        )
        try:
            if scope.name == "all-peers":
                peers = await bus.hosts_of("peer")
                if not peers:
                    raise SwarmflyError("unavailable", "no peer answers: nothing to preheat on")
                first = blobs[0]
                hosts = scope.choose(first.task_id or task_id(first.url), peers)
                summary.hosts = set(hosts)
                await run(to_peer(i, blob, host) for i, blob in enumerate(blobs) for host in hosts)
            else:
                await run(to_storage(i, blob) for i, blob in enumerate(blobs))
        finally:
            await stop()
    finally:
        await bus.close()
        summary.seconds = time.monotonic() - started
    return summary
