"""Events under a contract (one without a reply): published, heard by whoever listens, never
answered. A preheat's hosts report their progress so (``preheat.{job}.progress``)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from nats.aio.msg import Msg

from swarmfly import contracts
from swarmfly.bus.connection import Connection
from swarmfly.bus.serving import decode_request
from swarmfly.contracts.wire import NoReply, Req, Subject
from swarmfly.errors import BadRequest

log = logging.getLogger(__name__)

PENDING = 4096
"""Events a listener holds unread before nats-py drops the newest: a slow listener loses
progress lines, never memory."""

OnEvent = Callable[[Req, "contracts.Sender | None"], None]
"""Gets each event that keeps to the contract, and its sender where the contract names one."""


class Events(Connection):
    async def publish(self, subject: Subject[Req, NoReply], message: Req, **tokens: str) -> None:
        """Send ``message`` under its event contract, checked first as any request is."""
        payload = message.to_dict()
        subject.contract.validate_request(payload)
        await self.nc.publish(self.subject(subject.name, **tokens), orjson.dumps(payload))

    async def listen(
        self,
        subject: Subject[Req, NoReply],
        on_event: OnEvent[Req],
        *,
        every: tuple[str, ...] = (),
        **tokens: str,
    ) -> Callable[[], Awaitable[None]]:
        """Hear the events of ``subject`` (a token named in ``every``: all its values);
        events that break the contract are dropped. Returns what stops listening."""
        contract = subject.contract
        address = self._subject(subject.name, tokens, every)

        async def heard(msg: Msg) -> None:
            try:
                body = decode_request(contract, msg.data)
                sender = contracts.Sender.of(msg.subject) if contract.sender else None
            except (BadRequest, ValueError) as exc:
                log.debug("dropped an event on %s: %s", msg.subject, exc)
                return
            on_event(subject.request.from_dict(body), sender)

        subscription = await self.nc.subscribe(address, cb=heard, pending_msgs_limit=PENDING)
        await self.nc.flush()  # subscribed at the server before anyone is asked to report
        return subscription.unsubscribe
