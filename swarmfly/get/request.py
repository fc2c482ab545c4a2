"""What a user asks `swarmfly get` for, checked once before any byte moves, and the summary
it is told; the standard library only (see ``socket_client``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import check_digest, new_id, redact_url
from swarmfly.localproto import current_umask
from swarmfly.placefile import exists_at, refused_output

Progress = Callable[[int, int | None], None]


class PeerGone(SwarmflyError):
    """The local peer stopped answering mid-download: the caller may go on without it."""

    def __init__(self) -> None:
        super().__init__("unavailable", "the local peer service went away")


@dataclass(frozen=True)
class GetRequest:
    url: str
    output: Path
    headers: dict[str, str]
    digest: str | None = None
    timeout: float = 3600.0
    strategy: str | None = None
    piece_length: int | None = None
    tag: str = ""
    application: str = ""
    hard_link: bool = False
    """Hard-link the output to the (then read-only) cache file instead of copying it."""
    umask: int = field(default_factory=current_umask)
    """The requester's: the peer creates the output with mode ``0o666 & ~umask``."""
    download_rate: int = 0
    """Bytes/s the serving peer may take for this download (0: its own limit only)."""
    overwrite: bool = False
    """Replace an existing output (dfget's --overwrite); without it one is refused."""
    back_to_source: bool = True
    """The serving peer may read the origin (dfget's --disable-back-to-source: not)."""
    filtered_query_params: tuple[str, ...] | None = None
    priority: int = 0

    def checked(self) -> GetRequest:
        """This request with its output made absolute, or a ``bad_request`` before any byte
        moves: a digest that is none, an output that is a directory, or one that exists
        without ``overwrite`` (the peer refuses it again where it puts the file in place)."""
        if self.digest:
            try:
                check_digest(self.digest)
            except ValueError as exc:
                raise SwarmflyError("bad_request", str(exc)) from None
        output = self.output.absolute()
        if output.is_dir():
            raise SwarmflyError("bad_request", f"{output} is a directory")
        if not self.overwrite and exists_at(str(output)):
            raise refused_output(output)
        return replace(self, output=output)

    def source(self) -> SourceRequest:
        return SourceRequest(
            self.url,
            self.headers,
            self.digest,
            self.piece_length,
            self.tag,
            self.application,
            self.filtered_query_params,
            self.priority,
        )

    def body(self, output: Path) -> dict[str, Any]:
        """The ``peer.{host_id}.download`` request."""
        body: dict[str, Any] = {
            "download_id": new_id("dl"),
            "source": self.source().to_dict(),
            "output": str(output),
            "timeout_s": self.timeout,
            "umask": self.umask,
        }
        if self.strategy:
            body["strategy"] = self.strategy
        if self.hard_link:
            body["hard_link"] = True
        if self.download_rate:
            body["download_rate"] = self.download_rate
        if self.overwrite:
            body["overwrite"] = True
        if not self.back_to_source:
            body["back_to_source"] = False
        return body


def report(progress: Progress, state: Any) -> None:
    """Tell ``progress`` a peer's ``ProgressReply`` (a length not known yet: None)."""
    length = state.content_length
    progress(state.completed_bytes, length if isinstance(length, int) else None)


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n"):
        raise SwarmflyError("bad_request", f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def cannot_write(output: Path, exc: OSError) -> SwarmflyError:
    """The error for an output this user cannot create: the path, and why in words (a file
    where a folder should be makes ``mkdir`` say "File exists")."""
    reason = in_words(exc)
    if isinstance(exc, FileExistsError | NotADirectoryError):
        blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is not a directory" if blocking else reason
    return SwarmflyError("bad_request", f"cannot write {output}: {reason}")


def summary(request: GetRequest, reply: dict[str, Any], via: str, started: float) -> dict[str, Any]:
    return {
        "url": redact_url(request.url),
        "output": reply["output"],
        "task_id": reply["task_id"],
        "content_length": reply["content_length"],
        "bytes_origin": reply["bytes_origin"],
        "bytes_p2p": reply["bytes_p2p"],
        "seconds": round(time.monotonic() - started, 6),
        "digest": reply.get("digest"),
        "via": via,
    }
