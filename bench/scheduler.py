"""Scheduler benchmark: schedule decisions per second and their latency, from a simulated swarm.

One nats-server and ONE `swarmfly scheduler` process; a separate load-generator process (this
script re-run with ``--generator``) simulates N peers over T tasks on a few NATS connections,
with a fixed number of requests in flight. One peer per task is the seed: it registers with
"seed": true and reports every piece with its digest before the clock starts. Then each other
peer registers, and loops: while it lacks the digests of pieces its parents hold, ask the task's
digests (at most every 100 ms, as a peer's conductor does); report a batch of pieces (parent_id,
cost_ms), reschedule, and now and then a heartbeat. A peer that holds every piece reports its
result, leaves, and registers again (a new peer under the same id, which a host's peer on a task
always has), so the swarm keeps its size and registrations go on all through the run. Every peer
speaks as its own host, as a real one does: the subject names its sender, and its peer id is
derived from its host and task.

decisions = register + reschedule replies; each one's latency is timed in the generator, from
the request to its reply. The scheduler's CPU seconds (from /proc) show whether it or the
generator is the bottleneck. Before that, in the same run, the same generator (connections,
concurrency, register-sized requests) drives a trivial nats.micro echo service in its own
process: its requests/s is the machine's baseline, and decisions/s over it the figure to compare
across machines. ``--swarms`` repeats all of it for several peers-per-task. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.micro
import orjson
from _common import (
    PY,
    Out,
    Reaper,
    add_env_flag,
    cleanup,
    cpu_seconds,
    env_pairs,
    machine_cpu,
    median,
    percentile,
    table,
    workspace,
)

from swarmfly import contracts, ids
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.testing import spawn_service

TARGET_DECISIONS_PER_S = 5000
TARGET_P99_MS = 10.0
PIECE_LENGTH = 4 * 1024 * 1024
SUBJECTS = (
    "scheduler.{partition}.register",
    "scheduler.{partition}.reschedule",
    "scheduler.{partition}.pieces",
    "scheduler.heartbeat",
    "scheduler.{partition}.result",
    "scheduler.leave",
    "scheduler.{partition}.task",
)
DECISIONS = ("scheduler.{partition}.register", "scheduler.{partition}.reschedule")
TASK = "scheduler.{partition}.task"
DIGEST_INTERVAL = 0.1
"""Seconds between a peer's asks for the task's digests while it lacks some its parents hold
(services/peer/conductor.py, ``_p2p_loop``: ``_refresh_task`` at most every 0.1 s)."""
DIGEST_PAGE = 8192
"""Digests per scheduler.<n>.task reply at most (its contract's maxItems)."""
ECHO = "echo"
"""The baseline's request name; its subject is <prefix>.v1.bench.echo.<host_type>.<host_id>."""
ECHO_REPLY = orjson.dumps({"action": "wait", "parents": [], "retry_after_ms": 200})
"""What the echo service answers every request with: small and schedule-shaped."""
SETUP_TIMEOUT = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="simulated peers (default 1000)")
    parser.add_argument("--tasks", type=int, default=100, help="tasks (default 100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="requests in flight (default 64)"
    )
    parser.add_argument("--connections", type=int, default=4, help="NATS connections (4)")
    parser.add_argument("--pieces", type=int, default=64, help="pieces per task (default 64)")
    parser.add_argument("--batch", type=int, default=4, help="pieces per report (default 4)")
    parser.add_argument(
        "--reports-per-reschedule",
        type=int,
        default=1,
        help="piece reports a peer sends between two reschedules (default 1)",
    )
    parser.add_argument(
        "--bad-rate",
        type=float,
        default=0.05,
        help="share of reschedules that name a failed or slow parent (default 0.05)",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, default=2.0, help="per simulated host, s (2)"
    )
    parser.add_argument(
        "--digest-interval",
        type=float,
        default=DIGEST_INTERVAL,
        help="s between a peer's scheduler.<n>.task requests while it lacks digests its parents "
        "hold (default 0.1, as a peer; 0: none, the mix of figures before they were added)",
    )
    parser.add_argument(
        "--swarms",
        type=swarm_sizes,
        metavar="N,N,...",
        help="peers per task to sweep, e.g. 10,100,1000: --peers peers in --peers/N tasks of N "
        "peers each (a seed and N-1 others), one row each; --tasks is then unused",
    )
    parser.add_argument("--request-timeout", type=float, default=5.0, help="per request, s (5)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the measured runs, one extra run with py-spy on the scheduler; writes "
        "DIR/scheduler.txt (collapsed stacks, for speedscope or flamegraph.pl) and prints "
        "where the scheduler's time goes",
    )
    add_env_flag(
        parser, "extra environment for the scheduler, e.g. SWARMFLY_SCHEDULER_CANDIDATE_PARENTS=8"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the generator")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and logs)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--generator", help=argparse.SUPPRESS)  # internal: run as the load
    parser.add_argument("--echo", help=argparse.SUPPRESS)  # internal: run as the echo service
    args = parser.parse_args(argv)
    if args.generator or args.echo:
        return args
    if min(args.peers, args.tasks, args.concurrency, args.connections, args.runs) < 1:
        parser.error("--peers, --tasks, --concurrency, --connections and --runs must be >= 1")
    if args.swarms is None and args.peers < 2 * args.tasks:
        parser.error("--peers must be at least 2 x --tasks (a seed and a peer per task)")
    if args.swarms is not None and args.peers < max(args.swarms):
        parser.error(f"--peers must be at least the largest swarm ({max(args.swarms)})")
    if args.pieces < 1 or args.batch < 1 or args.duration <= 0:
        parser.error("--pieces, --batch and --duration must be positive")
    if args.digest_interval < 0:
        parser.error("--digest-interval must be >= 0")
    args.env = env_pairs(parser, args.env)
    return args


