"""The NATS adapter: every publish, request and subscription goes through here, under a contract.

Messages are orjson, validated on both sides with the contract's compiled validators; errors
travel as the one error shape with the NATS micro error headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats
import nats.errors
import orjson
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Service
from opentelemetry.trace import SpanKind

from swarmfly import contracts, metrics, telemetry
from swarmfly.errors import BadRequest, SwarmflyError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST_BYTES = 256 * 1024
MAX_HANDLING = 256
"""Requests one endpoint handles at once."""
"""Requests above this are refused before decoding; replies may be larger (digest lists)."""


def _validation_error(exc: Exception) -> BadRequest:
    path = getattr(exc, "name", None)
    message = getattr(exc, "message", str(exc))
    return BadRequest(str(message)[:1024], path=str(path)[:1024] if path else None)


def decode_request(contract: contracts.Contract, data: bytes) -> dict[str, Any]:
    """Decode and validate untrusted bytes; any failure is a BadRequest naming what failed."""
    if len(data) > MAX_REQUEST_BYTES:
        raise BadRequest(f"payload of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("payload must be a JSON object", path="data")
    try:
        contract.validate_request(payload)
    except Exception as exc:  # fastjsonschema raises JsonSchemaValueException
        raise _validation_error(exc) from None
    return payload


class Bus:
    """A NATS connection bound to a subject prefix, speaking only through contracts."""

    def __init__(self, nc: Client, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.used: set[str] = set()
        """Contract names this bus has used; tests check each has a contract."""
        self._services: list[Service] = []
        self._handling: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls,
        servers: Sequence[str],
        *,
        prefix: str,
        name: str,
        options: dict[str, Any] | None = None,
    ) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        async def on_disconnect() -> None:
            log.info("nats: disconnected")

        async def on_reconnect() -> None:
            log.info("nats: reconnected")

        nc = await nats.connect(
            servers=list(servers),
            name=name,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=3,
            **(options or {}),
        )
        return cls(nc, prefix)

    def subject(self, name: str, **tokens: str) -> str:
        self.used.add(name)
        subject: str = contracts.get(name).subject(self.prefix, **tokens)
        return subject

    async def request(
        self, name: str, payload: dict[str, Any], *, timeout: float = 5.0, **tokens: str
    ) -> dict[str, Any]:
        """Send a request under contract ``name``; raise SwarmflyError on an error reply."""
        contract = contracts.get(name)
        subject = self.subject(name, **tokens)
        contract.validate_request(payload)
        with telemetry.span(
            f"send {contract.name}",
            kind=SpanKind.CLIENT,
            attributes=_messaging(subject, "send") if telemetry.enabled() else None,
        ):
            headers: dict[str, str] = {}
            telemetry.inject(headers)
            return await self._request(contract, subject, payload, timeout, headers or None)

    async def _request(
        self,
        contract: contracts.Contract,
        subject: str,
        payload: dict[str, Any],
        timeout: float,
        headers: dict[str, str] | None,
    ) -> dict[str, Any]:
        try:
            msg = await self.nc.request(
                subject, orjson.dumps(payload), timeout=timeout, headers=headers
            )
        except nats.errors.NoRespondersError:
            raise SwarmflyError("unavailable", f"no service answers {subject}") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise SwarmflyError("timeout", f"{subject} did not answer in {timeout:g}s") from None
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            raise SwarmflyError("internal", f"malformed reply on {subject}") from None
        if msg.headers and ERROR_CODE_HEADER in msg.headers:
            try:
                contracts.validate_error()(body)
            except Exception:
                raise SwarmflyError("internal", msg.headers.get(ERROR_HEADER, "error")) from None
            raise SwarmflyError.from_dict(body)
        if contract.validate_reply is not None:
            try:
                contract.validate_reply(body)
            except Exception as exc:
                raise SwarmflyError(
                    "internal", f"invalid reply on {subject}: {_validation_error(exc).message}"
                ) from None
        reply: dict[str, Any] = body
        return reply

    async def add_service(
        self,
        name: str,
        version: str,
        description: str,
        handlers: dict[str, Handler],
        *,
        metadata: dict[str, str] | None = None,
        **tokens: str,
    ) -> Service:
        """A nats.micro service with one endpoint per contract, so $SRV discovery works."""
        service = await add_service(
            self.nc, name=name, version=version, description=description, metadata=metadata
        )
        self._services.append(service)
        for contract_name, handler in handlers.items():
            contract = contracts.get(contract_name)
            subject = self.subject(contract_name, **{t: tokens[t] for t in contract.tokens})
            await service.add_endpoint(
                name=contract_name.replace(".", "-").replace("{", "").replace("}", ""),
                subject=subject,
                handler=self._endpoint(contract, handler),
                queue_group=contract.queue_group or name,
                metadata={"contract": contract_name, "version": str(contract.version)},
            )
        # nats-py may write its PING ahead of queued SUBs: two round trips make sure every
        # endpoint is subscribed at the server before the service counts as started.
        await self.nc.flush()
        await self.nc.flush()
        return service

    def _endpoint(
        self, contract: contracts.Contract, handler: Handler
    ) -> Callable[[Request], Awaitable[None]]:
        """nats-py hands a subscription's messages over one at a time: each request is
        handled in its own task, so a long one (a download, a preheat) does not hold up the
        next; past MAX_HANDLING at once, the subscription waits (its queue is bounded)."""
        gate = asyncio.Semaphore(MAX_HANDLING)

        async def dispatch(request: Request) -> None:
            await gate.acquire()
            task = asyncio.create_task(serve(request))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)
            task.add_done_callback(lambda _: gate.release())

        async def serve(request: Request) -> None:
            try:
                payload = decode_request(contract, request.data)
            except BadRequest as exc:
                metrics.CONTRACT_FAILURES.labels(contract.name).inc()
                await _respond_error(request, exc)
                return
            try:
                with telemetry.span(
                    f"process {contract.name}",
                    kind=SpanKind.SERVER,
                    attributes=(
                        _messaging(request.subject, "process") if telemetry.enabled() else None
                    ),
                    carrier=request.headers,
                ):
                    reply = await handler(payload)
            except SwarmflyError as exc:
                await _respond_error(request, exc)
                return
            except Exception as exc:
                log.exception("handler for %s failed", contract.name)
                await _respond_error(request, SwarmflyError("internal", type(exc).__name__))
                return
            try:
                await request.respond(orjson.dumps(reply))
            except Exception as exc:  # e.g. larger than the server's max_payload
                log.error("reply on %s not sent: %s", contract.name, exc)
                await _respond_error(request, SwarmflyError("internal", "reply could not be sent"))

        return dispatch

    async def discover(self, wait: float = 0.5) -> list[dict[str, Any]]:
        """``$SRV.INFO`` of every nats.micro service using this bus's prefix (the standard
        discovery protocol, not a swarmfly contract)."""
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        found: list[dict[str, Any]] = []
        try:
            await self.nc.publish("$SRV.INFO", b"", reply=inbox)
            deadline = asyncio.get_running_loop().time() + wait
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    msg = await subscription.next_msg(timeout=left)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                try:
                    info = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    continue
                endpoints = info.get("endpoints") or []
                if any(str(e.get("subject", "")).startswith(self.prefix + ".") for e in endpoints):
                    found.append(info)
        finally:
            await subscription.unsubscribe()
        return found

    async def close(self) -> None:
        for task in list(self._handling):
            task.cancel()
        for service in self._services:
            try:
                await service.stop()
            except Exception as exc:  # a stop during a lost connection is not worth failing
                log.debug("service stop: %s", exc)
        self._services.clear()
        if not self.nc.is_closed:
            await self.nc.drain()


def _messaging(subject: str, operation: str) -> dict[str, str]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "messaging.operation.type": operation,
    }


async def _respond_error(request: Request, exc: SwarmflyError) -> None:
    if not request._msg.reply:
        log.warning("dropped message without reply subject: %s", exc)
        return
    await request.respond_error(
        str(exc.status), exc.message[:512].replace("\n", " "), data=orjson.dumps(exc.to_dict())
    )
