"""The download through its narrow interfaces alone (``links``): a scheduler that answers as
a restarted one does, an origin in memory, a real store in a temporary folder; no socket.

What the fault test ``test_a_scheduler_restart_does_not_fail_a_download`` meets now and
then, made certain: the new scheduler does not know the download (``not_found`` to a
reschedule) and, still starting, does not answer its register either (``unavailable``).
The download waits for it and finishes, as with any scheduler that does not answer."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from plugins.strategies.builtin import rarest_first
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Rep, Req, Subject
from swarmfly.errors import SwarmflyError
from swarmfly.metrics import PeerMetrics
from swarmfly.plugintypes import SourceStat
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.conductor import Conductor
from swarmfly.services.peer.links import DownloadSettings, HostBudget, Links, Offers
from swarmfly.services.peer.store import StoredTask, TaskStore

MiB = 1024 * 1024
DATA = bytes(range(256)) * (3 * MiB // 256) + b"tail"
URL = "https://origin.example/f.bin"


@dataclass
class RestartedScheduler:
    """A ``SchedulerLink`` whose scheduler restarted: the first register is answered, then a
    reschedule finds the download unknown, the register after it meets a scheduler still
    starting (``starting`` times), and from then on it sends the download to the origin."""

    starting: int = 1
    asked: list[str] = field(default_factory=list)
    reported: list[tuple[int, str | None]] = field(default_factory=list)
    """Each piece report heard, in order."""

    async def request(self, subject: Subject[Req, Rep], message: Req) -> Rep:
        name = subject.name.rsplit(".", 1)[-1]
        self.asked.append(name)
        if isinstance(message, messages.PiecesRequest):
            self.reported.extend((p.number, p.digest) for p in message.pieces)
        if name == "register" and self.asked.count("register") == 1:
            return messages.Schedule("parents", [])  # type: ignore[return-value]
        if name == "reschedule" and "not_found" not in self.asked:
            self.asked.append("not_found")
            raise SwarmflyError("not_found", "unknown peer")
        if name == "register" and self.starting > 0:
            self.starting -= 1
            raise SwarmflyError("unavailable", "the scheduler is starting")
        if name in ("register", "reschedule"):
            return messages.Schedule("back_to_source", [])  # type: ignore[return-value]
        if name == "pieces":
            return messages.ReportReply(True)  # type: ignore[return-value]
        raise SwarmflyError("unavailable", "the scheduler is starting")

    def schedulers_answer(self) -> bool:
        return True  # it answers, if only to say it is starting

    async def announce(
        self, stored: StoredTask, *, peer_id: str | None = None, seed: bool = False
    ) -> None:
        return None

    def host(self) -> messages.Host:
        return messages.Host("h1", "127.0.0.1", 1, "normal")


class NoParents:
    """A ``PieceClient`` no download here reaches: the scheduler names no parent."""

    async def offers(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        raise AssertionError("no parent was scheduled")

    def piece(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        read_timeout: float,
    ) -> AbstractAsyncContextManager[tuple[int, AsyncIterator[bytes]]]:
        raise AssertionError("no parent was scheduled")

    async def hand_back(
        self,
        address: str,
        task_id: str,
        number: int,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        raise AssertionError("nothing was lent")


class MemoryOrigin:
    """An ``OriginReader`` over bytes held here; counts what it served."""

    def __init__(self) -> None:
        self.served = 0

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        assert url == URL
        chunk = DATA[start:end]
        self.served += len(chunk)
        yield chunk


def conductor(tmp_path: Path, scheduler: Any, origin: MemoryOrigin) -> Conductor:
    links = Links(
        scheduler=scheduler,
        parents=NoParents(),
        settings=DownloadSettings(
            concurrency=4, per_parent=2, piece_timeout=10, origin_concurrency=2
        ),
        budget=HostBudget(TokenBucket(0), lambda: 1),
        clock=time.monotonic,
        metrics=PeerMetrics(),
    )
    task_id = hashlib.sha256(b"restart").hexdigest()
    digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
    return Conductor(
        links,
        task_id,
        SourceRequest(URL, digest=digest, piece_length=MiB),
        stored=TaskStore(tmp_path / "tasks").open(task_id, URL),
        peer_id="p" + "0" * 24,
        strategy=rarest_first,
        origin=origin,
        seed=False,
        stat=SourceStat(len(DATA), ranges=True, etag='"v1"'),
    )


@pytest.mark.timeout(60)
async def test_a_restarted_scheduler_that_is_still_starting_does_not_fail_the_download(
    tmp_path: Path,
) -> None:
    scheduler, origin = RestartedScheduler(), MemoryOrigin()
    download = conductor(tmp_path, scheduler, origin)
    async with asyncio.timeout(45):
        await download.run()
    assert download.stored.complete
    assert download.file_digest == "sha256:" + hashlib.sha256(DATA).hexdigest()
    assert origin.served == len(DATA) and download.bytes_origin == len(DATA)
    assert scheduler.starting == 0, "it met the scheduler still starting"
    assert scheduler.asked[:3] == ["register", "reschedule", "not_found"]


@pytest.mark.timeout(60)
async def test_without_back_to_source_the_same_download_fails_and_reads_nothing(
    tmp_path: Path,
) -> None:
    """dfget's --disable-back-to-source, where the scheduler says "the origin"."""
    scheduler, origin = RestartedScheduler(starting=0), MemoryOrigin()
    download = conductor(tmp_path, scheduler, origin)
    download.back_to_source = False
    with pytest.raises(SwarmflyError) as raised:
        async with asyncio.timeout(45):
            await download.run()
    assert raised.value.code == "not_found"
    assert "--disable-back-to-source" in raised.value.message
    assert origin.served == 0 and not download.stored.done


@pytest.mark.timeout(60)
async def test_a_resumed_download_tells_a_scheduler_that_forgot_it_what_it_held(
    tmp_path: Path,
) -> None:
    """A register names the pieces held only; a scheduler that forgot the task since (every
    peer of it left, or it restarted) hears their digests too, or the children it sends to
    this host would wait on digests that never come."""
    scheduler, origin = RestartedScheduler(starting=0), MemoryOrigin()
    download = conductor(tmp_path, scheduler, origin)
    stored = download.stored
    stored.set_content(download.origin.stat_content(len(DATA)))
    held = {n: stored.write_piece(n, DATA[n * MiB : (n + 1) * MiB], None) for n in (0, 2)}
    for number, digest in held.items():
        stored.mark_done(number, digest)
    async with asyncio.timeout(45):
        await download.run()
    assert stored.complete and origin.served == len(DATA) - 2 * MiB
    # Told at first, and again to the scheduler that forgot the download.
    assert scheduler.reported[:2] == sorted(held.items())
    assert scheduler.reported.count((2, held[2])) == 2