def swarm_sizes(text: str) -> list[int]:
    """``10,100,1000`` -> [10, 100, 1000]: peers per task, each at least 2 (a seed, a peer)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("each swarm needs at least 2 peers (a seed and a peer)")
    return sizes


def swarm_of(args: argparse.Namespace, size: int | None) -> tuple[int, int]:
    """(peers, tasks) of one swarm size: --peers peers in tasks of ``size`` peers each (as many
    whole tasks as fit); without a size, --peers and --tasks as given."""
    if size is None:
        return args.peers, args.tasks
    tasks = args.peers // size
    return tasks * size, tasks


# -- the load generator (its own process) ------------------------------------------------


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class SimPeer:
    """One simulated peer: its host, its task and what it holds in this generation."""

    __slots__ = (
        "conn",
        "gen",
        "host",
        "index",
        "missing",
        "next_digests",
        "next_heartbeat",
        "parents",
        "peer_id",
        "registered",
        "reports_due",
        "sender",
        "source",
        "subjects",
        "task",
        "unknown",
    )

    def __init__(self, index: int, task: int, host: dict[str, Any], conn: Any) -> None:
        self.index, self.task, self.host, self.conn = index, task, host, conn
        self.gen = 0
        self.peer_id = ""
        self.missing: list[int] = []
        self.parents: list[str] = []
        self.registered = False
        self.source = False
        self.reports_due = 0
        self.next_heartbeat = 0.0
        self.unknown: set[int] = set()
        """Pieces whose digest this peer has not learnt yet (it fetches none of them)."""
        self.next_digests = 0.0
        self.sender = contracts.Sender(host["type"], host["id"])
        self.subjects: dict[str, str] = {}
        """Each contract's subject for this peer: its task's partition, its host as sender."""


class Load:
    """The generator: the swarm's state, the counters and the request helper."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.p = params
        self.rng = random.Random(params["seed"])
        self.contracts = {n: contracts.get(n) for n in SUBJECTS}
        self.checked: set[str] = set()
        tag = params["prefix"]
        self.task_ids = [
            hashlib.sha256(f"bench-task-{tag}-{t}".encode()).hexdigest()
            for t in range(params["tasks"])
        ]
        self.partition = [str(partition_of(tid, params["partitions"])) for tid in self.task_ids]
        pieces = params["pieces"]
        self.digests = [
            [hashlib.sha256(f"{tid}:{n}".encode()).hexdigest() for n in range(pieces)]
            for tid in self.task_ids
        ]
        self.content = {
            "content_length": pieces * PIECE_LENGTH,
            "piece_length": PIECE_LENGTH,
            "piece_count": pieces,
        }
        self.latency: list[float] = []  # decisions, seconds
        self.other_latency: list[float] = []
        self.echo_latency: list[float] = []
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.errors_by_subject: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.parents_offered = 0
        self.generations = 0
        self.timing = False

    def bind(self, peer: SimPeer) -> None:
        """A peer's subjects: a task's go to its partition, as a peer routes them; each whose
        contract names a sender names the peer's host."""
        partition = self.partition[peer.task]
        for name, contract in self.contracts.items():
            tokens = {"partition": partition} if contract.tokens else {}
            if contract.sender:  # scheduler.<n>.task names none, so a peer's has none
                tokens["sender"] = peer.sender.token
            peer.subjects[name] = contract.subject(self.p["prefix"], **tokens)
        peer.subjects[ECHO] = f"{echo_subject(self.p['prefix'])}.{peer.sender.token}"

    async def call(
        self, peer: SimPeer, name: str, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        """One request of ``peer``'s; None on an error reply, a timeout or no responders
        (counted)."""
        if name not in self.checked and name != ECHO:  # each kind's first, against its contract
            self.contracts[name].validate_request(payload)
        data = orjson.dumps(payload)
        code = None
        started = time.perf_counter()
        try:
            msg = await peer.conn.request(
                peer.subjects[name], data, timeout=self.p["request_timeout"]
            )
        except nats.errors.NoRespondersError:
            code = "no_responders"
        except (TimeoutError, nats.errors.TimeoutError):
            code = "timeout"
        elapsed = time.perf_counter() - started
        body: dict[str, Any] | None = None
        if code is None:
            if msg.headers and "Nats-Service-Error-Code" in msg.headers:
                try:
                    code = orjson.loads(msg.data)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "error_" + msg.headers.get("Nats-Service-Error-Code", "?")
            else:
                body = orjson.loads(msg.data)
                if name not in self.checked and name != ECHO:
                    validate = self.contracts[name].validate_reply
                    if validate is not None:
                        validate(body)
                    self.checked.add(name)
        if self.timing:
            self.requests[name] += 1
            if code is not None:
                self.errors[code] += 1
                self.errors_by_subject[f"{name}:{code}"] += 1
            elif name in DECISIONS:  # a decision is a schedule reply, not an error reply
                self.latency.append(elapsed)
            elif name == ECHO:
                self.echo_latency.append(elapsed)
            else:
                self.other_latency.append(elapsed)
        return body

    # -- one peer's life -----------------------------------------------------------------

    def new_generation(self, peer: SimPeer) -> None:
        peer.gen += 1
        if not peer.subjects:
            self.bind(peer)
        # The same id each generation: the scheduler forgot the last one's peer as it left.
        peer.peer_id = ids.peer_id(peer.host["id"], self.task_ids[peer.task])
        peer.missing = list(range(self.p["pieces"]))
        self.rng.shuffle(peer.missing)
        # A new peer knows no digest yet; with --digest-interval 0 it is never asked for.
        peer.unknown = set(peer.missing) if self.p["digest_interval"] > 0 else set()
        peer.next_digests = 0.0
        peer.parents = []
        peer.registered = False
        peer.source = False
        peer.reports_due = 0

    def on_schedule(self, peer: SimPeer, reply: dict[str, Any]) -> None:
        action = reply["action"]
        if self.timing:
            self.actions[action] += 1
            self.parents_offered += len(reply["parents"])
        if action == "parents" and reply["parents"]:
            peer.parents = [p["peer_id"] for p in reply["parents"]]
        elif action == "back_to_source":
            peer.source = True
            peer.parents = []
        peer.reports_due = self.p["reports_per_reschedule"]

    def register_body(self, peer: SimPeer, seed: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "task_id": self.task_ids[peer.task],
            "peer_id": peer.peer_id,
            "host": peer.host,
            "source": {"url": f"https://origin.invalid/blob/{peer.task}"},
        }
        if seed:
            payload["seed"] = True
            payload["task"] = self.content
        return payload

    async def echo(self, peer: SimPeer) -> None:
        """The baseline's request: the peer's register body, to the echo service."""
        await self.call(peer, ECHO, self.register_body(peer))

    async def register(self, peer: SimPeer, seed: bool = False) -> dict[str, Any] | None:
        payload = self.register_body(peer, seed)
        reply = await self.call(peer, "scheduler.{partition}.register", payload)
        if reply is not None:
            peer.registered = True
            self.on_schedule(peer, reply)
        return reply

    async def report(self, peer: SimPeer, numbers: list[int], *, whole: bool = False) -> bool:
        digests = self.digests[peer.task]
        pieces: list[dict[str, Any]] = []
        for n in numbers:
            if peer.source:
                pieces.append({"number": n, "digest": digests[n], "cost_ms": 40})
            elif peer.parents:
                parent = self.rng.choice(peer.parents)
                cost = self.rng.randint(20, 200)
                pieces.append({"number": n, "parent_id": parent, "cost_ms": cost})
            else:
                pieces.append({"number": n})
        payload: dict[str, Any] = {
            "task_id": self.task_ids[peer.task],
            "peer_id": peer.peer_id,
            "pieces": pieces,
        }
        if whole:
            payload["task"] = self.content
        return await self.call(peer, "scheduler.{partition}.pieces", payload) is not None

    def next_batch(self, peer: SimPeer) -> list[int]:
        """The next pieces the peer gets, taken off its missing ones: from parents, only pieces
        whose digest it knows (a peer's piece book picks no other); from the origin, any."""
        size = self.p["batch"]
        if not peer.unknown or peer.source or not peer.parents:
            batch, peer.missing = peer.missing[:size], peer.missing[size:]
            return batch
        batch = [n for n in peer.missing if n not in peer.unknown][:size]
        if batch:
            taken = set(batch)
            peer.missing = [n for n in peer.missing if n not in taken]
        return batch

    async def refresh_task(self, peer: SimPeer) -> None:
        """The task's digests, page by page, as a peer's ``_refresh_task`` asks them; the
        peer learns those the scheduler knows."""
        offset = 0
        task_id = self.task_ids[peer.task]
        for _ in range(self.p["pieces"] // DIGEST_PAGE + 1):
            reply = await self.call(peer, TASK, {"task_id": task_id, "offset": offset})
            if reply is None or not reply["task"]:
                return
            digests: list[str | None] = reply["digests"]
            start = reply.get("offset", offset)
            peer.unknown.difference_update(n for n, d in enumerate(digests, start) if d)
            offset = start + len(digests)
            if not digests or offset >= reply["task"]["piece_count"]:
                return

    async def step(self, peer: SimPeer, now: float) -> None:
        """One request (two or three when a generation ends) of one peer."""
        if not peer.registered:
            await self.register(peer)
            return
        if now >= peer.next_heartbeat:
            peer.next_heartbeat = now + self.p["heartbeat_interval"]
            beat = {"host": peer.host, "uploads": 1, "peers": 1}
            await self.call(peer, "scheduler.heartbeat", beat)
            return
        if peer.unknown and peer.parents and not peer.source and now >= peer.next_digests:
            peer.next_digests = now + self.p["digest_interval"]
            await self.refresh_task(peer)
            return
        batch = self.next_batch(peer) if peer.reports_due > 0 and peer.missing else []
        if batch:  # none: what its parents hold lacks digests; it asks for others at once
            peer.reports_due -= 1
            if not await self.report(peer, batch):
                peer.missing.extend(batch)
                peer.registered = False  # e.g. not_found after the host expired: start over
                return
            if not peer.missing:
                done = {"task_id": self.task_ids[peer.task], "peer_id": peer.peer_id}
                result = {**done, "success": True}
                await self.call(peer, "scheduler.{partition}.result", result)
                gone = {"host_id": peer.host["id"], "peer_ids": [peer.peer_id]}
                await self.call(peer, "scheduler.leave", gone)
                self.new_generation(peer)
                if self.timing:
                    self.generations += 1
            return
        payload: dict[str, Any] = {"task_id": self.task_ids[peer.task], "peer_id": peer.peer_id}
        if peer.parents and self.rng.random() < self.p["bad_rate"]:
            bad = self.rng.choice(peer.parents)
            reason = self.rng.choice(("failed", "slow"))
            payload["blocklist"] = [bad]
            payload["bad_parents"] = [{"peer_id": bad, "reason": reason}]
        reply = await self.call(peer, "scheduler.{partition}.reschedule", payload)
        if reply is None:
            peer.reports_due = self.p["reports_per_reschedule"]
        else:
            self.on_schedule(peer, reply)


def host_of(index: int, seed: bool) -> dict[str, Any]:
    host_id = f"{'seed-' if seed else ''}h{index:05d}"
    return {
        "id": host_id,
        "ip": f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}",
        "port": 40001,
        "type": "seed" if seed else "normal",
        "idc": f"dc{index % 3}",
        "location": f"eu|west|{'abc'[index % 3]}",
    }


def _say(text: str) -> None:
    print(f"# generator: {text}", file=sys.stderr, flush=True)


async def partitions_of(conn: Any, prefix: str) -> int:
    """How many partitions the scheduler uses: a peer learns it from a heartbeat reply."""
    host = host_of(0, True)
    beat = {"host": host, "uploads": 0, "peers": 0}
    sender = contracts.Sender(host["type"], host["id"])
    subject = contracts.get("scheduler.heartbeat").subject(prefix, sender=sender.token)
    msg = await conn.request(subject, orjson.dumps(beat), timeout=10)
    return int(orjson.loads(msg.data).get("partitions", DEFAULT_PARTITIONS))


async def drive(
    ready: deque[SimPeer], step: Any, deadline: float, concurrency: int, grace: float
) -> None:
    """``concurrency`` workers keep that many requests in flight until ``deadline``: each takes
    the next peer off ``ready`` and sends its next request(s) (``step``); ``grace`` bounds it."""
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while True:
            now = loop.time()
            if now >= deadline:
                return
            peer = ready.popleft()
            try:
                await step(peer, now)
            finally:
                ready.append(peer)

    workers = min(concurrency, len(ready))  # a peer has one request in flight at a time
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), grace)


