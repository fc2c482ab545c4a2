"""``CONNECT host:port`` to an allowed destination: bytes both ways, untouched (TLS stays end
to end); refusals in the registry API's JSON error, as every other refusal of the proxy."""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus
from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind

from swarmfly import telemetry
from swarmfly.metrics import ProxyMetrics
from swarmfly.services.proxy.passthrough import CONNECT_TIMEOUT
from swarmfly.services.proxy.registry import AllowList, RegistryError
from swarmfly.services.proxy.responses import attributes, carrier


class Tunnels:
    def __init__(self, allowed: AllowList, metrics: ProxyMetrics, max_head: int) -> None:
        self.allowed = allowed
        self.metrics = metrics
        self.max_head = max_head
        """Bytes of a CONNECT request head read at most."""
        self._tunnels: set[asyncio.Task[None]] = set()

    def protocol(self) -> asyncio.Protocol:
        """The protocol of a connection whose request is a CONNECT."""
        reader = asyncio.StreamReader(limit=self.max_head)
        return asyncio.StreamReaderProtocol(reader, self._on_connect)

    def close(self) -> None:
        for tunnel in list(self._tunnels):
            tunnel.cancel()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnel = asyncio.create_task(self._safely(reader, writer))
        self._tunnels.add(tunnel)
        tunnel.add_done_callback(self._tunnels.discard)

    async def _safely(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._tunnel(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
        except asyncio.LimitOverrunError:
            self.metrics.count("refused")
            writer.write(
                _refusal(RegistryError(431, "UNSUPPORTED", "request headers are too large"))
            )
            return
        lines = head.decode("latin-1").split("\r\n")
        line = lines[0].split(" ")
        target = urlsplit(f"//{line[1]}") if len(line) == 3 else None
        try:
            host, port = (target.hostname, target.port) if target else (None, None)
        except ValueError:
            host, port = None, None
        if not host or not port:
            self.metrics.count("refused")
            writer.write(_refusal(RegistryError(400, "UNSUPPORTED", "CONNECT needs host:port")))
            return
        fields = dict(field.split(":", 1) for field in lines[1:] if ":" in field)
        with telemetry.span(
            "proxy connect", kind=SpanKind.SERVER,
            attributes=attributes("CONNECT", f"{host}:{port}"),
            carrier=carrier({k.strip(): v.strip() for k, v in fields.items()}),
        ) as current:  # fmt: skip
            status = await self._connect(reader, writer, host, port)
            telemetry.set_attributes(current, **{"http.response.status_code": status})

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> int:
        """The tunnel to an allowed ``host:port``; the status the client was answered."""
        if not self.allowed.allows_tunnel(host, port):
            self.metrics.count("refused")
            writer.write(_refusal(RegistryError(403, "DENIED", "this proxy does not tunnel there")))
            return 403
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.write(_refusal(RegistryError(502, "UNAVAILABLE", "the host cannot be reached")))
            return 502
        self.metrics.count("connect")
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
        return 200


def _refusal(error: RegistryError) -> bytes:
    """A whole answer to a CONNECT that is not tunnelled."""
    body = error.body()
    reason = HTTPStatus(error.status).phrase
    head = (
        f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(256 * 1024):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
