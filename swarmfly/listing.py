"""Listing a prefix or folder for `swarmfly get --recursive`: one bounded loop over a source's
``entries``, run where the source's credentials are (the host's peer, answering on its local
socket, or the CLI's own plugins when no peer runs), and the entry's shape between the two.

What an origin lists is untrusted: here it is bounded (entries, bytes of a name or URL);
``swarmfly.get.layout`` decides which names may become files.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from swarmfly.errors import SwarmflyError
from swarmfly.ids import redact_url
from swarmfly.plugintypes import Lister, SourceEntry

if TYPE_CHECKING:
    from swarmfly.pluginhost import Plugins

MAX_ENTRIES = 100_000
"""Files one listing may name: beyond, it is refused (name a narrower prefix or folder)."""
MAX_PATH_BYTES = 1024
"""Bytes of one listed path (UTF-8): far beyond real keys, far below a line's bound."""
MAX_URL_BYTES = 8192


def entry_to_dict(entry: SourceEntry) -> dict[str, Any]:
    data: dict[str, Any] = {"path": entry.path, "url": entry.url}
    if entry.size is not None:
        data["size"] = entry.size
    if entry.digest is not None:
        data["digest"] = entry.digest
    return data


def entry_from_dict(data: Mapping[str, Any]) -> SourceEntry:
    """An entry from a peer's line; ValueError for anything else."""
    path, url, size, digest = (data.get(k) for k in ("path", "url", "size", "digest"))
    if not isinstance(path, str) or not isinstance(url, str):
        raise ValueError("an entry has a path and a URL")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise ValueError("an entry's size is a whole number of bytes")
    if digest is not None and not isinstance(digest, str):
        raise ValueError("an entry's digest is a string")
    return SourceEntry(path, url, size, digest)


def lister_for(plugins: Plugins, url: str) -> Lister:
    source = plugins.source_for(url)
    if not isinstance(source, Lister):
        scheme = urlsplit(url).scheme.lower()
        raise SwarmflyError(
            "bad_request", f"the {scheme} source cannot list a prefix: --recursive needs one"
        )
    return source


async def entries(
    plugins: Plugins, url: str, headers: Mapping[str, str], limit: int = MAX_ENTRIES
) -> AsyncIterator[SourceEntry]:
    """The files below ``url``, as its source lists them; ``bad_request`` once there are
    more than ``limit`` or a name is too long (the source's stream is closed then)."""
    await plugins.origins.check(url)
    source = lister_for(plugins, url)
    count = 0
    listed = cast(AsyncGenerator[SourceEntry, None], source.entries(url, headers))
    async with aclosing(listed) as stream:
        async for entry in stream:
            count += 1
            if count > limit:
                raise SwarmflyError(
                    "bad_request",
                    f"{redact_url(url)} lists more than {limit} files: name a narrower prefix"
                    " or folder",
                )
            if len(entry.path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
                raise SwarmflyError(
                    "bad_request",
                    f"the listing names a file of more than {MAX_PATH_BYTES} bytes"
                    f" ({entry.path[:60]!r}…): refusing it",
                )
            if len(entry.url) > MAX_URL_BYTES:
                raise SwarmflyError(
                    "bad_request", f"the listing gave a URL of {len(entry.url)} bytes"
                )
            yield entry
