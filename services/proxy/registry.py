"""What the mirror makes of a request, without I/O: the route, the upstream, the error body.

Paths are checked raw (still percent-encoded) and decoded: a ``.`` or ``..`` segment, however
spelled, never reaches an upstream URL, and registry API paths follow the distribution spec's
grammar (a repository name with an empty segment or capitals is refused).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

import orjson

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_NAME_RE = re.compile(rf"^{_NAME}\Z")
_API = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>blobs|manifests|tags|referrers)/(?P<rest>.*)\Z")
"""A registry API path, loosely: what it names is then checked against the spec's grammar
(greedy, so a repository with ``blobs`` in its name still ends at the last keyword)."""
_TARGET = re.compile(r"^/[\x21-\x7e]*\Z")
"""An origin-form request target: printable ASCII, no space (RFC 9112 §3.2)."""
_REFERENCE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+=-]{0,254}\Z")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")
_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_UPLOAD = re.compile(r"^uploads/[A-Za-z0-9_.=-]{0,256}\Z")
MAX_NAME = 255
"""Characters of a repository name (distribution's limit)."""
OWN_PATHS = ("/healthz", "/metrics")
"""Answered by the proxy itself; every other path belongs to the upstream."""

DOCKER_HUB = "registry-1.docker.io"
_ALIASES = {"docker.io": DOCKER_HUB, "index.docker.io": DOCKER_HUB}
"""What containerd's ``ns=`` says for Docker Hub, and where its API lives."""


@dataclass(frozen=True)
class RegistryError(Exception):
    """A refusal shaped as the registry API's error body."""

    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return orjson.dumps({"errors": [{"code": self.code, "message": self.message}]})


Kind = Literal["blob", "passthrough"]


@dataclass(frozen=True)
class Route:
    kind: Kind
    name: str = ""
    digest: str = ""
    """``sha256:…`` of a blob the swarm can carry (kind ``blob``)."""


def route(raw_path: str, method: str) -> Route:
    """Classify a request: a sha256 blob GET goes through the swarm, anything else passes
    through to the upstream untouched, once it is known not to climb out of the path it
    names (``..``, ``%2e%2e``, ``%2f``, ``\\``) and, on the registry API, to follow its grammar."""
    path = raw_path.split("?", 1)[0]
    api = path.startswith("/v2/")
    if not _TARGET.match(raw_path):
        raise RegistryError(400, "UNSUPPORTED", "the request target must be a printable path")
    if any(part in (".", "..") for part in re.split(r"[/\\]", _decoded(path))):
        code = "NAME_INVALID" if api else "UNSUPPORTED"
        raise RegistryError(400, code, "the path must not hold . or .. segments")
    match = _API.match(path)
    if match is None:
        return Route("passthrough")
    name, kind, rest = match["name"], match["kind"], match["rest"]
    if len(name) > MAX_NAME or not _NAME_RE.match(name):
        raise RegistryError(400, "NAME_INVALID", "invalid repository name")
    if kind == "blobs":
        if _UPLOAD.match(rest):
            return Route("passthrough", name)
        if not _DIGEST.match(rest) or (rest.startswith("sha256:") and not _SHA256.match(rest)):
            raise RegistryError(400, "DIGEST_INVALID", "invalid blob digest")
        if method == "GET" and rest.startswith("sha256:"):
            return Route("blob", name, rest)
    elif kind == "manifests" and not _REFERENCE.match(rest):
        raise RegistryError(400, "MANIFEST_INVALID", "invalid tag or digest")
    return Route("passthrough", name)


def _decoded(path: str) -> str:
    """``path`` percent-decoded until it stops changing (a server that decodes twice must
    not find a ``..`` in ``%252e%252e`` either), a few rounds at most."""
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return path


def _authority(text: str) -> tuple[str | None, str]:
    """(scheme or None, host[:port] lowercased) of a URL or a bare host."""
    parts = urlsplit(text if "://" in text else f"//{text}")
    scheme = parts.scheme.lower() or None
    netloc = parts.netloc.lower().rsplit("@", 1)[-1]
    return scheme, _ALIASES.get(netloc, netloc)


class Upstreams:
    """The configured registries, and which one a request means."""

    def __init__(self, registries: list[str]) -> None:
        self.bases: list[str] = []
        self._by_host: dict[str, list[str]] = {}
        for entry in registries:
            scheme, host = _authority(entry)
            if scheme not in ("http", "https") or not host:
                raise ValueError(f"proxy registry must be an http(s) URL: {entry!r}")
            base = f"{scheme}://{host}"
            self.bases.append(base)
            self._by_host.setdefault(host, []).append(base)

    def pick(self, header: str | None, ns: str | None) -> str:
        """The upstream base URL: ``X-Swarmfly-Registry``, then ``ns=``, then the default."""
        wanted = header or ns
        if not wanted:
            if not self.bases:
                raise RegistryError(403, "DENIED", "no upstream registry is configured")
            return self.bases[0]
        try:
            scheme, host = _authority(wanted.strip())
        except ValueError:  # e.g. an unbalanced "[" of an IPv6 literal
            raise RegistryError(
                400, "UNSUPPORTED", "the upstream registry cannot be parsed"
            ) from None
        for base in self._by_host.get(host, []):
            if scheme is None or base.startswith(f"{scheme}://"):
                return base
        raise RegistryError(403, "DENIED", "that upstream registry is not configured here")


DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = -1


@dataclass(frozen=True)
class Destination:
    """One entry of the proxy's allow-list: ``[scheme://]host[:port]``, the host an fnmatch
    pattern; no scheme means ``http`` on 80 and ``https`` on 443; port ``*`` any port."""

    scheme: str | None
    host: str
    port: int | None
    """None: the default port of the scheme asked for; ``ANY_PORT``: any."""

    @classmethod
    def parse(cls, entry: str) -> Destination:
        text = entry.strip().lower()
        scheme, _, rest = text.rpartition("://")
        if scheme not in ("", "http", "https"):
            raise ValueError(f"proxy host must be [http[s]://]host[:port]: {entry!r}")
        rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        host, port_text = rest, ""
        if rest.startswith("["):  # an IPv6 literal
            host, _, after = rest[1:].partition("]")
            port_text = after.removeprefix(":")
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        port: int | None = None
        if port_text == "*":
            port = ANY_PORT
        elif port_text:
            if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"proxy host has an invalid port: {entry!r}")
            port = int(port_text)
        if not host:
            raise ValueError(f"proxy host names no host: {entry!r}")
        return cls(scheme or None, _ALIASES.get(host, host), port)

    def _port_allows(self, scheme: str, port: int) -> bool:
        if self.port == ANY_PORT:
            return True
        return port == (self.port if self.port is not None else DEFAULT_PORTS[scheme])

    def allows(self, scheme: str, host: str, port: int) -> bool:
        """A request for ``scheme://host:port`` (the port filled in by the caller)."""
        if self.scheme not in (None, scheme):
            return False
        return fnmatch.fnmatchcase(host, self.host) and self._port_allows(scheme, port)

    def allows_tunnel(self, host: str, port: int) -> bool:
        """``CONNECT host:port``: the very socket an entry names, whatever it speaks on it
        (a bare host: its https port)."""
        scheme = self.scheme or "https"
        return fnmatch.fnmatchcase(host, self.host) and self._port_allows(scheme, port)


class AllowList:
    """Where the proxy may forward to or tunnel: host *and* port, never a host alone (a
    registry on 127.0.0.1 must not open every port of 127.0.0.1)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = [Destination.parse(entry) for entry in entries]

    def allows(self, scheme: str, host: str, port: int | None) -> bool:
        scheme, host = scheme.lower(), host.lower()
        if scheme not in DEFAULT_PORTS:
            return False
        filled = DEFAULT_PORTS[scheme] if port is None else port
        return any(entry.allows(scheme, host, filled) for entry in self.entries)

    def allows_tunnel(self, host: str, port: int) -> bool:
        host = host.lower()
        return any(entry.allows_tunnel(host, port) for entry in self.entries)
