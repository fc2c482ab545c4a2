"""Integrity against cluster members: a host with the access any member has tries to make
others deliver, cache or serve bytes the origin did not send (issue 12's attacks 1-4).

Real nats-server, scheduler, storage and peer in their own processes, a real HTTP origin, and
a forger made of a NATS client plus a small HTTP server that serves its own bytes as pieces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import orjson
import pytest
from aiohttp import web

from swarmfly import bitmap, contracts, ids
from swarmfly.bus import Bus
from swarmfly.content import piece_count, piece_length_for
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Rep, Req, Subject
from swarmfly.errors import SwarmflyError
from swarmfly.ids import task_id
from swarmfly.testing import subject_tokens
from tests.integration.test_swarm import Cluster, get, sha256

MiB = 1024 * 1024
pytestmark = pytest.mark.slow


FORGER_HOST = "forger-host"


class Forger:
    """A cluster member that claims a task: it registers first, states its own content and
    piece digests, serves its own bytes to anyone who asks and says it succeeded. It speaks
    only for itself (its own host on the subject, its own peer): what any member can do."""

    def __init__(self, bus: Bus, task: str, forged: bytes, port: int) -> None:
        self.bus, self.task, self.forged, self.port = bus, task, forged, port
        self.length = piece_length_for(len(forged))
        self.count = piece_count(len(forged), self.length)
        self.sender = contracts.Sender("normal", FORGER_HOST)
        self.peer_id = ids.peer_id(FORGER_HOST, task)
        self.served = 0
        self.lent: list[int] = []
        self.refused: list[tuple[str, str]] = []
        """The scheduler's refusals, by subject and error code."""

    @property
    def host(self) -> messages.Host:
        return messages.Host(id=FORGER_HOST, ip="127.0.0.1", port=self.port, type="normal")

    def content(self) -> messages.TaskContent:
        return messages.TaskContent(
            content_length=len(self.forged),
            piece_length=self.length,
            piece_count=self.count,
        )

    def piece(self, number: int) -> bytes:
        return self.forged[number * self.length : (number + 1) * self.length]

    async def request(
        self, subject: Subject[Req, Rep], message: Req, sender: contracts.Sender | None = None
    ) -> Rep | None:
        """Send as this member's host (or as ``sender``, another host of the member's)."""
        tokens = subject_tokens(subject.name, {}, self.task, sender=sender or self.sender)
        try:
            return await self.bus.request(subject, message, **tokens)
        except SwarmflyError as exc:  # refused: the scheduler may; the forger goes on
            self.refused.append((subject.name, exc.code))
            return None

    async def heartbeat(self) -> None:
        await self.bus.request(
            messages.HEARTBEAT,
            messages.HeartbeatRequest(host=self.host, uploads=0),
            **subject_tokens(messages.HEARTBEAT.name, {}, sender=self.sender),
        )

    async def claim(self, url: str, *, seed: bool = True) -> None:
        await self.heartbeat()
        registered = await self.request(
            messages.REGISTER,
            messages.RegisterRequest(
                task_id=self.task,
                peer_id=self.peer_id,
                host=self.host,
                source=messages.Source(url=url),
                pieces=list(range(self.count)),
                task=self.content(),
                seed=seed,
            ),
        )
        # The claim is taken as any member's registration: the attack runs.
        assert registered is not None, self.refused
        await self.report(range(self.count))
        done = messages.ResultRequest(task_id=self.task, peer_id=self.peer_id, success=True)
        await self.request(messages.RESULT, done)

    async def report(self, numbers: range | list[int]) -> None:
        pieces = [messages.PieceReport(number=n, digest=sha256(self.piece(n))) for n in numbers]
        await self.request(
            messages.PIECES,
            messages.PiecesRequest(
                task_id=self.task,
                peer_id=self.peer_id,
                pieces=pieces,
                task=self.content(),
            ),
        )

    async def pieces(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "version": 1,
                "piece_count": self.count,
                "complete": True,
                "pieces": list(range(self.count)),
            }
        )

    async def data(self, request: web.Request) -> web.Response:
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        body = self.forged[int(first) : int(last) + 1]
        self.served += len(body)
        return web.Response(
            status=206,
            body=body,
            headers={"Content-Range": f"bytes {first}-{last}/{len(self.forged)}"},
        )


F = TypeVar("F", bound=Forger)


@asynccontextmanager
async def forger(bus: Bus, task: str, forged: bytes, kind: type[F]) -> AsyncIterator[F]:
    """A member of ``kind`` (a ``Forger``) behind its own upload server."""
    app = web.Application()
    holder: list[F] = []
    app.router.add_get("/v1/tasks/{task_id}/pieces", lambda r: holder[0].pieces(r))
    app.router.add_get("/v1/tasks/{task_id}/data", lambda r: holder[0].data(r))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    holder.append(kind(bus, task, forged, runner.addresses[-1][1]))
    try:
        yield holder[0]
    finally:
        await runner.cleanup()


