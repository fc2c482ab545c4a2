"""`swarmfly get --recursive`: every file below a prefix or repository folder, under one
directory.

The listing runs where the source's credentials are, as a download does: the host's peer
lists over its local socket (``services/peer/listing.py``); where none answers (or when
tracing), this process lists with its own plugins. ``layout`` checks every name before any
byte moves. Each file is then an ordinary `get` (``swarmfly.get.get_async``: its own task,
verified, renamed into place only when complete), ``jobs`` at once; the first failure starts
no more files, the ones under way finish, and the error carries the summary of what was
written.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmfly.errors import SwarmflyError
from swarmfly.get import get_async, socket_client
from swarmfly.get.layout import DEFAULT_JOBS, DEFAULT_MAX_FILES, MAX_JOBS, Planned, plan, shown
from swarmfly.get.request import GetRequest, PeerGone, Progress
from swarmfly.ids import redact_url
from swarmfly.listing import MAX_ENTRIES, entries, entry_from_dict
from swarmfly.placefile import exists_at
from swarmfly.plugintypes import SourceEntry

if TYPE_CHECKING:
    from swarmfly.config import Config


class PartlyDone(SwarmflyError):
    """A recursive get that stopped at a failed file: its error, and what was written."""

    def __init__(self, error: SwarmflyError, summary: dict[str, Any]) -> None:
        written, files = summary["written"], summary["files"]
        super().__init__(
            error.code,
            f"{error.message} ({written} of {files} files written under {summary['output']})",
            path=error.path,
        )
        self.summary = summary


@dataclass(frozen=True)
class RecursiveGet:
    request: GetRequest
    """``url`` the prefix or folder, ``output`` the directory; the rest goes with each file."""
    include: tuple[str, ...] = ()
    max_files: int = DEFAULT_MAX_FILES
    jobs: int = DEFAULT_JOBS


async def listing(
    config: Config, url: str, headers: dict[str, str]
) -> tuple[list[SourceEntry], str]:
    """The files below ``url`` and who listed them (``peer`` or ``in-process``), chosen as
    `get` chooses its way: the host's peer over its socket unless tracing, else here."""
    if not config.tracing:
        try:
            found = await asyncio.to_thread(
                socket_client.entries,
                config.state_dir,
                url,
                headers,
                MAX_ENTRIES,
                config.peer.socket,
            )
        except PeerGone:
            found = None
        if found is not None:
            try:
                return [entry_from_dict(item) for item in found], "peer"
            except ValueError as exc:
                raise SwarmflyError("internal", f"the local peer sent a bad entry: {exc}") from None
    from swarmfly.launch import load_plugins  # here: a listing by the peer loads no plugin

    plugins = load_plugins(config)
    try:
        return [entry async for entry in entries(plugins, url, headers)], "in-process"
    finally:
        await plugins.close()


def _inside(directory: Path, planned: list[Planned]) -> None:
    """Refuse a file whose folder, as it exists now, leads out of ``directory`` (a symlink
    already there): the names were checked, the directory's contents are the user's."""
    root = directory.resolve()
    for item in planned:
        folder = (directory / item.path).parent.resolve()
        if not folder.is_relative_to(root):
            raise SwarmflyError(
                "bad_request",
                f"{shown(item.entry.path)} would be written to {folder}, outside {directory}"
                " (a symbolic link there): refusing the listing",
            )


def _none_there(directory: Path, planned: list[Planned]) -> None:
    """Without --overwrite, a listing any of whose files exists already is refused whole,
    before any byte moves, as one file's get refuses its output."""
    there = [item for item in planned if exists_at(str(directory / item.path))]
    if there:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise SwarmflyError(
            "bad_request",
            f"{shown(there[0].entry.path)}{more} exist under {directory}: pass --overwrite to"
            " replace them (refusing the listing)",
        )


class _Tally:
    """One progress display for many files: bytes done of all, out of the listed sizes
    (None while one is not known). Called from the sockets' threads."""

    def __init__(self, progress: Progress | None, planned: list[Planned]) -> None:
        self.progress = progress
        sizes = [item.entry.size for item in planned]
        self.total = None if None in sizes else sum(s or 0 for s in sizes)
        self.done: dict[int, int] = {}
        self._lock = threading.Lock()

    def of(self, index: int) -> Progress:
        def report(done: int, _length: int | None) -> None:
            with self._lock:  # one bar: its redraws must not interleave
                self.done[index] = done
                if self.progress is not None:
                    self.progress(sum(self.done.values()), self.total)

        return report


async def get_tree(
    config: Config, job: RecursiveGet, progress: Progress | None = None, within: float | None = None
) -> dict[str, Any]:
    """The summary of every file written; ``PartlyDone`` when one failed."""
    started = time.monotonic()
    directory = job.request.output.absolute()
    if directory.exists() and not directory.is_dir():
        raise SwarmflyError("bad_request", f"{directory} is not a directory (-O names one with -r)")
    found, listed_by = await listing(config, job.request.url, job.request.headers)
    planned = plan(found, job.include, job.max_files)
    _inside(directory, planned)
    if not job.request.overwrite:
        _none_there(directory, planned)
    tally = _Tally(progress, planned)
    gate = asyncio.Semaphore(max(1, min(job.jobs, MAX_JOBS)))
    written: dict[int, dict[str, Any]] = {}
    failures: list[tuple[Planned, SwarmflyError]] = []

    async def one(index: int, item: Planned) -> None:
        async with gate:
            if failures:
                return
            request = replace(job.request, url=item.entry.url, output=directory / item.path)
            try:
                summary = await get_async(config, request, tally.of(index), within=within)
            except SwarmflyError as exc:
                failures.append((item, exc))
                return
            except TimeoutError:
                took = f"did not finish in {request.timeout:g}s"
                failures.append((item, SwarmflyError("timeout", took)))
                return
            written[index] = {"path": item.entry.path, **summary}

    await asyncio.gather(*(one(i, item) for i, item in enumerate(planned)))
    files = [written[i] for i in sorted(written)]
    summary: dict[str, Any] = {
        "url": redact_url(job.request.url),
        "output": str(directory),
        "listed_by": listed_by,
        "files": len(planned),
        "written": len(files),
        "content_length": sum(f["content_length"] or 0 for f in files),
        "bytes_origin": sum(f["bytes_origin"] for f in files),
        "bytes_p2p": sum(f["bytes_p2p"] for f in files),
        "seconds": round(time.monotonic() - started, 6),
        "entries": files,
    }
    if failures:
        item, error = failures[0]
        summary["failed"] = [
            {"path": failed.entry.path, **exc.to_dict()} for failed, exc in failures
        ]
        raise PartlyDone(
            SwarmflyError(
                error.code, f"{shown(item.entry.path)}: {error.message}", path=error.path
            ),
            summary,
        )
    return summary
