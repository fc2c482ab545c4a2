"""Scheduler core benchmark: the cost of one decision as the swarm of one task grows, or
(--tasks) the memory of many tasks in one core.

No NATS, no sockets, no services: the script drives the scheduler's pure core
(``swarmfly.services.scheduler.core.Scheduler``) in its own interpreter, built as
``services/scheduler/service.py`` builds it (the ``[scheduler]`` settings, the evaluator from
the plugin host) plus a seeded rng, and calls it as the service's handlers do, with the
arguments they pass. For each N of ``--peers``, on a fresh core: a storage seed registers
first and reports every piece with its digest; then N peers, each on its own host, send a
heartbeat and register (timed); then, for ``--decisions`` random peers, a batch of pieces the
peer lacks is reported and the peer reschedules (the reschedule timed: the decision). A peer
that holds every piece reports its result, leaves and registers again, not timed.

With ``--tasks``, the memory of many tasks in one core instead: for each N, in a fresh process
(twice: once plain, for the resident set, the build time and the decision, once under
tracemalloc), every task gets a storage seed that registers and reports each piece's digest,
then ``--peers-per-task`` peers, each on its own host, that register and report a few pieces.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import linecache
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import MiB, Out, add_env_flag, env_pairs, median, percentile, table, workspace

from swarmfly import config as swarmfly_config
from swarmfly import ids
from swarmfly.content import TaskContent
from swarmfly.errors import SwarmflyError
from swarmfly.pluginhost import Plugins
from swarmfly.services.scheduler.core import HostSpec, PieceReport, Schedule, Scheduler
from swarmfly.services.scheduler.service import core_for

PIECE_LENGTH = 4 * 1024 * 1024
TARGET_RATIO = 2.0
"""The issue's goal: the mean decision at 10,000 peers per task within 2x of that at 100."""
PROGRESS_EVERY = 5.0
"""Seconds between progress lines on stderr."""
SEED_HOST = "storage-0"
ROOT = Path(__file__).resolve().parent.parent
TASK_DECISIONS = 500
"""Timed reschedules per N with --tasks, unless --decisions says otherwise."""


