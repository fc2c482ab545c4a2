"""A peer's upload server, as a child sees it over real HTTP: it serves exactly the verified
bytes asked for, long-polls piece availability, refuses everything else, and paces uploads."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import pytest

from swarmfly import bitmap
from swarmfly.capability import Signer
from swarmfly.content import TaskContent, piece_count
from swarmfly.httpserver import serve_http
from swarmfly.services.peer import upload as upload_module
from swarmfly.services.peer.lending import LONE_SECONDS, Lending
from swarmfly.services.peer.store import StoredTask, TaskStore
from swarmfly.services.peer.upload import UploadServer
from swarmfly.testing import wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
PIECE = 1 * MiB
SECRET = b"TOP-SECRET-NOT-A-PIECE"


def content_of(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest()
    return (block * (size // len(block) + 1))[:size]


@dataclass
class Upload:
    url: str
    store: TaskStore
    server: UploadServer
    session: aiohttp.ClientSession
    root: Path
    signer: Signer

    def put(self, data: bytes, done: set[int], piece_length: int = PIECE) -> StoredTask:
        """A task whose ``done`` pieces are written, verified and marked."""
        task_id = hashlib.sha256(data).hexdigest()
        task = self.store.open(task_id, "https://origin.example/blob?X-Amz-Signature=s3cr3t")
        count = piece_count(len(data), piece_length)
        task.set_content(TaskContent(len(data), piece_length, count, f"sha256:{task_id}"))
        for number in sorted(done):
            finish(task, data, number)
        return task

    def token(self, task_id: str, peer_id: str = "child-1") -> dict[str, str]:
        """What a child the scheduler sent here shows: a capability for the task."""
        return {"Authorization": f"Bearer {self.signer.mint(task_id, peer_id, time.time())}"}

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """GET as a scheduled child would: with a capability for the task the path names
        (unless ``headers`` brings its own Authorization)."""
        match = re.match(r"^/v1/tasks/([0-9a-f]{64})/", path)
        if match and "Authorization" not in (headers or {}):
            query = dict(parse_qsl(urlsplit(path).query))
            headers = {**(headers or {}), **self.token(match[1], query.get("peer", "child-1"))}
        async with self.session.get(self.url + path, headers=headers) as response:
            return response.status, await response.read(), response.headers


def finish(task: StoredTask, data: bytes, number: int) -> None:
    assert task.content is not None
    offset, size = task.content.piece(number)
    piece = data[offset : offset + size]
    digest = task.write_piece(number, piece, hashlib.sha256(piece).hexdigest())
    task.mark_done(number, digest)


@asynccontextmanager
async def serve(
    tmp_path: Path, rate: int = 0, slots: int = 64, superseed: bool = False, lease: float = 30.0
) -> AsyncIterator[Upload]:
    (tmp_path / "secret.txt").write_bytes(SECRET)
    store = TaskStore(tmp_path / "state" / "tasks")
    server = UploadServer(store, rate=rate, slots=slots, superseed=superseed, grant_seconds=lease)
    signer = Signer.generate()
    server.trust([signer.verify_key])
    async with AsyncExitStack() as stack:
        url = await serve_http(stack, server.app, "127.0.0.1", 0)
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        stack.push_async_callback(session.close)
        stack.callback(store.close)
        yield Upload(url, store, server, session, tmp_path, signer)


@pytest.fixture
async def upload(tmp_path: Path) -> AsyncIterator[Upload]:
    async with serve(tmp_path) as served:
        yield served


async def raw_get(url: str, target: str, headers: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (no client normalisation)."""
    match = re.match(r"^http://([0-9.]+):(\d+)$", url)
    assert match
    reader, writer = await asyncio.open_connection(match.group(1), int(match.group(2)))
    try:
        request = f"GET {target} HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n{headers}\r\n"
        writer.write(request.encode("latin-1"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, _ = answer.partition(b"\r\n")
    _, _, body = answer.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), body


# -- ids and paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("resource", ["pieces", "data"])
@pytest.mark.parametrize(
    "task_id",
    [
        "xyz",
        "A" * 64,
        "0" * 63,
        "0" * 65,
        "g" * 64,
        "sha256:" + "0" * 64,
        "%20" + "0" * 61,
        "0" * 64 + "%0A",
    ],
)
async def test_invalid_task_id_is_400(upload: Upload, resource: str, task_id: str) -> None:
    status, body, _ = await upload.get(f"/v1/tasks/{task_id}/{resource}", {"Range": "bytes=0-0"})
    assert status == 400
    assert b"invalid task id" in body


@pytest.mark.parametrize("resource", ["pieces", "data"])
async def test_unknown_task_is_404(upload: Upload, resource: str) -> None:
    upload.put(content_of(PIECE, b"known"), {0})
    unknown = hashlib.sha256(b"never stored").hexdigest()
    status, _, _ = await upload.get(f"/v1/tasks/{unknown}/{resource}", {"Range": "bytes=0-0"})
    assert status == 404


async def test_a_task_opened_but_without_content_is_404(upload: Upload) -> None:
    task = upload.store.open(hashlib.sha256(b"no content yet").hexdigest())
    status, _, _ = await upload.get(f"/v1/tasks/{task.id}/pieces")
    assert status == 404


@pytest.mark.parametrize(
    "target",
    [
        "/v1/tasks/..%2F..%2Fetc/data",
        "/v1/tasks/../../etc/passwd",
        "/v1/tasks/..%2F..%2F..%2Fsecret.txt/data",
        "/v1/tasks/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt/data",
        "/v1/tasks/{task}/../../../../secret.txt",
        "/v1/tasks/{task}%2F..%2F..%2F..%2F..%2Fsecret.txt/data",
        "/v1/tasks/{task}/..%2F..%2Fsecret.txt",
        "/../../../../etc/passwd",
        "//etc/passwd",
    ],
)
async def test_path_traversal_never_serves_a_file(upload: Upload, target: str) -> None:
    data = content_of(PIECE, b"traversal")
    task = upload.put(data, {0})
    path = target.replace("{task}", task.id)
    # With a capability for the task: what is tested is the path, not the missing token.
    auth = upload.token(task.id)["Authorization"]
    status, body = await raw_get(
        upload.url, path, f"Range: bytes=0-1023\r\nAuthorization: {auth}\r\n"
    )
    assert 400 <= status < 500
    assert SECRET not in body
    assert b"root:" not in body
    assert data[:1024] not in body


# -- ranges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (0, 0),
        (0, PIECE - 1),
        (12345, 54321),
        (PIECE, 2 * PIECE - 1),
        (3 * PIECE, 3 * PIECE + PIECE // 2 - 1),
    ],
)
async def test_a_valid_range_is_206_with_exactly_the_bytes(
    upload: Upload, first: int, last: int
) -> None:
    data = content_of(3 * PIECE + PIECE // 2, b"ranges")  # pieces 0-3, the last a half
    task = upload.put(data, {0, 1, 3})
    status, body, headers = await upload.get(
        f"/v1/tasks/{task.id}/data", {"Range": f"bytes={first}-{last}"}
    )
    assert status == 206
    assert body == data[first : last + 1]
    assert headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
    assert int(headers["Content-Length"]) == last - first + 1


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (2 * PIECE, 2 * PIECE),  # inside the piece not yet verified
        (2 * PIECE - 1, 2 * PIECE),  # straddles into it
        (0, 4 * PIECE - 1),  # the whole file, over the hole
        (3 * PIECE, 3 * PIECE + PIECE // 2),  # one byte past the end
        (4 * PIECE, 4 * PIECE + 10),  # wholly past the end
        (10, 5),  # last before first
        (999_999_999_999_999, 999_999_999_999_999),
    ],
)
async def test_a_range_outside_verified_pieces_is_416(
    upload: Upload, first: int, last: int
) -> None:
    data = content_of(3 * PIECE + PIECE // 2, b"holes")
    task = upload.put(data, {0, 1, 3})
    status, body, headers = await upload.get(
        f"/v1/tasks/{task.id}/data", {"Range": f"bytes={first}-{last}"}
    )
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}", "the length, as RFC 9110 asks"
    assert data[:64] not in body


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (PIECE - 10, PIECE + 10),  # straddles two verified pieces
        (0, 2 * PIECE - 1),  # two whole pieces
        (0, 3 * PIECE + PIECE // 2 - 1),  # the whole file, every piece verified
        (PIECE, 3 * PIECE),  # one piece and a byte of the next
    ],
)
async def test_a_range_beyond_one_piece_is_416_though_every_byte_is_verified(
    tmp_path: Path, first: int, last: int
) -> None:
    """One piece per request, as children ask: a whole-file range would let one slow reader
    hold an upload slot for the whole file."""
    async with serve(tmp_path) as upload:
        data = content_of(3 * PIECE + PIECE // 2, b"one piece")
        task = upload.put(data, {0, 1, 2, 3})
        status, body, _ = await upload.get(
            f"/v1/tasks/{task.id}/data", {"Range": f"bytes={first}-{last}"}
        )
        assert status == 416
        assert data[:64] not in body and data[first : first + 64] not in body
        status, body, _ = await upload.get(
            f"/v1/tasks/{task.id}/data", {"Range": f"bytes={PIECE}-{2 * PIECE - 1}"}
        )
        assert (status, body) == (206, data[PIECE : 2 * PIECE])


async def test_a_piece_is_served_once_verified(upload: Upload) -> None:
    data = content_of(2 * PIECE, b"two pieces")
    task = upload.put(data, {0})
    second = {"Range": f"bytes={PIECE}-{2 * PIECE - 1}"}
    status, _, _ = await upload.get(f"/v1/tasks/{task.id}/data", second)
    assert status == 416
    finish(task, data, 1)
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/data", second)
    assert status == 206
    assert body == data[PIECE:]


@pytest.mark.parametrize(
    "range_header",
    [
        None,
        "",
        "bytes=abc",
        "bytes=0-1,4-5",
        "items=0-1",
        "bytes=0-",  # children always ask for explicit ranges of verified pieces
        "bytes=-5",
        "bytes= 0-1",
        "bytes=0-1\x00",
        "bytes=1234567890123456-1234567890123457",
    ],
)
async def test_a_missing_or_malformed_range_is_400(
    upload: Upload, range_header: str | None
) -> None:
    data = content_of(PIECE, b"malformed")
    task = upload.put(data, {0})
    extra = f"Authorization: {upload.token(task.id)['Authorization']}\r\n"
    extra += "" if range_header is None else f"Range: {range_header}\r\n"
    status, body = await raw_get(upload.url, f"/v1/tasks/{task.id}/data", extra)
    assert status == 400
    assert data[:64] not in body


# -- piece availability: the long-poll -------------------------------------------------------


async def test_pieces_lists_what_is_verified(upload: Upload) -> None:
    task = upload.put(content_of(3 * PIECE, b"list"), {2, 0})
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces")
    assert status == 200
    state = json.loads(body)
    assert state == {"version": 2, "piece_count": 3, "complete": False, "pieces": [0, 2]}


async def test_long_poll_returns_promptly_when_a_piece_completes(upload: Upload) -> None:
    data = content_of(3 * PIECE, b"long-poll")
    task = upload.put(data, {0})
    version = task.version

    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        finish(task, data, 1)

    started = time.monotonic()
    finisher = asyncio.create_task(finish_later())
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since={version}&wait=2")
    elapsed = time.monotonic() - started
    await finisher
    assert status == 200
    state = json.loads(body)
    assert state["version"] == version + 1
    assert state["pieces"] == [0, 1]
    assert 0.25 <= elapsed < 1.5


async def test_long_poll_returns_after_wait_when_nothing_changes(upload: Upload) -> None:
    task = upload.put(content_of(2 * PIECE, b"quiet"), {0})
    started = time.monotonic()
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since={task.version}&wait=2")
    elapsed = time.monotonic() - started
    assert status == 200
    assert json.loads(body)["version"] == task.version
    assert 1.8 <= elapsed < 4


@pytest.mark.parametrize("complete", [False, True])
async def test_long_poll_answers_at_once_when_news_exist(upload: Upload, complete: bool) -> None:
    """A stale ``since``, or a complete task, has nothing to wait for."""
    data = content_of(2 * PIECE, b"news")
    task = upload.put(data, {0, 1} if complete else {0})
    since = task.version if complete else task.version - 1
    started = time.monotonic()
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since={since}&wait=10")
    assert status == 200
    assert time.monotonic() - started < 1
    assert json.loads(body)["complete"] is complete


async def test_several_long_polls_all_wake(upload: Upload) -> None:
    data = content_of(2 * PIECE, b"many children")
    task = upload.put(data, {0})
    path = f"/v1/tasks/{task.id}/pieces?since={task.version}&wait=5"
    polls = [asyncio.create_task(upload.get(path)) for _ in range(5)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    finish(task, data, 1)
    answers = await asyncio.gather(*polls)
    assert time.monotonic() - started < 1.5
    for status, body, _ in answers:
        assert status == 200
        assert json.loads(body)["pieces"] == [0, 1]


async def test_long_poll_returns_promptly_when_pieces_are_withdrawn(upload: Upload) -> None:
    data = content_of(2 * PIECE, b"withdrawn")
    task = upload.put(data, {0})
    version = task.version

    async def reset_later() -> None:
        await asyncio.sleep(0.3)
        task.reset()  # what a peer does when the whole file fails its digest

    started = time.monotonic()
    resetter = asyncio.create_task(reset_later())
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since={version}&wait=3")
    elapsed = time.monotonic() - started
    await resetter
    assert status == 200
    assert json.loads(body)["pieces"] == []
    assert elapsed < 1.5


@pytest.mark.parametrize(
    "query", ["since=abc", "wait=abc", "since=1.5", "since=0&wait=soon", "since=&wait=1"]
)
async def test_non_numeric_since_or_wait_is_400(upload: Upload, query: str) -> None:
    task = upload.put(content_of(PIECE, b"query"), {0})
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?{query}")
    assert status == 400
    assert b"must be numbers" in body


# -- pacing, slots, health -------------------------------------------------------------------


async def test_upload_rate_limit_paces_a_range(tmp_path: Path) -> None:
    rate = 2 * MiB
    async with serve(tmp_path, rate=rate) as upload:
        data = content_of(4 * PIECE, b"paced")
        task = upload.put(data, {0, 1}, piece_length=2 * PIECE)
        started = time.monotonic()
        status, body, _ = await upload.get(
            f"/v1/tasks/{task.id}/data", {"Range": f"bytes={2 * PIECE}-{4 * PIECE - 1}"}
        )
        elapsed = time.monotonic() - started
        assert status == 206
        assert body == data[2 * PIECE :]
        expected = len(body) / rate  # 1 s; the first burst (rate/8) passes at once
        assert 0.5 * expected <= elapsed < 3 * expected + 1


async def test_a_full_upload_server_answers_503_then_serves_again(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=MiB, slots=1) as upload:
        data = content_of(2 * PIECE, b"slots")
        task = upload.put(data, {0}, piece_length=2 * PIECE)
        whole = {"Range": f"bytes=0-{len(data) - 1}"}
        slow = asyncio.create_task(upload.get(f"/v1/tasks/{task.id}/data", whole))
        await wait_until(lambda: upload.server.uploads == 1, timeout=5)
        # A few requests may wait behind each busy slot (it never idles); the next is
        # turned away to ask another parent.
        queued = await wait_behind(upload, task, "queued", None)
        status, _, headers = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-9"})
        assert status == 503
        assert headers["Retry-After"] == "1"
        status, body, _ = await slow
        assert (status, body) == (206, data)
        for waited in queued:
            assert (await waited)[:2] == (206, data[:10])
        status, body, _ = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-9"})
        assert (status, body) == (206, data[:10])


def ask(upload: Upload, task: StoredTask, number: int, child: str, have: str | None) -> Any:
    """A child's request for the first bytes of piece ``number``, saying it holds ``have``."""
    assert task.content is not None
    query = "" if have is None else f"?have={have}"
    start = number * task.content.piece_length
    headers = {
        "Range": f"bytes={start}-{start + 9}",
        **upload.token(task.id, child),
    }
    return asyncio.create_task(upload.get(f"/v1/tasks/{task.id}/data{query}", headers))


async def wait_behind(
    upload: Upload, task: StoredTask, child: str, have: str | None, count: int | None = None
) -> list[Any]:
    """``count`` requests (by default, as many as may wait) from children ``<child>-<n>``
    saying ``have``, for the first bytes of piece 0, waiting for the server's one slot."""
    count = upload_module.WAITING_PER_SLOT if count is None else count
    already = upload.server.admission.waiting
    waiting = [ask(upload, task, 0, f"{child}-{n}", have) for n in range(count)]
    await wait_until(lambda: upload.server.admission.waiting == already + count, timeout=5)
    return waiting


@asynccontextmanager
async def one_slot_taken(
    tmp_path: Path, superseed: bool = False
) -> AsyncIterator[tuple[Upload, StoredTask, bytes, Any]]:
    """A server with one slot, busy for about a second with a whole piece for "slow"."""
    async with serve(tmp_path, rate=MiB, slots=1, superseed=superseed) as upload:
        data = content_of(4 * PIECE, b"needs")
        task = upload.put(data, {0, 1, 2, 3})
        whole = {"Range": f"bytes=0-{PIECE - 1}", **upload.token(task.id, "slow")}
        slow = asyncio.create_task(upload.get(f"/v1/tasks/{task.id}/data", whole))
        await wait_until(lambda: upload.server.uploads == 1, timeout=5)
        yield upload, task, data, slow


async def test_a_child_holding_less_takes_the_place_of_a_richer_one_waiting(tmp_path: Path) -> None:
    async with one_slot_taken(tmp_path) as (upload, task, data, slow):
        rich = ask(upload, task, 1, "rich", "3")
        await wait_until(lambda: upload.server.admission.waiting == 1, timeout=5)
        others = await wait_behind(upload, task, "other", "2", upload_module.WAITING_PER_SLOT - 1)
        # As needy as the richest one waiting: turned away, as before.
        status, body, _ = await ask(upload, task, 2, "even", "3")
        assert (status, body) == (503, b"no free upload slot")
        poor = ask(upload, task, 2, "poor", "0")
        status, body, headers = await rich  # told at once, while the slot is still busy
        assert (status, body, headers["Retry-After"]) == (503, b"no free upload slot", "1")
        assert not slow.done()
        assert (await slow)[:2] == (206, data[:PIECE])
        assert (await poor)[:2] == (206, data[2 * PIECE : 2 * PIECE + 10])
        for other in others:
            assert (await other)[:2] == (206, data[:10])
        assert upload.server.load == 0


async def test_the_neediest_waiting_child_is_served_first(tmp_path: Path) -> None:
    # Two slots (one per 8 MiB/s of the cap), busy for about a second.
    async with serve(tmp_path, rate=16 * MiB, slots=2) as upload:
        data = content_of(4 * 8 * MiB, b"order")
        task = upload.put(data, {0, 1, 2, 3}, piece_length=8 * MiB)
        whole = [
            {
                "Range": f"bytes={n * 8 * MiB}-{(n + 1) * 8 * MiB - 1}",
                **upload.token(task.id, f"busy-{n}"),
            }
            for n in (0, 1)
        ]
        busy = [asyncio.create_task(upload.get(f"/v1/tasks/{task.id}/data", h)) for h in whole]
        await wait_until(lambda: upload.server.uploads == 2, timeout=5)
        finished: list[str] = []

        async def child(name: str, have: str) -> None:
            status, _, _ = await ask(upload, task, 3, name, have)
            assert status == 206
            finished.append(name)

        richer = asyncio.create_task(child("richer", "2"))
        await wait_until(lambda: upload.server.admission.waiting == 1, timeout=5)
        poorer = asyncio.create_task(child("poorer", "1"))
        await wait_until(lambda: upload.server.admission.waiting == 2, timeout=5)
        await asyncio.gather(*busy, richer, poorer)
        assert finished == ["poorer", "richer"]


async def test_a_child_that_understates_what_it_holds_is_held_to_what_it_was_sent(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path, rate=MiB, slots=1) as upload:
        data = content_of(4 * PIECE, b"liar")
        task = upload.put(data, {0, 1, 2, 3})
        for number in (0, 1):  # the liar has had two of the four pieces from us
            assert (await ask(upload, task, number, "liar", "0"))[0] == 206
        whole = {"Range": f"bytes=0-{PIECE - 1}", **upload.token(task.id, "slow")}
        slow = asyncio.create_task(upload.get(f"/v1/tasks/{task.id}/data", whole))
        await wait_until(lambda: upload.server.uploads == 1, timeout=5)
        liar = ask(upload, task, 2, "liar", "0")  # says it holds nothing: counted as two
        await wait_until(lambda: upload.server.admission.waiting == 1, timeout=5)
        others = await wait_behind(upload, task, "other", "1", upload_module.WAITING_PER_SLOT - 1)
        honest = ask(upload, task, 3, "honest", "1")
        assert (await liar)[0] == 503
        assert (await slow)[0] == 206
        assert (await honest)[0] == 206
        assert [(await other)[0] for other in others] == [206] * len(others)


async def test_a_child_that_says_nothing_never_displaces_one_that_does(tmp_path: Path) -> None:
    async with one_slot_taken(tmp_path) as (upload, task, _, slow):
        rich = await wait_behind(upload, task, "rich", "4")  # they hold every piece
        assert (await ask(upload, task, 2, "silent", None))[0] == 503
        assert (await slow)[0] == 206
        assert [(await r)[0] for r in rich] == [206] * len(rich)


async def test_at_a_seed_nobody_is_displaced(tmp_path: Path) -> None:
    """A super-seeding seed's places are its grants'."""
    async with one_slot_taken(tmp_path, superseed=True) as (upload, task, _, slow):
        rich = ask(upload, task, 1, "rich", "3")
        await wait_until(lambda: upload.server.admission.waiting == 1, timeout=5)
        assert (await ask(upload, task, 2, "poor", "0"))[0] == 503
        assert (await slow)[0] == 206
        assert (await rich)[0] == 206


@pytest.mark.parametrize("have", ["-1", "abc", "\u00b2", "5", "1e3", "", "0x1", "1234567890"])
async def test_a_malformed_have_is_a_400_and_the_server_keeps_serving(
    upload: Upload, have: str
) -> None:
    data = content_of(4 * PIECE, b"have")
    task = upload.put(data, {0, 1, 2, 3})
    status, body, _ = await ask(upload, task, 0, "child-1", quote(have))
    assert (status, body) == (400, b"have must be a count of the task's pieces")
    status, body, _ = await ask(upload, task, 0, "child-1", "4")
    assert (status, body) == (206, data[:10])


async def test_a_child_that_hangs_up_frees_its_slot(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=MiB, slots=1) as upload:
        data = content_of(4 * PIECE, b"hang up")
        task = upload.put(data, {0}, piece_length=4 * PIECE)
        async with upload.session.get(
            f"{upload.url}/v1/tasks/{task.id}/data",
            headers={"Range": f"bytes=0-{len(data) - 1}", **upload.token(task.id)},
        ) as response:
            assert response.status == 206
            assert len(await response.content.readexactly(64 * 1024)) == 64 * 1024
            response.close()

        async def health() -> int:
            status, body, _ = await upload.get("/healthz")
            assert status == 200
            uploads: int = json.loads(body)["uploads"]
            return uploads

        deadline = time.monotonic() + 10
        while await health() != 0:
            assert time.monotonic() < deadline, "the slot of a gone child was never freed"
            await asyncio.sleep(0.1)
        status, body, _ = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-9"})
        assert (status, body) == (206, data[:10])


async def test_a_slow_reader_is_cut_off_and_its_slot_goes_to_the_next_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 1.0
    monkeypatch.setattr(upload_module, "SEND_WINDOW", window)
    async with serve(tmp_path, slots=1) as upload:
        piece = 16 * MiB  # far more than the socket buffers hold
        data = content_of(piece, b"slow reader")
        task = upload.put(data, {0}, piece_length=piece)
        host, port = upload.url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(
            f"GET /v1/tasks/{task.id}/data HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {upload.token(task.id)['Authorization']}\r\n"
            f"Range: bytes=0-{piece - 1}\r\n\r\n".encode()
        )
        started = time.monotonic()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 206")
        await wait_until(lambda: upload.server.uploads == 1, timeout=5)
        # The slot is held: a few children may wait behind it, the next is turned away.
        queued = await wait_behind(upload, task, "queued", None)
        status, _, _ = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-9"})
        assert status == 503
        # The slow reader reads nothing more: cut off within a few windows.
        for waited in queued:
            assert (await waited)[:2] == (206, data[:10])
        assert time.monotonic() - started < 6 * window + 2
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(MiB), 10):
                received += len(chunk)
        writer.close()
        assert received < piece, "the slow reader got the whole piece"
        status, body, _ = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-9"})
        assert (status, body) == (206, data[:10])


async def test_healthz_and_metrics_answer(upload: Upload) -> None:
    task = upload.put(content_of(PIECE, b"metrics"), {0})
    status, _, _ = await upload.get(f"/v1/tasks/{task.id}/data", {"Range": "bytes=0-99"})
    assert status == 206
    status, body, _ = await upload.get("/healthz")
    assert status == 200
    assert json.loads(body) == {"ok": True, "uploads": 0}
    status, body, headers = await upload.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"swarmfly_peer_upload_bytes_total" in body


async def test_the_signed_url_query_never_reaches_disk(upload: Upload) -> None:
    task = upload.put(content_of(PIECE, b"secret query"), {0})
    task.save()  # what the store's periodic save writes
    meta = (task.dir / "meta.json").read_bytes()
    assert b"s3cr3t" not in meta
    assert b"https://origin.example/blob" in meta


# -- a seed grants pieces -------------------------------------------------------------------


async def poll(
    upload: Upload, task: StoredTask, wait: float, wants: str | None = None, child: str = ""
) -> Any:
    query = f"?since=-1&wait={wait}" + (f"&wants={wants}" if wants is not None else "")
    query += f"&peer={child}" if child else ""
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces{query}")
    assert status == 200, body
    return json.loads(body)


async def test_a_seed_grants_each_waiting_child_a_different_piece_and_no_more_than_it_can_send(
    tmp_path: Path,
) -> None:
    # One slot: one upload under way plus one granted at most (capacity 2).
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        data = content_of(4 * PIECE, b"grants")
        task = seed.put(data, {0, 1, 2, 3})
        answers = await asyncio.gather(*(poll(seed, task, 1.0) for _ in range(3)))
        granted = [a["pieces"] for a in answers]
        assert sorted(granted, key=len) == [[], [0], [1]], granted  # lowest first, no repeats
        assert not any(a["complete"] for a in answers)  # children keep asking

        # Taking a grant moves the next child up: piece 0 is sent, and piece 2 comes next
        # (1 is still reserved), while the upload and the grant hold both places.
        status, body, _ = await seed.get(
            f"/v1/tasks/{task.id}/data", {"Range": f"bytes=0-{PIECE - 1}"}
        )
        assert (status, body) == (206, data[:PIECE])
        assert (await poll(seed, task, 1.0))["pieces"] == [2]


async def test_a_grant_not_taken_lapses_and_goes_to_the_next_child(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=8 * MiB, superseed=True, lease=0.5) as seed:
        task = seed.put(content_of(2 * PIECE, b"lapse"), {0, 1})
        first = await asyncio.gather(poll(seed, task, 0.2), poll(seed, task, 0.2))
        assert sorted(a["pieces"][0] for a in first) == [0, 1]
        started = time.monotonic()
        later = await poll(seed, task, 5.0)  # both reserved until they lapse
        assert later["pieces"] in ([0], [1])
        assert 0.2 < time.monotonic() - started < 3.0


async def test_a_seed_keeps_grant_books_only_for_grants_outstanding(tmp_path: Path) -> None:
    """A seed that granted pieces of many tasks keeps no book per task it ever served: each
    child's poll would weigh them all (5.5 ms a poll with 10,000 of them)."""
    async with serve(tmp_path, rate=8 * MiB, superseed=True, lease=0.2) as seed:
        tasks = [seed.put(content_of(PIECE, f"book {n}".encode()), {0}) for n in range(30)]
        for task in tasks:
            assert (await poll(seed, task, 1.0))["pieces"] == [0]
            await asyncio.sleep(0.25)  # the grant lapses, untaken
        assert seed.server.desk.books <= 1
        # And the lapsed grants are offered again.
        assert (await poll(seed, tasks[0], 1.0))["pieces"] == [0]


async def test_a_seed_grants_only_what_the_child_wants(tmp_path: Path) -> None:
    async with serve(tmp_path, superseed=True) as seed:
        task = seed.put(content_of(10 * PIECE, b"wants"), set(range(10)))
        assert (await poll(seed, task, 1.0, bitmap.encode({7, 9}, 10)))["pieces"] == [7]
        assert (await poll(seed, task, 0.2, bitmap.encode(set(), 10)))["pieces"] == []


async def test_a_piece_verified_while_a_child_waits_is_granted_at_once(tmp_path: Path) -> None:
    async with serve(tmp_path, superseed=True) as seed:
        data = content_of(2 * PIECE, b"late")
        task = seed.put(data, set())
        waiting = asyncio.create_task(poll(seed, task, 5.0))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        finish(task, data, 1)
        assert (await waiting)["pieces"] == [1]
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "wants",
    ["%21%21%21", "AAAAAAAA", "A", "__8", "AA%3D%3D", "AA%20"],
    ids=["not-base64url", "too-long", "too-short", "pieces-beyond-the-task", "padded", "space"],
)
async def test_a_malformed_wants_bitmap_is_a_400_and_the_seed_keeps_serving(
    tmp_path: Path, wants: str
) -> None:
    async with serve(tmp_path, superseed=True) as seed:
        task = seed.put(content_of(10 * PIECE, b"bad wants"), set(range(10)))
        status, body, _ = await seed.get(f"/v1/tasks/{task.id}/pieces?wait=1&wants={wants}")
        if wants == "__8":  # 16 bits set: 10 pieces, and 6 bits past the end, ignored
            assert status == 200 and json.loads(body)["pieces"] == [0]
        else:
            assert status == 400, body
        assert (await poll(seed, task, 1.0))["pieces"] in ([0], [1])


