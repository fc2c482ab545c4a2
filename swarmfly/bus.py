"""The NATS adapter: every publish, request and subscription goes through here, under a contract.

Messages are orjson, validated on both sides with the contract's compiled validators; errors
travel as the one error shape with the NATS micro error headers.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Endpoint, Service
from opentelemetry.trace import SpanKind

from swarmfly import contracts, telemetry
from swarmfly.config import TokenFile
from swarmfly.contracts.wire import Endpoint as Bound
from swarmfly.contracts.wire import Handler, Rep, Req, SentHandler, Subject
from swarmfly.errors import BadRequest, SwarmflyError, in_words
from swarmfly.ids import redact_url
from swarmfly.metrics import Metrics

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 256 * 1024
"""Requests above this are refused before decoding; replies may be larger (digest lists)."""
MAX_HANDLING = 256
"""Requests one endpoint handles at once."""
CLOSE_TIMEOUT = 1.0
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"
TOKEN_CHECK = 10.0
"""How often a connection on a token file looks for a renewed token."""
"""Seconds to close a connection the server refused."""


def _validation_error(exc: contracts.Invalid) -> BadRequest:
    return BadRequest(exc.message[:1024], path=exc.path[:1024])


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
        raise _validation_error(exc) from None
    return payload


@dataclass
class Served:
    """A running nats.micro service. Endpoints whose subjects need tokens the service did not
    have at start (a scheduler's partitions) open and close while it runs."""

    service: Service
    name: str
    deferred: list[Bound[Any, Any]]
    inline: bool
    metrics: Metrics
    """The service's: a request its contract refuses is counted there."""
    opened: dict[tuple[tuple[str, str], ...], list[Endpoint]] = field(default_factory=dict)


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
        within: float | None = None,
    ) -> Bus:
        """Connect, retrying servers that are down for as long as it takes; but after as many
        refusals of the credentials or of TLS as there are servers, raise SwarmflyError:
        that is a setting to fix, not a server to wait for. ``within``: the seconds a one-shot
        command waits instead, then SwarmflyError("unavailable") with the last error (the
        failed attempts log at DEBUG: the error says it once)."""
        options = dict(options or {})
        servers = list(servers)
        nc = _Client()
        nc.require_tls = "tls" in options or any(s.startswith("tls://") for s in servers)
        refusals = 0
        connected = False

        async def on_error(exc: Exception) -> None:
            nonlocal refusals
            (log.debug if within is not None and not connected else log.warning)("nats: %s", exc)
            if connected or not _refused(exc):
                return
            refusals += 1
            if refusals >= len(servers):
                raise _refusal(exc, servers, options)

        async def on_disconnect() -> None:
            # nats-py marks the client closed before it calls back for a close of our own
            (log.debug if nc.is_closed else log.info)("nats: disconnected")

        async def on_reconnect() -> None:
            log.info("nats: reconnected")

        try:
            async with asyncio.timeout(within):
                await nc.connect(
                    servers=servers,
                    name=name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    max_reconnect_attempts=-1,
                    connect_timeout=3,
                    **{"reconnect_time_wait": 0.5, **options},  # typed int, takes seconds
                )
        except (SwarmflyError, TimeoutError) as exc:
            try:  # after a failed TLS handshake the stream may never report itself closed
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.debug("nats: the refused connection did not close in %gs", CLOSE_TIMEOUT)
            if isinstance(exc, SwarmflyError) or within is None:
                raise
            where = ", ".join(redact_url(s) for s in servers)
            last = in_words(nc.last_error) if nc.last_error else "no answer"
            raise SwarmflyError(
                "unavailable", f"cannot reach NATS at {where} in {within:g}s: {last}"
            ) from None
        connected = True
        bus = cls(nc, prefix)
        token = options.get("token")
        if isinstance(token, TokenFile):
            bus.spawn(bus._renew(token))
        return bus

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

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of this connection's, cancelled when it closes."""
        task = asyncio.create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)
        return task

    async def _renew(self, token: TokenFile) -> None:
        """Reconnect once the token file is renewed: the callout's session ends with the
        token it was granted for, and nats-py closes for good on that error."""
        while True:
            await asyncio.sleep(TOKEN_CHECK)
            if self.nc.is_connected and token.renewed():
                log.info("nats: reconnecting with the renewed token of %s", token.path)
                await self.nc.force_reconnect()

    def subject(self, name: str, **tokens: str) -> str:
        return self._subject(name, tokens)

    def _subject(self, name: str, tokens: dict[str, str], every: tuple[str, ...] = ()) -> str:
        self.used.add(name)
        subject: str = contracts.get(name).subject(self.prefix, every=every, **tokens)
        return subject

    async def request(
        self, subject: Subject[Req, Rep], message: Req, *, timeout: float = 5.0, **tokens: str
    ) -> Rep:
        """Send ``message`` under its subject's contract; the reply comes back typed. An
        error reply raises SwarmflyError."""
        contract = subject.contract
        address = self.subject(subject.name, **tokens)
        payload = message.to_dict()
        contract.validate_request(payload)
        with telemetry.span(
            f"send {contract.name}",
            kind=SpanKind.CLIENT,
            attributes=_messaging(address, "send") if telemetry.enabled() else None,
        ):
            headers: dict[str, str] = {}
            telemetry.inject(headers)
            body = await self._request(contract, address, payload, timeout, headers or None)
        return subject.reply.from_dict(body)

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
            except contracts.Invalid:
                raise SwarmflyError("internal", msg.headers.get(ERROR_HEADER, "error")) from None
            raise SwarmflyError.from_dict(body)
        if contract.validate_reply is not None:
            try:
                contract.validate_reply(body)
            except contracts.Invalid as exc:
                raise SwarmflyError("internal", f"invalid reply on {subject}: {exc}") from None
        reply: dict[str, Any] = body
        return reply

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
    ) -> Served:
        """A nats.micro service with one endpoint per contract, so $SRV discovery works.

        Endpoints whose subject tokens are all in ``tokens`` subscribe now; the others wait
        for ``open_endpoints`` with the missing tokens. ``inline``: the handlers never wait
        (they compute and answer), so each runs in its subscription's own task rather than
        in a task per request, which costs as much as a small handler.
        """
        service = await add_service(
            self.nc, name=name, version=version, description=description, metadata=metadata
        )
        self._services.append(service)
        served = Served(service, name, [], inline, metrics)
        now: list[Bound[Any, Any]] = []
        for endpoint in endpoints:
            self.used.add(endpoint.subject.name)
            if set(endpoint.subject.contract.tokens) <= set(tokens):
                now.append(endpoint)
            else:
                served.deferred.append(endpoint)
        await self._add_endpoints(served, now, tokens)
        return served

    async def open_endpoints(
        self, served: Served, *, every: tuple[str, ...] = (), **tokens: str
    ) -> None:
        """Subscribe the deferred endpoints under these tokens (a partition a scheduler
        took); a token named in ``every`` is a wildcard: one subscription for all its values
        (a scheduler that holds every partition)."""
        key = _endpoints_key(every, tokens)
        if key not in served.opened:
            served.opened[key] = await self._add_endpoints(served, served.deferred, tokens, every)

    async def close_endpoints(
        self, served: Served, *, every: tuple[str, ...] = (), **tokens: str
    ) -> None:
        """Unsubscribe what ``open_endpoints`` subscribed under the same arguments."""
        for endpoint in served.opened.pop(_endpoints_key(every, tokens), []):
            # nats.micro (nats-py 2.16) removes endpoints only all at once, in Service.stop:
            # do for one what it does for each there.
            served.service._endpoints.remove(endpoint)
            try:
                await endpoint._stop()
            except nats.errors.Error as exc:  # the connection is gone: so is the interest
                log.debug("unsubscribing %s: %s", endpoint._subject, exc)
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=2)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("flush after closing endpoints: %s", exc)

    async def _add_endpoints(
        self,
        served: Served,
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
                queue_group = f"{served.name}-{served.service.id}"
            else:
                queue_group = contract.queue_group or served.name
            await served.service.add_endpoint(
                name=_endpoint_name(contract_name, {**tokens, **dict.fromkeys(every, "all")}),
                subject=subject,
                handler=self._endpoint(bound, served),
                queue_group=queue_group,
                metadata={"contract": contract_name, "version": str(contract.version)},
            )
            added.append(served.service._endpoints[-1])
        # nats-py may write its PING ahead of queued SUBs: two round trips make sure every
        # endpoint is subscribed at the server before the service counts as started.
        await self.nc.flush()
        await self.nc.flush()
        return added

    def _endpoint(
        self, bound: Bound[Any, Any], served: Served
    ) -> Callable[[Request], Awaitable[None]]:
        """nats-py hands a subscription's messages over one at a time: each request is
        handled in its own task, so a long one (a download, a preheat) does not hold up the
        next; past MAX_HANDLING at once, the subscription waits (its queue is bounded).
        Handlers that never wait (``inline``) run in turn in the subscription's task."""
        gate = asyncio.Semaphore(MAX_HANDLING)
        failures = served.metrics.contract_failures
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
                        _messaging(request.subject, "process") if telemetry.enabled() else None
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

        return serve if served.inline else dispatch

    async def gather(
        self,
        subject: Subject[Req, Rep],
        message: Req,
        *,
        wait: float = 0.5,
        expect: int | None = None,
        **tokens: str,
    ) -> list[Rep]:
        """Every reply to a fanout request that arrives within ``wait`` seconds (one per
        instance of the service), or until ``expect`` of them came; error replies and
        replies that break the contract are left out."""
        contract = subject.contract
        address = self.subject(subject.name, **tokens)
        payload = message.to_dict()
        contract.validate_request(payload)
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        replies: list[Rep] = []
        try:
            await self.nc.publish(address, orjson.dumps(payload), reply=inbox)
            deadline = asyncio.get_running_loop().time() + wait
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                if expect is not None and len(replies) >= expect:
                    break
                try:
                    msg = await subscription.next_msg(timeout=left)
                except (TimeoutError, nats.errors.TimeoutError):
                    break
                if msg.headers and msg.headers.get("Status") == "503":
                    break  # no responders: nobody serves the subject
                if msg.headers and ERROR_CODE_HEADER in msg.headers:
                    continue
                try:
                    body = orjson.loads(msg.data)
                    if contract.validate_reply is not None:
                        contract.validate_reply(body)
                except (orjson.JSONDecodeError, contracts.Invalid) as exc:  # a broken reply
                    log.warning("dropped a reply on %s: %s", address, exc)
                    continue
                replies.append(subject.reply.from_dict(body))
        finally:
            await subscription.unsubscribe()
        return replies

    async def key_value(self, bucket: str, *, timeout: float = 1.0, replicas: int = 1) -> KeyValue:
        """The JetStream key-value bucket (one revision per key), created on first use with
        ``replicas`` copies where the cluster has room for them, else one; ``timeout`` bounds
        each later read or write."""
        try:
            js = self.nc.jetstream(timeout=timeout)
            try:
                return await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            creator = self.nc.jetstream(timeout=max(timeout, 10.0))  # a raft group takes time
            for count in sorted({replicas, 1}, reverse=True):
                try:
                    await creator.create_key_value(bucket=bucket, history=1, replicas=count)
                    break
                except nats.js.errors.APIError as exc:
                    if count == 1:
                        raise
                    # A lone nats-server holds one copy: expected, not worth alarming anyone.
                    log.info("bucket %s: one copy (%d need a nats-server cluster)", bucket, count)
                    log.debug("bucket %s with %d replicas: %s", bucket, count, exc.description)
            return await js.key_value(bucket)
        except (nats.errors.Error, TimeoutError) as exc:
            raise SwarmflyError(
                "unavailable", f"JetStream key-value store unavailable: {in_words(exc)}"
            ) from None

    async def discover(self, wait: float = 0.5, name: str = "") -> list[dict[str, Any]]:
        """``$SRV.INFO`` of every nats.micro service using this bus's prefix (the standard
        discovery protocol, not a swarmfly contract), or of the services called ``name``."""
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        found: list[dict[str, Any]] = []
        try:
            await self.nc.publish(f"$SRV.INFO.{name}" if name else "$SRV.INFO", b"", reply=inbox)
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
                metadata = info.get("metadata") or {}
                if metadata.get("prefix") == self.prefix or any(  # no endpoints: the proxy
                    str(e.get("subject", "")).startswith(self.prefix + ".") for e in endpoints
                ):
                    found.append(info)
        finally:
            await subscription.unsubscribe()
        return found

    async def hosts_of(self, name: str) -> set[str]:
        """The host ids the live services called ``name`` give in their metadata: who is
        up now, before their heartbeats say so."""
        return {
            str(info["metadata"]["host_id"])
            for info in await self.discover(name=name)
            if isinstance(info.get("metadata"), dict)
            and isinstance(info["metadata"].get("host_id"), str)
        }

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


class _TlsNotOffered(nats.errors.Error):
    def __str__(self) -> str:
        return "nats: the server does not require TLS, and swarmfly is set to use it"


class _Client(Client):
    """nats-py's client, refusing a server that offers no TLS when TLS is configured: nats-py
    (2.16) would go on in plain text and send a password or token to whoever answered."""

    require_tls = False

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        websocket = server is not None and server.uri.scheme in ("ws", "wss")
        if (
            initial_connection
            and self.require_tls
            and not websocket
            and not info.get("tls_required")
        ):
            raise _TlsNotOffered()
        await super()._process_info(info, initial_connection)


def _refused(exc: Exception) -> bool:
    """Whether a server turned the connection down for its credentials or its TLS: no
    retry will change that (a timeout or a connection cut mid-handshake might)."""
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return False
    if isinstance(exc, ssl.SSLError | _TlsNotOffered | nats.errors.AuthorizationError):
        return True
    text = str(exc).lower()
    return (
        isinstance(exc, nats.errors.Error)
        and ("authoriz" in text or "authenticat" in text)
        and "timeout" not in text
    )


def _refusal(exc: Exception, servers: list[str], options: dict[str, Any]) -> SwarmflyError:
    """The error a user reads: what was refused and which settings to check, with the URLs'
    userinfo left out and no secret."""
    where = ", ".join(redact_url(s) for s in servers)
    if isinstance(exc, ssl.SSLError | _TlsNotOffered):
        hint = "check [nats] tls_ca, tls_cert, tls_key and tls_hostname"
        return SwarmflyError("unavailable", f"TLS with NATS ({where}) failed: {exc}; {hint}")
    method = next(
        (
            label
            for key, label in (
                ("user_credentials", "the creds file"),
                ("nkeys_seed", "the NKey seed"),
                ("token", "the token"),
                ("user", "user and password"),
            )
            if options.get(key)
        ),
        "the URL's credentials" if any("@" in s for s in servers) else "no credentials",
    )
    return SwarmflyError(
        "unavailable", f"NATS ({where}) refused {method}: {exc}; check the [nats] settings"
    )


def _endpoints_key(every: tuple[str, ...], tokens: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**tokens, **dict.fromkeys(every, "*")}.items()))


def _endpoint_name(contract_name: str, tokens: dict[str, str]) -> str:
    """The micro endpoint name: the contract's, with a partition filled in, since one service
    serves the same contract once per partition."""
    name = contract_name
    if "partition" in tokens:
        name = name.replace("{partition}", tokens["partition"])
    return name.replace(".", "-").replace("{", "").replace("}", "")


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