async def echo_phase(load: Load, peers: list[SimPeer], params: dict[str, Any]) -> dict[str, Any]:
    """The baseline: the timed phase's workers, connections and peers, each request a peer's
    register body to the echo service, for as long as the timed phase."""
    loop = asyncio.get_running_loop()
    echo_pid, nats_pid = params["echo_pid"], params["nats_pid"]

    async def step(peer: SimPeer, now: float) -> None:
        await load.echo(peer)

    cpu0 = (cpu_seconds(echo_pid), cpu_seconds(nats_pid), _self_cpu(), machine_cpu())
    t0 = loop.time()
    load.timing = True
    grace = params["duration"] + 2 * params["request_timeout"] + 10
    try:
        await drive(deque(peers), step, t0 + params["duration"], params["concurrency"], grace)
    finally:
        elapsed = loop.time() - t0
        load.timing = False
        cpu1 = (cpu_seconds(echo_pid), cpu_seconds(nats_pid), _self_cpu(), machine_cpu())
    ms = [v * 1000 for v in load.echo_latency]
    total = cpu1[3][1] - cpu0[3][1]
    result = {
        "echo_requests": len(ms),
        "echo_elapsed_s": round(elapsed, 3),
        "echo_rps": round(len(ms) / elapsed, 1),
        "echo_p50_ms": round(percentile(ms, 50), 3) if ms else None,
        "echo_p99_ms": round(percentile(ms, 99), 3) if ms else None,
        "echo_errors": dict(load.errors),
        "echo_cpu_seconds": {
            "echo": round(cpu1[0] - cpu0[0], 2),
            "nats_server": round(cpu1[1] - cpu0[1], 2),
            "generator": round(cpu1[2] - cpu0[2], 2),
        },
        "echo_cpu_busy": round((cpu1[3][0] - cpu0[3][0]) / total, 3) if total else None,
    }
    for counter in (load.requests, load.errors, load.errors_by_subject):
        counter.clear()
    load.echo_latency.clear()
    return result