def cached(root: Path, task: str) -> bytes | None:
    """What a host's cache holds of a task, once its metadata says it is complete."""
    folder = root / "tasks" / task[:2] / task
    try:
        meta = orjson.loads((folder / "meta.json").read_bytes())
        if len(meta["done"]) < meta["content"]["piece_count"]:
            return None
        return (folder / "data").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def settled(root: Path, task: str, data: bytes) -> bytes | None:
    """What the cache holds once it says it is complete (within 30 s), or None."""
    for _ in range(300):
        if (held := cached(root, task)) is not None:
            return held
        await asyncio.sleep(0.1)
    return None


def flip(data: bytes) -> bytes:
    return bytes(b ^ 0x5A for b in data)


@pytest.mark.parametrize("forged_size", [3 * MiB, 5 * MiB], ids=["same-size", "larger"])
async def test_a_member_that_claims_a_task_first_cannot_feed_it(
    cluster: Cluster, bus: Bus, tmp_path: Path, forged_size: int
) -> None:
    """Attacks 1 and 4: the forger's content and digests count for nothing; the child gets
    the origin's bytes, and so does the storage's cache."""
    data = os.urandom(3 * MiB)
    from swarmfly.testing import Origin

    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        etag = origin._etag("f.bin", data)
        task = task_id(url, etag=etag)
        cluster.start(peers=1)
        async with forger(bus, task, flip(os.urandom(forged_size))[:forged_size], Forger) as evil:
            await evil.claim(url)
            out = tmp_path / "out.bin"
            result = await get(url, out, cluster.peer_dir(0), *cluster.get_args())
            assert result["exit"] == 0, result
            assert result["task_id"] == task
            assert sha256(out.read_bytes()) == sha256(data)
            assert await settled(cluster.peer_dir(0), task, data) == data
            storage_copy = cached(cluster.root / "storage", task)
            assert storage_copy is None or storage_copy == data


async def test_a_known_digest_is_enforced_whatever_the_swarm_says(
    cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    """Attack 2: with `--digest`, the digest-keyed task a forger claimed still yields the
    origin's bytes; a wrong `--digest` fails and leaves nothing at the output path."""
    data = os.urandom(3 * MiB)
    digest = f"sha256:{sha256(data)}"
    from swarmfly.testing import Origin

    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        task = task_id(url, digest=digest)
        cluster.start(peers=1)
        async with forger(bus, task, flip(data), Forger) as evil:
            await evil.claim(url)
            out = tmp_path / "out.bin"
            result = await get(
                url, out, cluster.peer_dir(0), *cluster.get_args(), "--digest", digest
            )
            assert result["exit"] == 0, result
            assert result["digest"] == digest
            assert out.read_bytes() == data

            wrong = tmp_path / "wrong.bin"
            other = f"sha256:{'0' * 64}"
            failed = await get(
                url, wrong, cluster.peer_dir(0), *cluster.get_args(), "--digest", other
            )
            assert failed["exit"] != 0
            assert "digest" in failed["error"]
            assert not wrong.exists()
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".wrong")] == []


