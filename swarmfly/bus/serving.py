"""Serving contracts: nats.micro services with one endpoint per contract, so ``$SRV``
discovery works; every request decoded and validated before its handler sees it, every error
answered in the one error shape with the NATS micro error headers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Endpoint, Service
from opentelemetry.trace import SpanKind

from swarmfly import contracts, telemetry
from swarmfly.bus import natsinternals
from swarmfly.bus.connection import Connection, messaging
from swarmfly.contracts.wire import Endpoint as Bound
from swarmfly.contracts.wire import Handler, SentHandler
from swarmfly.errors import BadRequest, SwarmflyError
from swarmfly.metrics import Metrics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024
"""Requests above this are refused before decoding; replies may be larger (digest lists)."""
MAX_HANDLING = 256
"""Requests one endpoint handles at once."""
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"


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
    except contracts.Invalid as exc:
        raise BadRequest(exc.message[:1024], path=exc.path[:1024]) from None
    return payload


@dataclass
class RunningService:
    """A running nats.micro service. Endpoints whose subjects need tokens the service did not
    have at start (a scheduler's partitions) open and close while it runs."""

    service: Service
    name: str
    deferred: list[Bound[Any, Any]]
    inline: bool
    metrics: Metrics
    """The service's: a request its contract refuses is counted there."""
    opened: dict[tuple[tuple[str, str], ...], list[Endpoint]] = field(default_factory=dict)


class Serving(Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._services: list[Service] = []

    async def add_service(
        self,
        name: str,
        version: str,
        description: str,
        endpoints: Sequence[Bound[Any, Any]],
        *,
        metrics: Metrics,
        metadata: dict[str, str] | None = None,
        inline: bool = False,
        **tokens: str,
    ) -> RunningService:
        """A nats.micro service with one endpoint per contract.

        Endpoints whose subject tokens are all in ``tokens`` subscribe now; the others wait
        for ``open_endpoints`` with the missing tokens. ``inline``: the handlers never wait
        (they compute and answer), so each runs in its subscription's own task rather than
        in a task per request, which costs as much as a small handler.
        """
        service = await add_service(
            self.nc, name=name, version=version, description=description, metadata=metadata
        )
        self._services.append(service)
        running = RunningService(service, name, [], inline, metrics)
        now: list[Bound[Any, Any]] = []
        for endpoint in endpoints:
            self.used.add(endpoint.subject.name)
            if set(endpoint.subject.contract.tokens) <= set(tokens):
                now.append(endpoint)
            else:
                running.deferred.append(endpoint)
        await self._add_endpoints(running, now, tokens)
        return running

    async def open_endpoints(
        self, running: RunningService, *, every: tuple[str, ...] = (), **tokens: str
    ) -> None:
        """Subscribe the deferred endpoints under these tokens (a partition a scheduler
        took); a token named in ``every`` is a wildcard: one subscription for all its values
        (a scheduler that holds every partition)."""
        key = _endpoints_key(every, tokens)
        if key not in running.opened:
            running.opened[key] = await self._add_endpoints(
                running, running.deferred, tokens, every
            )

    async def close_endpoints(
        self, running: RunningService, *, every: tuple[str, ...] = (), **tokens: str
    ) -> None:
        """Unsubscribe what ``open_endpoints`` subscribed under the same arguments."""
        for endpoint in running.opened.pop(_endpoints_key(every, tokens), []):
            try:
                await natsinternals.remove_endpoint(running.service, endpoint)
            except nats.errors.Error as exc:  # the connection is gone: so is the interest
                log.debug("unsubscribing %s: %s", natsinternals.endpoint_subject(endpoint), exc)
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=2)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("flush after closing endpoints: %s", exc)

    async def _add_endpoints(
        self,
        running: RunningService,
        endpoints: list[Bound[Any, Any]],
        tokens: dict[str, str],
        every: tuple[str, ...] = (),
    ) -> list[Endpoint]:
        added: list[Endpoint] = []
        for bound in endpoints:
            contract_name = bound.subject.name
            contract = bound.subject.contract
            given = {t: tokens[t] for t in contract.tokens if t not in every}
            senders = (contracts.SENDER,) if contract.sender else ()
            subject = self._subject(contract_name, given, every + senders)
            if contract.fanout:  # every instance hears it: a queue group of its own
                queue_group = f"{running.name}-{running.service.id}"
            else:
                queue_group = contract.queue_group or running.name
            await running.service.add_endpoint(
                name=_endpoint_name(contract_name, {**tokens, **dict.fromkeys(every, "all")}),
                subject=subject,
                handler=self._endpoint(bound, running),
                queue_group=queue_group,
                metadata={"contract": contract_name, "version": str(contract.version)},
            )
            added.append(natsinternals.newest_endpoint(running.service))
        # nats-py may write its PING ahead of queued SUBs: two round trips make sure every
        # endpoint is subscribed at the server before the service counts as started.
        await self.nc.flush()
        await self.nc.flush()
        return added

    def _endpoint(
        self, bound: Bound[Any, Any], running: RunningService
    ) -> Callable[[Request], Awaitable[None]]:
        """nats-py hands a subscription's messages over one at a time: each request is
        handled in its own task, so a long one (a download, a preheat) does not hold up the
        next; past MAX_HANDLING at once, the subscription waits (its queue is bounded).
        Handlers that never wait (``inline``) run in turn in the subscription's task."""
        gate = asyncio.Semaphore(MAX_HANDLING)
        failures = running.metrics.contract_failures
        contract, handler, request_type = (
            bound.subject.contract,
            bound.handler,
            bound.subject.request,
        )

        async def dispatch(request: Request) -> None:
            await gate.acquire()
            task = self.spawn(serve(request))
            task.add_done_callback(lambda _: gate.release())

        async def serve(request: Request) -> None:
            try:
                message = request_type.from_dict(decode_request(contract, request.data))
            except BadRequest as exc:
                failures.labels(contract.name).inc()
                await _respond_error(request, exc)
                return
            try:
                with telemetry.span(
                    f"process {contract.name}",
                    kind=SpanKind.SERVER,
                    attributes=(
                        messaging(request.subject, "process") if telemetry.enabled() else None
                    ),
                    carrier=request.headers,
                ):
                    if contract.sender:
                        sender = contracts.Sender.of(request.subject)
                        reply = await cast("SentHandler[Any, Any]", handler)(message, sender)
                    else:
                        reply = await cast("Handler[Any, Any]", handler)(message)
            except SwarmflyError as exc:
                await _respond_error(request, exc)
                return
            except Exception:
                log.exception("handler for %s failed", contract.name)
                failed = f"{contract.name} failed inside the service (its log says why)"
                await _respond_error(request, SwarmflyError("internal", failed))
                return
            try:
                await request.respond(orjson.dumps(reply.to_dict()))
            except Exception as exc:  # e.g. larger than the server's max_payload
                log.error("reply on %s not sent: %s", contract.name, exc)
                await _respond_error(request, SwarmflyError("internal", "reply could not be sent"))

        return serve if running.inline else dispatch

    async def answer_auth_callout(
        self, answer: Callable[[bytes], Awaitable[bytes | None]], *, queue: str
    ) -> None:
        """Serve nats-server's auth callout (``$SYS.REQ.USER.AUTH``): the server's own
        protocol of signed JWTs, not a contract of ours. Each request is answered in its own
        task; ``answer`` returning None leaves it unanswered (nats-server times it out)."""

        async def one(msg: Msg) -> None:
            reply = await answer(msg.data)
            if reply is not None:
                await msg.respond(reply)

        async def on_request(msg: Msg) -> None:
            self.spawn(one(msg))

        await self.nc.subscribe(AUTH_CALLOUT, queue=queue, cb=on_request)

    async def close(self) -> None:
        for task in list(self._handling):
            task.cancel()
        for service in self._services:
            try:
                await service.stop()
            except Exception as exc:  # a stop during a lost connection is not worth failing
                log.debug("service stop: %s", exc)
        self._services.clear()
        await super().close()


def _endpoints_key(every: tuple[str, ...], tokens: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**tokens, **dict.fromkeys(every, "*")}.items()))


def _endpoint_name(contract_name: str, tokens: dict[str, str]) -> str:
    """The micro endpoint name: the contract's, with a partition filled in, since one service
    serves the same contract once per partition."""
    name = contract_name
    if "partition" in tokens:
        name = name.replace("{partition}", tokens["partition"])
    return name.replace(".", "-").replace("{", "").replace("}", "")


async def _respond_error(request: Request, exc: SwarmflyError) -> None:
    if not natsinternals.has_reply_subject(request):
        log.warning("dropped message without reply subject: %s", exc)
        return
    await request.respond_error(
        str(exc.status), exc.message[:512].replace("\n", " "), data=orjson.dumps(exc.to_dict())
    )