NO_ECHO = dict.fromkeys(
    ("echo_requests", "echo_elapsed_s", "echo_rps", "echo_p50_ms", "echo_p99_ms", "echo_errors",
     "echo_cpu_seconds", "echo_cpu_busy", "echo_ratio", "requests_echo_ratio"),
)  # fmt: skip
"""A run's echo figures when it measured no baseline (the profiled run)."""


async def generate(params: dict[str, Any]) -> dict[str, Any]:
    conns = [
        await nats.connect(
            params["nats"],
            name=f"bench-scheduler-load-{i}",
            max_reconnect_attempts=3,
            connect_timeout=5,
        )
        for i in range(params["connections"])
    ]
    try:
        load = Load({**params, "partitions": await partitions_of(conns[0], params["prefix"])})
        peers: list[SimPeer] = []
        for i in range(params["peers"]):
            task = i % params["tasks"]
            seed = i < params["tasks"]
            peer = SimPeer(i, task, host_of(i, seed), conns[i % len(conns)])
            load.new_generation(peer)
            peers.append(peer)
        seeds, normals = peers[: params["tasks"]], peers[params["tasks"] :]
        loop = asyncio.get_running_loop()

        # The baseline first, while the scheduler knows nothing yet: the same load, echoed.
        echo: dict[str, Any] = dict(NO_ECHO)
        if params.get("echo_pid"):
            echo = await echo_phase(load, normals, params)
            _say(
                f"echo baseline: {echo['echo_rps']:g} requests/s, p50 {echo['echo_p50_ms']} ms,"
                f" p99 {echo['echo_p99_ms']} ms"
            )

        # Set-up, not timed: every task gets its seed, which reports all pieces with digests.
        setup_start = time.perf_counter()
        gate = asyncio.Semaphore(params["concurrency"])

        async def seed_up(peer: SimPeer) -> None:
            async with gate:
                reply = await load.register(peer, seed=True)
                if reply is None or reply["action"] != "back_to_source":
                    raise RuntimeError(f"seed register answered {reply}")
                if not await load.report(peer, peer.missing, whole=True):
                    raise RuntimeError("seed piece report refused")
                peer.missing = []
                peer.unknown = set()  # it read every piece (and its digest) from the origin

        await asyncio.wait_for(asyncio.gather(*(seed_up(s) for s in seeds)), SETUP_TIMEOUT)
        setup_s = time.perf_counter() - setup_start
        _say(f"{len(seeds)} seeds registered with {params['pieces']} pieces each in {setup_s:.2f}s")

        # The timed phase.
        sched_pid, nats_pid = params["scheduler_pid"], params["nats_pid"]
        print(json.dumps({"event": "timed"}), flush=True)
        cpu0 = (cpu_seconds(sched_pid), cpu_seconds(nats_pid), _self_cpu(), machine_cpu())
        t0 = loop.time()
        deadline = t0 + params["duration"]
        for peer in normals:
            peer.next_heartbeat = t0 + load.rng.uniform(0, params["heartbeat_interval"])
        load.timing = True

        async def seed_heartbeats() -> None:
            while loop.time() < deadline + params["heartbeat_interval"]:
                for peer in seeds:
                    body = {"host": peer.host, "uploads": 4, "peers": 1}
                    await load.call(peer, "scheduler.heartbeat", body)
                await asyncio.sleep(params["heartbeat_interval"])

        beats = asyncio.create_task(seed_heartbeats())
        grace = params["duration"] + 2 * params["request_timeout"] + 10
        try:
            await drive(deque(normals), load.step, deadline, params["concurrency"], grace)
        finally:
            elapsed = loop.time() - t0
            load.timing = False
            cpu1 = (cpu_seconds(sched_pid), cpu_seconds(nats_pid), _self_cpu(), machine_cpu())
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()

    decisions = len(load.latency)
    ms = [v * 1000 for v in load.latency]
    other_ms = [v * 1000 for v in load.other_latency]
    total = cpu1[3][1] - cpu0[3][1]
    sched_cpu = cpu1[0] - cpu0[0]
    decisions_per_s = decisions / elapsed
    requests_per_s = sum(load.requests.values()) / elapsed
    echo_rps = echo["echo_rps"]
    return {
        "event": "result",
        "decisions": decisions,
        "elapsed_s": round(elapsed, 3),
        "decisions_per_s": round(decisions_per_s, 1),
        "requests": dict(load.requests),
        "requests_per_s": round(requests_per_s, 1),
        "requests_per_s_by_subject": {
            name: round(n / elapsed, 1) for name, n in sorted(load.requests.items())
        },
        "p50_ms": round(percentile(ms, 50), 3) if ms else None,
        "p90_ms": round(percentile(ms, 90), 3) if ms else None,
        "p99_ms": round(percentile(ms, 99), 3) if ms else None,
        "max_ms": round(max(ms), 3) if ms else None,
        "other_p50_ms": round(percentile(other_ms, 50), 3) if other_ms else None,
        "other_p99_ms": round(percentile(other_ms, 99), 3) if other_ms else None,
        "errors": dict(load.errors),
        "errors_by_subject": dict(load.errors_by_subject),
        "actions": dict(load.actions),
        "parents_per_decision": round(load.parents_offered / decisions, 2) if decisions else None,
        "generations": load.generations,
        "setup_s": round(setup_s, 3),
        "cpu_seconds": {
            "scheduler": round(sched_cpu, 2),
            "nats_server": round(cpu1[1] - cpu0[1], 2),
            "generator": round(cpu1[2] - cpu0[2], 2),
        },
        "cpu_busy": round((cpu1[3][0] - cpu0[3][0]) / total, 3) if total else None,
        "scheduler_cpu_us_per_decision": round(sched_cpu / decisions * 1e6, 1)
        if decisions
        else None,
        "decisions_per_scheduler_cpu_s": round(decisions / sched_cpu) if sched_cpu else None,
        **echo,
        "echo_ratio": round(decisions_per_s / echo_rps, 3) if echo_rps else None,
        "requests_echo_ratio": round(requests_per_s / echo_rps, 3) if echo_rps else None,
    }


