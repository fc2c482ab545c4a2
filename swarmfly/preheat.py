"""`swarmfly preheat`: put content into the cluster's cache before anyone pulls it.

``preheat url`` asks a storage instance to seed one URL. ``preheat image`` resolves an image
reference (an index to the platform's manifest) here, with the caller's credentials, then
asks storage to seed every blob of it (config and layers), a few at a time; the credentials
travel to storage in the request and are never logged or stored. Each blob is reported as it
finishes, progress within the running ones comes from the schedulers, and a summary is given
whether every blob made it or not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from swarmfly.bus import Bus
from swarmfly.cluster import connect
from swarmfly.config import Config
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import task_id
from swarmfly.launch import load_plugins
from swarmfly.oci import MANIFEST_TYPES

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 * 1024 * 1024
PARALLEL = 4
"""Blobs preheated at once: enough to keep storage busy without a thundering herd."""
POLL = 1.0
"""Seconds between looks at how far storage has got with the blobs it is fetching."""
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


@dataclass
class Summary:
    """What a preheat did, printed whether it finished or not."""

    total: int
    replies: list[dict[str, Any]] = field(default_factory=list)
    errors: list[SwarmflyError] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def cached(self) -> int:
        """Tasks storage already held: nothing read from the origin or from peers."""
        return sum(r["bytes_origin"] == 0 and r["bytes_p2p"] == 0 for r in self.replies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": len(self.replies),
            "failed": len(self.errors),
            "cached": self.cached,
            "bytes": sum(r["content_length"] for r in self.replies),
            "bytes_origin": sum(r["bytes_origin"] for r in self.replies),
            "seconds": round(self.seconds, 3),
            "task_ids": [r["task_id"] for r in self.replies],
        }

    def line(self, noun: str = "task") -> str:
        d = self.to_dict()
        failed = f", {d['failed']} failed" if d["failed"] else ""
        return (
            f"preheated {d['tasks']} of {self.total} {noun}(s){failed},"
            f" {d['bytes'] / 2**20:.1f} MiB"
            f" ({d['cached']} already cached, {d['bytes_origin'] / 2**20:.1f} MiB from the"
            f" origin) in {self.seconds:.1f}s"
        )


OnBlob = Callable[[Blob, "dict[str, Any] | SwarmflyError", Summary], None]
"""Called as each blob finishes: its reply, or its error."""
OnBytes = Callable[[int, "int | None"], None]
"""Bytes seeded so far (finished blobs, and what storage holds of running ones) and the
total when known: `swarmfly get`'s progress bar takes exactly this."""


async def _held(bus: Bus, task: str) -> int | None:
    """Bytes of ``task`` the seeding storage holds so far, as the schedulers know them:
    ``storage.preheat`` answers only at the end, ``scheduler.state`` (fanout, filtered to one
    task) says how far it has got."""
    asked = messages.StateRequest(task_id=task, limit=1)
    for reply in await bus.gather(messages.STATE, asked, wait=POLL / 2):
        for state in reply.tasks:
            content = state.task
            if state.id == task and content:
                pieces = max((p.pieces for p in state.peers if p.source), default=0)
                return min(content.content_length, pieces * content.piece_length)
    return None


async def preheat(
    config: Config,
    blobs: list[Blob],
    headers: dict[str, str],
    *,
    timeout: float,
    within: float | None = None,
    on_blob: OnBlob | None = None,
    on_bytes: OnBytes | None = None,
) -> Summary:
    """Seed every blob through storage, ``PARALLEL`` at a time; a blob that fails does not
    stop the others. ``on_bytes`` gets progress within blobs every ``POLL`` seconds.
    ``within``: the connect deadline (``cluster.connect``)."""
    started = time.monotonic()
    summary = Summary(len(blobs))
    sizes = [b.size for b in blobs]
    total = None if None in sizes else sum(s or 0 for s in sizes)
    running: dict[str, int] = {}
    """Task id -> bytes storage holds of it, for the running blobs whose task id is known."""
    bus = await connect(config, "swarmfly-preheat", within=within)
    gate = asyncio.Semaphore(PARALLEL)

    def seeded() -> int:
        finished: int = sum(r["content_length"] for r in summary.replies)
        return finished + sum(running.values())

    async def one(blob: Blob) -> None:
        async with gate:
            task = blob.task_id
            if task:
                running[task] = 0
            source = messages.Source(blob.url, headers or None, blob.digest or None)
            try:
                reply = (
                    await bus.request(
                        messages.PREHEAT,
                        messages.PreheatRequest(source, timeout),
                        timeout=timeout + 5,
                    )
                ).to_dict()
            except SwarmflyError as exc:
                summary.errors.append(exc)
                outcome: dict[str, Any] | SwarmflyError = exc
            else:
                summary.replies.append(reply)
                outcome = reply
            finally:
                running.pop(task or "", None)
        if on_blob is not None:
            on_blob(blob, outcome, summary)
        if on_bytes is not None:
            on_bytes(seeded(), total)

    async def watch() -> None:
        assert on_bytes is not None
        while True:
            await asyncio.sleep(POLL)
            for task in list(running):
                try:
                    held = await _held(bus, task)
                except SwarmflyError as exc:  # progress is a nicety: the preheat goes on
                    log.debug("no progress for %s: %s", task[:12], exc)
                    held = None
                if held is not None and task in running:
                    running[task] = held
            on_bytes(seeded(), total)

    watching = asyncio.create_task(watch()) if on_bytes is not None else None
    try:
        await asyncio.gather(*(one(blob) for blob in blobs))
    finally:
        if watching is not None:
            watching.cancel()
        await bus.close()
        summary.seconds = time.monotonic() - started
    return summary
