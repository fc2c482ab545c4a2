"""The cluster's state as one view, from the ``scheduler.state`` replies of its schedulers:
for the scheduler's own API and dashboard and for `swarmfly status`."""

from __future__ import annotations

from typing import Any


def merge(states: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """One view of several schedulers: each knows every host (heartbeats reach them all)
    and the tasks of the partitions it holds."""
    hosts: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for state in states:
        for host in state["hosts"]:
            known = hosts.get(host["id"])
            if known is None or host["seen_s"] < known["seen_s"]:
                hosts[host["id"]] = host
        for task in state["tasks"]:
            tasks.setdefault(task["id"], task)
    merged: dict[str, Any] = {
        "hosts": list(hosts.values()),
        "tasks": list(tasks.values())[:limit],
        # Every scheduler hears every host; each holds the tasks of its own partitions.
        "host_count": max((s.get("host_count", len(s["hosts"])) for s in states), default=0),
        "task_count": sum(s.get("task_count", len(s["tasks"])) for s in states),
        "schedulers": [s["scheduler"] for s in states if s.get("scheduler")],
    }
    if any(s.get("truncated") for s in states) or len(tasks) > limit:
        merged["truncated"] = True
    return merged
