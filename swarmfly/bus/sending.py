"""Sending under a contract: a request and its typed reply, or every reply to a fanout."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
import orjson
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from opentelemetry.trace import SpanKind

from swarmfly import contracts, telemetry
from swarmfly.bus.connection import Connection, messaging
from swarmfly.contracts.wire import Rep, Req, Subject
from swarmfly.errors import SwarmflyError

log = logging.getLogger(__name__)


class Sending(Connection):
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
            attributes=messaging(address, "send") if telemetry.enabled() else None,
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
