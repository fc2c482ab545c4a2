"""`swarmfly get` with a peer of its own, in this process, when no peer service answers on
this host: it joins the swarm through NATS if it may (else reads the origin by itself), in a
store of its own that goes when it ends."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import shutil
import tempfile
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.get.request import GetRequest, Progress, cannot_write, report
from swarmfly.ids import new_id
from swarmfly.localproto import KEEPALIVE, PROGRESS_INTERVAL

log = logging.getLogger(__name__)

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


async def get(
    stack: AsyncExitStack,
    config: Config,
    bus: Bus | None,
    servers: list[str],
    request: GetRequest,
    progress: Progress | None,
) -> dict[str, Any]:
    """The download's reply, from a peer of this process's that ends with ``stack``."""
    # Only here: a get through the host's peer service never loads the node and its plugins.
    from swarmfly.launch import load_plugins
    from swarmfly.services.peer.delivery import deliver
    from swarmfly.services.peer.host import HostSettings, PeerHost
    from swarmfly.services.peer.progress import follow

    output = request.output
    _check_writable(output)
    state_dir = _cli_state_dir(stack, config)
    plugins = load_plugins(config)
    stack.push_async_callback(plugins.close)
    node = PeerHost(HostSettings.of(config, "peer", state_dir), bus, servers, plugins)
    await node.start(stack)
    download_id = new_id("dl")
    job = asyncio.create_task(
        node.download(
            request.source(),
            strategy=request.strategy or config.peer.strategy,
            download_id=download_id,
            rate=request.download_rate,
            back_to_source=request.back_to_source,
        )
    )
    try:
        if progress is not None:
            await follow(
                partial(node.progress, download_id),
                job,
                partial(report, progress),
                interval=PROGRESS_INTERVAL,
                keepalive=KEEPALIVE,
            )
        result = await job
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
            overwrite=request.overwrite,
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
