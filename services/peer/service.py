"""The peer service: a PeerNode plus the ``peer.<host_id>.*`` endpoints that `swarmfly get` uses."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson

from swarmfly import __version__
from swarmfly.bus import Bus
from swarmfly.cluster import PEER_FILE
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.services.peer.node import PeerNode, deliver


def source_from(data: dict[str, Any]) -> SourceRequest:
    return SourceRequest(
        url=data["url"],
        headers=dict(data.get("headers", {})),
        digest=data.get("digest"),
        piece_length=data.get("piece_length"),
    )


def checked_output(text: str) -> Path:
    """An output path this host can create, checked before any byte is fetched."""
    if "\x00" in text:
        raise SwarmflyError("bad_request", "output contains a NUL byte", path="data.output")
    output = Path(text)
    if any(len(part.encode()) > 255 for part in output.parts):
        raise SwarmflyError(
            "bad_request", "an output path component is too long", path="data.output"
        )
    if output.is_dir():
        raise SwarmflyError("bad_request", "output is a directory", path="data.output")
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SwarmflyError(
                    "bad_request", f"{parent} is not a directory", path="data.output"
                )
            break
    return output


class PeerService:
    def __init__(self, node: PeerNode, bus: Bus, *, default_strategy: str) -> None:
        self.node = node
        self.bus = bus
        self.default_strategy = default_strategy

    async def start(self, stack: AsyncExitStack) -> None:
        await self.node.start(stack)
        host_id = self.node.settings.host_id
        await self.bus.add_service(
            "peer",
            __version__,
            "swarmfly peer: downloads through the swarm and serves pieces",
            {
                "peer.{host_id}.download": self.on_download,
                "peer.{host_id}.progress": self.on_progress,
            },
            metadata={"host_id": host_id, "upload": self.node.upload_url},
            host_id=host_id,
        )
        marker = self.node.settings.state_dir / PEER_FILE
        marker.write_bytes(
            orjson.dumps({"host_id": host_id, "pid": os.getpid(), "upload": self.node.upload_url})
        )
        stack.callback(lambda: marker.unlink(missing_ok=True))

    async def on_download(self, req: dict[str, Any]) -> dict[str, Any]:
        output = checked_output(req["output"])
        download_id = req["download_id"]
        try:
            async with asyncio.timeout(req.get("timeout_s", 3600)):
                result = await self.node.download(
                    source_from(req["source"]),
                    strategy=req.get("strategy", self.default_strategy),
                    download_id=download_id,
                )
                stored = self.node.store.open(result.task_id)
                try:
                    await asyncio.to_thread(deliver, stored, output)
                except OSError as exc:
                    raise SwarmflyError(
                        "bad_request",
                        f"cannot write the output: {exc.strerror}",
                        path="data.output",
                    ) from None
        except TimeoutError:
            raise SwarmflyError("timeout", "download did not finish in time") from None
        finally:
            self.node.forget(download_id)
        return result.reply(output)

    async def on_progress(self, req: dict[str, Any]) -> dict[str, Any]:
        conductor = self.node.progress(req["download_id"])
        if conductor is None:
            return {"state": "unknown", "completed_bytes": 0, "content_length": None}
        stored = conductor.stored
        content = stored.content
        return {
            "state": "done" if stored.complete else "running",
            "completed_bytes": stored.completed_bytes,
            "content_length": content.content_length if content else None,
        }