async def test_a_lent_child_that_lies_is_caught_and_nobody_keeps_its_bytes(
    cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    """Attack 3: a registered child the capped seed lends pieces to reports false digests
    for them and serves false bytes. The honest child, which knows the whole file's digest,
    delivers the origin's bytes; the seed caches the origin's bytes; the liar is not offered
    again."""
    data = os.urandom(24 * MiB)
    digest = f"sha256:{sha256(data)}"
    from swarmfly.testing import Origin

    # The origin is faster than the seed's uplink, but not so fast that the seed has read
    # everything before the liar asks: the seed lends while its reading runs ahead.
    async with Origin(rate=4 * MiB).serve() as origin:
        url = origin.add("f.bin", data)
        task = task_id(url, digest=digest)
        cluster.start(peers=1, seed_rate="2MiB")
        async with forger(bus, task, flip(data), Forger) as evil:
            # An ordinary child: registers without any claim of its own.
            await evil.heartbeat()
            honest = asyncio.create_task(
                get(
                    url,
                    tmp_path / "out.bin",
                    cluster.peer_dir(0),
                    *cluster.get_args(),
                    "--digest",
                    digest,
                )
            )
            for _ in range(300):  # the honest child asked first: its seed is reading
                known = await evil.request(messages.TASK, messages.TaskRequest(task_id=task))
                if known is not None and known.task is not None:
                    break
                await asyncio.sleep(0.05)
            seed: messages.Parent | None = None
            for _ in range(200):
                reply = await evil.request(
                    messages.REGISTER,
                    messages.RegisterRequest(
                        task_id=task,
                        peer_id=evil.peer_id,
                        host=evil.host,
                        source=messages.Source(url=url),
                    ),
                )
                parents = reply.parents if reply is not None else []
                seed = next((p for p in parents if p.type == "seed"), None)
                if seed is not None:
                    break
                await asyncio.sleep(0.1)
            assert seed is not None and reply is not None, "the seed never came"
            # A registered child: the scheduler gave it a capability like any other.
            auth = {"Authorization": f"Bearer {reply.token}"}
            await lie_while_lent(evil, seed.address, auth, digest_task=task)
            result = await asyncio.wait_for(honest, 120)
            assert result["exit"] == 0, (result, cluster.peers[0].log()[-8000:])
            assert (tmp_path / "out.bin").read_bytes() == data
            assert evil.lent, "the seed lent the liar nothing: the attack did not run"
            # The seed finishes its cache after the child.
            held = await settled(cluster.root / "storage", task, data)
            assert held == data, cluster.storage.log()[-3000:]
            reply = await evil.request(
                messages.REGISTER,
                messages.RegisterRequest(
                    task_id=task,
                    peer_id=ids.peer_id("newcomer", task),
                    host=dataclasses.replace(evil.host, id="newcomer"),
                    source=messages.Source(url=url),
                ),
                sender=contracts.Sender("normal", "newcomer"),
            )
            assert reply is not None
            assert evil.peer_id not in {p.peer_id for p in reply.parents}


async def lie_while_lent(
    evil: Forger, seed: str, auth: dict[str, str], *, digest_task: str
) -> None:
    """Poll the seed as a child that wants every piece; report a false digest for each
    piece it lends (within a bounded number of polls)."""
    import aiohttp

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    async with aiohttp.ClientSession() as session:
        info = None
        while loop.time() < deadline:
            params = {"since": "-1", "wait": "1", "peer": evil.peer_id}
            if info is not None:
                params["wants"] = bitmap.encode(range(info), info)
            url = f"{seed}/v1/tasks/{digest_task}/pieces"
            async with session.get(url, params=params, headers=auth) as r:
                if r.status != 200:
                    await asyncio.sleep(0.1)
                    continue
                body = await r.json()
            info = body["piece_count"]
            lent = [n for n in body.get("origin", []) if n not in evil.lent]
            if lent:
                evil.lent.extend(lent)
                await evil.report(lent)
            if len(evil.lent) >= 4:
                return


async def test_a_cached_copy_that_disagrees_with_the_origin_now_is_not_delivered(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Attack 8's second half: an origin without ETags changes a file; the URL is the same
    task, but the cached copy no longer fits what the origin says, so it is read again."""
    from swarmfly.testing import Origin

    async with Origin(etags=False).serve() as origin:
        old, new = os.urandom(3 * MiB), os.urandom(3 * MiB + 4096)
        url = origin.add("f.bin", old)
        cluster.start(peers=1)
        first = await get(url, tmp_path / "a.bin", cluster.peer_dir(0), *cluster.get_args())
        assert first["exit"] == 0, first
        origin.add("f.bin", new)
        second = await get(url, tmp_path / "b.bin", cluster.peer_dir(0), *cluster.get_args())
        assert second["exit"] == 0, second
        assert second["task_id"] == first["task_id"]
        assert (tmp_path / "b.bin").read_bytes() == new
        assert (tmp_path / "a.bin").read_bytes() == old


class FalseLender(Forger):
    """A member that answers its children as a lending seed would: every piece lent to read
    from the origin, as to a seed's sole child (whose pieces the whole file alone proves)."""

    polled = 0

    async def pieces(self, request: web.Request) -> web.Response:
        self.polled += 1
        return web.json_response(
            {
                "version": 1,
                "piece_count": self.count,
                "complete": False,
                "pieces": [],
                "origin": list(range(self.count)),
                "sole": True,
            }
        )


async def test_a_member_that_lends_as_a_seed_would_is_not_heeded(
    cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    """Only the parent the scheduler names the task's seed lends: a member that answers as a
    lending seed ("origin" pieces, "sole") is an ordinary parent to its children, which read
    nothing from the origin on its word (it would have the origin read once per child) and
    hash every piece they take."""
    data = os.urandom(3 * MiB)
    digest = f"sha256:{sha256(data)}"
    from swarmfly.testing import Origin

    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        task = task_id(url, digest=digest)
        # A storage that lends its sole child nothing: any origin read of the child's is the
        # false lender's doing.
        cluster.start(peers=1, storage_env={"SWARMFLY_STORAGE_LEND_SOLE": "false"})
        async with forger(bus, task, flip(data), FalseLender) as evil:
            await evil.claim(url)
            out = tmp_path / "out.bin"
            result = await get(
                url, out, cluster.peer_dir(0), *cluster.get_args(), "--digest", digest
            )
        assert result["exit"] == 0, result
        assert out.read_bytes() == data
        assert evil.polled > 0, "the child never asked the false lender: the attack did not run"
        assert result["bytes_origin"] == 0, "the child read the origin on a member's word"
        read = origin.bytes_served - origin.probes  # less each host's one-byte access check
        assert read <= len(data), "the origin was read more than once"
