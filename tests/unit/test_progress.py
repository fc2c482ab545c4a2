"""The one progress mechanism (services/peer/progress.py): answers when the download moves,
a keepalive while it does not, nothing faster than a bar's refresh; on virtual time."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from swarmfly.content import TaskContent
from swarmfly.contracts import messages
from swarmfly.services.peer.conductor import Conductor
from swarmfly.services.peer.progress import UNKNOWN, follow, moved
from swarmfly.services.peer.store import StoredTask, TaskStore
from tests.virtualtime import now, virtual_time

PIECE = 4
CONTENT = TaskContent(content_length=10, piece_length=PIECE, piece_count=3)


@pytest.fixture
def task(tmp_path: Path) -> StoredTask:
    stored = TaskStore(tmp_path / "tasks").open(hashlib.sha256(b"t").hexdigest(), "http://o/f")
    stored.set_content(CONTENT)
    return stored


def running(task: StoredTask) -> Conductor:
    """What the progress functions read of a conductor: its stored task."""
    return cast(Conductor, SimpleNamespace(stored=task))


def finish(task: StoredTask, number: int) -> None:
    data = b"0123456789"[number * PIECE : (number + 1) * PIECE]
    digest = hashlib.sha256(data).hexdigest()
    task.mark_done(number, task.write_piece(number, data, digest))


@virtual_time
async def test_an_answer_comes_at_once_when_more_is_done_than_the_asker_saw(
    task: StoredTask,
) -> None:
    finish(task, 0)
    started = now()
    state = await moved(running(task), after=-1, wait=10)
    assert now() == started
    assert (state.state, state.completed_bytes, state.content_length) == ("running", 4, 10)


@virtual_time
async def test_a_long_poll_wakes_on_the_next_piece_not_on_a_timer(task: StoredTask) -> None:
    finish(task, 0)
    asking = asyncio.create_task(moved(running(task), after=4, wait=10))
    await asyncio.sleep(3)
    assert not asking.done(), "nothing moved: the poll holds its answer"
    started = now()
    finish(task, 1)
    state = await asking
    assert now() == started, "woken by the change, not by a timer"
    assert state.completed_bytes == 8


@virtual_time
async def test_a_long_poll_answers_after_its_wait_while_nothing_moves(task: StoredTask) -> None:
    started = now()
    state = await moved(running(task), after=0, wait=2)
    assert now() - started == pytest.approx(2)
    assert (state.state, state.completed_bytes) == ("running", 0)


@virtual_time
async def test_the_wait_a_request_asks_for_is_bounded(task: StoredTask) -> None:
    started = now()
    await moved(running(task), after=0, wait=1e9)
    assert now() - started == pytest.approx(10), "MAX_WAIT, the contract's bound"


@virtual_time
async def test_a_long_poll_ends_with_the_download(task: StoredTask) -> None:
    ended: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(1, ended.set_result, None)
    started = now()
    await moved(running(task), after=0, wait=10, ended=ended)
    assert now() - started == pytest.approx(1)


@virtual_time
async def test_a_download_this_peer_does_not_run_is_unknown_at_once() -> None:
    assert await moved(None, after=0, wait=10) == UNKNOWN


@virtual_time
async def test_follow_tells_each_move_a_keepalive_and_nothing_faster_than_its_interval(
    task: StoredTask,
) -> None:
    told: list[tuple[float, int]] = []
    download: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    start = now()
    for at, number in ((0.1, 0), (0.2, 1), (5.0, 2)):
        loop.call_later(at, finish, task, number)
    loop.call_later(6.0, download.set_result, None)

    def report(state: messages.ProgressReply) -> None:
        told.append((round(now() - start, 3), state.completed_bytes))

    await follow(lambda: running(task), download, report, interval=0.5, keepalive=2.0)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(told)]
    assert all(0.5 <= gap <= 2.5 for gap in gaps), told
    assert told[:3] == [(0.0, 0), (0.5, 8), (3.0, 8)], (
        "at once; both early pieces in one line; a keepalive"
    )
    assert (5.0, 10) in told, "the last piece as it lands"
    assert told[-1][0] < 6.0, "nothing after the download ended"
