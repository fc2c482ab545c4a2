"""Which origins a service may read: the ``[origins]`` allow/deny list.

A URL that arrives over NATS (a preheat, a seed request, a download) makes a service connect
wherever it names, and the bytes can then be read back from the cache: server-side request
forgery with read-back. Every origin a peer or storage service reads passes this policy —
the URL it was given, every redirect, and (through the source's resolver) every address a
name resolves to — before any connection is made.

Entries (``allow`` and ``deny``) are ``HOST[:PORT]``:

- ``registry.example.com`` one host name, ``*.example.com`` any name below it, ``*`` any host;
- ``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``, ``[fd00::/8]:443`` addresses, matched against an
  IP literal in the URL and against every address a name resolves to;
- ``:PORT`` (``registry:5000``, ``10.0.0.0/8:80``) limits the entry to one port (a URL without
  one has its scheme's: 80 for http and oci+http, 443 for https and oci).

Link-local and cloud-metadata addresses are always denied. A deny entry wins over an allow
entry; with ``allow`` set, an origin must match one of its entries (a name entry, or an
address entry for every address the name resolves to). ``0.0.0.0`` and ``::`` count as
loopback, which is what connecting to them reaches. ``s3://`` URLs are not checked: their
authority is a bucket, read at the endpoint the operator configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from swarmfly.errors import SwarmflyError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolve = Callable[[str, int | None], Awaitable[list[str]]]
"""``resolve(host, port) -> addresses``, as ``getaddrinfo`` answers."""

DEFAULT_PORTS = {"http": 80, "https": 443, "oci": 443, "oci+http": 80}
UNCHECKED_SCHEMES = frozenset({"s3", "hf"})
"""Schemes whose URL names no host to connect to (an S3 bucket, a Hugging Face repo): their
sources check the endpoints they do connect to, and every redirect, themselves."""
_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))


@dataclass(frozen=True)
class Rule:
    """One ``[origins]`` entry: a host name pattern or an address range, maybe one port."""

    text: str
    name: str | None = None
    """Lower case, no trailing dot; ``*.suffix`` or ``*`` match more than one."""
    network: Network | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        entry = text.strip()
        host, port = _split_port(entry)
        if not host:
            raise ValueError(f"[origins] {text!r}: no host")
        try:
            return cls(
                text, network=ipaddress.ip_network(host.strip("[]"), strict=False), port=port
            )
        except ValueError:
            pass
        name = host.lower().rstrip(".")
        label = name.removeprefix("*.") if name != "*" else "x"
        if not label or not all(
            part and all(c.isalnum() or c in "-_" for c in part) for part in label.split(".")
        ):
            raise ValueError(
                f"[origins] {text!r}: not a host name, *.domain, *, an address or a CIDR range"
            )
        return cls(text, name=name, port=port)

    def matches_name(self, host: str, port: int | None) -> bool:
        if self.name is None or not self._port_ok(port):
            return False
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def matches_address(self, address: Address, port: int | None) -> bool:
        if self.network is None or not self._port_ok(port):
            return False
        return address.version == self.network.version and address in self.network

    def _port_ok(self, port: int | None) -> bool:
        return self.port is None or self.port == port


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``v6/len`` (a bare IPv6 address has colons of its own)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"[origins] {entry!r}: text after ']' must be :PORT")
        return host, _port(entry, rest[1:]) if rest else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(entry, port)
    return entry, None


def _port(entry: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"[origins] {entry!r}: the port must be 1-65535")
    return int(text)


BUILT_IN_DENY: tuple[tuple[Rule, str], ...] = tuple(
    (Rule.parse(text), reason)
    for text, reason in (
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("metadata.google.internal", "cloud metadata"),
        ("metadata.goog", "cloud metadata"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
    )
)
"""Denied whatever the configuration says: nothing a swarm distributes lives there, and an
instance's credentials do."""


def parse_address(text: str) -> Address | None:
    """An IP literal (IPv4-mapped IPv6 as the IPv4 it is, a zone id dropped), else None."""
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _reached(address: Address) -> tuple[Address, ...]:
    """The addresses a connection to ``address`` reaches: the unspecified one is this host."""
    return (address, *_LOOPBACK) if address.is_unspecified else (address,)


