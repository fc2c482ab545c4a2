"""A storage instance that stops hands its cached tasks over first (issue 19).

On SIGTERM, before it leaves the swarm, the instance asks each complete task's homes among
the instances that stay (rendezvous order without itself, ``[storage] copies`` of them) to
take the task: a ``storage.{host_id}.fill`` naming the task id, which the receiver downloads
from the swarm while this instance still serves it, every piece verified against the task's
digests as always. Tasks it is a home of go first: those are where the scheduler sends the
swarm. Bounded in time (``[storage] handover_timeout``) and in tasks at once
(``handover_concurrency``); what is not handed over in time is counted in the log and left.
A kill -9 hands nothing over.

``plan`` is pure; ``hand_over`` (the sender) and ``take`` (the receiver) are its adapters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import nats.errors

from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.placement import rendezvous
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.peer.store import StoredTask

log = logging.getLogger(__name__)

MAX_FILL_SECONDS = 86400.0
"""The most a fill's ``timeout_s`` may say (storage.fill.json)."""


@dataclass(frozen=True)
class Handing:
    """One task to hand over, and the instances that may take it."""

    task_id: str
    order: tuple[str, ...]
    """Every other instance, in rendezvous order: the first ``copies`` are to take it, the
    next in line when one of them is stopping too (it becomes a home once that one goes)."""
    copies: int
    homed: bool
    """This instance is one of the task's homes now: without a hand-over the task's next
    home would read the origin again."""

    @property
    def targets(self) -> tuple[str, ...]:
        """The task's homes once this instance is gone."""
        return self.order[: self.copies]


def plan(tasks: Iterable[str], me: str, fleet: Iterable[str], copies: int) -> list[Handing]:
    """What to hand to whom, in the order given, the tasks ``me`` is a home of first: each
    task to its first ``copies`` instances in rendezvous order of the fleet without ``me``.
    Nothing when no other instance is live."""
    others = set(fleet) - {me}
    if not others:
        return []
    homed: list[Handing] = []
    rest: list[Handing] = []
    for task_id in tasks:
        ours = me in rendezvous(task_id, [*others, me])[:copies]
        handing = Handing(task_id, tuple(rendezvous(task_id, others)), copies, ours)
        (homed if ours else rest).append(handing)
    return homed + rest


@dataclass
class Outcome:
    """What a hand-over came to, in counts (no task ids or URLs: a URL may hold a secret)."""

    tasks: int = 0
    handed: int = 0
    """Tasks every target holds now."""
    failed: int = 0
    """Tasks some target refused or failed to take."""

    @property
    def left(self) -> int:
        """Tasks not handed over: not tried in time, or failed."""
        return self.tasks - self.handed


def handable(stored: StoredTask) -> bool:
    """A complete, verified task with a URL a receiver can check against the origin."""
    return stored.complete and not stored.unverified and bool(stored.url)


async def hand_over(
    node: PeerHost,
    bus: Bus,
    fleet: Callable[[], Awaitable[set[str]]],
    *,
    copies: int,
    seconds: float,
    concurrency: int,
) -> Outcome:
    """Have each complete task taken by its homes among the live instances but this one
    (``fleet``, asked only when there is a task to hand over), within ``seconds``,
    ``concurrency`` tasks at once."""
    held = sorted(
        (t for t in node.store.tasks.values() if handable(t)), key=lambda t: -t.last_access
    )
    outcome = Outcome(tasks=len(held))
    if not held or seconds <= 0:
        return outcome
    by_id = {t.id: t for t in held}
    queue = plan(by_id, node.settings.host_id, await fleet(), copies)
    if not queue:  # its disk keeps them for when it comes back
        log.info(
            "leaving: no other storage instance is live; %d task%s kept here only",
            len(held), "" if len(held) == 1 else "s",
        )  # fmt: skip
        return outcome
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    pending = iter(queue)

    async def worker() -> None:
        for handing in pending:  # one shared iterator: each task is taken by one worker
            done = await _hand(bus, by_id[handing.task_id], handing, lambda: deadline - loop.time())
            if done is None:
                return
            if done:
                outcome.handed += 1
            else:
                outcome.failed += 1

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(queue)))]
    done, late = await asyncio.wait(workers, timeout=seconds)
    for job in late:
        job.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for job in done:
        job.result()  # a bug in a worker is not a hand-over that merely failed
    homed = sum(h.homed for h in queue)
    if outcome.left:
        log.warning(
            "leaving: handed %d of %d cached tasks over (%d homed here); %d failed, %d not"
            " done within %gs (handover_timeout): they are read from the origin when next"
            " asked for",
            outcome.handed, outcome.tasks, homed, outcome.failed,
            outcome.left - outcome.failed, seconds,
        )  # fmt: skip
    else:
        log.info("leaving: handed %d cached tasks over (%d homed here)", outcome.handed, homed)
    return outcome


