"""The one error shape: errors are data with a stable code, mapped onto NATS micro headers."""

from __future__ import annotations

import os
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
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:  # a resolver's error: a negative errno
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
