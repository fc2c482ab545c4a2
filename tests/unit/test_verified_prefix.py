"""The verified prefix a download follows: the whole-file hash, and outputs copied while the
download runs that never hold an unverified byte."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmfly.content import TaskContent
from swarmfly.services.peer import filedigest
from swarmfly.services.peer.filedigest import PrefixDigest
from swarmfly.services.peer.store import StoredTask, TaskStore, copy_range

ID = hashlib.sha256(b"prefix").hexdigest()
DATA = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes: pieces of 1,024, the last one short
LENGTH = 1024
CONTENT = TaskContent(
    content_length=len(DATA),
    piece_length=LENGTH,
    piece_count=-(-len(DATA) // LENGTH),
    digest=f"sha256:{hashlib.sha256(DATA).hexdigest()}",
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece(number: int, data: bytes = DATA) -> bytes:
    return data[number * LENGTH : (number + 1) * LENGTH]


@pytest.fixture
def task(tmp_path: Path) -> StoredTask:
    opened = TaskStore(tmp_path / "tasks").open(ID, "https://origin.example/file")
    opened.set_content(CONTENT)
    return opened


@pytest.fixture
def output(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield fd
    os.close(fd)


def verify(task: StoredTask, number: int, data: bytes = DATA) -> None:
    task.mark_done(number, task.write_piece(number, piece(number, data), sha(piece(number, data))))


def contents(fd: int) -> bytes:
    return os.pread(fd, len(DATA) + 100, 0)


async def test_an_output_holds_only_the_contiguous_verified_prefix(
    task: StoredTask, output: int
) -> None:
    prefix = PrefixDigest(task)
    out = prefix.attach(output)
    for number in (3, 1, 2):  # out of order, piece 0 missing: nothing may be copied yet
        verify(task, number)
        prefix.kick()
        await prefix.settle()
    assert out.copied == 0 and contents(output).strip(b"\0") == b""
    verify(task, 0)
    prefix.kick()
    await prefix.settle()
    assert out.copied == 4 * LENGTH
    assert contents(output)[: 4 * LENGTH] == DATA[: 4 * LENGTH]
    assert os.fstat(output).st_size == 4 * LENGTH, "nothing past the verified prefix"


async def test_the_output_and_the_whole_file_digest_come_out_of_one_pass_in_steps(
    task: StoredTask, output: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filedigest, "PASS_BYTES", 1000)  # not a multiple of the piece length
    prefix = PrefixDigest(task)
    prefix.hashing = True
    out = prefix.attach(output)
    for number in reversed(range(CONTENT.piece_count)):
        verify(task, number)
        prefix.kick()
    assert await prefix.finish() == CONTENT.digest
    out.copy_up_to(task, len(DATA))  # what the peer does at the end: the tail, here none
    assert contents(output) == DATA


async def test_an_output_attached_late_gets_the_file_from_its_first_byte(
    task: StoredTask, output: int
) -> None:
    prefix = PrefixDigest(task)
    prefix.hashing = True
    for number in range(CONTENT.piece_count):
        verify(task, number)
    prefix.kick()
    await prefix.settle()
    out = prefix.attach(output)  # a second ask joining a download that is almost done
    assert await prefix.finish() == CONTENT.digest
    assert out.copied == len(DATA) and contents(output) == DATA


async def test_without_a_digest_nothing_is_hashed_and_the_output_still_follows(
    task: StoredTask, output: int
) -> None:
    prefix = PrefixDigest(task)
    reads: list[int] = []
    real = task.hash_into

    def counted(hasher: object, offset: int, size: int) -> bool:
        reads.append(size)
        return real(hasher, offset, size)

    task.hash_into = counted  # type: ignore[method-assign]
    out = prefix.attach(output)
    for number in range(CONTENT.piece_count):
        verify(task, number)
        prefix.kick()
    await prefix.settle()
    assert reads == [] and out.copied == len(DATA) and contents(output) == DATA


async def test_rewind_takes_pieces_read_again_into_the_output_and_the_digest(
    task: StoredTask, output: int
) -> None:
    forged = DATA[:LENGTH] + b"X" * LENGTH + DATA[2 * LENGTH :]
    prefix = PrefixDigest(task)
    prefix.hashing = True
    out = prefix.attach(output)
    for number in range(CONTENT.piece_count):
        verify(task, number, forged)  # piece 1 on someone's false word
        prefix.kick()
    assert await prefix.finish() != CONTENT.digest
    assert contents(output) == forged
    task.done.discard(1)  # the repair: read again from the origin
    verify(task, 1)
    await prefix.rewind()
    assert await prefix.finish() == CONTENT.digest
    assert contents(output) == DATA, "the output took the piece read again"
    assert out.copied == len(DATA)


def test_copy_range_falls_back_to_a_buffer_where_the_kernel_will_not_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    with open(source, "rb") as src, open(tmp_path / "target.bin", "w+b") as dst:
        copy_range(src.fileno(), dst.fileno(), 1000, 5000)
        assert os.pread(dst.fileno(), 10_000, 0) == b"\0" * 1000 + DATA[1000:6000]


def test_copy_range_of_a_short_source_is_an_error_not_a_short_file(tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA[:100])
    with open(source, "rb") as src, open(tmp_path / "target.bin", "w+b") as dst:
        with pytest.raises(OSError) as caught:
            copy_range(src.fileno(), dst.fileno(), 0, len(DATA))
        assert caught.value.errno == errno.EIO
