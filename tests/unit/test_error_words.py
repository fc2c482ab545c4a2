"""Failures to reach a server say why, in words, and which server: made with real sockets on
loopback and a name under ``.invalid`` (RFC 2606: never resolves), each bounded to seconds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest

from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.natsserver import free_port
from swarmfly.plugins.sources.http import HttpSource

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMIT = 0.3


async def _never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the client gives up and closes
    writer.close()


async def _hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.close()


async def _speaks_plain_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(100)
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    writer.close()


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    listening = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with listening:
        yield listening.sockets[0].getsockname()[1]


async def failure_of(url: str) -> Exception:
    """What aiohttp raises for a GET of ``url``, with a short read limit."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=LIMIT)
    async with asyncio.timeout(5), aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(url) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return exc
    raise AssertionError(f"{url} answered")


async def test_a_closed_port_is_refused_with_its_host_and_port() -> None:
    port = free_port()
    exc = await failure_of(f"http://127.0.0.1:{port}/blob")
    assert connect_error_in_words(exc) == f"cannot connect to 127.0.0.1:{port}: Connection refused"


async def test_a_name_that_does_not_resolve_is_named() -> None:
    exc = await failure_of("http://origin.invalid/blob")
    words = connect_error_in_words(exc, "http://origin.invalid/blob")
    assert words.startswith("cannot resolve origin.invalid: ")
    assert "Error" not in words, "a cause, not an exception class"


async def test_a_server_that_never_answers_names_the_seconds_and_not_the_credentials() -> None:
    async with server(_never_answers) as port:
        url = f"http://ada:s3cret@127.0.0.1:{port}/blob?token=t0ken"
        exc = await failure_of(url)
    words = connect_error_in_words(exc, url, seconds=LIMIT)
    assert words == f"127.0.0.1:{port} did not answer in 0.3s"


async def test_a_server_that_hangs_up_is_named() -> None:
    async with server(_hangs_up) as port:
        url = f"http://127.0.0.1:{port}/blob"
        exc = await failure_of(url)
    assert connect_error_in_words(exc, url) == f"127.0.0.1:{port} closed the connection"


async def test_tls_to_a_plain_server_says_what_tls_said() -> None:
    async with server(_speaks_plain_http) as port:
        exc = await failure_of(f"https://127.0.0.1:{port}/blob")
    words = connect_error_in_words(exc)
    assert words.startswith(f"cannot connect to 127.0.0.1:{port}: ")
    assert "not permitted" not in words, "OpenSSL's error number is not the OS's"


async def test_the_http_source_reports_the_origin_in_words() -> None:
    source = HttpSource(retries=0, timeout=LIMIT)
    try:
        async with server(_never_answers) as port:
            with pytest.raises(SwarmflyError, match=rf"^source_error: 127\.0\.0\.1:{port} did not"):
                await source.stat(f"http://127.0.0.1:{port}/blob", {})
        with pytest.raises(SwarmflyError, match=r"cannot resolve origin\.invalid: ") as caught:
            await source.stat("http://origin.invalid/blob", {})
        assert caught.value.code == "source_error"
    finally:
        await source.close()


def test_a_local_disk_error_says_the_cause_and_the_file() -> None:
    import errno
    import os

    from swarmfly.services.peer.transfer import LocalDiskError

    full = LocalDiskError.of(
        OSError(errno.ENOSPC, "No space left on device", "/var/lib/swarmfly/t/data")
    )
    assert full.message == (
        "cannot store the download here: No space left on device (/var/lib/swarmfly/t/data)"
    )
    try:
        os.read(-1, 1)  # a real one: no file named
    except OSError as exc:
        assert LocalDiskError.of(exc).message.endswith(": Bad file descriptor")
