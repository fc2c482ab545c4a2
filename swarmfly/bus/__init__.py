"""The NATS adapter: every publish, request and subscription goes through a ``Bus``, under a
contract. Messages are orjson, validated on both sides with the contract's compiled
validators; errors travel as the one error shape with the NATS micro error headers.

One module per job: ``connection`` (connecting, refusals, token renewal, tasks, subjects),
``sending`` (request and fanout replies), ``serving`` (services, endpoints, decoding),
``discovery`` (``$SRV``), ``keyvalue`` (JetStream buckets), ``events`` (published, never
answered); the private parts of nats-py they rely on are all in ``natsinternals``.
"""

from __future__ import annotations

from swarmfly.bus.connection import Connection
from swarmfly.bus.discovery import Discovery
from swarmfly.bus.events import Events
from swarmfly.bus.keyvalue import KeyValues
from swarmfly.bus.sending import Sending
from swarmfly.bus.serving import (
    AUTH_CALLOUT,
    MAX_REQUEST_BYTES,
    RunningService,
    Serving,
    decode_request,
)

__all__ = [
    "AUTH_CALLOUT",
    "MAX_REQUEST_BYTES",
    "Bus",
    "Connection",
    "RunningService",
    "decode_request",
]


class Bus(Sending, Serving, Discovery, KeyValues, Events):
    """A NATS connection bound to a subject prefix, speaking only through contracts."""
