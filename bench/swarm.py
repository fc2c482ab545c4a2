"""Swarm benchmark: N peers fetch one file at once; completion time against the lower bound.

An embedded cluster (nats-server, `swarmfly scheduler`, `swarmfly storage` with its upload
capped) plus N `swarmfly peer` processes, each with its upload capped; a rate-capped origin
in its own process. All N `swarmfly get` start together; each one's completion time is taken
from that common start. The comparison is with the Kurose-Ross bound for distributing F bytes
to N peers:

    bound_s = max(F / u_s, F / d, N * F / (u_s + u_seed + N * u))

ratio = max_s / bound_s (1.0 is perfect); origin_ratio = origin bytes / F (1.0: the origin was
read exactly once). --mode digest passes every get `--digest sha256:<hex>`, no-digest does not,
and both (the default) does each run in both modes, each on a fresh cluster: a capped seed lends
pieces to its children only when the whole file's digest is known. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    Cluster,
    MiB,
    OriginProcess,
    Out,
    Reaper,
    add_env_flag,
    add_swarm_flags,
    children_cpu,
    cleanup,
    env_pairs,
    human,
    lower_bound,
    machine_cpu,
    median,
    percentile,
    profiled,
    seed_bound,
    sha256_file,
    size_arg,
    start_cluster,
    stop_cluster,
    table,
    workspace,
    write_random_file,
)

from swarmfly.ids import default_host_id
from swarmfly.natsserver import NatsServer

LOG_PATTERNS = {
    "dropped_slow": r"dropped parent .*: slow$",
    "dropped_failed": r"dropped parent .*: failed$",
    "dropped_corrupt": r"dropped parent .*: corrupt$",
    "warnings": r" WARNING ",
    "errors": r" ERROR ",
    "upload_resets": r"Cannot write to closing transport",
}
MODES = ("digest", "no-digest")  # --mode both runs them in this order, then alternates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_swarm_flags(parser)
    parser.add_argument("--runs", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument(
        "--mode",
        choices=[*MODES, "both"],
        default="both",
        help="digest: every get has --digest sha256:<hex> (the seed may lend pieces); "
        "no-digest: it has none; both (default): each run in both modes, each on a fresh cluster",
    )
    parser.add_argument("--piece-length", type=size_arg, help="piece length (default: from F)")
    parser.add_argument(
        "--timeout",
        type=float,
        help="abort a run after this many s (default: 10x bound, at least 120, at most 300)",
    )
    add_env_flag(
        parser, "extra environment for every service and get, e.g. SWARMFLY_PEER_PER_PARENT=1"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (and logs)")
    parser.add_argument("--detail", action="store_true", help="print a per-peer table per run")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="py-spy the storage and two peers during each run's gets; stacks in DIR",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.peers < 1 or args.runs < 1 or args.file_size < 1:
        parser.error("--peers, --runs and --file-size must be positive")
    args.env = env_pairs(parser, args.env)
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    return args


class Timeline(threading.Thread):
    """Polls the scheduler's /api/state: [seconds, seed pieces, pieces held by peers, peers
    done, machine CPU busy fraction since the previous point]."""

    def __init__(self, cluster: Cluster, t0: float, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.cluster, self.t0, self.interval = cluster, t0, interval
        self.points: list[list[float]] = []
        self.stop = threading.Event()
        self.cpu = machine_cpu()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                state = self.cluster.state()
            except (OSError, ValueError):
                continue
            seed = held = succeeded = 0
            for task in state.get("tasks", []):
                for peer in task["peers"]:
                    if peer["host_id"].startswith("seed-"):
                        seed = max(seed, peer["pieces"])
                    else:
                        held += peer["pieces"]
                        succeeded += peer["state"] == "succeeded"
            busy, total = machine_cpu()
            cpu = (busy - self.cpu[0]) / max(1, total - self.cpu[1])
            self.cpu = (busy, total)
            elapsed = round(time.monotonic() - self.t0, 2)
            self.points.append([elapsed, seed, held, succeeded, round(cpu, 2)])


def one_get(
    cluster: Cluster, index: int, url: str, output: Path, extra: list[str], t0: float,
    timeout: float, reaper: Reaper, env: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    command = cluster.get_command(url, output, index, "--timeout", str(timeout), *extra)
    proc = reaper.add(
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
            start_new_session=True,
        )
    )
    row: dict[str, Any] = {"peer": index}
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, t0 + timeout + 5 - time.monotonic()))
    except subprocess.TimeoutExpired:
        reaper.stop(proc)
        row.update(ok=False, error="timeout", done_s=None)
        return row
    row["done_s"] = round(time.monotonic() - t0, 3)
    row["exit"] = proc.returncode
    if proc.returncode != 0:
        row.update(ok=False, error=stderr.strip()[-500:])
        return row
    try:
        summary = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        row.update(ok=False, error=f"no JSON summary: {stdout[-200:]!r}")
        return row
    row.update(
        ok=True,
        get_seconds=summary["seconds"],
        bytes_origin=summary["bytes_origin"],
        bytes_p2p=summary["bytes_p2p"],
        via=summary["via"],
    )
    return row


def one_run(
    run: int, mode: str, args: argparse.Namespace, root: Path, nats: NatsServer,
    origin: OriginProcess, digest: str, bound: float, reaper: Reaper, out: Out,
) -> dict[str, Any]:  # fmt: skip
    """One run in one mode (digest: every get is told the file's sha256) on a fresh cluster."""
    n, f = args.peers, args.file_size
    prefix = f"bench{uuid.uuid4().hex[:10]}"
    run_dir = root / f"run{run}-{mode}"
    name = f"run {run} ({mode})"
    out.progress(f"{name}: starting scheduler, storage and {n} peers (prefix {prefix})")
    cluster = start_cluster(
        reaper,
        nats,
        run_dir,
        prefix,
        peers=n,
        seed_rate=args.seed_upload_rate,
        peer_rate=args.peer_upload_rate,
        download_rate=args.download_rate,
        env=args.env,
    )
    try:
        time.sleep(1.0)  # let start-up CPU (imports, first heartbeats) settle before timing
        url = f"{origin.file_url}?run={run}&mode={mode}&nonce={uuid.uuid4().hex[:8]}"
        extra = ["--piece-length", str(args.piece_length)] if args.piece_length else []
        if mode == "digest":
            extra += ["--digest", f"sha256:{digest}"]
        outputs = [run_dir / "out" / f"peer{i:02d}.bin" for i in range(n)]
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        timeout = args.timeout or min(300.0, max(120.0, 10 * bound))
        before = origin.stats()
        cpu0, busy0, child0 = cluster.cpu(), machine_cpu(), children_cpu()
        spied = {"storage": cluster.storage, "peer0": cluster.peers[0], "peer1": cluster.peers[-1]}
        with profiled(args.profile, {k: v.process.pid for k, v in spied.items()}):
            out.progress(f"{name}: {n} downloads of {human(f)} start now (timeout {timeout:.0f}s)")
            t0 = time.monotonic()
            timeline = Timeline(cluster, t0)
            timeline.start()
            pool = ThreadPoolExecutor(max_workers=n)
            try:
                futures = [
                    pool.submit(
                        one_get, cluster, i, url, outputs[i], extra, t0, timeout, reaper, args.env
                    )
                    for i in range(n)
                ]
                peers = [future.result() for future in futures]
            except BaseException:
                reaper.stop_all()  # ends the gets, so their threads return at once
                raise
            finally:
                pool.shutdown(wait=True)
            wall = time.monotonic() - t0
        timeline.stop.set()
        cpu1, busy1, child1 = cluster.cpu(), machine_cpu(), children_cpu()
        after = origin.stats()
        timeline.join(2)
        for row, path in zip(peers, outputs, strict=True):
            if row["ok"]:
                actual = sha256_file(path)
                if actual != digest:
                    row.update(ok=False, error=f"sha256 mismatch: {actual}")
        seed_metrics = cluster.metrics(cluster.storage)
        refused = by_reason(seed_metrics, "swarmfly_peer_upload_refused")
        for row, service in zip(peers, cluster.peers, strict=True):
            values = cluster.metrics(service)
            row["uploaded"] = int(service_upload(values))
            row["piece_failures"] = by_reason(values, "swarmfly_peer_piece_failures")
            for reason, count in by_reason(values, "swarmfly_peer_upload_refused").items():
                refused[reason] = refused.get(reason, 0) + count
        state = safe_state(cluster)
        order = [p["host_id"] for p in state if not p["host_id"].startswith("seed-")]
        for row, folder in zip(peers, cluster.peer_dirs, strict=True):
            row["host_id"] = default_host_id(str(folder))
            row["registered"] = order.index(row["host_id"]) if row["host_id"] in order else None
        logs = cluster.log_counts(LOG_PATTERNS)
        seeded = seed_seconds(cluster.storage.log())
    finally:
        stop_cluster(reaper, cluster)
    ok = [row for row in peers if row["ok"]]
    times = [row["done_s"] for row in ok]
    origin_bytes = after["bytes_served"] - before["bytes_served"]
    cpu_total = busy1[1] - busy0[1]
    result: dict[str, Any] = {
        "run": run,
        "mode": mode,
        "ok": len(ok) == n,
        "failed": [{"peer": r["peer"], "error": r.get("error")} for r in peers if not r["ok"]],
        "p50_s": round(percentile(times, 50), 3) if times else None,
        "max_s": round(max(times), 3) if len(ok) == n else None,
        "min_s": round(min(times), 3) if times else None,
        "wall_s": round(wall, 3),
        "ratio": round(max(times) / bound, 3) if len(ok) == n else None,
        "timeout_s": timeout,
        "origin_bytes": origin_bytes,
        "origin_ratio": round(origin_bytes / f, 4),
        "origin_requests": after["requests"] - before["requests"],
        "seed_seconds": seeded,
        "seed_upload_bytes": int(service_upload(seed_metrics)),
        "piece_failures": {
            reason: sum(r.get("piece_failures", {}).get(reason, 0) for r in peers)
            for reason in ("slow", "failed", "corrupt")
        },
        "upload_refused": refused,
        "peer_upload_bytes": sum(r.get("uploaded", 0) for r in peers),
        "bytes_origin_by_peers": sum(r.get("bytes_origin", 0) for r in ok),
        "bytes_p2p": sum(r.get("bytes_p2p", 0) for r in ok),
        "get_startup_s": median([r["done_s"] - r["get_seconds"] for r in ok]),
        "cpu_busy": round((busy1[0] - busy0[0]) / cpu_total, 3) if cpu_total else None,
        "cpu_seconds": {
            "scheduler": round(cpu1["scheduler"] - cpu0["scheduler"], 2),
            "storage": round(cpu1["storage"] - cpu0["storage"], 2),
            "peers": round(cpu1["peers"] - cpu0["peers"], 2),
            "gets": round(child1 - child0, 2),
        },
        "logs": logs,
        "scheduler_peers": state,
        "timeline": timeline.points,
        "peers": peers,
    }
    return result


def service_upload(values: dict[str, float]) -> float:
    return values.get("swarmfly_peer_upload_bytes", 0.0)


def by_reason(values: dict[str, float], metric: str) -> dict[str, int]:
    prefix = metric + '{reason="'
    return {k[len(prefix) : -2]: int(v) for k, v in values.items() if k.startswith(prefix)}


def safe_state(cluster: Cluster) -> list[dict[str, Any]]:
    try:
        state = cluster.state()
    except (OSError, ValueError):
        return []
    return [
        {"host_id": p["host_id"], "state": p["state"], "pieces": p["pieces"], "source": p["source"]}
        for task in state.get("tasks", [])
        for p in task["peers"]
    ]


def seed_seconds(log: str) -> float | None:
    """The storage's own account of its origin read: 'seeded task … in X.XXs'."""
    for line in reversed(log.splitlines()):
        if "seeded task" in line:
            with contextlib.suppress(ValueError, IndexError):
                return float(line.rsplit(" in ", 1)[1].rstrip("s"))
    return None


def medians(runs: list[dict[str, Any]], bound_seed: float) -> dict[str, Any]:
    """The medians of some runs (one mode's): times over the good runs, origin bytes over all."""
    good = [r for r in runs if r["ok"]]

    def med(key: str) -> float | None:
        values = [r[key] for r in good if r[key] is not None]
        return round(v, 4) if (v := median(values)) is not None else None

    max_s = med("max_s")
    return {
        "p50_s": med("p50_s"),
        "max_s": max_s,
        "ratio": med("ratio"),
        "ratio_seed_only": round(max_s / bound_seed, 4) if max_s and bound_seed else None,
        "origin_bytes": int(median([r["origin_bytes"] for r in runs]) or 0),
        "origin_ratio": med("origin_ratio"),
    }


def report(
    args: argparse.Namespace, bound: float, runs: list[dict[str, Any]], out: Out
) -> dict[str, Any]:
    n, f = args.peers, args.file_size
    bound_seed = seed_bound(
        n, f, args.origin_rate, args.seed_upload_rate, args.peer_upload_rate, args.download_rate
    )
    by_mode = {mode: [r for r in runs if r["mode"] == mode] for mode in args.modes}
    modes: dict[str, Any] = {
        mode: {
            "ok": all(r["ok"] for r in mode_runs),
            **{f"{key}_median": value for key, value in medians(mode_runs, bound_seed).items()},
            "runs": [
                {key: r[key] for key in ("run", "ok", "p50_s", "max_s", "ratio", "origin_ratio")}
                for r in mode_runs
            ],
        }
        for mode, mode_runs in by_mode.items()
    }
    # The top-level figures are today's keys, for the first mode (digest, unless --mode says
    # otherwise); "modes" has each mode's, and "runs" every run of every mode.
    summary_mode = args.modes[0]
    summary: dict[str, Any] = {
        "benchmark": "swarm",
        "ok": all(r["ok"] for r in runs),
        "mode": args.mode,
        "summary_mode": summary_mode,
        "n": n,
        "file_bytes": f,
        "origin_rate": args.origin_rate,
        "peer_upload_rate": args.peer_upload_rate,
        "seed_upload_rate": args.seed_upload_rate,
        "download_rate": args.download_rate,
        "piece_length": args.piece_length,
        "runs_requested": args.runs,
        "bound_s": round(bound, 4),
        "bound_seed_only_s": round(bound_seed, 4),
        "env": args.env,
        **medians(by_mode[summary_mode], bound_seed),
        "modes": modes,
        "runs": runs,
    }
    out.say()
    out.say(
        f"swarm: N={n} F={human(f)} u_s={human(args.origin_rate)}/s "
        f"u_seed={human(args.seed_upload_rate)}/s u={human(args.peer_upload_rate)}/s "
        f"d={human(args.download_rate) + '/s' if args.download_rate else 'unlimited'}"
    )
    out.say(
        f"lower bound {bound:.3f}s; {bound_seed:.3f}s when only the seed reads the origin"
        " (origin_ratio 1: every byte leaves through the seed)"
    )
    if args.env:
        out.say(f"service environment: {args.env}")
    rows = [
        [
            r["run"], r["mode"], "yes" if r["ok"] else f"NO ({len(r['failed'])} failed)",
            r["p50_s"], r["max_s"], r["ratio"], r["origin_ratio"], r["seed_seconds"],
            round(r["seed_upload_bytes"] / f, 2), round(r["peer_upload_bytes"] / f, 2),
            r["get_startup_s"] and round(r["get_startup_s"], 2), r["cpu_busy"],
        ]
        for r in runs
    ]  # fmt: skip
    out.say(
        table(
            ["run", "mode", "ok", "p50_s", "max_s", "ratio", "origin/F", "seed_s", "seed_up/F",
             "peers_up/F", "get_start_s", "cpu_busy"],
            rows,
        )
    )  # fmt: skip
    for mode, m in modes.items():
        out.say(
            f"median ({mode}): p50_s {m['p50_s_median']}, max_s {m['max_s_median']}, "
            f"ratio {m['ratio_median']} (target <= 1.5), "
            f"origin_ratio {m['origin_ratio_median']} (target <= 1.05)"
        )
    if args.detail:
        for r in runs:
            out.say(
                f"\nrun {r['run']} ({r['mode']}): per peer; reg = order of registration at the"
                " scheduler, up = bytes it served to others, fails = piece failures by reason"
            )
            out.say(
                table(
                    ["peer", "reg", "ok", "done_s", "get_s", "origin_MiB", "p2p_MiB", "up_MiB",
                     "fails"],
                    [
                        [
                            p["peer"], p.get("registered"), p["ok"], p["done_s"],
                            p.get("get_seconds"),
                            round(p.get("bytes_origin", 0) / MiB, 1),
                            round(p.get("bytes_p2p", 0) / MiB, 1),
                            round(p.get("uploaded", 0) / MiB, 1),
                            ",".join(f"{k}:{v}" for k, v in p.get("piece_failures", {}).items()),
                        ]
                        for p in sorted(r["peers"], key=lambda p: p["done_s"] or 1e9)
                    ],
                )
            )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Out(args.json)
    n, f = args.peers, args.file_size
    bound = lower_bound(
        n, f, args.origin_rate, args.seed_upload_rate, args.peer_upload_rate, args.download_rate
    )
    reaper = Reaper()
    runs: list[dict[str, Any]] = []
    try:
        with workspace("swarm", args.keep, out) as root, cleanup(reaper):
            source = root / "blob.bin"
            out.progress(f"writing {human(f)} of random bytes to {source}")
            digest = write_random_file(source, f)
            nats = NatsServer(root / "nats").start()
            reaper.add(nats.process)  # type: ignore[arg-type]
            origin = OriginProcess(reaper, "origin", source, args.origin_rate)
            for run in range(1, args.runs + 1):
                # With both modes, the first one alternates from run to run, so that a drift in
                # the machine's load does not always hit the same mode.
                for mode in args.modes if run % 2 else args.modes[::-1]:
                    r = one_run(run, mode, args, root, nats, origin, digest, bound, reaper, out)
                    runs.append(r)
                    out.progress(
                        f"run {run} ({mode}): ok={r['ok']} p50_s={r['p50_s']} max_s={r['max_s']}"
                        f" ratio={r['ratio']} origin_ratio={r['origin_ratio']}"
                    )
            nats.stop()
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    summary = report(args, bound, runs, out)
    if args.keep:
        summary["dir"] = str(root)
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
