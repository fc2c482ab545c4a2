"""A NATS connection bound to a subject prefix: connecting (retries, refusals, a one-shot
command's deadline), token renewal, the tasks it runs, and the subjects its contracts name.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine, Sequence
from typing import Any, Self

import nats.errors
from nats.aio.client import Client

from swarmfly import contracts
from swarmfly.bus.natsinternals import TlsNotOffered, TlsRequiringClient
from swarmfly.config import TokenFile
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import redact_url

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 1.0
"""Seconds to close a connection the server refused."""
TOKEN_CHECK = 10.0
"""How often a connection on a token file looks for a renewed token."""


class Connection:
    """The connection the bus's jobs (sending, serving, discovery, key-value) share."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.used: set[str] = set()
        """Contract names this bus has used; tests check each has a contract."""
        self._handling: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        *,
        prefix: str,
        name: str,
        options: dict[str, Any] | None = None,
        within: float | None = None,
    ) -> Self:
        """Connect, retrying servers that are down for as long as it takes; but after as many
        refusals of the credentials or of TLS as there are servers, raise SwarmflyError:
        that is a setting to fix, not a server to wait for. ``within``: the seconds a one-shot
        command waits instead, then SwarmflyError("unavailable") with the last error (the
        failed attempts log at DEBUG: the error says it once)."""
        options = dict(options or {})
        servers = list(servers)
        nc = TlsRequiringClient()
        nc.require_tls = "tls" in options or any(s.startswith("tls://") for s in servers)
        refusals = 0
        connected = False

        async def on_error(exc: Exception) -> None:
            nonlocal refusals
            (log.debug if within is not None and not connected else log.warning)("nats: %s", exc)
            if connected or not _refused(exc):
                return
            refusals += 1
            if refusals >= len(servers):
                raise _refusal(exc, servers, options)

        async def on_disconnect() -> None:
            # nats-py marks the client closed before it calls back for a close of our own
            (log.debug if nc.is_closed else log.info)("nats: disconnected")

        async def on_reconnect() -> None:
            log.info("nats: reconnected")

        try:
            async with asyncio.timeout(within):
                await nc.connect(
                    servers=servers,
                    name=name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    max_reconnect_attempts=-1,
                    connect_timeout=3,
                    **{"reconnect_time_wait": 0.5, **options},  # typed int, takes seconds
                )
        except (SwarmflyError, TimeoutError) as exc:
            try:  # after a failed TLS handshake the stream may never report itself closed
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.debug("nats: the refused connection did not close in %gs", CLOSE_TIMEOUT)
            if isinstance(exc, SwarmflyError) or within is None:
                raise
            where = ", ".join(redact_url(s) for s in servers)
            last = in_words(nc.last_error) if nc.last_error else "no answer"
            raise SwarmflyError(
                "unavailable", f"cannot reach NATS at {where} in {within:g}s: {last}"
            ) from None
        connected = True
        bus = cls(nc, prefix)
        token = options.get("token")
        if isinstance(token, TokenFile):
            bus.spawn(bus._renew(token))
        return bus

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of this connection's, cancelled when it closes."""
        task = asyncio.create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)
        return task

    async def _renew(self, token: TokenFile) -> None:
        """Reconnect once the token file is renewed: the callout's session ends with the
        token it was granted for, and nats-py closes for good on that error."""
        while True:
            await asyncio.sleep(TOKEN_CHECK)
            if self.nc.is_connected and token.renewed():
                log.info("nats: reconnecting with the renewed token of %s", token.path)
                await self.nc.force_reconnect()

    def subject(self, name: str, **tokens: str) -> str:
        return self._subject(name, tokens)

    def _subject(self, name: str, tokens: dict[str, str], every: tuple[str, ...] = ()) -> str:
        self.used.add(name)
        subject: str = contracts.get(name).subject(self.prefix, every=every, **tokens)
        return subject

    async def close(self) -> None:
        for task in list(self._handling):
            task.cancel()
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except nats.errors.ConnectionReconnectingError:
            # The server is gone (a stopped NATS): nothing can be drained, and closing may
            # find the socket reset; either way the connection is over.
            try:
                await self.nc.close()
            except OSError as exc:
                log.debug("nats: closed a lost connection: %s", in_words(exc))


def messaging(subject: str, operation: str) -> dict[str, str]:
    """The OpenTelemetry messaging attributes of a span around one message."""
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


def _refused(exc: Exception) -> bool:
    """Whether a server turned the connection down for its credentials or its TLS: no
    retry will change that (a timeout or a connection cut mid-handshake might)."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False
    if isinstance(exc, ssl.SSLError | TlsNotOffered | nats.errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return (
        isinstance(exc, nats.errors.Error)
        and ("authoriz" in text or "authenticat" in text)
        and "timeout" not in text
    )


def _refusal(exc: Exception, servers: list[str], options: dict[str, Any]) -> SwarmflyError:
    """The error a user reads: what was refused and which settings to check, with the URLs'
    userinfo left out and no secret."""
    where = ", ".join(redact_url(s) for s in servers)
    if isinstance(exc, ssl.SSLError | TlsNotOffered):
        hint = "check [nats] tls_ca, tls_cert, tls_key and tls_hostname"
        return SwarmflyError("unavailable", f"TLS with NATS ({where}) failed: {exc}; {hint}")
    method = next(
        (
            label
            for key, label in (
                ("user_credentials", "the creds file"),
                ("nkeys_seed", "the NKey seed"),
                ("token", "the token"),
                ("user", "user and password"),
            )
            if options.get(key)
        ),
        "the URL's credentials" if any("@" in s for s in servers) else None,
    )
    if method is None:  # most often the NATS of `swarmfly up`, which admits its own only
        return SwarmflyError(
            "unavailable",
            f"NATS ({where}) requires credentials and none were given ({exc}): `swarmfly up`"
            " keeps its cluster's under <state dir>/credentials, and get, status, preheat and"
            " doctor use them when run with the same --state-dir; otherwise set [nats] creds,"
            " nkeys_seed, token_file or user",
        )
    return SwarmflyError(
        "unavailable", f"NATS ({where}) refused {method}: {exc}; check the [nats] settings"
    )
