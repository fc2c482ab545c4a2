"""The peer's on-disk task store: verified piece writes, reload after restart, no secrets."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import orjson
import pytest

from swarmfly.content import TaskContent
from swarmfly.errors import SwarmflyError
from swarmfly.ids import redact_url
from swarmfly.services.peer import transfer
from swarmfly.services.peer.store import UNHASHED, StoredTask, TaskStore
from tests.virtualtime import now, virtual_time

ID = hashlib.sha256(b"task").hexdigest()
OTHER = hashlib.sha256(b"other").hexdigest()
DATA = b"0123456789"  # pieces of 4: "0123", "4567", "89"
CONTENT = TaskContent(content_length=10, piece_length=4, piece_count=3)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece(number: int) -> bytes:
    return DATA[number * 4 : number * 4 + 4]


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "tasks")


@pytest.fixture
def task(store: TaskStore) -> StoredTask:
    opened = store.open(ID, "https://origin.example/file")
    opened.set_content(CONTENT)
    return opened


def fill(task: StoredTask, numbers: range | list[int]) -> None:
    for number in numbers:
        task.mark_done(number, task.write_piece(number, piece(number), sha(piece(number))))


# -- writes --------------------------------------------------------------------------------


def test_set_content_makes_a_sparse_file_of_the_full_length(task: StoredTask) -> None:
    assert task.data_path.stat().st_size == len(DATA)
    assert task.digests == [None, None, None]
    assert not task.complete


def test_a_verified_piece_is_written_at_its_offset(task: StoredTask) -> None:
    assert task.write_piece(1, b"4567", sha(b"4567")) == sha(b"4567")
    assert task.data_path.read_bytes() == b"\0\0\0\x004567\0\0"
    assert task.read(4, 4) == b"4567"


def test_the_short_last_piece_is_written(task: StoredTask) -> None:
    task.write_piece(2, b"89", sha(b"89"))
    assert task.data_path.read_bytes()[8:] == b"89"


def test_a_wrong_digest_is_refused_and_nothing_is_written(task: StoredTask) -> None:
    with pytest.raises(SwarmflyError, match="piece 0: sha256 mismatch") as caught:
        task.write_piece(0, b"XXXX", sha(b"0123"))
    assert caught.value.code == "integrity"
    assert task.data_path.read_bytes() == b"\0" * len(DATA)
    assert task.done == set()


@pytest.mark.parametrize("data", [b"012", b"01234", b""])
def test_a_wrong_size_is_refused_and_nothing_is_written(task: StoredTask, data: bytes) -> None:
    with pytest.raises(SwarmflyError, match="piece 0: got") as caught:
        task.write_piece(0, data, sha(data))
    assert caught.value.code == "integrity"
    assert task.data_path.read_bytes() == b"\0" * len(DATA)


def test_a_wrong_size_is_refused_even_without_a_digest(task: StoredTask) -> None:
    with pytest.raises(SwarmflyError, match="piece 2: got 4 of 2 bytes"):
        task.write_piece(2, b"8901", None)
    assert task.data_path.read_bytes() == b"\0" * len(DATA)


def test_a_piece_is_written_chunk_by_chunk_and_proved_at_the_end(task: StoredTask) -> None:
    writer = task.writer(1)
    assert writer is not None
    assert task.writer(1) is None  # one writer per piece: an endgame copy keeps its own aside
    writer.write([b"45"])
    assert writer.finish(sha(b"4567"), [b"6", b"7"]) == sha(b"4567")  # the last ones with it
    writer.close()
    assert task.data_path.read_bytes()[4:8] == b"4567"
    assert 1 not in task.done  # the caller marks it, once proved


@pytest.mark.parametrize("writing", [1, 2, 4, 5, 16, 17, 64])
def test_the_pieces_being_written_hold_a_bounded_batch_each(writing: int) -> None:
    """Fewer pieces under way gather more per thread hop; together no more than the budget,
    or the least batch each once that exceeds it."""
    batch = transfer.write_batch(writing)
    assert transfer.WRITE_BATCH <= batch <= transfer.WRITE_BATCH_MOST
    assert writing * batch <= max(transfer.WRITE_BUFFERS, writing * transfer.WRITE_BATCH)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [((b"45", b"67"), "sha256 mismatch"), ((b"45",), "got 2 of 4"), ((b"456", b"78"), "more")],
)
def test_a_piece_that_does_not_prove_itself_is_never_done(
    task: StoredTask, chunks: tuple[bytes, ...], message: str
) -> None:
    writer = task.writer(0)
    assert writer is not None
    with pytest.raises(SwarmflyError, match=message):
        for chunk in chunks:
            writer.write([chunk])
        writer.finish(sha(b"0123"))
    writer.close()
    assert 0 not in task.done and task.writer(0) is not None  # free for the next copy


def test_a_piece_written_unhashed_is_held_with_no_digest_and_its_size_still_checked(
    store: TaskStore, task: StoredTask
) -> None:
    """A sole child's lent read: the whole file's digest proves it, so it is written only.
    It is held, with no digest to report or check it by; a restart does not take it back
    (no digest to re-hash it against): it is read again."""
    writer = task.writer(1, hashing=False)
    assert writer is not None
    writer.write([b"45", b"67"])
    assert writer.finish(None) == UNHASHED
    writer.close()
    task.mark_done(1, UNHASHED)
    assert 1 in task.done and task.digests[1] is None
    assert task.read(4, 4) == b"4567"
    short = task.writer(0, hashing=False)
    assert short is not None
    short.write([b"01"])
    with pytest.raises(SwarmflyError, match="piece 0: got 2 of 4"):
        short.finish(None)
    short.close()
    assert 0 not in task.done
    fill(task, [2])
    task.save()
    store.close()
    again = TaskStore(store.root).load()
    assert [t.unverified for t in again] == [{2}]


def test_a_done_piece_gets_no_writer(task: StoredTask) -> None:
    fill(task, [0])
    assert task.writer(0) is None


def test_mark_done_completes_the_task(task: StoredTask) -> None:
    fill(task, range(3))
    assert task.complete
    assert task.completed_bytes == len(DATA)
    assert task.digests == [sha(piece(n)) for n in range(3)]
    assert task.data_path.read_bytes() == DATA


def test_mark_done_twice_counts_once(task: StoredTask) -> None:
    fill(task, [0])
    version = task.version
    task.mark_done(0, sha(piece(0)))
    assert task.version == version
    assert task.completed_bytes == 4


def test_a_piece_count_that_does_not_match_the_length_is_refused(store: TaskStore) -> None:
    task = store.open(ID)
    with pytest.raises(SwarmflyError, match="piece count") as caught:
        task.set_content(TaskContent(content_length=10, piece_length=4, piece_count=2))
    assert caught.value.code == "bad_request"


def test_changed_content_is_a_conflict(task: StoredTask) -> None:
    with pytest.raises(SwarmflyError, match="task content changed") as caught:
        task.set_content(TaskContent(content_length=12, piece_length=4, piece_count=3))
    assert caught.value.code == "conflict"


def test_content_may_gain_its_digest(task: StoredTask) -> None:
    digest = "sha256:" + sha(DATA)
    task.set_content(TaskContent(10, 4, 3, digest))
    assert task.content is not None and task.content.digest == digest


def test_reset_forgets_every_piece(task: StoredTask) -> None:
    fill(task, range(3))
    task.reset()
    assert task.done == set()
    assert task.digests == [None, None, None]
    assert not task.covers(0, 10)


# -- covers --------------------------------------------------------------------------------


def test_covers_only_verified_pieces(task: StoredTask) -> None:
    task.write_piece(0, piece(0), sha(piece(0)))
    assert not task.covers(0, 4)  # written, not yet marked done
    task.mark_done(0, sha(piece(0)))
    assert task.covers(0, 4)
    assert task.covers(1, 3)
    assert not task.covers(0, 5)
    assert not task.covers(3, 6)


@pytest.mark.parametrize(("start", "end"), [(-1, 4), (0, 11), (5, 5), (6, 2), (0, 0)])
def test_covers_rejects_ranges_outside_the_content(task: StoredTask, start: int, end: int) -> None:
    fill(task, range(3))
    assert not task.covers(start, end)


def test_covers_the_whole_file_once_complete(task: StoredTask) -> None:
    fill(task, [2, 0])
    assert task.covers(8, 10)
    assert not task.covers(0, 10)
    fill(task, [1])
    assert task.covers(0, 10)


def test_covers_nothing_without_content(store: TaskStore) -> None:
    assert not store.open(ID).covers(0, 1)


# -- ids and paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../../etc", "..", "", "/etc/passwd", ID[:-1], ID.upper(), ID + "/..", "../" + ID[3:]],
)
def test_invalid_task_ids_never_become_paths(store: TaskStore, bad: str) -> None:
    with pytest.raises(SwarmflyError, match="invalid task id") as caught:
        store.path_for(bad)
    assert caught.value.code == "bad_request"
    with pytest.raises(SwarmflyError, match="invalid task id"):
        store.open(bad)
    assert store.get(bad) is None


def test_a_task_lives_under_the_store_root(store: TaskStore) -> None:
    path = store.path_for(ID)
    assert path == store.root / ID[:2] / ID
    assert path.resolve().is_relative_to(store.root.resolve())


def test_a_task_id_with_a_trailing_newline_is_refused(store: TaskStore) -> None:
    with pytest.raises(SwarmflyError, match="invalid task id"):
        store.path_for(ID + "\n")


def test_open_returns_the_same_task(store: TaskStore) -> None:
    assert store.open(ID) is store.open(ID)
    assert store.get(ID) is store.open(ID)
    assert store.get(OTHER) is None


# -- metadata and restart ------------------------------------------------------------------


def restart(store: TaskStore) -> TaskStore:
    """The store as a restarted host finds it: loaded, every task re-verified."""
    store.close()
    again = TaskStore(store.root)
    for task in again.load():
        while batch := task.verify_batch():
            task.accept(batch, task.check_pieces(batch))
    return again


def test_nothing_is_written_until_saved_and_an_unchanged_task_is_not_saved_again(
    task: StoredTask,
) -> None:
    fill(task, [0])
    assert not (task.dir / "meta.json").exists(), "saves are the node's, off the hot path"
    task.save()
    assert orjson.loads((task.dir / "meta.json").read_bytes())["done"] == [0]
    assert task.checkpoint() is None
    fill(task, [1])
    assert task.checkpoint() is not None


def test_files_are_private_and_metadata_replaced_atomically(task: StoredTask) -> None:
    fill(task, range(3))
    task.save()
    assert task.data_path.stat().st_mode & 0o777 == 0o600
    assert (task.dir / "meta.json").stat().st_mode & 0o777 == 0o600
    assert task.dir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in task.dir.iterdir()) == ["data", "meta.json"]


def test_data_is_synced_before_metadata_says_complete(
    task: StoredTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_sync, real_replace = os.fdatasync, os.replace

    def fdatasync(fd: int) -> None:
        calls.append("sync data" if os.fstat(fd).st_ino == task.data_path.stat().st_ino else "?")
        real_sync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        calls.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)
    fill(task, [0])
    task.save()
    assert calls == ["rename meta.json"], "a partial task's pieces are re-hashed anyway"
    fill(task, [1, 2])
    task.save()
    assert calls[1:] == ["sync data", "rename meta.json"]


WHOLE = TaskContent(content_length=10, piece_length=4, piece_count=3, digest=f"sha256:{sha(DATA)}")


def unhashed(task: StoredTask, number: int) -> None:
    """A piece written as a seed takes one of no digest known: written only (``UNHASHED``)."""
    writer = task.writer(number, hashing=False)
    assert writer is not None
    assert writer.finish(None, [piece(number)]) == UNHASHED
    writer.close()
    task.mark_done(number, UNHASHED)


def held_unhashed(store: TaskStore, numbers: list[int]) -> StoredTask:
    """A seed's complete copy, the pieces of ``numbers`` taken with no digest of their own
    (the whole file's proved them), saved as a restart finds it."""
    task = store.open(ID, "https://origin.example/file")
    task.set_content(WHOLE)
    for number in range(3):
        if number in numbers:
            unhashed(task, number)
        else:
            fill(task, [number])
    task.save()
    return task


def test_a_restart_proves_pieces_held_unhashed_by_the_whole_file_and_keeps_their_digests(
    store: TaskStore,
) -> None:
    """Pieces held with no digest of their own come back only through the whole file's
    digest: one pass, which leaves each with its digest (a seed reports them then)."""
    task = held_unhashed(store, [0, 2])
    assert task.digests == [None, sha(piece(1)), None]
    again = restart(store).get(ID)
    assert again is not None and again.complete
    assert again.digests == [sha(piece(n)) for n in range(3)]
    assert not again.unverified and not again.unproven


def test_a_restart_drops_pieces_held_unhashed_when_the_whole_file_no_longer_matches(
    store: TaskStore,
) -> None:
    """A byte changed while the host was down: the whole file fails, so the pieces only it
    proved are dropped (read again); a piece with its own digest that still matches stays."""
    task = held_unhashed(store, [0, 2])
    with open(task.data_path, "r+b") as data:
        data.seek(9)
        data.write(b"X")  # in piece 2, an unhashed one
    again = restart(store).get(ID)
    assert again is not None
    assert again.done == {1} and again.digests == [None, sha(piece(1)), None]


def test_a_partial_task_held_unhashed_loses_those_pieces_at_a_restart(store: TaskStore) -> None:
    """Without the whole file nothing proves an unhashed piece: it is read again."""
    task = store.open(ID, "https://origin.example/file")
    task.set_content(WHOLE)
    unhashed(task, 0)
    fill(task, [1])
    task.save()
    again = restart(store).get(ID)
    assert again is not None and again.done == {1}


def test_load_brings_back_complete_and_partial_tasks_unverified(
    store: TaskStore, task: StoredTask
) -> None:
    fill(task, range(3))
    task.save()
    partial = store.open(OTHER, "https://origin.example/other")
    partial.set_content(CONTENT)
    fill(partial, [0, 2])
    partial.save()
    store.close()

    restarted = TaskStore(store.root)
    loaded = {t.id: t for t in restarted.load()}
    assert set(loaded) == {ID, OTHER}
    for again in loaded.values():
        assert again.done == set() and not again.complete, "trusted only once re-hashed"
        assert not again.covers(0, 4)
    assert loaded[ID].unverified == {0, 1, 2} and loaded[OTHER].unverified == {0, 2}

    verified = restart(restarted)
    again, resumed = verified.get(ID), verified.get(OTHER)
    assert again is not None and resumed is not None
    assert again.complete and again.covers(0, 10) and again.read(0, 10) == DATA
    assert again.content == CONTENT and again.url == "https://origin.example/file"
    assert resumed.done == {0, 2} and not resumed.complete
    fill(resumed, [1])  # the download resumes with the missing piece only
    assert resumed.complete and resumed.read(0, 10) == DATA
    verified.close()


def test_a_piece_changed_on_disk_is_dropped_and_read_again(
    store: TaskStore, task: StoredTask
) -> None:
    fill(task, range(3))
    task.save()
    store.close()
    with open(task.data_path, "r+b") as handle:
        handle.seek(5)
        handle.write(b"X")
    again = restart(store).get(ID)
    assert again is not None
    assert again.done == {0, 2} and not again.complete
    assert not again.covers(4, 8), "the changed piece is never served"
    assert again.digests[1] is None
    fill(again, [1])
    assert again.complete and again.read(0, 10) == DATA


def test_a_task_whose_data_file_is_gone_is_an_orphan(store: TaskStore, task: StoredTask) -> None:
    fill(task, range(3))
    task.save()
    store.close()
    task.data_path.unlink()
    restarted = TaskStore(store.root)
    assert restarted.load() == []
    assert set(restarted.orphans) == {ID}
    restarted.evict(ID)
    assert not task.dir.exists() and restarted.orphans == {}


@pytest.mark.parametrize("meta", [b"{not json", None, b'{"id": "x", "content": null}'])
def test_a_task_dir_without_readable_metadata_is_an_orphan(
    store: TaskStore, task: StoredTask, meta: bytes | None
) -> None:
    fill(task, range(3))
    store.close()
    if meta is not None:
        (task.dir / "meta.json").write_bytes(meta)
    restarted = TaskStore(store.root)
    assert restarted.load() == []
    assert set(restarted.orphans) == {ID}
    assert restarted.orphans[ID] > 0, "what it takes on disk is counted"


def test_load_of_an_empty_root(tmp_path: Path) -> None:
    assert TaskStore(tmp_path / "missing").load() == []


def test_load_leaves_directories_that_are_not_task_ids_alone(
    store: TaskStore, task: StoredTask
) -> None:
    fill(task, range(3))
    task.save()
    store.close()
    stray = store.root / "ab" / "not-a-task"
    stray.mkdir(parents=True)
    (stray / "meta.json").write_bytes((task.dir / "meta.json").read_bytes())
    restarted = TaskStore(store.root)
    assert [t.id for t in restarted.load()] == [ID]
    assert restarted.orphans == {} and stray.is_dir()


# -- disk faults ---------------------------------------------------------------------------


def test_a_write_the_disk_refuses_is_an_oserror_naming_the_store(task: StoredTask) -> None:
    task.data_path.unlink()
    task.data_path.symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(OSError, match=f"No space left on device in {task.root}") as caught:
        task.write_piece(0, piece(0), sha(piece(0)))
    assert caught.value.errno == errno.ENOSPC
    assert task.done == set()


@pytest.mark.parametrize(
    "url",
    [
        "https://user:s3cret@origin.example:8443/bucket/file?X-Amz-Signature=abcdef&token=t0k",
        "https://origin.example:8443/bucket/file?X-Amz-Signature=abcdef#frag",
    ],
)
def test_metadata_on_disk_holds_no_query_or_userinfo(tmp_path: Path, url: str) -> None:
    store = TaskStore(tmp_path)
    task = store.open(ID, url)
    task.set_content(CONTENT)
    fill(task, range(3))
    task.save()
    raw = (task.dir / "meta.json").read_bytes()
    for secret in (b"s3cret", b"user", b"abcdef", b"t0k", b"Signature", b"?", b"frag"):
        assert secret not in raw
    assert orjson.loads(raw)["url"] == "https://origin.example:8443/bucket/file"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://u:p@example.com/a/b?sig=1#x", "https://example.com/a/b"),
        ("https://token@example.com:8443/a", "https://example.com:8443/a"),
        ("http://example.com", "http://example.com"),
        ("http://EXAMPLE.com/Path", "http://example.com/Path"),
        ("http://u:p@example.com:99999/x", "http://example.com/x"),  # no port, no raise
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1]:8080/x?sig=1", "http://[::1]:8080/x"),
        ("https://u:p@[2001:db8::1]/blob", "https://[2001:db8::1]/blob"),
    ],
)
def test_redact_url_keeps_ipv6_brackets(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_open_keeps_the_first_url(store: TaskStore) -> None:
    task = store.open(ID, "https://a.example/f?sig=1")
    store.open(ID, "https://b.example/f")
    assert task.url == "https://a.example/f"


# -- waiting for changes -------------------------------------------------------------------


@virtual_time
async def test_wait_change_returns_on_mark_done(task: StoredTask) -> None:
    waiter = asyncio.create_task(task.wait_change(task.version, timeout=5.0))
    await asyncio.sleep(1.0)
    assert not waiter.done()
    changed = now()
    task.mark_done(0, task.write_piece(0, piece(0), sha(piece(0))))
    await waiter
    assert now() == changed, "woken by the change, not by its timeout"


@virtual_time
async def test_wait_change_wakes_every_waiter(task: StoredTask) -> None:
    waiters = [asyncio.create_task(task.wait_change(task.version, timeout=5.0)) for _ in range(3)]
    await asyncio.sleep(1.0)
    assert not any(waiter.done() for waiter in waiters)
    changed = now()
    task.mark_done(1, sha(piece(1)))
    await asyncio.gather(*waiters)
    assert now() == changed


@virtual_time
async def test_wait_change_returns_at_once_when_already_changed(task: StoredTask) -> None:
    since = task.version
    task.mark_done(0, sha(piece(0)))
    await task.wait_change(since, timeout=5.0)
    assert now() == 0


@virtual_time
async def test_wait_change_returns_at_once_for_a_stale_version(task: StoredTask) -> None:
    before = task.version
    fill(task, range(3))
    await task.wait_change(before, timeout=5.0)
    assert now() == 0


@virtual_time
async def test_wait_change_gives_up_after_its_timeout(task: StoredTask) -> None:
    await task.wait_change(task.version, timeout=5.0)
    assert now() == 5.0
