"""Every private part of aiohttp that swarmfly uses, and nowhere else: a request handler whose
HTTP parser's refusals the application answers in its own error shape.

pyproject.toml bounds aiohttp from above; tests/unit/test_internals.py fails, naming what
moved, before a raised bound lets the proxy answer in aiohttp's text/plain again (or reset
the connection before the client reads the answer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
"""How long, and how much, a server reads and drops of a request it refused half-read."""

Answer = Callable[[int, BaseException | None], web.Response]
"""The response to an error aiohttp's handler met: its status (400 for what the parser
refused, 500 for a failure of ours) and the exception."""


def too_large(exc: BaseException | None) -> bool:
    """Whether the parser refused a request line or header line for its length."""
    return isinstance(exc, LineTooLong)


class ParserErrors(web.RequestHandler):
    """aiohttp's request handler, answering what its HTTP parser refuses (a request or header
    line over the limit, too many headers, a malformed request line) with ``answer``'s
    response instead of text/plain, and closing such a connection with a linger, so the
    client reads the answer."""

    __slots__ = ("_answer", "_lingering")

    def __init__(self, manager: web.Server, answer: Answer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._lingering: Lingering | None = None
        self._answer = answer

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp does: the answer has begun
            raise ConnectionError("the response has begun: no error can follow")
        if status < 500 and self.transport is not None and self._lingering is None:
            self._lingering = self.transport = Lingering(self.transport)
        response = self._answer(status, exc)
        response.force_close()
        return response

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:  # the rest of a refused request: dropped unparsed
            self._lingering.drop(len(data))
            return
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)


class Lingering(asyncio.Transport):
    """A connection whose request was refused before it was read whole, closed as web
    servers close one (nginx's lingering close): the answer, then our end shut, then what the
    client still sends read and dropped, up to ``LINGER_BYTES`` for ``LINGER_SECONDS`` at
    most. Closing at once, with the request unread, would reset the connection, and the
    client would lose the answer."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.transport.writelines(list_of_data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def close(self) -> None:
        """Shut our end once the answer is out; close when the client closes (end of file
        closes a socket transport), at the deadline, or past the byte budget."""
        if self._timer is not None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)

    def abort(self) -> None:
        self.cancel()
        self.transport.abort()

    def drop(self, size: int) -> None:
        self.dropped += size
        if self.dropped > LINGER_BYTES:
            self.transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