def counts(text: str) -> list[int]:
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("counts must be >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--peers",
        type=counts,
        default=counts("100,1000,10000"),
        help="swarm sizes N of one task, comma-separated (default 100,1000,10000)",
    )
    mode.add_argument(
        "--tasks",
        type=counts,
        help="the memory mode: numbers of tasks N in one core, comma-separated, e.g. "
        "1000,10000,100000",
    )
    parser.add_argument(
        "--peers-per-task", type=int, default=4, help="with --tasks: peers of each task besides "
        "its seed, each on its own host (default 4)",
    )  # fmt: skip
    parser.add_argument("--pieces", type=int, default=256, help="pieces of the task (256)")
    parser.add_argument(
        "--batch", type=int, default=4, help="pieces per report, and a peer's pieces with "
        "--tasks (default 4)",
    )  # fmt: skip
    parser.add_argument(
        "--decisions",
        type=int,
        help=f"timed reschedules per N (default 2000; {TASK_DECISIONS} with --tasks)",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=300.0,
        help="wall-clock budget of each phase (register, steady; with --tasks: seeds, peers, "
        "decisions) of one N in one run; a phase past it stops there and the N is marked "
        "truncated (default 300)",
    )
    parser.add_argument(
        "--min-free-mib",
        type=int,
        default=2048,
        help="with --tasks: stop building (truncated), or skip the snapshot, when the "
        "machine's MemAvailable would fall below this (default 2048)",
    )
    parser.add_argument(
        "--traced-runs",
        type=int,
        default=1,
        help="with --tasks: the first runs that also build under tracemalloc, which counts "
        "the same state the same way every run (default 1)",
    )
    parser.add_argument(
        "--top", type=int, default=10, help="with --tasks: lines of tracemalloc's top (10)"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    add_env_flag(
        parser,
        "SWARMFLY_SCHEDULER_* settings for the core, e.g. SWARMFLY_SCHEDULER_CANDIDATE_PARENTS=8",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--child", choices=("plain", "traced"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decisions is None:
        args.decisions = TASK_DECISIONS if args.tasks else 2000
    positive = (args.pieces, args.batch, args.decisions, args.runs, args.peers_per_task)
    if min(positive) < 1 or args.max_seconds <= 0:
        parser.error(
            "--pieces, --batch, --decisions, --runs, --peers-per-task and --max-seconds must "
            "be positive"
        )
    if args.batch > args.pieces or min(args.top, args.min_free_mib, args.traced_runs) < 0:
        parser.error("--batch must be <= --pieces; --top, --min-free-mib, --traced-runs >= 0")
    if args.child and (not args.tasks or len(args.tasks) != 1):
        parser.error("--child measures one --tasks N")
    args.env = env_pairs(parser, args.env)
    return args


def make_core(args: argparse.Namespace, settings: Any, evaluator: Any) -> Scheduler:
    """The core as the service builds it, with a seeded rng of its own (the driver's is
    seeded with ``--seed``)."""
    return core_for(settings.scheduler, evaluator, random.Random(args.seed + 1))


# -- the simulated swarm -----------------------------------------------------------------


def host_of(index: int) -> HostSpec:
    """A normal host, as ``service.host_spec`` builds it from a heartbeat or register."""
    return HostSpec(
        id=f"h{index:05d}",
        ip=f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}",
        port=40001,
        type="normal",
        idc=f"dc{index % 3}",
        location=f"eu|west|{'abc'[index % 3]}",
        upload_slots=64,
    )


SEED_SPEC = HostSpec(
    id=SEED_HOST, ip="10.255.0.1", port=40002, type="seed", idc="dc0", location="eu|west|a"
)


@dataclass
class SimPeer:
    """One peer of the swarm: its host, what it lacks and the parents it was last given."""

    host: HostSpec
    peer_id: str
    missing: list[int] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    source: bool = False


@dataclass
class Timings:
    register: list[float] = field(default_factory=list)
    """Seconds (perf_counter) of each timed register."""
    decision: list[float] = field(default_factory=list)
    """Seconds (perf_counter) of each timed reschedule."""
    decision_cpu: float = 0.0
    """CPU seconds (process_time) spent inside the timed reschedules."""
    register_cpu: float = 0.0
    report: list[float] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    parents_offered: int = 0
    rejoins: int = 0


class Swarm:
    """One task on one fresh core, driven as the scheduler service drives it."""

    def __init__(self, args: argparse.Namespace, settings: Any, evaluator: Any) -> None:
        self.args = args
        self.clock = time.monotonic  # the service's clock
        self.rng = random.Random(args.seed)
        self.core = make_core(args, settings, evaluator)
        self.task_id = ids.task_id(f"https://origin.invalid/bench/core-{args.pieces}.bin")
        self.content = TaskContent(args.pieces * PIECE_LENGTH, PIECE_LENGTH, args.pieces)
        self.digests = [
            hashlib.sha256(f"{self.task_id}:{n}".encode()).hexdigest() for n in range(args.pieces)
        ]
        self.peers: list[SimPeer] = []
        self.t = Timings()

    # -- what the service's handlers call ------------------------------------------------

    def heartbeat(self, host: HostSpec) -> None:
        self.core.heartbeat(host, 0, self.clock())  # on_heartbeat

    def register(self, peer: SimPeer, seed: bool = False) -> tuple[Schedule, float, float]:
        """on_register: (schedule, wall seconds, CPU seconds) of the core call alone."""
        cpu, started = time.process_time(), time.perf_counter()
        schedule, effects = self.core.register(
            task_id=self.task_id,
            peer_id=peer.peer_id,
            host=peer.host,
            now=self.clock(),
            pieces=(),
            content=None,
            seed=seed,
        )
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if effects:  # a seed trigger: none is expected, the seed registered first
            self.t.errors["trigger_seed"] += len(effects)
        self.on_schedule(peer, schedule)
        return schedule, wall, cpu

    def report(self, peer: SimPeer, numbers: list[int], content: bool = False) -> None:
        """on_pieces: a source reports digests (as an origin read does), a child the parent
        it got each piece from and what it cost."""
        pieces = []
        for n in numbers:
            if peer.source:
                pieces.append(PieceReport(n, self.digests[n], None, self.rng.randint(20, 80)))
            elif peer.parents:
                parent = self.rng.choice(peer.parents)
                pieces.append(PieceReport(n, None, parent, self.rng.randint(20, 200)))
            else:
                pieces.append(PieceReport(n))
        started = time.perf_counter()
        self.core.report_pieces(
            task_id=self.task_id,
            peer_id=peer.peer_id,
            pieces=pieces,
            now=self.clock(),
            content=self.content if content else None,
            lent=[],
        )
        self.t.report.append(time.perf_counter() - started)

    def reschedule(self, peer: SimPeer) -> None:
        """on_reschedule, timed: the decision."""
        cpu, started = time.process_time(), time.perf_counter()
        schedule, effects = self.core.reschedule(
            task_id=self.task_id, peer_id=peer.peer_id, now=self.clock(), blocklist=(),
            bad_parents=[],
        )  # fmt: skip
        self.t.decision.append(time.perf_counter() - started)
        self.t.decision_cpu += time.process_time() - cpu
        if effects:
            self.t.errors["trigger_seed"] += len(effects)
        self.t.actions[schedule.action] += 1
        self.t.parents_offered += len(schedule.parents)
        self.on_schedule(peer, schedule)

    def finish(self, peer: SimPeer) -> None:
        """on_result, then on_leave of that one peer; the host stays."""
        self.core.result(task_id=self.task_id, peer_id=peer.peer_id, success=True, now=self.clock())
        self.core.leave(peer.host.id, [peer.peer_id])

    def on_schedule(self, peer: SimPeer, schedule: Schedule) -> None:
        if schedule.action == "back_to_source":
            peer.source, peer.parents = True, []
        elif schedule.parents:
            peer.parents = [p.peer_id for p in schedule.parents]

    def new_peer(self, host: HostSpec) -> SimPeer:
        missing = list(range(self.args.pieces))
        self.rng.shuffle(missing)
        return SimPeer(host, ids.peer_id(host.id, self.task_id), missing)

    # -- the phases ----------------------------------------------------------------------

    def seed_up(self) -> None:
        """The storage seed, as a real one: heartbeat, register with seed=True, read every
        piece from the origin and report it with its digest and the task's layout."""
        seed = SimPeer(SEED_SPEC, ids.peer_id(SEED_HOST, self.task_id))
        self.heartbeat(SEED_SPEC)
        schedule, _, _ = self.register(seed, seed=True)
        if schedule.action != "back_to_source":
            raise RuntimeError(f"the seed was answered {schedule.action}")
        self.report(seed, list(range(self.args.pieces)), content=True)
        self.t.report.clear()

    def register_all(self, n: int, deadline: float, out: Out) -> bool:
        """N peers, each on its own host: heartbeat, then register. False when cut short."""
        next_say = time.monotonic() + PROGRESS_EVERY
        for i in range(n):
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_say:
                next_say = now + PROGRESS_EVERY
                out.progress(f"N={n}: registered {i}/{n}")
            peer = self.new_peer(host_of(i))
            self.heartbeat(peer.host)
            try:
                schedule, wall, cpu = self.register(peer)
            except SwarmflyError as exc:
                self.t.errors[exc.code] += 1
                continue
            self.t.register.append(wall)
            self.t.register_cpu += cpu
            self.t.actions[f"register:{schedule.action}"] += 1
            self.peers.append(peer)
        return True

    def steady(self, deadline: float, out: Out) -> bool:
        """Report a batch, then reschedule, for random peers. False when cut short."""
        todo = self.args.decisions
        next_say = time.monotonic() + PROGRESS_EVERY
        for done in range(todo):
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_say:
                next_say = now + PROGRESS_EVERY
                out.progress(f"N={len(self.peers)}: decisions {done}/{todo}")
            index = self.rng.randrange(len(self.peers))
            peer = self.peers[index]
            try:
                if not peer.missing:  # done: result, leave, and a fresh peer of the host
                    self.finish(peer)
                    peer = self.peers[index] = self.new_peer(peer.host)
                    self.heartbeat(peer.host)
                    self.register(peer)
                    self.t.rejoins += 1
                batch = peer.missing[: self.args.batch]
                self.report(peer, batch)
                del peer.missing[: self.args.batch]
                self.reschedule(peer)
            except SwarmflyError as exc:
                self.t.errors[exc.code] += 1
        return True


def one_n(
    n: int, run: int, args: argparse.Namespace, settings: Any, evaluator: Any, out: Out
) -> dict[str, Any]:
    gc.collect()  # the garbage of earlier sizes (and of start-up) is not this N's to pay
    swarm = Swarm(args, settings, evaluator)
    start = time.monotonic()
    swarm.seed_up()
    truncated = []
    if not swarm.register_all(n, start + args.max_seconds, out):
        truncated.append("register")  # the steady phase runs on the peers that did register
    register_s = time.monotonic() - start
    if swarm.peers and not swarm.steady(time.monotonic() + args.max_seconds, out):
        truncated.append("steady")
    t = swarm.t
    ms = 1000.0
    decisions = t.decision
    result: dict[str, Any] = {
        "run": run,
        "peers": n,
        "registered": len(t.register),
        "register_total_s": round(sum(t.register), 4),
        "register_cpu_s": round(t.register_cpu, 4),
        "register_mean_ms": round(statistics.fmean(t.register) * ms, 4) if t.register else None,
        "register_p99_ms": round(percentile(t.register, 99) * ms, 4) if t.register else None,
        "register_wall_s": round(register_s, 3),
        "decisions": len(decisions),
        "decision_p50_ms": round(percentile(decisions, 50) * ms, 4) if decisions else None,
        "decision_p99_ms": round(percentile(decisions, 99) * ms, 4) if decisions else None,
        "decision_mean_ms": round(statistics.fmean(decisions) * ms, 4) if decisions else None,
        "decision_max_ms": round(max(decisions) * ms, 4) if decisions else None,
        "decisions_per_cpu_s": round(len(decisions) / t.decision_cpu, 1)
        if decisions and t.decision_cpu > 0
        else None,
        "report_mean_ms": round(statistics.fmean(t.report) * ms, 4) if t.report else None,
        "parents_per_decision": round(t.parents_offered / len(decisions), 3) if decisions else None,
        "actions": dict(t.actions),
        "rejoins": t.rejoins,
        "errors": dict(t.errors),
        "truncated": bool(truncated),
        "truncated_phases": truncated,
        "wall_s": round(time.monotonic() - start, 3),
    }
    return result


# -- the report --------------------------------------------------------------------------

MEDIAN_KEYS = (
    "registered", "register_total_s", "register_cpu_s", "register_mean_ms", "register_p99_ms",
    "register_wall_s", "decisions", "decision_p50_ms", "decision_p99_ms", "decision_mean_ms",
    "decision_max_ms", "decisions_per_cpu_s", "report_mean_ms", "parents_per_decision",
    "wall_s",
)  # fmt: skip


def summary_of(
    args: argparse.Namespace, settings: Any, per_n: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    results = []
    for n, runs in per_n.items():
        row: dict[str, Any] = {"peers": n}
        for key in MEDIAN_KEYS:
            value = median([r[key] for r in runs if r[key] is not None])
            row[key] = round(value, 4) if value is not None else None
        errors: Counter[str] = Counter()
        for r in runs:
            errors.update(r["errors"])
        row["errors"] = dict(errors)
        row["truncated"] = any(r["truncated"] for r in runs)
        row["truncated_phases"] = sorted({p for r in runs for p in r["truncated_phases"]})
        row["per_run"] = runs
        results.append(row)
    ratio = ratio_of(results, "decision_mean_ms")
    sc = settings.scheduler
    return {
        "benchmark": "core",
        "pieces": args.pieces,
        "piece_length": PIECE_LENGTH,
        "batch": args.batch,
        "decisions_requested": args.decisions,
        "runs": args.runs,
        "seed": args.seed,
        "max_seconds": args.max_seconds,
        "env": args.env,
        "scheduler": {
            "candidate_parents": sc.candidate_parents,
            "acyclic": sc.acyclic,
            "evaluator": sc.evaluator,
        },
        "python": sys.version.split()[0],
        "results": results,
        "ratio_mean_largest_smallest": ratio,
        "ratio_p50_largest_smallest": ratio_of(results, "decision_p50_ms"),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio is not None and ratio <= TARGET_RATIO,
        "ok": not any(r["errors"] for r in results),
    }


def ratio_of(results: list[dict[str, Any]], key: str) -> float | None:
    """``key`` at the largest N over ``key`` at the smallest (None without both)."""
    if len(results) < 2:
        return None
    small, large = results[0][key], results[-1][key]
    return round(large / small, 3) if small and large else None


def report(summary: dict[str, Any], out: Out) -> None:
    sched = summary["scheduler"]
    out.say()
    out.say(
        f"scheduler core: one task of {summary['pieces']} pieces (4 MiB), one storage seed, "
        f"{summary['decisions_requested']} decisions per N (report {summary['batch']} pieces, "
        f"then reschedule), candidate_parents={sched['candidate_parents']}, "
        f"acyclic={sched['acyclic']}, evaluator={sched['evaluator']}; median of "
        f"{summary['runs']} run(s)"
    )
    if summary["env"]:
        out.say(f"scheduler environment: {summary['env']}")
    rows = []
    for r in summary["results"]:
        rows.append([
            r["peers"], r["registered"], r["register_total_s"], r["register_mean_ms"],
            r["decisions"], r["decision_p50_ms"], r["decision_p99_ms"], r["decision_mean_ms"],
            r["decisions_per_cpu_s"], r["report_mean_ms"], "yes" if r["truncated"] else "no",
        ])  # fmt: skip
    out.say(
        table(
            ["N", "registered", "register_s", "register_ms", "decisions", "p50_ms", "p99_ms",
             "mean_ms", "decisions/cpu_s", "report_ms", "truncated"],
            [[("-" if v is None else v) for v in row] for row in rows],
        )
    )  # fmt: skip
    out.say(
        "register_s: the N registers' total; register_ms, p50/p99/mean_ms: per register, per "
        "reschedule (the decision); decisions/cpu_s: reschedules per CPU-second inside the "
        "core; report_ms: mean piece report"
    )
    for r in summary["results"]:
        if r["errors"]:
            out.say(f"N={r['peers']}: errors {r['errors']}")
        if r["truncated"]:
            out.say(
                f"N={r['peers']}: {' and '.join(r['truncated_phases'])} cut short after "
                f"--max-seconds {summary['max_seconds']:g} ({r['registered']} registered, "
                f"{r['decisions']} decisions): its figures are for the smaller swarm"
            )
    ratio = summary["ratio_mean_largest_smallest"]
    results = summary["results"]
    if ratio is None:
        out.say("ratio: needs two sizes with decisions")
    else:
        verdict = "meets" if summary["meets_target"] else "misses"
        out.say(
            f"mean decision at N={results[-1]['peers']} / at N={results[0]['peers']}: "
            f"{ratio}x: {verdict} the target (<= {TARGET_RATIO:g}x); p50: "
            f"{summary['ratio_p50_largest_smallest']}x"
            + (
                " (a size was cut short: see above)"
                if results[0]["truncated"] or results[-1]["truncated"]
                else ""
            )
        )


# -- the memory of many tasks (--tasks) --------------------------------------------------


def rss_bytes(field_name: str = "VmRSS") -> int:
    """This process's resident set (or, with ``VmHWM``, its peak) from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def mem_available() -> int | None:
    """The machine's MemAvailable, in bytes (None when /proc/meminfo does not say)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def fresh(text: str) -> str:
    """An equal string of its own, as each message's JSON decoding makes one: what the core
    keeps from a call is not shared with what it kept from another."""
    return text.encode().decode()


def task_url(index: int) -> str:
    return f"https://origin.invalid/bench/core-tasks/{index:06d}.bin"


class Tasks:
    """N tasks on one fresh core: per task a storage seed, then K peers, each on its own
    host, called as the scheduler service's handlers call it."""

    def __init__(self, n: int, args: argparse.Namespace, settings: Any, evaluator: Any) -> None:
        self.args = args
        self.clock = time.monotonic
        self.rng = random.Random(args.seed)
        self.core = make_core(args, settings, evaluator)
        # The driver's own: made before the baseline, so not counted as the core's.
        self.task_ids = [ids.task_id(task_url(i)) for i in range(n)]
        self.seeded = 0
        self.peers = 0
        self.actions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def content(self) -> TaskContent:
        pieces = self.args.pieces
        return TaskContent(pieces * PIECE_LENGTH, PIECE_LENGTH, pieces)

    def stop(self, i: int, deadline: float) -> str | None:
        """Why to stop building before task ``i`` (None: go on)."""
        if i % 256:
            return None
        if time.monotonic() >= deadline:
            return "time"
        free = mem_available()
        if free is not None and free < self.args.min_free_mib * MiB:
            return "memory"
        return None

    def seeds(self, deadline: float, out: Out) -> str | None:
        """Per task, the storage seed: register with seed=True and the task's layout (it
        gets back_to_source), then report every piece's sha256 hex, as after reading the
        origin. Returns why it stopped early, or None."""
        core, pieces = self.core, self.args.pieces
        core.heartbeat(dataclasses.replace(SEED_SPEC, id=fresh(SEED_HOST)), 0, self.clock())
        next_say = time.monotonic() + PROGRESS_EVERY
        for i, task_id in enumerate(self.task_ids):
            if why := self.stop(i, deadline):
                return why
            if time.monotonic() >= next_say:
                next_say = time.monotonic() + PROGRESS_EVERY
                out.progress(f"tasks={len(self.task_ids)}: seeded {i}")
            peer_id = ids.peer_id(SEED_HOST, task_id)
            host = dataclasses.replace(SEED_SPEC, id=fresh(SEED_HOST))
            try:
                schedule, _ = core.register(
                    task_id=fresh(task_id), peer_id=peer_id, host=host, now=self.clock(),
                    content=self.content(), seed=True,
                )  # fmt: skip
                self.actions[f"seed:{schedule.action}"] += 1
                reports = [
                    PieceReport(
                        n,
                        hashlib.sha256(f"{task_id}:{n}".encode()).hexdigest(),
                        None,
                        self.rng.randint(20, 80),
                    )
                    for n in range(pieces)
                ]
                core.report_pieces(
                    task_id=fresh(task_id), peer_id=fresh(peer_id), pieces=reports,
                    now=self.clock(), lent=[],
                )  # fmt: skip
            except SwarmflyError as exc:
                self.errors[exc.code] += 1
                continue
            self.seeded += 1
        return None

    def peers_up(self, deadline: float, out: Out) -> str | None:
        """Per seeded task, K peers on hosts of their own: heartbeat, register, then report
        ``--batch`` pieces from the parents they were given."""
        core, k, args = self.core, self.args.peers_per_task, self.args
        next_say = time.monotonic() + PROGRESS_EVERY
        for i, task_id in enumerate(self.task_ids[: self.seeded]):
            if why := self.stop(i, deadline):
                return why
            if time.monotonic() >= next_say:
                next_say = time.monotonic() + PROGRESS_EVERY
                out.progress(f"tasks={len(self.task_ids)}: peers of {i} tasks up")
            for j in range(k):
                index = i * k + j
                core.heartbeat(host_of(index), 0, self.clock())
                host = host_of(index)
                peer_id = ids.peer_id(host.id, task_id)
                try:
                    schedule, effects = core.register(
                        task_id=fresh(task_id), peer_id=peer_id, host=host, now=self.clock()
                    )
                    self.actions[f"register:{schedule.action}"] += 1
                    if effects:
                        self.errors["trigger_seed"] += len(effects)
                    parents = [p.peer_id for p in schedule.parents]
                    reports = [
                        PieceReport(
                            n,
                            None,
                            fresh(self.rng.choice(parents)) if parents else None,
                            self.rng.randint(20, 200),
                        )
                        for n in sorted(self.rng.sample(range(args.pieces), args.batch))
                    ]
                    core.report_pieces(
                        task_id=fresh(task_id), peer_id=fresh(peer_id), pieces=reports,
                        now=self.clock(), lent=[],
                    )  # fmt: skip
                except SwarmflyError as exc:
                    self.errors[exc.code] += 1
                    continue
                self.peers += 1
        return None

    def decide(self, deadline: float, out: Out) -> list[float]:
        """``--decisions`` reschedules of random peers (not seeds), each timed."""
        core = self.core
        pairs = [(p.task_id, p.id) for p in core.peers.values() if not p.seed]
        times: list[float] = []
        if not pairs:
            return times
        next_say = time.monotonic() + PROGRESS_EVERY
        for done in range(self.args.decisions):
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_say:
                next_say = now + PROGRESS_EVERY
                out.progress(f"tasks={len(self.task_ids)}: decisions {done}")
            task_id, peer_id = self.rng.choice(pairs)
            try:
                started = time.perf_counter()
                schedule, _ = core.reschedule(
                    task_id=task_id, peer_id=peer_id, now=self.clock(), blocklist=(),
                    bad_parents=[],
                )  # fmt: skip
                times.append(time.perf_counter() - started)
            except SwarmflyError as exc:
                self.errors[exc.code] += 1
                continue
            self.actions[f"decision:{schedule.action}"] += 1
        return times


def build(tasks: Tasks, measure: Any, out: Out) -> tuple[dict[str, Any], list[str], list[int]]:
    """Seeds, then peers, each phase within --max-seconds; ``measure()`` (bytes) is read
    after a ``gc.collect()`` before, between and after. Returns timings, the phases cut short
    and the three readings."""
    budget = tasks.args.max_seconds
    gc.collect()
    readings = [measure()]
    truncated: list[str] = []
    started = time.perf_counter()
    if why := tasks.seeds(time.monotonic() + budget, out):
        truncated.append(f"seeds ({why})")
    seeds_s = time.perf_counter() - started
    gc.collect()
    readings.append(measure())
    started = time.perf_counter()
    if why := tasks.peers_up(time.monotonic() + budget, out):
        truncated.append(f"peers ({why})")
    peers_s = time.perf_counter() - started
    gc.collect()
    readings.append(measure())
    built = {
        "tasks_built": tasks.seeded,
        "peers_built": tasks.peers,
        "seeds_s": round(seeds_s, 3),
        "peers_s": round(peers_s, 3),
        "build_s": round(seeds_s + peers_s, 3),
    }
    return built, truncated, readings


def where(filename: str, lineno: int) -> str:
    """A traceback frame, short: relative to the repository when inside it."""
    if filename == "<string>":
        return f"<dataclass __init__>:{lineno}"  # code that dataclasses generated
    path = Path(filename)
    try:
        name = str(path.relative_to(ROOT))
    except ValueError:
        name = path.name if "site-packages" not in filename else f".../{path.name}"
    return f"{name}:{lineno}"


SNAPSHOT_FACTOR = 4.0
"""What taking a snapshot adds to the resident set (its Python copy of the traces), over
``tracemalloc.get_tracemalloc_memory()``: 3.5 measured at 10,000 tasks."""


def traced_build(
    tasks: Tasks, args: argparse.Namespace, out: Out
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The build under tracemalloc (one frame), between two snapshots; the second is taken
    only when the machine has room for it, else the totals are tracemalloc's counters."""
    n = len(tasks.task_ids)
    tracemalloc.start(1)
    gc.collect()
    before = tracemalloc.take_snapshot()
    tracemalloc.reset_peak()
    built, truncated, readings = build(tasks, lambda: tracemalloc.get_traced_memory()[0], out)
    traced: dict[str, Any] = {
        "traced_seeds_bytes": readings[1] - readings[0],
        "traced_peers_bytes": readings[2] - readings[1],
        "traced_current_bytes": readings[2] - readings[0],
        "traced_peak_bytes": tracemalloc.get_traced_memory()[1] - readings[0],
        "tracemalloc_own_bytes": tracemalloc.get_tracemalloc_memory(),
        "top_lines": [],
        "top_files": {},
    }
    need = SNAPSHOT_FACTOR * traced["tracemalloc_own_bytes"]
    free = mem_available()
    if free is not None and free - need < args.min_free_mib * MiB:
        out.progress(
            f"tasks={n}: no snapshot: it needs about {need / MiB:.0f} MiB, and "
            f"{free / MiB:.0f} MiB are available (--min-free-mib {args.min_free_mib})"
        )
        tracemalloc.stop()
        traced["snapshot"] = "skipped (memory)"
        traced["traced_total_bytes"] = traced["traced_current_bytes"]
        return built, truncated, traced
    out.progress(f"tasks={n}: snapshot, about {need / MiB:.0f} MiB")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    traced["snapshot"] = "taken"
    diff = after.compare_to(before, "lineno")
    del after, before
    traced["rss_peak"] = rss_bytes("VmHWM")
    traced["traced_total_bytes"] = sum(stat.size_diff for stat in diff)
    files: Counter[str] = Counter()
    for stat in diff:
        files[where(stat.traceback[0].filename, 0).rsplit(":", 1)[0]] += stat.size_diff
    traced["top_files"] = dict(files.most_common(args.top))
    for stat in diff[: args.top]:
        frame = stat.traceback[0]
        traced["top_lines"].append({
            "where": where(frame.filename, frame.lineno),
            "code": linecache.getline(frame.filename, frame.lineno).strip(),
            "bytes": stat.size_diff,
            "blocks": stat.count_diff,
        })  # fmt: skip
    return built, truncated, traced


def core_source() -> str:
    """The sha256 (12 hex digits) of the core's source as this process loaded it, which is
    also put in linecache now, so that the top quotes the lines that ran even if the file
    changes meanwhile."""
    path = sys.modules[Scheduler.__module__].__file__ or ""
    for module in (Scheduler.__module__, __name__):
        linecache.getlines(sys.modules[module].__file__ or "")
    return hashlib.sha256("".join(linecache.getlines(path)).encode()).hexdigest()[:12]


def child(args: argparse.Namespace, out: Out) -> int:
    """One N in this fresh process (--child, from ``run_tasks``): plain, the resident set,
    the build time and the decisions; traced, tracemalloc's view. One JSON object out."""
    settings, evaluator = core_parts(args, out)
    n = args.tasks[0]
    tasks = Tasks(n, args, settings, evaluator)
    result: dict[str, Any] = {"mode": args.child, "tasks": n, "core_source": core_source()}
    if args.child == "plain":
        built, truncated, rss = build(tasks, rss_bytes, out)
        result.update(built)
        result.update({
            "rss_before": rss[0], "rss_seeds_bytes": rss[1] - rss[0],
            "rss_peers_bytes": rss[2] - rss[1], "rss_total_bytes": rss[2] - rss[0],
            "rss_peak": rss_bytes("VmHWM"),
        })  # fmt: skip
        times = tasks.decide(time.monotonic() + args.max_seconds, out)
        if len(times) < args.decisions:
            truncated.append("decisions")
        ms = 1000.0
        result.update({
            "decisions": len(times),
            "decision_p50_ms": round(percentile(times, 50) * ms, 4) if times else None,
            "decision_p99_ms": round(percentile(times, 99) * ms, 4) if times else None,
            "decision_mean_ms": round(statistics.fmean(times) * ms, 4) if times else None,
            "decision_max_ms": round(max(times) * ms, 4) if times else None,
        })  # fmt: skip
    else:
        built, truncated, traced = traced_build(tasks, args, out)
        result.update(built)
        result.update(traced)
    result["truncated_phases"] = truncated
    result["actions"] = dict(tasks.actions)
    result["errors"] = dict(tasks.errors)
    out.result(result)
    return 0


def one_tasks_n(n: int, run: int, args: argparse.Namespace, out: Out) -> dict[str, Any]:
    """One N of one run: the plain child, then the traced one, each a fresh interpreter (an
    allocator that already grew for an earlier N would hide part of this one's growth)."""
    row: dict[str, Any] = {"run": run, "tasks": n, "errors": {}, "truncated_phases": []}
    for mode in ("plain", "traced") if run <= args.traced_runs else ("plain",):
        command = [
            sys.executable, str(Path(__file__).resolve()), "--child", mode, "--tasks", str(n),
            "--peers-per-task", str(args.peers_per_task), "--pieces", str(args.pieces),
            "--batch", str(args.batch), "--decisions", str(args.decisions),
            "--max-seconds", str(args.max_seconds), "--min-free-mib", str(args.min_free_mib),
            "--top", str(args.top), "--seed", str(args.seed),
            *(f"--env={key}={value}" for key, value in args.env.items()),
        ]  # fmt: skip
        # Three phases of --max-seconds, then the snapshots' comparison (minutes at 100,000).
        limit = 3 * args.max_seconds + 900
        started = time.monotonic()
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            row["errors"][f"{mode}_timeout"] = 1
            continue
        try:
            part = json.loads(done.stdout) if done.returncode == 0 else None
        except ValueError:
            part = None
        if part is None:
            row["errors"][f"{mode}_exit_{done.returncode}"] = 1
            continue
        row[f"{mode}_wall_s"] = round(time.monotonic() - started, 3)
        for key, value in part["errors"].items():
            row["errors"][f"{mode}:{key}"] = value
        row["truncated_phases"] += [f"{mode}: {p}" for p in part["truncated_phases"]]
        row[f"{mode}_actions"] = part["actions"]
        row.setdefault("core_source", []).append(part["core_source"])
        if mode == "plain":
            tasks_built, peers_built = part["tasks_built"], part["peers_built"]
            row.update({
                key: part[key] for key in (
                    "tasks_built", "peers_built", "seeds_s", "peers_s", "build_s",
                    "decisions", "decision_p50_ms", "decision_p99_ms", "decision_mean_ms",
                    "decision_max_ms",
                )
            })  # fmt: skip
            row["build_ms_per_task"] = round(part["build_s"] * 1000 / tasks_built, 4)
            row["rss_mib"] = round(part["rss_total_bytes"] / MiB, 2)
            row["rss_peak_mib"] = round(part["rss_peak"] / MiB, 2)
            row["rss_bytes_per_task"] = round(part["rss_total_bytes"] / tasks_built)
            row["rss_seed_bytes_per_task"] = round(part["rss_seeds_bytes"] / tasks_built)
            row["rss_bytes_per_peer"] = (
                round(part["rss_peers_bytes"] / peers_built) if peers_built else None
            )
        else:
            tasks_built, peers_built = part["tasks_built"], part["peers_built"]
            row["traced_tasks_built"] = tasks_built
            row["traced_build_s"] = part["build_s"]
            row["traced_mib"] = round(part["traced_total_bytes"] / MiB, 2)
            row["traced_peak_mib"] = round(part["traced_peak_bytes"] / MiB, 2)
            row["tracemalloc_own_mib"] = round(part["tracemalloc_own_bytes"] / MiB, 2)
            if "rss_peak" in part:
                row["traced_rss_peak_mib"] = round(part["rss_peak"] / MiB, 2)
            row["bytes_per_task"] = round(part["traced_total_bytes"] / tasks_built)
            row["seed_bytes_per_task"] = round(part["traced_seeds_bytes"] / tasks_built)
            row["bytes_per_peer"] = (
                round(part["traced_peers_bytes"] / peers_built) if peers_built else None
            )
            row["snapshot"] = part["snapshot"]
            row["top_lines"] = part["top_lines"]
            row["top_files"] = part["top_files"]
    row["truncated"] = bool(row["truncated_phases"])
    return row


TASK_MEDIAN_KEYS = (
    "tasks_built", "peers_built", "traced_mib", "bytes_per_task", "seed_bytes_per_task",
    "bytes_per_peer", "traced_peak_mib", "tracemalloc_own_mib", "traced_rss_peak_mib",
    "rss_mib", "rss_peak_mib", "rss_bytes_per_task", "rss_seed_bytes_per_task",
    "rss_bytes_per_peer", "seeds_s", "peers_s", "build_s", "build_ms_per_task",
    "traced_build_s", "decisions", "decision_p50_ms", "decision_p99_ms", "decision_mean_ms",
    "decision_max_ms",
)  # fmt: skip


def tasks_summary(
    args: argparse.Namespace, settings: Any, per_n: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    results = []
    for n, runs in per_n.items():
        row: dict[str, Any] = {"tasks": n, "peers": n * args.peers_per_task}
        for key in TASK_MEDIAN_KEYS:
            value = median([r[key] for r in runs if r.get(key) is not None])
            row[key] = round(value, 4) if value is not None else None
        errors: Counter[str] = Counter()
        for r in runs:
            errors.update(r["errors"])
        row["errors"] = dict(errors)
        row["truncated"] = any(r["truncated"] for r in runs)
        row["truncated_phases"] = sorted({p for r in runs for p in r["truncated_phases"]})
        row["core_source"] = sorted({c for r in runs for c in r.get("core_source", [])})
        # tracemalloc's count hardly moves from run to run (the same seed, the same state):
        # the first run's top stands for all.
        traced = [r for r in runs if "top_lines" in r]
        row["snapshot"] = traced[0]["snapshot"] if traced else None
        row["top_lines"] = traced[0]["top_lines"] if traced else []
        row["top_files"] = traced[0]["top_files"] if traced else {}
        row["per_run"] = [
            {k: v for k, v in r.items() if k not in ("top_lines", "top_files")} for r in runs
        ]
        results.append(row)
    sc = settings.scheduler
    return {
        "benchmark": "core-tasks",
        "pieces": args.pieces,
        "piece_length": PIECE_LENGTH,
        "peers_per_task": args.peers_per_task,
        "peer_pieces": args.batch,
        "decisions_requested": args.decisions,
        "runs": args.runs,
        "seed": args.seed,
        "max_seconds": args.max_seconds,
        "min_free_mib": args.min_free_mib,
        "traced_runs": min(args.traced_runs, args.runs),
        "env": args.env,
        "scheduler": {
            "candidate_parents": sc.candidate_parents,
            "acyclic": sc.acyclic,
            "evaluator": sc.evaluator,
        },
        "python": sys.version.split()[0],
        "results": results,
        "ok": not any(r["errors"] for r in results),
    }


def tasks_report(summary: dict[str, Any], out: Out) -> None:
    sched = summary["scheduler"]
    out.say()
    out.say(
        f"scheduler core, memory: N tasks of {summary['pieces']} pieces (4 MiB), each with a "
        f"storage seed (every digest reported) and {summary['peers_per_task']} peers on hosts "
        f"of their own ({summary['peer_pieces']} pieces each); "
        f"candidate_parents={sched['candidate_parents']}, evaluator={sched['evaluator']}; "
        f"median of {summary['runs']} run(s)"
    )
    if summary["env"]:
        out.say(f"scheduler environment: {summary['env']}")
    rows = []
    for r in summary["results"]:
        rows.append([
            r["tasks"], r["tasks_built"], r["traced_mib"], r["bytes_per_task"],
            r["seed_bytes_per_task"], r["bytes_per_peer"], r["rss_mib"], r["rss_bytes_per_task"],
            r["build_s"], r["build_ms_per_task"], r["decisions"], r["decision_p50_ms"],
            r["decision_p99_ms"], r["decision_mean_ms"], "yes" if r["truncated"] else "no",
        ])  # fmt: skip
    out.say(
        table(
            ["tasks", "built", "traced_MiB", "B/task", "seed_B/task", "B/peer", "rss_MiB",
             "rss_B/task", "build_s", "build_ms/task", "decisions", "p50_ms", "p99_ms",
             "mean_ms", "truncated"],
            [[("-" if v is None else v) for v in row] for row in rows],
        )
    )  # fmt: skip
    out.say(
        "traced_MiB: tracemalloc's snapshot difference around the build; B/task: that over "
        "the tasks; seed_B/task: a task with its seed and digests alone; B/peer: each further "
        "peer with its host; rss_*: the same from VmRSS, in a run without tracemalloc; "
        "build_s: seeds and peers registered; p50/p99/mean_ms: one reschedule of a random peer"
    )
    for r in summary["results"]:
        if r["errors"]:
            out.say(f"tasks={r['tasks']}: errors {r['errors']}")
        if r["truncated"]:
            out.say(
                f"tasks={r['tasks']}: cut short: {', '.join(r['truncated_phases'])} "
                f"(--max-seconds {summary['max_seconds']:g}, --min-free-mib "
                f"{summary['min_free_mib']}): per-task figures are over the tasks built"
            )
    for r in summary["results"]:
        if r["snapshot"] and r["snapshot"] != "taken":
            out.say(
                f"tasks={r['tasks']}: snapshot {r['snapshot']}: traced_MiB is tracemalloc's "
                "counter, and there is no top"
            )
    sources = sorted({c for r in summary["results"] for c in r["core_source"]})
    if len(sources) > 1:
        out.say(f"services/scheduler/core.py changed during the runs: sha256 {sources}")
    largest = summary["results"][-1]
    if largest["top_lines"]:
        out.say(f"tracemalloc's top lines at {largest['tasks']} tasks (first run):")
        out.say(
            table(
                ["MiB", "blocks", "where", "code"],
                [
                    [round(t["bytes"] / MiB, 1), t["blocks"], t["where"], t["code"][:60]]
                    for t in largest["top_lines"]
                ],
            )
        )


def run_tasks(args: argparse.Namespace, settings: Any, out: Out) -> int:
    per_n: dict[int, list[dict[str, Any]]] = {n: [] for n in args.tasks}
    try:
        for run in range(1, args.runs + 1):
            for n in args.tasks:
                out.progress(f"run {run}: tasks={n}")
                row = one_tasks_n(n, run, args, out)
                per_n[n].append(row)
                out.progress(
                    f"run {run}: tasks={n}: traced {row.get('traced_mib')} MiB "
                    f"({row.get('bytes_per_task')} B/task, {row.get('bytes_per_peer')} B/peer), "
                    f"rss {row.get('rss_mib')} MiB, build {row.get('build_s')}s, decision p50 "
                    f"{row.get('decision_p50_ms')} ms"
                    + (" TRUNCATED" if row["truncated"] else "")
                    + (f" errors {row['errors']}" if row["errors"] else "")
                )
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    summary = tasks_summary(args, settings, per_n)
    tasks_report(summary, out)
    out.result(summary)
    return 0 if summary["ok"] else 1


def core_parts(args: argparse.Namespace, out: Out) -> tuple[Any, Any]:
    """The settings as a scheduler would read them from SWARMFLY_* (only --env's, and no
    config file: the state dir is an empty temp dir), and the evaluator they name."""
    with workspace("core", False, out) as root:
        env = {"SWARMFLY_STATE_DIR": str(root), **args.env}
        settings = swarmfly_config.load(env=env)
        plugins = Plugins.load(settings.disable_plugins)
        evaluator = plugins.evaluator(settings.scheduler.evaluator)
    return settings, evaluator


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args, Out(True))
    out = Out(args.json)
    settings, evaluator = core_parts(args, out)
    if args.tasks:
        return run_tasks(args, settings, out)
    per_n: dict[int, list[dict[str, Any]]] = {n: [] for n in args.peers}
    try:
        for run in range(1, args.runs + 1):
            for n in args.peers:
                out.progress(f"run {run}: N={n}")
                result = one_n(n, run, args, settings, evaluator, out)
                per_n[n].append(result)
                out.progress(
                    f"run {run}: N={n}: register {result['register_total_s']}s "
                    f"({result['register_mean_ms']} ms each), decision p50 "
                    f"{result['decision_p50_ms']} ms p99 {result['decision_p99_ms']} ms mean "
                    f"{result['decision_mean_ms']} ms, {result['wall_s']}s"
                    + (" TRUNCATED" if result["truncated"] else "")
                )
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    summary = summary_of(args, settings, per_n)
    report(summary, out)
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
