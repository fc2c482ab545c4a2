"""``peer.{host_id}.reach``: can this peer reach another host's upload server? `swarmfly
doctor` asks other hosts so, since a firewall between hosts is beyond what one host sees.

Not an HTTP prober for whoever asks (§9, every network input untrusted): the request names a
host id only. The address probed is the one the schedulers list for that live host
(``scheduler.address``), asked by this peer itself; only its ``/healthz`` is fetched, with GET,
no redirect followed, a bounded time and body, an address in a denied range (cloud metadata,
link-local) refused, and at most ``MAX_PROBES`` at once. Only the client role (the operator's
CLI) may send the request (the shipped NATS permissions).
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import aiohttp
import nats.errors
import orjson

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.origins import OriginPolicy
from swarmfly.services.peer.host import PeerHost

log = logging.getLogger(__name__)

PROBE_SECONDS = 3.0
"""A probe's time limit unless the request sets one (the contract allows at most 10)."""
MAX_PROBES = 4
"""Probes running at once; past them a request is refused (``unavailable``), not queued."""
ADDRESS_WAIT = 1.0
"""Seconds the schedulers have to say where the target is (each knows the hosts it hears)."""
MAX_BODY = 4096
"""Bytes of ``/healthz`` read: its answer is a small JSON object."""
MAX_ERROR = 1024
"""Characters of a failure's words the reply carries (the contract's bound)."""


def probe_url(address: str) -> str:
    """``address``/healthz, for an ``http(s)://host:port`` upload address and nothing else
    (no credentials, path, query or fragment): what the schedulers list is checked too."""
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        port = None
        parts = urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise SwarmflyError(
            "forbidden", f"{address[:256]!r} is not an upload address (http(s)://host:port)"
        )
    return f"{parts.scheme}://{parts.netloc}/healthz"


class Reach:
    """The probes this peer runs for `swarmfly doctor` on other hosts."""

    def __init__(self, node: PeerHost, bus: Bus) -> None:
        self.node = node
        self.host_id = node.settings.host_id
        self.bus = bus
        self._running = 0
        self._policy = OriginPolicy()
        """The built-in deny list only: a host may advertise any address of its network."""

    async def on_reach(self, req: messages.ReachRequest) -> messages.ReachReply:
        if self._running >= MAX_PROBES:
            raise SwarmflyError(
                "unavailable", f"this peer runs {MAX_PROBES} probes already; ask again"
            )
        self._running += 1
        try:
            address = await self.address_of(req.target)
            url = probe_url(address)
            await self._policy.check(url)
            return await self._probe(req.target, address, url, req.timeout_s or PROBE_SECONDS)
        finally:
            self._running -= 1

    async def address_of(self, target: str) -> str:
        """The upload address the schedulers list for the live host ``target``."""
        try:
            replies = await self.bus.gather(
                messages.ADDRESS,
                messages.AddressRequest(target),
                wait=ADDRESS_WAIT,
                expect=len(self.node.schedulers) or None,
            )
        except nats.errors.Error as exc:
            raise SwarmflyError("unavailable", f"cannot ask the schedulers: {exc}") from None
        for reply in replies:
            if reply.known and reply.address:
                return reply.address
        if not replies:
            raise SwarmflyError(
                "unavailable", f"no scheduler answered in {ADDRESS_WAIT:g}s: cannot look up hosts"
            )
        raise SwarmflyError(
            "not_found",
            f"no scheduler lists a live host {target!r}: this peer probes only the upload"
            " address of a host the schedulers list",
        )

    async def _probe(
        self, target: str, address: str, url: str, seconds: float
    ) -> messages.ReachReply:
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with (
                self._client() as session,
                session.get(
                    url,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=seconds),
                ) as response,
            ):
                status = response.status
                body = await response.content.read(MAX_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = connect_error_in_words(exc, url, seconds=seconds)
        else:
            try:
                healthy = orjson.loads(body).get("ok") is True
            except (orjson.JSONDecodeError, AttributeError):
                healthy = False
            if status != 200 or not healthy:
                error = f"{url} answered {status}" + ("" if status != 200 else " without ok")
        took = time.monotonic() - started
        log.info("probed %s (%s) for doctor: %s", target, url, error or "ok")
        return messages.ReachReply(
            self.host_id,
            target,
            address,
            ok=error is None,
            seconds=round(took, 4),
            status=status,
            error=None if error is None else error[:MAX_ERROR],
        )

    def _client(self) -> aiohttp.ClientSession:
        """A session of its own per probe: no pooled connection or cookie carries over."""
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=True),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