async def _hand(
    bus: Bus, stored: StoredTask, handing: Handing, remaining: Callable[[], float]
) -> bool | None:
    """Have the task's homes take it, the next in line for one that is stopping too: True
    once they hold it, False when one refused or failed, None when out of time."""
    wanted = min(handing.copies, len(handing.order))
    held = 0
    for target in handing.order:
        if held == wanted:
            break
        seconds = remaining()
        if seconds <= 0:
            return None
        code = await _fill(bus, stored, target, min(seconds, MAX_FILL_SECONDS))
        if code is None:
            held += 1
        elif code != "unavailable":
            return False
    return held == wanted


async def _fill(bus: Bus, stored: StoredTask, target: str, seconds: float) -> str | None:
    """Ask ``target`` to take ``stored``: None once it holds it, else the error's code
    (logged)."""
    digest = stored.content.digest if stored.content else None
    request = messages.FillRequest(
        messages.Source(stored.url, digest=digest),
        timeout_s=seconds,
        replica=True,
        task_id=stored.id,
    )
    try:
        await bus.request(messages.FILL, request, timeout=seconds + 1.0, host_id=target)
    except SwarmflyError as exc:
        log.info("hand-over of task %s to %s: %s", stored.id[:12], target, exc.code)
        return exc.code
    except nats.errors.Error as exc:  # the connection going: the rest fail the same way
        log.info("hand-over of task %s to %s: %s", stored.id[:12], target, type(exc).__name__)
        return "internal"
    return None


async def take(node: PeerHost, req: messages.FillRequest, seconds: float) -> messages.PreheatReply:
    """The receiver of a hand-over: take ``req.task_id`` from the swarm, or answer at once
    when it is held here already.

    The sender says which task; nothing it says is believed about the content. Refused
    before any piece moves unless the task's scheduler knows the task's content (stated by
    the task's authenticated origin reader) and this instance's own check of the origin
    agrees with it; then every piece is verified against the task's digests and, where
    known, the whole file against its digest, as in any download."""
    assert req.task_id is not None
    task_id = req.task_id
    host_id = node.settings.host_id
    held = node.store.get(task_id)
    if held is not None and handable(held) and held.content is not None:
        return messages.PreheatReply(
            task_id, host_id, held.content.content_length, 0, 0, 0.0, held.content.digest
        )
    resolved = await node.resolve(SourceRequest.of(req.source))
    known = await node.request(messages.TASK, messages.TaskRequest(task_id))
    content = known.task
    if content is None:
        raise SwarmflyError("not_found", "hand-over refused: the task's scheduler knows no content")
    size, digest = resolved.stat.size, resolved.source.digest
    if size is not None and size != content.content_length:
        raise SwarmflyError(
            "integrity",
            f"hand-over refused: the origin has {size} bytes, the task {content.content_length}",
        )
    if digest and content.digest and digest != content.digest:
        raise SwarmflyError("integrity", "hand-over refused: the digest is not the task's")
    run = await node.begin(resolved.source, task_id=task_id, stat=resolved.stat)
    try:
        async with asyncio.timeout(seconds):
            result = await run.result()
    except TimeoutError:
        # The sender is gone by now: what it did not give in time is not read from the
        # origin instead (the pieces taken stay, for a later download to resume from).
        run.running.cancel()
        raise SwarmflyError("timeout", f"hand-over did not finish in {seconds:g}s") from None
    if result.bytes_origin:
        log.warning(
            "hand-over of task %s: %d bytes read from the origin (the swarm did not serve them)",
            task_id[:12],
            result.bytes_origin,
        )
    return messages.PreheatReply.from_dict({**result.summary(), "host_id": host_id})