def generator_main(spec: str) -> int:
    params = json.loads(spec)
    result = _run_fast(generate(params))
    print(json.dumps(result), flush=True)
    return 0


def _run_fast(coro: Any) -> Any:
    """On uvloop when it is installed, as the scheduler runs (``swarmfly.cli.startup._run``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the baseline: a trivial nats.micro service (its own process) -------------------------


def echo_subject(prefix: str) -> str:
    """The echo endpoint's subject, less the sender's two tokens."""
    return f"{prefix}.{contracts.API_VERSION}.bench.echo"


async def serve_echo(params: dict[str, Any]) -> None:
    """One nats.micro service, one endpoint on <prefix>.v1.bench.echo.*.* in a queue group,
    as the scheduler's endpoints are; each request gets ``ECHO_REPLY`` and nothing else is
    done. Serves until SIGTERM, its stdin closes or ``lifetime`` s have passed."""
    nc = await nats.connect(
        params["nats"], name="bench-scheduler-echo", max_reconnect_attempts=3, connect_timeout=5
    )
    try:
        service = await nats.micro.add_service(
            nc, name="bench-echo", version="1.0.0", description="bench/scheduler.py baseline"
        )

        async def handler(request: Any) -> None:
            await request.respond(ECHO_REPLY)

        await service.add_endpoint(
            name="echo",
            subject=f"{echo_subject(params['prefix'])}.*.*",
            handler=handler,
            queue_group="bench-echo",
        )
        await nc.flush()
        await nc.flush()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def watch_stdin() -> None:  # read() returns when the driver is gone
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        print(json.dumps({"event": "ready"}), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), params["lifetime"])
        await service.stop()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def echo_main(spec: str) -> int:
    _run_fast(serve_echo(json.loads(spec)))
    return 0


# -- the driver --------------------------------------------------------------------------


class Lines(threading.Thread):
    """Reads a child's stdout into a queue, so the driver can wait with a deadline."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: queue.Queue[str] = queue.Queue()

    def run(self) -> None:
        for line in self.stream:
            self.lines.put(line)
        self.lines.put("")

    def next_event(self, deadline: float) -> dict[str, Any] | None:
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if not line:
                return None  # the child closed its stdout
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    return event
            if time.monotonic() > deadline:
                return None


def start_echo(
    reaper: Reaper, nats: NatsServer, prefix: str, lifetime: float
) -> subprocess.Popen[str] | None:
    """The baseline's echo service in its own process (this script with ``--echo``), once its
    endpoint is subscribed; None if it did not come up."""
    spec = json.dumps({"nats": nats.url, "prefix": prefix, "lifetime": lifetime})
    echo = reaper.add(
        subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "--echo", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )
    lines = Lines(echo.stdout)
    lines.start()
    event = lines.next_event(time.monotonic() + 30)
    if event is None or event["event"] != "ready":
        reaper.stop(echo)
        return None
    return echo


