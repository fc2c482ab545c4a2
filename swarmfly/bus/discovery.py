"""Who is up: nats.micro's ``$SRV`` discovery, the standard protocol, not a swarmfly contract."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import orjson

from swarmfly.bus.connection import Connection


class Discovery(Connection):
    async def discover(self, wait: float = 0.5, name: str = "") -> list[dict[str, Any]]:
        """``$SRV.INFO`` of every nats.micro service using this bus's prefix, or of the
        services called ``name``."""
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
