"""`swarmfly get`: through the host's peer service when one runs (over NATS here; its local
socket is ``swarmfly.localpeer``), else an in-process peer."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import shutil
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from swarmfly import telemetry
from swarmfly.bus import Bus
from swarmfly.cluster import connect, local_peer, servers_of
from swarmfly.config import Config
from swarmfly.contracts import messages
from swarmfly.contracts.wire import ABSENT
from swarmfly.credentials import inbox_prefix
from swarmfly.errors import SwarmflyError
from swarmfly.ids import check_digest, new_id, redact_url
from swarmfly.localpeer import GetRequest, Progress, cannot_write, summary

log = logging.getLogger(__name__)

REPLY_GRACE = 2.0
"""Seconds a finished download's reply may lag its progress before it is asked for again."""
PEER_SILENCE = 3.0
"""Seconds without a progress answer after which the peer service counts as gone."""


async def get(
    config: Config,
    request: GetRequest,
    progress: Progress | None = None,
    *,
    within: float | None = None,
) -> dict[str, Any]:
    """The download's summary. ``within``: seconds to wait for NATS before the origin is read
    without the swarm (None: as long as it takes)."""
    if request.digest:
        try:
            check_digest(request.digest)
        except ValueError as exc:
            raise SwarmflyError("bad_request", str(exc)) from None
    output = request.output.absolute()
    if output.is_dir():
        raise SwarmflyError("bad_request", f"{output} is a directory")
    async with AsyncExitStack() as stack:
        if shutdown := telemetry.setup("cli", config.tracing):
            stack.callback(shutdown)
        stack.enter_context(
            telemetry.span("swarmfly get", attributes={"url.full": redact_url(request.url)})
        )
        bus: Bus | None = None
        servers = servers_of(config)
        if servers:
            try:
                bus = await connect(config, "swarmfly-get", servers, within=within)
                stack.push_async_callback(bus.close)
            except SwarmflyError as exc:
                log.warning("%s: reading the origin without the swarm", exc.message)
                bus = None
        host_id = local_peer(config.state_dir)
        started = time.monotonic()
        async with asyncio.timeout(request.timeout):
            if bus is not None and host_id is not None:
                try:
                    reply = await _via_peer(bus, host_id, request, output, progress)
                    return summary(request, reply, "peer", started)
                except SwarmflyError as exc:
                    if exc.code != "unavailable":
                        raise
                    log.info("local peer does not answer: running one in process")
            # The CLI's own credentials may not act as a peer: its in-process peer then
            # reads the origin by itself rather than wait on refused registrations.
            swarm = None if config.nats.inbox_prefix == inbox_prefix("client") else bus
            reply = await _in_process(stack, config, swarm, servers, request, output, progress)
            return summary(request, reply, "in-process", started)
    raise AssertionError("unreachable")  # pragma: no cover


async def _via_peer(
    bus: Bus, host_id: str, request: GetRequest, output: Path, progress: Progress | None
) -> dict[str, Any]:
    body = messages.DownloadRequest.from_dict(request.body(output))
    download_id = body.download_id

    def ask() -> asyncio.Task[messages.DownloadReply]:
        return asyncio.create_task(
            bus.request(messages.DOWNLOAD, body, timeout=request.timeout + 5, host_id=host_id)
        )

    call = ask()
    # A bar wants fresh numbers; otherwise the polls only watch that the peer is alive.
    interval = 0.25 if progress is not None else 1.0
    silent_since: float | None = None
    seen = False
    forgotten_since: float | None = None
    try:
        while not call.done():
            await asyncio.wait([call], timeout=interval)
            if call.done():
                break
            try:
                state = await bus.request(
                    messages.PROGRESS, messages.ProgressRequest(download_id), host_id=host_id
                )
            except SwarmflyError:
                if not bus.nc.is_connected:
                    # NATS is down, not the peer: it keeps downloading, and both reconnect.
                    silent_since = None
                    continue
                # A peer service that stops answering will never reply to the download.
                silent_since = silent_since or time.monotonic()
                if time.monotonic() - silent_since > PEER_SILENCE:
                    raise SwarmflyError("unavailable", "the local peer service went away") from None
                continue
            silent_since = None
            if state.state != "unknown":
                seen, forgotten_since = True, None
            elif seen:
                # The peer finished and forgot this download, yet no reply came: it was lost
                # in a NATS reconnect. Ask again; the file is in the peer's cache by now.
                forgotten_since = forgotten_since or time.monotonic()
                if time.monotonic() - forgotten_since > REPLY_GRACE:
                    call.cancel()
                    call, seen, forgotten_since = ask(), False, None
            if progress is not None:
                length = state.content_length
                progress(state.completed_bytes, None if length is ABSENT else length)
    finally:
        call.cancel()
    return call.result().to_dict()