def one_run(
    run: int, args: argparse.Namespace, root: Path, nats: NatsServer, reaper: Reaper, out: Out,
    profile: Path | None = None, swarm: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    peers, tasks = swarm_of(args, swarm)
    run_dir = (
        root / (f"swarm{swarm}" if swarm else "") / (f"run{run}" if profile is None else "profile")
    )
    out.progress(f"run {run}: starting the scheduler (prefix {prefix})")
    scheduler = spawn_service(
        "scheduler", nats.url, run_dir / "scheduler", "--prefix", prefix, env=args.env, timeout=60
    )
    reaper.add(scheduler.process)
    assert nats.process is not None
    result: dict[str, Any] = {"run": run, "ok": False, "swarm": swarm}
    echo_s = 0.0 if profile is not None else args.duration + 2 * args.request_timeout + 10
    echo: subprocess.Popen[str] | None = None
    if profile is None:  # the profiled run measures no baseline
        echo = start_echo(reaper, nats, prefix, lifetime=SETUP_TIMEOUT + 3 * echo_s + 120)
        if echo is None:
            reaper.stop(scheduler.process)
            result["error"] = "the echo service did not start"
            return result
    params = {
        "nats": nats.url, "prefix": prefix, "peers": peers, "tasks": tasks,
        "duration": args.duration, "concurrency": args.concurrency,
        "connections": args.connections, "pieces": args.pieces, "batch": args.batch,
        "reports_per_reschedule": args.reports_per_reschedule, "bad_rate": args.bad_rate,
        "heartbeat_interval": args.heartbeat_interval, "request_timeout": args.request_timeout,
        "digest_interval": args.digest_interval, "seed": args.seed + run,
        "scheduler_pid": scheduler.process.pid, "nats_pid": nats.process.pid,
        "echo_pid": echo.pid if echo is not None else None,
    }  # fmt: skip
    spy: subprocess.Popen[bytes] | None = None
    generator: subprocess.Popen[str] | None = None
    try:
        if echo is not None:
            out.progress(f"run {run}: echo baseline, {args.duration:g}s")
        generator = reaper.add(
            subprocess.Popen(
                [PY, str(Path(__file__).resolve()), "--generator", json.dumps(params)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        lines = Lines(generator.stdout)
        lines.start()
        limit = time.monotonic() + echo_s + SETUP_TIMEOUT + 30
        event = lines.next_event(limit)
        if event is None or event["event"] != "timed":
            result["error"] = "the generator did not finish its set-up"
            return result
        out.progress(f"run {run}: {peers} peers over {tasks} tasks, {args.duration:g}s of load")
        if profile is not None:
            spy = start_profiler(reaper, scheduler.process.pid, profile, args.duration)
        limit = time.monotonic() + args.duration + 2 * args.request_timeout + 30
        event = lines.next_event(limit)
        if event is None or event["event"] != "result":
            result["error"] = "the generator did not report (see stderr)"
            return result
        generator.wait(timeout=10)
        result.update(event)
        del result["event"]
        alive = scheduler.process.poll() is None
        bad = sum(result["errors"].get(code, 0) for code in ("bad_request", "internal"))
        no_echo = echo is not None and not result["echo_rps"]
        result["ok"] = alive and bad == 0 and not no_echo and generator.returncode == 0
        if not alive:
            result["error"] = f"the scheduler exited with {scheduler.process.returncode}"
        elif bad:
            result["error"] = f"{bad} bad_request/internal replies: a benchmark or scheduler bug"
        elif no_echo:
            result["error"] = f"the echo service did not answer: {result['echo_errors']}"
        log = scheduler.log()
        result["scheduler_log"] = {
            "warnings": len(re.findall(r" WARNING ", log)),
            "errors": len(re.findall(r" ERROR ", log)),
        }
        if spy is not None:
            spy.wait(timeout=args.duration + 30)
    finally:
        for proc in (spy, generator, echo, scheduler.process):
            if proc is not None:
                reaper.stop(proc)
    return result


# -- profiling ---------------------------------------------------------------------------


def start_profiler(reaper: Reaper, pid: int, folder: Path, duration: float) -> Any:
    """py-spy on the scheduler for the timed phase (less a second at each end)."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(_py_spy())
    seconds = max(1, int(duration) - 2)
    command = [
        spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "250",
        "--format", "raw", "--full-filenames", "-o", str(folder / "scheduler.txt"),
    ]  # fmt: skip
    time.sleep(1.0)
    return reaper.add(
        subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    )


def _py_spy() -> Path:
    """py-spy on PATH, or beside this interpreter (a venv's)."""
    found = shutil.which("py-spy")
    return Path(found) if found else Path(PY).parent / "py-spy"


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
CHOICE = "Scheduler._schedule"
"""Core samples under this method are parent choice; the rest is bookkeeping."""


def category(file: str, func: str, src: str) -> str | None:
    """What one frame is part of, or None to look at its caller."""
    if file == "<string>" and func.endswith("__init__"):  # dataclasses' and quick_init's
        return "building messages and candidates (dataclass __init__)"
    if "/contracts/schema.py" in file or "jsonschema_rs" in file:
        return "JSON Schema validation (jsonschema-rs)"
    if "/prometheus_client/" in file:
        return "metrics (prometheus_client)"
    if file.endswith(("/statistics.py", "/fractions.py")):
        return "statistics/fractions (exact math: pstdev, median)"
    if "/plugins/evaluators/" in file:
        return "parent evaluator (plugins/evaluators)"
    if "orjson." in src:
        return "orjson loads/dumps"
    if file.endswith("/scheduler/core.py"):
        return "core"
    if file.endswith("/scheduler/service.py"):
        return "adapter (scheduler/service.py)"
    if "/swarmfly/bus/" in file:
        return "bus glue (swarmfly/bus/)"
    if file.endswith("/asyncio/streams.py"):
        return "socket writes (asyncio streams, from nats-py's flusher)"
    if "/nats/micro/" in file:
        return "nats.micro"
    if "/nats/" in file:
        return "nats-py client (parse, publish, dispatch)"
    if "/asyncio/" in file or "/uvloop/" in file:
        return "event loop (asyncio/uvloop)"
    return None


def _source_line(path: str, line: str | None) -> str:
    import linecache

    return linecache.getline(path, int(line)) if line else ""


def summarize_profile(path: Path) -> dict[str, Any]:
    """Collapsed stacks -> the share of busy samples in each category (the deepest frame that
    matches a category claims the sample), the core's functions, and the hottest leaves."""
    categories: Counter[str] = Counter()
    core_funcs: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for text in stack.split(";"):
            match = FRAME.match(text)
            if match:
                frames.append((match["func"], match["file"], match["line"]))
        if not frames:
            continue
        func, file, line = frames[-1]
        leaves[f"{func} ({'/'.join(file.rsplit('/', 2)[-2:])}:{line})"] += count
        chosen = "other"
        for func, file, line in reversed(frames):
            src = _source_line(file, line) if file.endswith(".py") else ""
            name = category(file, func, src)
            if name == "core":
                under = any(fn == CHOICE for fn, _, _ in frames)
                name = "core: parent choice (_schedule)" if under else "core: bookkeeping"
            if name:
                chosen = name
                break
        categories[chosen] += count
        core = [fn for fn, f, _ in frames if f.endswith("/scheduler/core.py")]
        if core:  # the deepest named method of the core (comprehensions count for theirs)
            core_funcs[core[-1].split(".<locals>")[0]] += count

    def share(counts: Counter[str]) -> dict[str, float]:
        return {k: round(v / max(1, total), 3) for k, v in counts.most_common(15)}

    return {
        "samples": total,
        "categories": share(categories),
        "core_functions": share(core_funcs),
        "leaves": share(leaves),
    }


# -- the report --------------------------------------------------------------------------


def common_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings every swarm size of an invocation shares."""
    return {
        "benchmark": "scheduler",
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "pieces": args.pieces,
        "batch": args.batch,
        "reports_per_reschedule": args.reports_per_reschedule,
        "bad_rate": args.bad_rate,
        "heartbeat_interval_s": args.heartbeat_interval,
        "digest_interval_s": args.digest_interval,
        "runs_requested": args.runs,
        "env": args.env,
        "target": {"decisions_per_s": TARGET_DECISIONS_PER_S, "p99_ms": TARGET_P99_MS},
    }


def summary_of(
    args: argparse.Namespace, runs: list[dict[str, Any]], swarm: int | None = None
) -> dict[str, Any]:
    good = [r for r in runs if r["ok"]]
    peers, tasks = swarm_of(args, swarm)

    def med(key: str) -> float | None:
        values = [r[key] for r in good if r.get(key) is not None]
        return round(v, 3) if (v := median(values)) is not None else None

    errors: Counter[str] = Counter()
    for r in runs:
        errors.update(r.get("errors", {}))
    subjects = sorted({name for r in good for name in r["requests_per_s_by_subject"]})
    by_subject = {
        name: median([r["requests_per_s_by_subject"].get(name, 0.0) for r in good])
        for name in subjects
    }
    dps, p99 = med("decisions_per_s"), med("p99_ms")
    util = median([r["cpu_seconds"]["scheduler"] / r["elapsed_s"] for r in good])
    gen_util = median([r["cpu_seconds"]["generator"] / r["elapsed_s"] for r in good])
    echo_util = median(
        [r["echo_cpu_seconds"]["echo"] / r["echo_elapsed_s"] for r in good if r["echo_rps"]]
    )
    busy = median([r["cpu_busy"] for r in good if r["cpu_busy"] is not None])
    if util is None:
        bottleneck = None
    elif util >= 0.85:
        bottleneck = "scheduler (one core saturated)"
    elif gen_util is not None and gen_util >= 0.85:
        bottleneck = "generator (one core saturated)"
    elif busy is not None and busy >= 0.9:
        bottleneck = "machine (both cores busy: scheduler, generator and nats-server share them)"
    else:
        bottleneck = "neither saturated: latency-bound at this concurrency"
    common = common_of(args)
    return {
        "benchmark": common.pop("benchmark"),
        "ok": len(good) == len(runs),
        "swarm": swarm,
        "peers": peers,
        "tasks": tasks,
        "peers_per_task": peers // tasks if peers % tasks == 0 else round(peers / tasks, 2),
        **common,
        "decisions_per_s": dps,
        "requests_per_s": med("requests_per_s"),
        "requests_per_s_by_subject": by_subject,
        "p50_ms": med("p50_ms"),
        "p99_ms": p99,
        "max_ms": med("max_ms"),
        "errors": dict(errors),
        "scheduler_cpu_per_wall_s": round(util, 3) if util is not None else None,
        "generator_cpu_per_wall_s": round(gen_util, 3) if gen_util is not None else None,
        "scheduler_cpu_us_per_decision": med("scheduler_cpu_us_per_decision"),
        "decisions_per_scheduler_cpu_s": med("decisions_per_scheduler_cpu_s"),
        "bottleneck": bottleneck,
        "echo_rps": med("echo_rps"),
        "echo_p50_ms": med("echo_p50_ms"),
        "echo_p99_ms": med("echo_p99_ms"),
        "echo_cpu_per_wall_s": round(echo_util, 3) if echo_util is not None else None,
        "echo_ratio": med("echo_ratio"),
        "requests_echo_ratio": med("requests_echo_ratio"),
        "meets_target": bool(
            dps and p99 and dps >= TARGET_DECISIONS_PER_S and p99 <= TARGET_P99_MS
        ),
        "runs": runs,
    }


SHORT = {name: name.replace("scheduler.", "").replace("{partition}.", "") for name in SUBJECTS}


def report(summary: dict[str, Any], out: Out) -> None:
    runs = summary["runs"]
    out.say()
    out.say(
        f"scheduler: {summary['peers']} peers over {summary['tasks']} tasks "
        f"({summary['peers_per_task']:g} per task; {summary['pieces']} pieces each, batches of "
        f"{summary['batch']}), {summary['concurrency']} requests in flight on "
        f"{summary['connections']} connections, {summary['duration_s']:g}s per run"
    )
    if summary["env"]:
        out.say(f"scheduler environment: {summary['env']}")
    rows = []
    for r in runs:
        if "decisions" not in r:
            rows.append([r["run"], "NO", *["-"] * 14])  # as many cells as the header
            continue
        cpu, wall = r["cpu_seconds"], r["elapsed_s"]
        rows.append([
            r["run"], "yes" if r["ok"] else "NO", r["decisions"], r["elapsed_s"],
            r["decisions_per_s"], r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"],
            sum(r["errors"].values()), round(cpu["scheduler"] / wall, 2),
            round(cpu["generator"] / wall, 2), round(cpu["nats_server"] / wall, 2),
            r["cpu_busy"], _dash(r["echo_rps"]), _dash(r["echo_ratio"]),
        ])  # fmt: skip
    out.say(
        table(
            ["run", "ok", "decisions", "seconds", "decisions/s", "requests/s", "p50_ms",
             "p99_ms", "max_ms", "errors", "sched_cpu", "gen_cpu", "nats_cpu", "cpu_busy",
             "echo_rps", "echo_ratio"],
            rows,
        )
    )  # fmt: skip
    out.say(
        "sched_cpu, gen_cpu, nats_cpu: CPU seconds per wall second (1.0 = one core saturated);"
        " cpu_busy: the whole machine (2 cores); echo_ratio: decisions/s / echo_rps"
    )
    mix = ", ".join(
        f"{SHORT.get(k, k)} {v:g}" for k, v in summary["requests_per_s_by_subject"].items()
    )
    out.say(f"requests/s by subject (median): {mix or '-'}")
    errors = ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())) or "none"
    out.say(f"errors by code (all runs): {errors}")
    for r in runs:
        if r.get("error"):
            out.say(f"run {r['run']}: {r['error']}")
    verdict = "meets" if summary["meets_target"] else "misses"
    out.say(
        f"median: {summary['decisions_per_s']} decisions/s, p50 {summary['p50_ms']} ms, "
        f"p99 {summary['p99_ms']} ms: {verdict} the target (>= {TARGET_DECISIONS_PER_S}/s, "
        f"p99 <= {TARGET_P99_MS:g} ms)"
    )
    out.say(
        f"scheduler CPU per decision {summary['scheduler_cpu_us_per_decision']} us (with the "
        f"piece reports and heartbeats around it): {summary['decisions_per_scheduler_cpu_s']} "
        f"decisions per CPU-second of the scheduler; bottleneck: {summary['bottleneck']}"
    )
    if summary["echo_rps"]:
        out.say(
            f"echo baseline (a trivial nats.micro service, same generator): "
            f"{summary['echo_rps']} requests/s, p50 {summary['echo_p50_ms']} ms, p99 "
            f"{summary['echo_p99_ms']} ms, echo CPU {summary['echo_cpu_per_wall_s']}; "
            f"decisions/s per echo request/s {summary['echo_ratio']}, requests/s per echo "
            f"request/s {summary['requests_echo_ratio']}"
        )
    profile = summary.get("profile")
    if profile and profile.get("summary"):
        prof = profile["summary"]
        out.say()
        out.say(
            f"profile of the scheduler (extra run, py-spy, {prof['samples']} busy samples; "
            f"{profile['decisions_per_s']} decisions/s while profiled): {profile['stacks']}"
        )
        out.say(
            table(["where the scheduler's CPU goes", "share"], list(prof["categories"].items()))
        )
        out.say(table(["core function (deepest)", "share"], list(prof["core_functions"].items())))
        out.say(table(["hottest leaf frames", "share"], list(prof["leaves"].items())[:10]))


def _dash(value: object) -> object:
    return "-" if value is None else value


def report_swarms(summaries: list[dict[str, Any]], out: Out) -> None:
    """One row per swarm size: the medians of its runs."""
    rows = [
        [
            s["peers_per_task"], s["tasks"], s["peers"], "yes" if s["ok"] else "NO",
            _dash(s["decisions_per_s"]), _dash(s["requests_per_s"]), _dash(s["p50_ms"]),
            _dash(s["p99_ms"]), _dash(s["scheduler_cpu_per_wall_s"]),
            _dash(s["scheduler_cpu_us_per_decision"]), _dash(s["echo_rps"]),
            _dash(s["echo_ratio"]),
        ]
        for s in summaries
    ]  # fmt: skip
    out.say()
    out.say(f"by swarm size (medians of {summaries[0]['runs_requested']} runs each):")
    out.say(
        table(
            ["peers/task", "tasks", "peers", "ok", "decisions/s", "requests/s", "p50_ms",
             "p99_ms", "sched_cpu", "us/decision", "echo_rps", "echo_ratio"],
            rows,
        )
    )  # fmt: skip


def measure(
    args: argparse.Namespace, root: Path, nats: NatsServer, reaper: Reaper, out: Out,
    swarm: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The runs of one swarm size (and its profiled run) and their summary."""
    runs: list[dict[str, Any]] = []
    label = f"swarm {swarm}, " if swarm else ""
    for run in range(1, args.runs + 1):
        result = one_run(run, args, root, nats, reaper, out, swarm=swarm)
        runs.append(result)
        out.progress(
            f"{label}run {run}: ok={result['ok']} decisions/s={result.get('decisions_per_s')}"
            f" p50={result.get('p50_ms')}ms p99={result.get('p99_ms')}ms"
            f" echo_rps={result.get('echo_rps')} echo_ratio={result.get('echo_ratio')}"
            f" errors={result.get('errors')}"
        )
    summary = summary_of(args, runs, swarm)
    if args.profile:
        folder = args.profile.resolve() / (f"swarm{swarm}" if swarm else "")
        out.progress(f"{label}profile run: py-spy on the scheduler, stacks in {folder}")
        extra = one_run(0, args, root, nats, reaper, out, profile=folder, swarm=swarm)
        stacks = folder / "scheduler.txt"
        summary["profile"] = {
            "decisions_per_s": extra.get("decisions_per_s"),
            "p99_ms": extra.get("p99_ms"),
            "stacks": str(stacks),
            "summary": summarize_profile(stacks) if stacks.exists() else None,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generator:
        return generator_main(args.generator)
    if args.echo:
        return echo_main(args.echo)
    if args.profile and not _py_spy().exists():
        print("--profile needs py-spy: pip install py-spy", file=sys.stderr)
        return 2
    out = Out(args.json)
    reaper = Reaper()
    summaries: list[dict[str, Any]] = []
    try:
        with workspace("scheduler", args.keep, out) as root, cleanup(reaper):
            nats = NatsServer(root / "nats").start()
            assert nats.process is not None
            reaper.add(nats.process)
            for swarm in args.swarms or [None]:
                summaries.append(measure(args, root, nats, reaper, out, swarm))
            nats.stop()
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    for one in summaries:
        report(one, out)
    if args.swarms is None:
        summary = summaries[0]  # the shape of the figures before --swarms
    else:
        report_swarms(summaries, out)
        summary = {
            **common_of(args),
            "ok": all(one["ok"] for one in summaries),
            "peers_requested": args.peers,
            "swarm_sizes": args.swarms,
            "swarms": summaries,
        }
    if args.keep:
        summary["dir"] = str(root)
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
