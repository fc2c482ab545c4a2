"""HTTP header rules, for every server and client here: which headers are one connection's,
and the one parser of ``Range`` and ``Content-Range``."""

from __future__ import annotations

import re
from dataclasses import dataclass

HOP_BY_HOP = frozenset(
    {"connection", "content-length", "keep-alive", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "proxy-authorization", "proxy-connection"}
)  # fmt: skip
"""Headers that belong to one connection: a caller's values would break the request."""

_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
"""ASCII digits only: ``int`` also reads other scripts' digits, HTTP does not."""


class Unsatisfiable(Exception):
    """A Range that lies outside the content (416)."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    """Exclusive."""

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_range(header: str | None) -> tuple[int | None, int | None] | None:
    """``(first, last)`` of a one-span ``Range: bytes=first-last`` (either may be missing:
    ``bytes=90-``, the suffix ``bytes=-10``); None for no header, a list of ranges, or
    anything else. The syntax only: what a range means is the caller's (``byte_range``)."""
    match = _RANGE.fullmatch(header.strip(" \t")) if header else None
    if match is None or not (match[1] or match[2]):
        return None
    return (int(match[1]) if match[1] else None, int(match[2]) if match[2] else None)


def byte_range(header: str | None, length: int) -> Span | None:
    """The one range a ``Range`` header asks of ``length`` bytes, as RFC 9110 reads it; None
    for the whole content (no header, a multi-range or one that does not parse: a server may
    ignore those). Unsatisfiable when it lies past the end."""
    parsed = parse_range(header)
    if parsed is None:
        return None
    first, last = parsed
    if first is None:  # suffix: the last N bytes
        assert last is not None
        if last == 0:
            raise Unsatisfiable
        return Span(max(0, length - last), length)
    if first >= length:
        raise Unsatisfiable
    if last is not None and last < first:
        return None
    return Span(first, min(length - 1 if last is None else last, length - 1) + 1)


def content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, complete length)`` of a ``Content-Range: bytes first-last/length``
    (length None for ``*``); None for anything else."""
    match = _CONTENT_RANGE.fullmatch(header.strip(" \t")) if header else None
    if match is None:
        return None
    return int(match[1]), int(match[2]), None if match[3] == "*" else int(match[3])


def content_length(header: str | None) -> int | None:
    """A ``Content-Length`` as a number; None when absent or not ASCII digits (``"²"`` is
    ``isdigit()`` to Python, and ``int`` refuses it)."""
    text = header.strip(" \t") if header else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 19 else None


def http_url(host: str, port: int) -> str:
    """``http://host:port`` for a name, an IPv4 or an IPv6 address (bracketed, RFC 3986); a
    wildcard listen address is shown as its loopback, where this host reaches it."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"
