"""The peer service: a PeerNode plus the ``peer.<host_id>.*`` endpoints, on NATS and, for
`swarmfly get` on this host, on a local socket (``swarmfly.localpeer``)."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from swarmfly import __version__, contracts
from swarmfly.bus import MAX_REQUEST_BYTES, Bus, decode_request
from swarmfly.content import SourceRequest
from swarmfly.errors import BadRequest, SwarmflyError
from swarmfly.localpeer import PEER_FILE, PROGRESS_INTERVAL, current_umask, socket_path
from swarmfly.services.peer.node import PeerNode, deliver

log = logging.getLogger(__name__)


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
        self.umask = current_umask()
        """For outputs a request gives no umask for."""

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
        local = await self._serve_locally(stack)
        marker = self.node.settings.state_dir / PEER_FILE
        record = {"host_id": host_id, "pid": os.getpid(), "upload": self.node.upload_url}
        marker.write_bytes(orjson.dumps({**record, "socket": str(local) if local else None}))
        stack.callback(lambda: marker.unlink(missing_ok=True))

    async def _serve_locally(self, stack: AsyncExitStack) -> Path | None:
        """The local socket `swarmfly get` uses on this host, mode 0600."""
        path = socket_path(self.node.settings.state_dir)
        if path is None:
            log.info("state dir too deep for a Unix socket: local gets go through NATS")
            return None
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/v1/download", self.local_download)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        path.unlink(missing_ok=True)
        mask = os.umask(0o177)
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(mask)
        stack.callback(lambda: path.unlink(missing_ok=True))
        return path

    async def local_download(self, request: web.Request) -> web.StreamResponse:
        """``peer.{host_id}.download`` over the local socket: progress lines, then the
        reply or the error. The download goes on if the client hangs up, as over NATS."""
        contract = contracts.get("peer.{host_id}.download")
        try:
            payload = decode_request(contract, await request.read())
        except BadRequest as exc:
            return web.json_response(exc.to_dict(), status=400)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        download = asyncio.create_task(self.on_download(payload))
        try:
            while not download.done():
                await asyncio.wait([download], timeout=PROGRESS_INTERVAL)
                if not download.done():
                    state = await self.on_progress({"download_id": payload["download_id"]})
                    await response.write(orjson.dumps({"progress": state}) + b"\n")
            try:
                last = {"reply": download.result()}
            except SwarmflyError as exc:
                last = exc.to_dict()
            except Exception as exc:
                log.exception("local download failed")
                last = SwarmflyError("internal", type(exc).__name__).to_dict()
            await response.write(orjson.dumps(last) + b"\n")
        except ConnectionError:
            log.debug("local client of %s went away", payload["download_id"])
        return response

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
                    await asyncio.to_thread(
                        deliver,
                        stored,
                        output,
                        umask=int(req.get("umask", self.umask)) & 0o777,
                        hard_link=bool(req.get("hard_link", False)),
                    )
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
