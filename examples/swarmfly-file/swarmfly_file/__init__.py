"""A swarmfly source for file:// URLs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from swarmfly.plugins import SourceRegistry, SourceStat, SwarmflyError, hookimpl

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """``[plugins.file]`` in swarmfly's configuration file."""

    roots: list[str] = field(default_factory=list)
    """Directories file:// URLs may name (links resolved); none: any file this user reads."""


class FileSource:
    schemes: tuple[str, ...] = ("file",)

    def __init__(self, roots: list[str] | tuple[str, ...] = ()) -> None:
        self.roots = [os.path.realpath(root) for root in roots]

    def _path(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise SwarmflyError("bad_request", "file:// URLs must name a local path")
        path = unquote(parts.path)
        real = os.path.realpath(path)
        if self.roots and not any(os.path.commonpath([real, r]) == r for r in self.roots):
            raise SwarmflyError("forbidden", "the file is outside [plugins.file] roots")
        return path

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        try:
            info = await asyncio.to_thread(os.stat, self._path(url))
        except FileNotFoundError:
            raise SwarmflyError("not_found", "no such file") from None
        except OSError as exc:
            raise SwarmflyError("source_error", exc.strerror or "cannot read file") from None
        return SourceStat(size=info.st_size, ranges=True, etag=f'"{info.st_mtime_ns}"')

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        try:
            fd = await asyncio.to_thread(os.open, self._path(url), os.O_RDONLY)
        except OSError as exc:
            raise SwarmflyError("source_error", exc.strerror or "cannot read file") from None
        try:
            size = os.fstat(fd).st_size
            end = size if end is None else end
            if end > size:
                raise SwarmflyError("source_error", "range past the end of the file")
            offset = start
            while offset < end:
                chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - offset), offset)
                if not chunk:
                    raise SwarmflyError("source_error", "file shrank while reading")
                offset += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def close(self) -> None:
        """Nothing pooled: files are opened per fetch."""


@hookimpl
def swarmfly_settings_class() -> type[Settings]:
    return Settings


@hookimpl
def swarmfly_register_sources(register: SourceRegistry, settings: Settings) -> None:
    register.add(FileSource(settings.roots))