STALE_RUN = 60.0
"""Seconds after which an unlocked run dir of the in-process peer counts as left behind."""


def _cli_state_dir(stack: AsyncExitStack, config: Config) -> Path:
    """A store of this in-process peer's own, removed when it ends.

    The host's cache belongs to its peer service; a second, lasting copy of every file under
    ``<state>/cli`` doubled the disk used, and two processes must not share one store (it has
    no cross-process locking). The file is moved, not copied, to the output (``deliver``'s
    ``take``). Run dirs left by a killed get are removed by the next one: a live run holds
    an flock on its own."""
    from swarmfly.services.peer.store import private_dir

    folder = config.state_dir / "cli"
    private_dir(config.state_dir)
    private_dir(folder)
    _sweep(folder)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    handle = open(run / ".lock", "a")  # noqa: SIM115 - held for the whole download
    fcntl.flock(handle, fcntl.LOCK_EX)
    stack.callback(shutil.rmtree, run, ignore_errors=True)
    stack.callback(handle.close)
    return run


def _sweep(folder: Path) -> None:
    """Remove what killed in-process peers left under ``folder`` (and the lasting cache
    older versions kept there)."""
    now = time.time()
    for entry in folder.iterdir():
        try:
            if not entry.is_dir() or now - entry.stat().st_mtime < STALE_RUN:
                continue  # a run being set up has no lock yet
            with open(entry / ".lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(entry, ignore_errors=True)
        except BlockingIOError:
            continue  # a live run holds its lock
        except OSError as exc:
            log.warning("cannot remove %s: %s", entry, exc)
    (folder / ".lock").unlink(missing_ok=True)


async def _in_process(
    stack: AsyncExitStack,
    config: Config,
    bus: Bus | None,
    servers: list[str],
    request: GetRequest,
    output: Path,
    progress: Progress | None,
) -> dict[str, Any]:
    # Only here: a get through the host's peer service never loads the node and its plugins.
    from swarmfly.runtime import load_plugins, peer_settings
    from swarmfly.services.peer.node import PeerNode, deliver

    _check_writable(output)
    state_dir = _cli_state_dir(stack, config)
    plugins = load_plugins(config)
    stack.push_async_callback(plugins.close)
    node = PeerNode(peer_settings(config, state_dir), bus, servers, plugins)
    await node.start(stack)
    download_id = new_id("dl")
    job = asyncio.create_task(
        node.download(
            request.source(),
            strategy=request.strategy or config.peer.strategy,
            download_id=download_id,
            rate=request.download_rate,
        )
    )
    try:
        while not job.done():
            await asyncio.wait([job], timeout=0.25)
            conductor = node.progress(download_id)
            if progress is not None and conductor is not None:
                content = conductor.stored.content
                progress(
                    conductor.stored.completed_bytes, content.content_length if content else None
                )
        result = job.result()
    finally:
        job.cancel()
    try:
        await asyncio.to_thread(
            deliver,
            node.store.open(result.task_id),
            output,
            umask=request.umask,
            hard_link=request.hard_link,
            take=True,
        )
    except OSError as exc:
        raise cannot_write(output, exc) from None
    return result.reply(output).to_dict()


def _check_writable(output: Path) -> None:
    """Refuse an output this user cannot create before the download, not after it: the
    in-process peer delivers as this user, with a file made next to the output."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.swarmfly-"):
            pass
    except OSError as exc:
        raise cannot_write(output, exc) from None
