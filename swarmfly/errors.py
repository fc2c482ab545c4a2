"""The one error shape: errors are data with a stable code, mapped onto NATS micro headers."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

ErrorCode = Literal[
    "bad_request",
    "not_found",
    "forbidden",
    "conflict",
    "unavailable",
    "timeout",
    "source_error",
    "integrity",
    "internal",
]

STATUS: dict[str, int] = {
    "bad_request": 400,
    "not_found": 404,
    "forbidden": 403,
    "conflict": 409,
    "unavailable": 503,
    "timeout": 504,
    "source_error": 502,
    "integrity": 422,
    "internal": 500,
}

EXIT_STATUS: dict[str, int] = {
    "bad_request": 2,
    "not_found": 3,
    "source_error": 3,
    "integrity": 4,
    "timeout": 5,
    "unavailable": 6,
    "forbidden": 1,
    "conflict": 1,
    "internal": 1,
}
"""The CLI's exit status per code, distinct where a script would branch (README, "Exit
codes"): 2 is also argparse's, for a command line that cannot work."""


class SwarmflyError(Exception):
    """An expected failure that crosses a boundary as data (a reply, an exit message)."""

    def __init__(self, code: ErrorCode, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.path = path

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.code]

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "status": self.status, "message": self.message}
        if self.path:
            body["path"] = self.path
        return {"error": body}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SwarmflyError:
        body = data["error"]
        return cls(body["code"], body["message"], path=body.get("path"))

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequest(SwarmflyError):
    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__("bad_request", message, path=path)


def in_words(exc: BaseException) -> str:
    """What went wrong, as a user reads it: the system's words for an OS error (asyncio's
    text names the call that failed, not why), else the message, else the kind of failure."""
    # Only a loaded ssl module raises its errors: the CLI's start-up need not load it.
    ssl = sys.modules.get("ssl")
    if ssl is not None and isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if ssl is not None and isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()  # its errno is OpenSSL's
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:  # a resolver's error: a negative errno
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def connect_error_in_words(
    exc: BaseException, url: str | None = None, *, seconds: float | None = None
) -> str:
    """An aiohttp or OS failure to talk to a server, in words, naming the server: the
    ``host:port`` aiohttp says it tried, else ``url``'s (never its credentials or query);
    ``seconds`` is the limit a timeout ran out of."""
    import aiohttp  # here, not above: the CLI imports this module and starts without aiohttp

    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}: {in_words(exc.os_error)}"
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, TLS, proxy
        return f"cannot connect to {_host_port(exc.host, exc.port)}: {in_words(exc.os_error)}"
    server = _server(url)
    if isinstance(exc, TimeoutError):  # asyncio's, and aiohttp's connect and read timeouts
        return f"{server} did not answer in {seconds:g}s" if seconds else f"{server} did not answer"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{server} closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"{server} broke off the response body"
    return f"{server}: {in_words(exc)}"


def _host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def _server(url: str | None) -> str:
    from yarl import URL  # aiohttp's, imported with it

    try:
        parsed = URL(url) if url else None
        host, port = (parsed.host, parsed.port) if parsed else (None, None)
    except ValueError:  # a message is no place to raise about a URL already requested
        host, port = None, None
    return _host_port(host, port) if host else "the server"