def this_host_only(address: Address) -> bool:
    """Whether a connection to ``address`` reaches the connecting machine itself, whichever
    it is: loopback, or unspecified (``0.0.0.0``, ``::``), which is what connecting to it does."""
    return address.is_loopback or address.is_unspecified


@dataclass(frozen=True)
class Target:
    """What a URL makes a source connect to."""

    origin: str
    """``scheme://host[:port]/``, for messages: no credentials, path or query."""
    host: str
    port: int | None


def target_of(url: str) -> Target | None:
    """The host a URL names; None for one that names none (``s3://``, ``file:///``)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SwarmflyError("bad_request", "the URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme in UNCHECKED_SCHEMES:
        return None
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        return None  # nothing to connect to (file:///…); a source that needs a host says so
    shown = f"[{host}]" if ":" in host else host
    suffix = f":{port}" if port is not None else ""
    return Target(f"{scheme}://{shown}{suffix}/", host, port or DEFAULT_PORTS.get(scheme))


async def system_resolve(host: str, port: int | None) -> list[str]:
    """Every address ``getaddrinfo`` gives (the resolver aiohttp uses too); none when the
    name does not resolve (the source then fails to connect on its own)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


class OriginPolicy:
    """The allow/deny decision, pure in :meth:`decide`; :meth:`check` resolves names first."""

    def __init__(
        self, allow: Iterable[str] = (), deny: Iterable[str] = (), resolve: Resolve | None = None
    ) -> None:
        self.allow = tuple(Rule.parse(text) for text in allow)
        self.deny = (*BUILT_IN_DENY, *((Rule.parse(text), "") for text in deny))
        self._resolve = resolve or system_resolve

    def decide(self, host: str, port: int | None, addresses: Sequence[str]) -> str | None:
        """None when the origin may be read, else why not (``[origins] deny: link-local``).
        ``addresses``: what ``host`` resolves to (for an IP literal, itself)."""
        literal = parse_address(host)
        reached = [
            a
            for text in ([host] if literal is not None else addresses)
            if (parsed := parse_address(text)) is not None
            for a in _reached(parsed)
        ]
        for rule, reason in self.deny:
            if rule.matches_name(host, port) or any(rule.matches_address(a, port) for a in reached):
                return f"[origins] deny: {reason or rule.text}"
        if not self.allow:
            return None
        if any(rule.matches_name(host, port) for rule in self.allow):
            return None
        if reached and all(any(r.matches_address(a, port) for r in self.allow) for a in reached):
            return None
        return "not in [origins] allow"

    async def check(self, url: str) -> None:
        """Raise ``forbidden`` unless ``url``'s origin may be read; before any connection."""
        await self.resolve(url)

    async def resolve(self, url: str) -> list[str]:
        """What ``url``'s host name resolves to, every address allowed (``forbidden``
        otherwise); none for an IP literal (itself) or a URL naming no host. For a caller that
        connects to these addresses and no others: a name resolved again at connect time may
        answer otherwise (DNS rebinding)."""
        target = target_of(url)
        if target is None:
            return []
        addresses: list[str] = []
        if parse_address(target.host) is None:
            addresses = await self._resolve(target.host, target.port)
        self._refuse(target, addresses)
        return addresses

    def check_addresses(self, host: str, port: int | None, addresses: Sequence[str]) -> None:
        """Raise ``forbidden`` when a connection about to be made to ``host`` would use a
        denied address (a source's resolver calls this: a name may resolve otherwise now
        than when :meth:`check` asked)."""
        shown = f"[{host}]" if ":" in host else host
        self._refuse(Target(f"//{shown}:{port}/", host.lower().rstrip("."), port), addresses)

    def _refuse(self, target: Target, addresses: Sequence[str]) -> None:
        reason = self.decide(target.host, target.port, addresses)
        if reason is not None:
            raise SwarmflyError("forbidden", f"{target.origin} is not an allowed origin ({reason})")
