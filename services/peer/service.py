"""The peer service: a PeerHost plus the ``peer.<host_id>.*`` endpoints, on NATS and, for
`swarmfly get` on this host, on a local socket (``swarmfly.get.socket_client``)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import orjson

from swarmfly import __version__, contracts
from swarmfly.bus import Bus, decode_request
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Endpoint
from swarmfly.errors import SwarmflyError
from swarmfly.localproto import (
    KEEPALIVE,
    PEER_FILE,
    PROGRESS_INTERVAL,
    current_umask,
    error_line,
    progress_line,
    reply_line,
    socket_path,
)
from swarmfly.placefile import exists_at, refused_output
from swarmfly.services.peer.delivery import deliver
from swarmfly.services.peer.filedigest import Output
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.peer.imports import Imports, cache_request
from swarmfly.services.peer.listing import listing_request, serve_listing
from swarmfly.services.peer.localsocket import LocalRequest, LocalServer, Send
from swarmfly.services.peer.outputs import OutputRoots
from swarmfly.services.peer.preheat import PeerPreheat
from swarmfly.services.peer.progress import follow, moved
from swarmfly.services.peer.reach import Reach
from swarmfly.services.peer.store import StoredTask

log = logging.getLogger(__name__)


def checked_output(text: str, *, overwrite: bool = False) -> Path:
    """An output path this host can create, checked before any byte is fetched: one that
    exists only with ``overwrite``."""
    if "\x00" in text:
        raise SwarmflyError("bad_request", "output contains a NUL byte", path="data.output")
    output = Path(text)
    if any(len(part.encode()) > 255 for part in output.parts):
        raise SwarmflyError(
            "bad_request", "an output path component is too long", path="data.output"
        )
    if output.is_dir():
        raise SwarmflyError("bad_request", "output is a directory", path="data.output")
    if not overwrite and exists_at(text):
        raise refused_output(output)
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SwarmflyError(
                    "bad_request", f"{parent} is not a directory", path="data.output"
                )
            break
    return output


class PeerService:
    name = "peer"

    def __init__(
        self,
        node: PeerHost,
        bus: Bus,
        *,
        default_strategy: str,
        output_roots: list[str] | tuple[str, ...] = (),
        socket: str | None = None,
        socket_group: str | None = None,
    ) -> None:
        self.node = node
        self.bus = bus
        self.default_strategy = default_strategy
        self.outputs = OutputRoots(output_roots)
        """Where a download asked for over NATS may write (none by default)."""
        self.socket = Path(socket) if socket else None
        self.socket_group = socket_group
        self.umask = current_umask()
        """For outputs a request gives no umask for."""
        self.imports = Imports(node, bus)
        """`swarmfly cache` on this host: files its users import, stat and remove."""
        self.preheat = PeerPreheat(node, bus, strategy=default_strategy)
        """``peer.{host_id}.preheat``: into the cache, no output."""
        self.reach = Reach(node, bus)
        """``peer.{host_id}.reach``: `swarmfly doctor` on another host asks if its upload
        server is reachable from here."""

    async def start(self, stack: AsyncExitStack) -> None:
        await self.node.start(stack)
        host_id = self.node.settings.host_id
        await self.bus.add_service(
            "peer",
            __version__,
            "swarmfly peer: downloads through the swarm and serves pieces",
            [
                Endpoint(messages.DOWNLOAD, self.on_download),
                Endpoint(messages.PROGRESS, self.on_progress),
                Endpoint(messages.PEER_PREHEAT, self.preheat.on_preheat),
                Endpoint(messages.REACH, self.reach.on_reach),
            ],
            metrics=self.node.metrics,
            metadata={"host_id": host_id, "upload": self.node.upload_url},
            host_id=host_id,
        )
        local = await self._serve_locally(stack)
        marker = self.node.settings.state_dir / PEER_FILE
        record = {"host_id": host_id, "pid": os.getpid(), "upload": self.node.upload_url}
        marker.write_bytes(orjson.dumps({**record, "socket": str(local) if local else None}))
        stack.callback(lambda: marker.unlink(missing_ok=True))

    async def drain(self) -> None:
        """Leave the swarm: children get other parents now, not when this host is gone."""
        await self.node.leave()

    async def _serve_locally(self, stack: AsyncExitStack) -> Path | None:
        """The local socket `swarmfly get` uses on this host: mode 0600 (the peer's user
        only), or 0660 for ``[peer] socket_group``. Either way the peer writes an output only
        into a file its caller opened (or, for its own user, at the path named)."""
        path = self.socket or socket_path(self.node.settings.state_dir)
        if path is None:
            log.info("state dir too deep for a Unix socket: local gets go through NATS")
            return None
        if self.socket is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        server = LocalServer(path, self.local_request, self.socket_group)
        await server.start()
        stack.push_async_callback(server.stop)
        return path

    async def local_request(self, request: LocalRequest, send: Send) -> None:
        """A line on the local socket: a ``list`` request (`get --recursive`), listed with
        this peer's source credentials, or a download."""
        cache = cache_request(request.body)
        if cache is not None:  # swarmfly cache: import, stat, rm
            await self.imports.serve(cache, request.fd, send)
            return
        listing = listing_request(request.body)
        if listing is None:
            await self.local_download(request, send)
        elif request.fd is not None:
            raise SwarmflyError("bad_request", "a list request takes no descriptor")
        else:
            await serve_listing(self.node.plugins, listing, send)

    async def local_download(self, request: LocalRequest, send: Send) -> None:
        """``peer.{host_id}.download`` over the local socket: progress lines, then the
        reply or the error. The download goes on if the client hangs up, as over NATS."""
        contract = contracts.get("peer.{host_id}.download")
        payload = messages.DownloadRequest.from_dict(decode_request(contract, request.body))
        if request.fd is not None:
            _check_output_fd(request.fd, payload)
        elif request.caller.uid != os.geteuid():
            raise SwarmflyError(
                "forbidden",
                "the local socket writes only into a file its caller opened (swarmfly get"
                " sends its descriptor); a path only for the peer's own user",
                path="data.output",
            )
        else:
            checked_output(payload.output, overwrite=bool(payload.overwrite))
        fd = request.fd

        def place(stored: StoredTask) -> None:
            output = checked_output(payload.output, overwrite=bool(payload.overwrite))
            self._deliver_at(stored, output, payload)

        download = asyncio.create_task(self._download(payload, place, into=fd))
        try:
            await follow(
                partial(self.node.progress, payload.download_id),
                download,
                lambda state: send(progress_line(state.to_dict())),
                interval=PROGRESS_INTERVAL,
                keepalive=KEEPALIVE,
            )
            try:
                last = reply_line(download.result().to_dict())
            except SwarmflyError as exc:
                last = error_line(exc)
            except Exception:
                log.exception("local download failed")
                failed = "the download failed inside the peer (its log says why)"
                last = error_line(SwarmflyError("internal", failed))
            await send(last)
        except ConnectionError:
            log.debug("local client of %s went away", payload.download_id)
            await asyncio.wait([download])  # the descriptor stays open until it is written

    async def on_download(self, req: messages.DownloadRequest) -> messages.DownloadReply:
        """Over NATS: the output only under ``[peer] output_roots``, checked before anything
        is fetched and opened again, without following links, before anything is written."""
        placement = self.outputs.place(req.output)
        folder = self.outputs.open_parent(placement, create=False)
        if folder is not None:
            try:
                if not req.overwrite and exists_at(placement.parts[-1], folder):
                    raise refused_output(req.output)
            finally:
                os.close(folder)

        def place(stored: StoredTask) -> None:
            folder = self.outputs.open_parent(placement, create=True)
            assert folder is not None
            try:
                self._deliver_at(stored, placement.output, req, directory=folder)
            finally:
                os.close(folder)

        return await self._download(req, place)

    def _deliver_at(
        self,
        stored: StoredTask,
        output: Path,
        req: messages.DownloadRequest,
        directory: int | None = None,
    ) -> None:
        deliver(
            stored,
            output,
            umask=(self.umask if req.umask is None else req.umask) & 0o777,
            hard_link=bool(req.hard_link),
            directory=directory,
            overwrite=bool(req.overwrite),
        )

    async def _download(
        self,
        req: messages.DownloadRequest,
        place: Callable[[StoredTask], None],
        *,
        into: int | None = None,
    ) -> messages.DownloadReply:
        """Download ``req``'s source through the swarm, then ``place`` the verified file;
        or, given ``into`` (an empty file its requester opened), copy verified pieces into it
        while the download runs, so that only its tail is left to copy at the end."""
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        download_id = req.download_id
        seconds = 3600 if req.timeout_s is None else req.timeout_s
        output: Output | None = None
        try:
            async with asyncio.timeout(seconds):
                download = await self.node.begin(
                    source,
                    strategy=req.strategy or self.default_strategy,
                    download_id=download_id,
                    rate=req.download_rate or 0,
                    back_to_source=req.back_to_source is not False,
                )
                if into is not None:
                    output = download.conductor.digest.attach(into)
                result = await download.result()
                stored = self.node.store.open(result.task_id)
                assert stored.content is not None
                if output is not None:
                    size = stored.content.content_length
                    place = partial(output.copy_up_to, end=size)  # the tail, if any
                try:
                    await asyncio.to_thread(place, stored)
                except OSError as exc:
                    raise SwarmflyError(
                        "bad_request",
                        f"cannot write the output: {exc.strerror}",
                        path="data.output",
                    ) from None
        except TimeoutError:
            raise SwarmflyError("timeout", f"download did not finish in {seconds:g}s") from None
        finally:
            if output is not None:
                await download.conductor.digest.detach(output)
            self.node.forget(download_id)
        return result.reply(Path(req.output))

    async def on_progress(self, req: messages.ProgressRequest) -> messages.ProgressReply:
        """A long poll: the state once it moves past ``req.after`` (or ``req.wait_s`` on)."""
        after = -1 if req.after is None else req.after
        return await moved(self.node.progress(req.download_id), after, req.wait_s or 0.0)


def _check_output_fd(fd: int, payload: messages.DownloadRequest) -> None:
    """A descriptor the peer can fill: an empty regular file open for writing."""
    if payload.hard_link:
        raise SwarmflyError(
            "bad_request", "a hard link cannot be made through a descriptor", path="data.output"
        )
    info = os.fstat(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    writable = flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR) and not flags & os.O_APPEND
    if not stat.S_ISREG(info.st_mode) or not writable or info.st_size:
        raise SwarmflyError(
            "bad_request",
            "the output descriptor must be an empty regular file open for writing",
            path="data.output",
        )
