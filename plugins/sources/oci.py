"""The oci source: blobs and manifests of any OCI/Docker registry.

``oci://host[:port]/name@sha256:…`` is a blob (verified against its digest), and
``oci://host[:port]/name:tag`` a manifest by tag; ``oci+http://`` talks plain HTTP to a
registry without TLS. Registries' own ``/v2/<name>/blobs/<digest>`` URLs go through the
http source; both use the Bearer token flow of ``bearer.py``. Anonymous, Basic (an
``Authorization`` header) and Bearer (exchanged from Basic, or anonymous) auth all work.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from swarmfly.errors import SwarmflyError
from swarmfly.oci import MANIFEST_TYPES
from swarmfly.plugins import SourceRegistry, SourceStat, hookimpl
from swarmfly.plugins.sources.http import HttpSource

_REFERENCE = re.compile(
    r"^(?P<scheme>oci|oci\+http)://(?P<host>(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?)/"
    r"(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64})|:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))$"
)


@dataclass(frozen=True)
class Reference:
    url: str
    """The registry API URL the reference resolves to."""
    digest: str | None
    accept: str | None


def resolve(url: str) -> Reference:
    match = _REFERENCE.match(url)
    if match is None:
        raise SwarmflyError(
            "bad_request", "oci URLs look like oci://host/name@sha256:<hex> or oci://host/name:tag"
        )
    scheme = "http" if match["scheme"] == "oci+http" else "https"
    base = f"{scheme}://{match['host']}/v2/{match['name']}"
    if match["digest"]:
        return Reference(f"{base}/blobs/{match['digest']}", match["digest"], None)
    return Reference(f"{base}/manifests/{match['tag']}", None, MANIFEST_TYPES)


class OciSource:
    schemes: tuple[str, ...] = ("oci", "oci+http")

    def __init__(self, http: HttpSource | None = None) -> None:
        self.http = http or HttpSource()

    def _headers(self, reference: Reference, headers: Mapping[str, str]) -> dict[str, str]:
        out = dict(headers)
        if reference.accept and not any(k.lower() == "accept" for k in out):
            out["Accept"] = reference.accept
        return out

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        reference = resolve(url)
        stat = await self.http.stat(reference.url, self._headers(reference, headers))
        return SourceStat(stat.size, stat.ranges, stat.etag, reference.digest)

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        reference = resolve(url)
        async for chunk in self.http.fetch(
            reference.url, self._headers(reference, headers), start, end
        ):
            yield chunk

    async def close(self) -> None:
        await self.http.close()


@hookimpl
def swarmfly_register_sources(register: SourceRegistry) -> None:
    register.add(OciSource(HttpSource(guard=register.origins)))
