"""`swarmfly preheat`: put content into the cluster's cache before anyone pulls it.

``preheat url`` asks a storage instance to seed one URL. ``preheat image`` resolves an image
reference (an index to the platform's manifest) here, with the caller's credentials, then
asks storage to seed every blob of it (config and layers), a few at a time; the credentials
travel to storage in the request and are never logged or stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from swarmfly.bus import Bus
from swarmfly.cluster import connect
from swarmfly.config import Config
from swarmfly.errors import SwarmflyError
from swarmfly.plugins.sources.oci import MANIFEST_TYPES
from swarmfly.runtime import load_plugins

MAX_MANIFEST = 4 * 1024 * 1024
PARALLEL = 4
"""Blobs preheated at once: enough to keep storage busy without a thundering herd."""
_REFERENCE = re.compile(
    r"^(?:(?P<scheme>https?)://)?(?P<host>[A-Za-z0-9.-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?)/"
    r"(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?\Z"
)
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

Report = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ImageRef:
    base: str
    """``scheme://host[:port]`` of the registry API."""
    name: str
    reference: str
    """A tag or a ``sha256:`` digest."""

    def url(self, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{self.name}/{kind}/{reference}"


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
) -> list[tuple[str, int]]:
    """(digest, size) of every blob of the image for the platform: config first, then layers."""
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
            return [(str(b["digest"]), int(b.get("size", 0))) for b in blobs]
        raise SwarmflyError("source_error", "an index points at another index")
    finally:
        await plugins.close()


async def _preheat_one(
    bus: Bus, url: str, headers: dict[str, str], digest: str | None, timeout: float
) -> dict[str, Any]:
    source: dict[str, Any] = {"url": url}
    if headers:
        source["headers"] = headers
    if digest:
        source["digest"] = digest
    return await bus.request(
        "storage.preheat", {"source": source, "timeout_s": timeout}, timeout=timeout + 5
    )


async def preheat(
    config: Config,
    urls: list[tuple[str, str | None]],
    headers: dict[str, str],
    *,
    timeout: float,
    report: Report | None = None,
) -> dict[str, Any]:
    """Seed each (url, digest) through storage; returns the summary."""
    started = time.monotonic()
    bus = await connect(config, "swarmfly-preheat")
    gate = asyncio.Semaphore(PARALLEL)
    done: list[dict[str, Any]] = []

    async def one(url: str, digest: str | None) -> None:
        async with gate:
            reply = await _preheat_one(bus, url, headers, digest, timeout)
        done.append(reply)
        if report is not None:
            report({**reply, "done": len(done), "total": len(urls)})

    try:
        async with asyncio.TaskGroup() as group:
            for url, digest in urls:
                group.create_task(one(url, digest))
    except* SwarmflyError as failures:
        raise failures.exceptions[0] from None
    finally:
        await bus.close()
    return {
        "tasks": len(done),
        "bytes": sum(r["content_length"] for r in done),
        "bytes_origin": sum(r["bytes_origin"] for r in done),
        "seconds": round(time.monotonic() - started, 3),
        "task_ids": [r["task_id"] for r in done],
    }
