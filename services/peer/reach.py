"""``peer.{host_id}.reach``: can this peer reach another host's upload server? `swarmfly
doctor` asks other hosts so, since a firewall between hosts is beyond what one host sees.

Not an HTTP prober for whoever asks (§9, every network input untrusted): the request names a
host id only. The address probed is the one the schedulers list for that live host
(``scheduler.address``), asked by this peer itself; only its ``/healthz`` is fetched, with GET,
no redirect followed, a bounded time and body, an address in a denied range (cloud metadata,
link-local) refused, and at most ``MAX_PROBES`` at once. Only the client role (the operator's
CLI) may send the request (the shipped NATS permissions).

A loopback or unspecified address (``127.0.0.1``, ``::1``, ``0.0.0.0``, ``::``, or a name
resolving to one) is probed only by a peer that advertises one itself, that is on a cluster all
on one machine (`swarmfly up`, the tests): elsewhere the GET would reach a port of the asked
peer's own machine (an oracle for its local services), and no other machine reaches that
address anyway, which the reply says instead. A name is resolved once: every address is
checked and the connection goes to those only (``PinnedResolver``), so a second lookup (DNS
rebinding) cannot slip a denied address past the check.
"""

from __future__ import annotations

import logging
import socket
import time
from urllib.parse import urlsplit

import aiohttp
import nats.errors
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.origins import (
    OriginPolicy,
    Resolve,
    parse_address,
    system_resolve,
    target_of,
    this_host_only,
)
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


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one probe: the name probed answers with the addresses already
    checked, and nothing else resolves. The connection goes where the check looked."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        self._host = host.lower().rstrip(".")
        self._addresses = tuple(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".") != self._host:
            raise OSError(f"{host} is not the host probed")
        found: list[ResolveResult] = []
        for address in self._addresses:
            kind = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family in (socket.AF_UNSPEC, kind):
                found.append(
                    ResolveResult(
                        hostname=host,
                        host=address,
                        port=port,
                        family=kind,
                        proto=0,
                        flags=socket.AI_NUMERICHOST,
                    )
                )
        if not found:
            raise OSError(f"{host} has no checked address of the family asked")
        return found

    async def close(self) -> None:
        """Nothing to release: no lookup is ever made."""


class Prober:
    """One probe of an upload address: where it may connect, and the GET (apart from NATS and
    the host, so that tests drive it with a resolver of their own)."""

    def __init__(self, host_id: str, advertised: str, resolve: Resolve | None = None) -> None:
        self.host_id = host_id
        self.advertised = advertised
        """The address this peer advertises (``[peer] advertise_ip`` or its route to NATS)."""
        self._resolve = resolve or system_resolve
        self._policy = OriginPolicy(resolve=self._resolve)
        """The built-in deny list only: a host may advertise any address of its network."""

    async def probe(self, target: str, address: str, seconds: float) -> messages.ReachReply:
        """``forbidden`` for an address that is no upload address or is in a denied range;
        else a reply, ``ok`` or what stopped it (a loopback target refused among them)."""
        url = probe_url(address)
        started = time.monotonic()
        addresses = await self._policy.resolve(url)  # the one lookup of the name, checked
        error = await self._refusal(url, addresses)
        status: int | None = None
        if error is None:
            status, error = await self._get(url, addresses, seconds)
        log.info("probed %s (%s) for doctor: %s", target, url, error or "ok")
        return messages.ReachReply(
            self.host_id,
            target,
            address,
            ok=error is None,
            seconds=round(time.monotonic() - started, 4),
            status=status,
            error=None if error is None else error[:MAX_ERROR],
        )

    async def _refusal(self, url: str, addresses: list[str]) -> str | None:
        """Why ``url`` is not probed from here, in words; None when it may be. ``addresses``:
        what its name resolved to (none for an IP literal)."""
        where = target_of(url)
        assert where is not None, "probe_url made an http(s) URL with a host"
        literal = parse_address(where.host)
        if literal is None and not addresses:
            return f"cannot resolve {where.host}"
        reached = [literal] if literal is not None else [parse_address(a) for a in addresses]
        local = next((a for a in reached if a is not None and this_host_only(a)), None)
        if local is None or await self._here_only():
            return None
        kind = "a loopback" if local.is_loopback else "an unspecified"
        shown = f"[{where.host}]" if ":" in where.host else where.host
        said = (
            f"{shown}:{where.port} is {kind} address"
            if literal is not None
            else f"{where.host} resolves to {local}, {kind} address"
        )
        return (
            f"{said}, which other machines cannot reach ({self.host_id} advertises"
            f" {self.advertised}: not probed)"
        )

    async def _here_only(self) -> bool:
        """This peer advertises a loopback (or unspecified) address: the whole cluster is on
        this machine, where a loopback address is every host's."""
        own = parse_address(self.advertised)
        if own is not None:
            return this_host_only(own)
        resolved = [parse_address(a) for a in await self._resolve(self.advertised, None)]
        return bool(resolved) and all(a is not None and this_host_only(a) for a in resolved)

    async def _get(
        self, url: str, addresses: list[str], seconds: float
    ) -> tuple[int | None, str | None]:
        """GET ``url`` at ``addresses`` (its name's checked ones) only: its status, and why it
        is not a healthy answer (None when it is)."""
        status: int | None = None
        try:
            async with (
                self._client(url, addresses) as session,
                session.get(
                    url,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=seconds),
                ) as response,
            ):
                status = response.status
                body = await response.content.read(MAX_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return status, connect_error_in_words(exc, url, seconds=seconds)
        try:
            healthy = orjson.loads(body).get("ok") is True
        except (orjson.JSONDecodeError, AttributeError):
            healthy = False
        if status != 200 or not healthy:
            return status, f"{url} answered {status}" + ("" if status != 200 else " without ok")
        return status, None

    def _client(self, url: str, addresses: list[str]) -> aiohttp.ClientSession:
        """A session of its own per probe: no pooled connection or cookie carries over, and
        no name resolves but the one probed, to the addresses checked."""
        where = target_of(url)
        assert where is not None
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=1,
                force_close=True,
                use_dns_cache=False,
                resolver=PinnedResolver(where.host, addresses),
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
        )


class Reach:
    """The probes this peer runs for `swarmfly doctor` on other hosts."""

    def __init__(self, node: PeerHost, bus: Bus, resolve: Resolve | None = None) -> None:
        self.node = node
        self.host_id = node.settings.host_id
        self.bus = bus
        self._running = 0
        self.prober = Prober(self.host_id, node.ip, resolve)

    async def on_reach(self, req: messages.ReachRequest) -> messages.ReachReply:
        if self._running >= MAX_PROBES:
            raise SwarmflyError(
                "unavailable", f"this peer runs {MAX_PROBES} probes already; ask again"
            )
        self._running += 1
        try:
            address = await self.address_of(req.target)
            return await self.prober.probe(req.target, address, req.timeout_s or PROBE_SECONDS)
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
