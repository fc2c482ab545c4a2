"""Every private part of nats-py that swarmfly uses, and nowhere else.

pyproject.toml bounds nats-py from above; tests/unit/test_internals.py fails, naming what
moved, before a raised bound lets a service misbehave at run time (a TLS downgrade let
through, an endpoint left subscribed, an error answered to nobody).
"""

from __future__ import annotations

from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import Endpoint, Service


class TlsNotOffered(nats.errors.Error):
    def __str__(self) -> str:
        return "nats: the server does not require TLS, and swarmfly is set to use it"


class TlsRequiringClient(Client):
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
            raise TlsNotOffered()
        await super()._process_info(info, initial_connection)


def newest_endpoint(service: Service) -> Endpoint:
    """The endpoint ``service.add_endpoint`` just added (nats.micro returns nothing)."""
    endpoint: Endpoint = service._endpoints[-1]
    return endpoint


async def remove_endpoint(service: Service, endpoint: Endpoint) -> None:
    """Unsubscribe one endpoint: nats.micro (2.16) removes endpoints only all at once, in
    ``Service.stop``; this does for one what it does for each there."""
    service._endpoints.remove(endpoint)
    await endpoint._stop()


def endpoint_subject(endpoint: Endpoint) -> str:
    subject: str = endpoint._subject
    return subject


def has_reply_subject(request: Request) -> bool:
    """Whether anyone waits for an answer (a publish without a reply subject does not)."""
    return bool(request._msg.reply)
