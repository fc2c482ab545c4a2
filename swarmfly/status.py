"""`swarmfly status`: the cluster as an operator wants it at a glance."""

from __future__ import annotations

from typing import Any

from swarmfly.cluster import connect
from swarmfly.config import Config
from swarmfly.contracts import messages
from swarmfly.services.scheduler.views import merge


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _summary(peers: list[dict[str, Any]]) -> dict[str, int]:
    """What a scheduler that lists every peer (and sends no summary) says, summed here."""
    normal = [p for p in peers if not p["source"]]
    return {
        "peers": len(peers),
        "sources": len(peers) - len(normal),
        "succeeded": sum(p["state"] == "succeeded" for p in normal),
        "failed": sum(p["state"] == "failed" for p in normal),
        "pieces_held": sum(p["pieces"] for p in normal),
        "origin_bytes": sum(p.get("origin_bytes", 0) for p in peers),
        "p2p_bytes": sum(p.get("p2p_bytes", 0) for p in peers),
    }


SCHEDULER_WAIT = 2.0
"""Seconds the schedulers have to answer ``scheduler.state``."""


async def gather(config: Config, *, within: float | None = None) -> dict[str, Any]:
    """Services, hosts and tasks; ``error`` says why there are no hosts or tasks when no
    scheduler answers. ``within``: the connect deadline (``cluster.connect``)."""
    bus = await connect(config, "swarmfly-status", within=within)
    try:
        services = await bus.discover()
        schedulers = sum(s.get("name") == "scheduler" for s in services)
        replies = await bus.gather(
            messages.STATE,
            messages.StateRequest(limit=50),
            wait=SCHEDULER_WAIT,
            expect=schedulers or None,
        )
        states = [reply.to_dict() for reply in replies]
    finally:
        await bus.close()
    if states:
        state = merge(states, 50)
    else:
        where = f"the subject prefix {bus.prefix!r}"
        error = (
            f"no scheduler answered in {SCHEDULER_WAIT:g}s ({schedulers} found under {where})"
            if schedulers
            else f"no scheduler runs under {where}"
        )
        state = {"hosts": [], "tasks": [], "error": error}
    return {
        "services": [
            {
                "name": s.get("name"),
                "id": s.get("id"),
                "version": s.get("version"),
                "metadata": s.get("metadata") or {},
            }
            for s in services
        ],
        **state,
    }


def ranges(numbers: list[int]) -> str:
    """0,1,2,3,7 as 0-3,7."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "-"


def _schedulers(status: dict[str, Any]) -> str:
    """Who holds which partitions, and which no scheduler that answered holds."""
    schedulers = sorted(status.get("schedulers", []), key=lambda s: s["id"])
    rows = [
        [s["id"], s["run"], ranges(s["partitions"]), ",".join(s["members"])] for s in schedulers
    ]
    # The newest generation's count; schedulers still in an older one hold nothing of it.
    layouts = sorted({(s.get("generation") or 0, s["partition_count"]) for s in schedulers})
    generation, count = layouts[-1] if layouts else (0, 0)
    current = [s for s in schedulers if (s.get("generation") or 0) == generation]
    unheld = set(range(count)) - {p for s in current for p in s["partitions"]}
    title = "SCHEDULERS"
    if count:
        changing = "; changing from " + ", ".join(f"{c} (generation {g})" for g, c in layouts[:-1])
        title += (  # generation 0: the count was never changed, nothing worth saying
            f" ({count} partitions{f', generation {generation}' if generation else ''}"
            f"{changing if len(layouts) > 1 else ''}"
            f"{f'; held by none: {ranges(list(unheld))}' if unheld else ''})"
        )
    return _table(title, ["SCHEDULER", "RUN", "PARTITIONS", "MEMBERS"], rows)


def render(status: dict[str, Any]) -> str:
    """The tables `swarmfly status` prints."""
    services = [
        [s["name"] or "", s["id"] or "", s["version"] or "", s["metadata"].get("host_id", "")]
        for s in sorted(status["services"], key=lambda s: (s["name"] or "", s["id"] or ""))
    ]
    hosts = [
        [
            h["id"],
            h["type"],
            h["address"],
            f"{h['uploads']}/{h['upload_slots']}",
            f"{h['seen_s']:.1f}s",
        ]
        for h in status["hosts"]
    ]
    tasks = []
    for task in status["tasks"]:
        content = task["task"] or {}
        count = content.get("piece_count", 0)
        summary = task.get("summary") or _summary(task["peers"])
        normal = summary["peers"] - summary["sources"]
        held = summary["pieces_held"]
        progress = f"{100 * held / (count * normal):.0f}%" if count and normal else "-"
        tasks.append(
            [
                task["id"][:12],
                _size(content.get("content_length", 0)),
                str(count),
                f"{summary['succeeded']}/{normal}",
                str(summary["sources"]),
                task.get("home") or "-",
                ",".join(task.get("replicas") or []) or "-",
                progress,
                _size(summary["origin_bytes"]),
                _size(summary["p2p_bytes"]),
                task.get("url") or "-",
            ]
        )
    known = status.get("host_count", len(hosts))
    title = (
        "HOSTS" if known <= len(hosts) else f"HOSTS ({len(hosts)} most recently seen of {known})"
    )
    return "\n\n".join(
        [
            _table("SERVICES", ["NAME", "ID", "VERSION", "HOST"], services),
            _schedulers(status),
            _table(title, ["HOST", "TYPE", "ADDRESS", "UPLOADS", "SEEN"], hosts),
            _table(
                "TASKS",
                [
                    "TASK",
                    "SIZE",
                    "PIECES",
                    "DONE",
                    "SEEDS",
                    "HOME",
                    "REPLICAS",
                    "PROGRESS",
                    "ORIGIN",
                    "P2P",
                    "URL",
                ],
                tasks,
            ),
        ]
    )