async def test_a_seed_with_no_slot_free_lends_a_piece_to_read_from_the_origin(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        task = seed.put(content_of(8 * PIECE, b"lend"), {0, 1})
        task.lending = Lending(8, etag='"v1"', limit=1, window=1)
        every = bitmap.encode(set(range(8)), 8)
        # Two grants fill the one slot and its one waiting place; the third child is lent
        # the last piece, pinned to the ETag the seed read, and the fourth gets nothing.
        answers = await asyncio.gather(
            *(poll(seed, task, 0.5, every, child=f"child-{n}") for n in range(4))
        )
        granted = sorted(a["pieces"] for a in answers if a["pieces"])
        assert granted == [[0], [1]]
        lent = [a for a in answers if a.get("origin")]
        assert [(a["origin"], a["etag"]) for a in lent] == [([7], '"v1"')]
        # The child says it read the piece (numbers never lent are ignored, a malformed
        # list is refused); then another may be lent, but only to a child that said what
        # it wants (so it knows the task's pieces).
        for bad in ("x", ",", "1" * 10, ",".join(["1"] * 65)):
            status, _, _ = await seed.get(f"/v1/tasks/{task.id}/pieces?wait=0&lent={bad}")
            assert status == 400, bad
        assert "origin" not in await poll(seed, task, 0.3, every, child="c")  # 7 is still out
        status, body, _ = await seed.get(f"/v1/tasks/{task.id}/pieces?wait=0.3&lent=7,3")
        assert status == 200 and "origin" not in json.loads(body)
        assert task.lending.delivered == {7}
        assert (await poll(seed, task, 0.3, every, child="c"))["origin"] == [6]


async def test_without_capabilities_only_a_child_that_names_itself_is_lent_a_piece(
    tmp_path: Path,
) -> None:
    """Only the child named may vouch for a lent piece: an anonymous poll is lent nothing."""
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        seed.server.capabilities = False
        task = seed.put(content_of(8 * PIECE, b"anonymous"), {0, 1})
        task.lending = Lending(8, limit=2, window=1)
        every = bitmap.encode(set(range(8)), 8)
        query = f"/v1/tasks/{task.id}/pieces?since=-1&wait=0.3&wants={every}"
        answers = await asyncio.gather(*(seed.get(query, {"Authorization": ""}) for _ in range(4)))
        assert all(b'"origin"' not in body for _, body, _ in answers)
        _, named, _ = await seed.get(query + "&peer=child-a", {"Authorization": ""})
        assert json.loads(named)["origin"] == [7]


# -- capabilities: only a child the scheduler sent reads a task ---------------------------


@pytest.mark.parametrize("resource", ["data", "pieces"])
async def test_a_task_is_served_only_against_a_capability_for_it(
    upload: Upload, resource: str
) -> None:
    data = content_of(PIECE, b"private")
    task = upload.put(data, {0})
    other = upload.put(content_of(PIECE, b"other"), {0})
    path = f"/v1/tasks/{task.id}/{resource}"
    ranged = {"Range": "bytes=0-1023"}
    forger = Signer.generate()  # a member's own key: not the schedulers'
    refused = {
        "none": {"Authorization": ""},
        "garbage": {"Authorization": "Bearer v1.abc.def"},
        "another task": upload.token(other.id),
        "expired": {"Authorization": f"Bearer {upload.signer.mint(task.id, 'c', 0, 60)}"},
        "unknown key": {"Authorization": f"Bearer {forger.mint(task.id, 'c', time.time())}"},
    }
    for reason, auth in refused.items():
        status, body, _ = await upload.get(path, {**ranged, **auth})
        assert status == 403, reason
        assert data[:64] not in body
    # Nobody learns what is held without one: an unknown task is refused the same way.
    status, _, _ = await upload.get(f"/v1/tasks/{'ab' * 32}/{resource}", {"Authorization": ""})
    assert status == 403
    status, body, _ = await upload.get(path, ranged)
    assert status in (200, 206)
    if resource == "data":
        assert body == data[:1024]


async def test_a_host_that_knows_no_scheduler_key_yet_says_come_back(upload: Upload) -> None:
    """Just started, before a scheduler named its key: a child's capability may be good, so
    it is told to retry (503, as a busy parent), not refused as a forger would be (403, which
    makes the child give the parent up)."""
    data = content_of(PIECE, b"early")
    task = upload.put(data, {0})
    keys = dict(upload.server.verify_keys)
    upload.server.verify_keys.clear()
    path = f"/v1/tasks/{task.id}/data"
    status, body, headers = await upload.get(path, {"Range": "bytes=0-1023"})
    assert (status, headers.get("Retry-After")) == (503, "1")
    assert data[:64] not in body
    upload.server.trust(keys)
    status, body, _ = await upload.get(path, {"Range": "bytes=0-1023"})
    assert (status, body) == (206, data[:1024])


async def test_a_seed_lends_to_the_child_its_capability_names(tmp_path: Path) -> None:
    """What a child calls itself (``peer=``) does not count: only whom the scheduler
    scheduled may vouch for a lent piece."""
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        task = seed.put(content_of(8 * PIECE, b"named"), {0, 1})
        task.lending = Lending(8, limit=1, window=1)
        every = bitmap.encode(set(range(8)), 8)
        query = f"?since=-1&wait=0.5&wants={every}&peer=child-b"
        answers = await asyncio.gather(*(
            seed.get(f"/v1/tasks/{task.id}/pieces{query}", seed.token(task.id, "child-a"))
            for _ in range(3)
        ))  # fmt: skip
        lent = [json.loads(body)["origin"] for _, body, _ in answers if b"origin" in body]
        assert lent == [[7]]
        assert task.lending.lent_to == {7: "child-a"}


async def test_a_seed_with_no_uplink_limit_lends_only_to_a_sole_child(tmp_path: Path) -> None:
    """Its uplink is never full, so it lends to the one child asking only: the whole file in
    order, as many as it may read at once in one answer (marked ``sole``: no one takes them
    on its word), freed as the child says what came back; a second child, or one that does
    not borrow, gets pieces served as ever (and no loan)."""
    async with serve(tmp_path) as seed:
        task = seed.put(content_of(8 * PIECE, b"sole"), {0, 1})
        task.lending = Lending(8, limit=8, per_child=2, window=4)
        every = bitmap.encode(set(range(8)), 8)

        async def ask(child: str, extra: str = "") -> Any:
            query = f"?since=-1&wait=0.3&wants={every}&peer={child}{extra}"
            status, body, _ = await seed.get(
                f"/v1/tasks/{task.id}/pieces{query}", seed.token(task.id, child)
            )
            assert status == 200, body
            return json.loads(body)

        # Its first ask: others may be a moment behind it.
        assert "origin" not in await ask("child-a")
        await asyncio.sleep(LONE_SECONDS)
        answers = [await ask("child-a") for _ in range(2)]
        assert [a.get("origin") for a in answers] == [[2, 3], None]  # two at once at most
        assert answers[0]["sole"] is True
        assert answers[1]["pieces"] == [0, 1]  # after its wait, what the seed holds
        assert (await ask("child-a", "&lent=2")).get("origin") == [4]  # 2 came back
        # A child that reads no origin beside it: the seed reads for both, lends none.
        assert "origin" not in await ask("child-b", "&borrow=0")
        assert "origin" not in await ask("child-a", "&lent=3")
        assert task.lending.lent_to == {2: "child-a", 3: "child-a", 4: "child-a"}


async def test_head_is_refused_and_neither_sends_bytes_nor_takes_a_grant(tmp_path: Path) -> None:
    """aiohttp answers HEAD on a GET route by default: on ``/data`` sendfile wrote the body
    anyway and counted the piece served; on a seed's ``/pieces`` it used up a grant."""
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        task = seed.put(content_of(2 * PIECE, b"head"), {0, 1})
        auth = seed.token(task.id)
        for path, headers in (
            (f"/v1/tasks/{task.id}/data", {"Range": f"bytes=0-{PIECE - 1}", **auth}),
            (f"/v1/tasks/{task.id}/pieces?wait=0.2", auth),
        ):
            async with seed.session.head(seed.url + path, headers=headers) as response:
                assert response.status == 405, path
        assert task.served == {} and seed.server.desk.books == 0
        assert (await poll(seed, task, 0.5))["pieces"] == [0]


async def test_a_download_asking_for_pieces_held_unhashed_is_told_to_the_host(
    upload: Upload,
) -> None:
    """A task whose pieces the whole file proved with none hashed on its own: a child's
    download asking for it (its poll says what it ``wants``) sets the host hashing them; a
    holder's look at what is held (a seed taking its copy asks no ``wants``) does not."""
    data = content_of(3 * PIECE, b"unhashed")
    task = upload.put(data, {0, 1, 2})
    task.unhashed = {1, 2}
    told: list[str] = []
    upload.server.wanted_unhashed = lambda stored: told.append(stored.id)
    status, body, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since=-1&wait=0")
    assert status == 200 and json.loads(body)["pieces"] == [0, 1, 2]
    assert told == []
    wants = bitmap.encode({0, 1, 2}, 3)
    status, _, _ = await upload.get(f"/v1/tasks/{task.id}/pieces?since=-1&wait=0&wants={wants}")
    assert status == 200 and told == [task.id]
    task.unhashed.clear()  # all hashed: nothing more to tell
    await upload.get(f"/v1/tasks/{task.id}/pieces?since=-1&wait=0&wants={wants}")
    assert told == [task.id]
