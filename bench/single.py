"""Single-download benchmark: one large file through swarmfly against curl + a sha256 tool.

A local, uncapped origin serves a file from disk (aiohttp FileResponse, sendfile, Range).
Each run measures, in alternating order:

  (a) curl -s -o OUT URL ; sha256sum OUT            (wall time of both: ``curl_s``)
  (b) curl -s -o OUT URL ; openssl dgst -sha256 OUT (wall time of both: ``curl_fast_s``)
  (c) swarmfly get URL -O OUT2 --digest sha256:HEX --json
                                                    (embedded cluster: nats-server, scheduler,
                                                     storage and one peer, no rate limits)

Every run uses a fresh URL (``?run=N``), so neither the storage nor the peer has the task
cached. ratio = swarmfly / (a) and ratio_fast = swarmfly / (b) per run; the summary holds the
medians. For (c) it also reads each service's CPU time (/proc/PID/stat) and peak RSS (VmHWM,
reset before each get) and the get's own CPU time, over the get and until the storage has
seeded the task and the services are idle (``settle_s``: a storage that lent the file to the
peer takes its copy from it after the get), so no measurement runs beside the last one's
work. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    Cluster,
    OriginProcess,
    Out,
    Reaper,
    add_env_flag,
    children_cpu,
    cleanup,
    cpu_seconds,
    env_pairs,
    human,
    median,
    peak_rss_mib,
    profiled,
    reset_peak_rss,
    sha256_file,
    size_arg,
    start_cluster,
    stop_cluster,
    table,
    workspace,
    write_random_file,
)

from swarmfly.natsserver import NatsServer

GiB = 2**30
KINDS = ("get", "peer", "storage", "scheduler")  # the processes whose CPU time is counted
SERVICES = ("peer", "storage", "scheduler")  # the ones whose peak RSS is read
SHORT = {"curl": "sha", "curl_fast": "ssl", "swarmfly": "swarm"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-size", type=size_arg, default="1GiB", help="default 1GiB")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="per measurement, seconds (default 600)"
    )
    add_env_flag(
        parser, "extra environment for the services and the get, e.g. SWARMFLY_PEER_CONCURRENCY=8"
    )
    parser.add_argument(
        "--get-arg", action="append", default=[], metavar="ARG",
        help="one more argument for swarmfly get (repeatable), e.g. --get-arg=--priority=3",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and logs)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR",
        help="py-spy every service during each get; collapsed stacks in DIR (slows the get)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.runs < 1 or args.file_size < 1:
        parser.error("--runs and --file-size must be positive")
    args.env = env_pairs(parser, args.env)
    return args


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def disk_needed(size: int, runs: int) -> int:
    """The origin file, a storage copy and a peer copy per run (each run is a new task, and
    the caches keep it), one output at a time, and 1 GiB for logs and slack."""
    return size * (1 + 2 * runs + 1) + GiB


def timed(command: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one command; wall seconds, CPU seconds of the child, exit code, output."""
    cpu0 = children_cpu()
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timeout", "seconds": None}
    seconds = time.monotonic() - started
    result = {
        "ok": done.returncode == 0,
        "seconds": seconds,
        "cpu": children_cpu() - cpu0,
        "stdout": done.stdout,
    }
    if done.returncode != 0:
        result["error"] = f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
    return result


def sha256sum_hex(stdout: str) -> str:
    return stdout.split()[0]  # "HEX  FILE"


def openssl_hex(stdout: str) -> str:
    return stdout.strip().rsplit("= ", 1)[-1]  # "SHA2-256(FILE)= HEX"


def measure_curl(
    curl: str, url: str, output: Path, timeout: float, hasher: list[str],
    parse: Callable[[str], str],
) -> dict[str, Any]:  # fmt: skip
    """curl -o OUTPUT, then HASHER OUTPUT; the time of both."""
    name = Path(hasher[0]).name
    deadline = time.monotonic() + timeout
    fetched = timed([curl, "-s", "-f", "-o", str(output), url], timeout)
    if not fetched["ok"]:
        return {"ok": False, "error": f"curl: {fetched['error']}", "seconds": None}
    hashed = timed([*hasher, str(output)], max(1.0, deadline - time.monotonic()))
    if not hashed["ok"]:
        return {"ok": False, "error": f"{name}: {hashed['error']}", "seconds": None}
    return {
        "ok": True,
        "seconds": round(fetched["seconds"] + hashed["seconds"], 3),
        "curl_s": round(fetched["seconds"], 3),
        f"{name}_s": round(hashed["seconds"], 3),
        "cpu_s": round(fetched["cpu"] + hashed["cpu"], 2),
        "digest": parse(hashed["stdout"]),
    }


SETTLE_IDLE = 0.05
"""CPU-seconds per half second below which the services count as idle again."""
SETTLE_LIMIT = 60.0


def settle(cluster: Cluster, services: dict[str, int], task_id: str | None) -> float:
    """Wait until the storage has seeded the task (its log says so) and the services are
    idle, at most ``SETTLE_LIMIT`` s: what they still do for this download (the storage's
    copy, taken from the peer it lent the file to) is counted with it. Returns the seconds
    waited."""
    started = time.monotonic()
    seeded = f"seeded task {task_id[:12]}" if task_id else ""
    last = sum(cpu_seconds(pid) for pid in services.values())
    quiet = 0
    while time.monotonic() - started < SETTLE_LIMIT:
        if quiet >= 2 and seeded in cluster.storage.log():
            break
        time.sleep(0.5)
        now = sum(cpu_seconds(pid) for pid in services.values())
        quiet = quiet + 1 if now - last < SETTLE_IDLE else 0
        last = now
    return round(time.monotonic() - started, 1)


def _task_id(stdout: str) -> str | None:
    """The task id a get's JSON summary names, if it printed one."""
    try:
        summary = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    task_id = summary.get("task_id") if isinstance(summary, dict) else None
    return task_id if isinstance(task_id, str) else None


def measure_swarmfly(
    cluster: Cluster, url: str, output: Path, digest: str, args: argparse.Namespace
) -> dict[str, Any]:
    services = {s.kind: s.process.pid for s in cluster.services}
    # VmHWM back to the current RSS, so the peak read afterwards is this download's
    per_run = all([reset_peak_rss(pid) for pid in services.values()])
    before = {kind: cpu_seconds(pid) for kind, pid in services.items()}
    command = cluster.get_command(
        url, output, 0, "--digest", f"sha256:{digest}", "--timeout", str(args.timeout),
        *args.get_arg,
    )  # fmt: skip
    with profiled(args.profile, services):
        got = timed(command, args.timeout + 10, args.env)
        # The storage may take its copy after the get (from the peer it lent the file to):
        # that work is this download's, and must not run beside the next measurement.
        settle_s = settle(cluster, services, _task_id(got["stdout"]))
    after = {kind: cpu_seconds(pid) for kind, pid in services.items()}
    rss = {kind: peak_rss_mib(pid) for kind, pid in services.items()}
    if not got["ok"]:
        return {"ok": False, "error": f"swarmfly get: {got['error']}", "seconds": None}
    try:
        summary = json.loads(got["stdout"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "error": "swarmfly get printed no JSON", "seconds": None}
    return {
        "ok": True,
        "seconds": round(got["seconds"], 3),
        "get_reported_s": summary["seconds"],
        "bytes_origin": summary["bytes_origin"],
        "bytes_p2p": summary["bytes_p2p"],
        "via": summary["via"],
        "reported_digest": summary.get("digest"),
        "cpu_s": {
            "get": round(got["cpu"], 2),
            **{kind: round(after[kind] - before[kind], 2) for kind in services},
        },
        "rss_mib": {kind: rounded(rss[kind], 1) for kind in services},
        "settle_s": settle_s,
        "rss_per_run": per_run,
    }


def one_run(
    run: int, origin: OriginProcess, cluster: Cluster, curl: str, openssl: str, digest: str,
    args: argparse.Namespace, root: Path, out: Out,
) -> dict[str, Any]:  # fmt: skip
    url = f"{origin.file_url}?run={run}&nonce={uuid.uuid4().hex[:8]}"
    # today's pair (curl + sha256sum, swarmfly) keeps its alternation; openssl sits between
    order = ["curl", "curl_fast", "swarmfly"]
    if run % 2 == 0:
        order.reverse()
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for which in order:
        os.sync()  # the previous measurement's dirty pages are not this one's to write
        out.progress(f"run {run}: {which}")
        output = root / f"{which}-{run}.bin"
        if which == "curl":
            r = measure_curl(curl, url, output, args.timeout, ["sha256sum"], sha256sum_hex)
        elif which == "curl_fast":
            hasher = [openssl, "dgst", "-sha256"]
            r = measure_curl(curl, url, output, args.timeout, hasher, openssl_hex)
        else:
            r = measure_swarmfly(cluster, url, output, digest, args)
            if r["ok"]:  # checked here too, not only by the get's --digest
                r["digest"] = sha256_file(output)
        results[which] = r
        if not r["ok"]:
            errors.append(r["error"])
        elif r["digest"] != digest:
            errors.append(f"{which}'s output digest {r['digest']} is not the origin's {digest}")
        output.unlink(missing_ok=True)  # one output on disk at a time
    c, f, s = results["curl"], results["curl_fast"], results["swarmfly"]
    if s["ok"] and s["reported_digest"] != f"sha256:{digest}":
        errors.append(f"swarmfly reported digest {s['reported_digest']}, not sha256:{digest}")
    ok = not errors
    gib = args.file_size / GiB
    return {
        "run": run,
        "ok": ok,
        "order": order,
        "errors": errors,
        "curl_s": c["seconds"],
        "curl_fast_s": f["seconds"],
        "swarmfly_s": s["seconds"],
        "ratio": round(s["seconds"] / c["seconds"], 3) if ok else None,
        "ratio_fast": round(s["seconds"] / f["seconds"], 3) if ok else None,
        "cpu_s_per_gib": {k: round(s["cpu_s"][k] / gib, 2) for k in KINDS} if ok else None,
        "swarm_cpu_s_per_gib": round(sum(s["cpu_s"][k] for k in KINDS) / gib, 2) if ok else None,
        "curl_cpu_s_per_gib": round(c["cpu_s"] / gib, 2) if ok else None,
        "curl_fast_cpu_s_per_gib": round(f["cpu_s"] / gib, 2) if ok else None,
        **{f"{k}_rss_mib": s["rss_mib"][k] if ok else None for k in SERVICES},
        "curl": c,
        "curl_fast": f,
        "swarmfly": s,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Out(args.json)
    tools = {name: shutil.which(name) for name in ("curl", "openssl", "sha256sum")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        print(f"single.py: not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    curl, openssl = str(tools["curl"]), str(tools["openssl"])
    reaper = Reaper()
    runs: list[dict[str, Any]] = []
    cluster: Cluster | None = None
    try:
        with workspace("single", args.keep, out) as root, cleanup(reaper):
            need, free = disk_needed(args.file_size, args.runs), shutil.disk_usage(root).free
            if free < need:
                print(
                    f"single.py: not enough disk space in {root.parent}: {human(free)} free,"
                    f" {human(need)} needed for {args.runs} run(s) of {human(args.file_size)}"
                    " (the origin file, a storage and a peer copy per run, one output at a"
                    " time, 1GiB slack); use fewer --runs, a smaller --file-size, or set"
                    " TMPDIR to a roomier filesystem",
                    file=sys.stderr,
                )
                return 2
            serve_dir = root / "origin"
            serve_dir.mkdir()
            source = serve_dir / "blob.bin"
            out.progress(f"writing {human(args.file_size)} of random bytes to {source}")
            digest = write_random_file(source, args.file_size)
            nats = NatsServer(root / "nats").start()
            reaper.add(nats.process)  # type: ignore[arg-type]
            origin = OriginProcess(reaper, "fileserver", source)
            prefix = f"bench{uuid.uuid4().hex[:10]}"
            out.progress(f"starting scheduler, storage and one peer (prefix {prefix})")
            cluster = start_cluster(reaper, nats, root / "cluster", prefix, peers=1, env=args.env)
            time.sleep(1.0)
            for run in range(1, args.runs + 1):
                result = one_run(run, origin, cluster, curl, openssl, digest, args, root, out)
                runs.append(result)
                out.progress(
                    f"run {run}: curl+sha256sum {result['curl_s']}s, curl+openssl"
                    f" {result['curl_fast_s']}s, swarmfly {result['swarmfly_s']}s,"
                    f" ratio {result['ratio']}, ratio_fast {result['ratio_fast']}"
                    + (f" ERRORS {result['errors']}" if result["errors"] else "")
                )
            stop_cluster(reaper, cluster)
            nats.stop()
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    good = [r for r in runs if r["ok"]]
    rss_per_run = all(r["swarmfly"].get("rss_per_run") for r in good)

    def med(key: str) -> float | None:
        return median([r[key] for r in good if r[key] is not None])

    summary: dict[str, Any] = {
        "benchmark": "single",
        "ok": len(good) == len(runs),
        "file_bytes": args.file_size,
        "runs_requested": args.runs,
        "ratio": med("ratio"),
        "ratio_fast": med("ratio_fast"),
        "curl_s": med("curl_s"),
        "curl_fast_s": med("curl_fast_s"),
        "swarmfly_s": med("swarmfly_s"),
        "cpu_s_per_gib": {k: median([r["cpu_s_per_gib"][k] for r in good]) for k in KINDS},
        "swarm_cpu_s_per_gib": med("swarm_cpu_s_per_gib"),
        "curl_cpu_s_per_gib": med("curl_cpu_s_per_gib"),
        "curl_fast_cpu_s_per_gib": med("curl_fast_cpu_s_per_gib"),
        **{f"{k}_rss_mib": med(f"{k}_rss_mib") for k in SERVICES},
        # per_run: VmHWM was reset before each get; else the peak since the process started
        "rss_scope": "per_run" if rss_per_run else "since_start",
        "env": args.env,
        "get_args": args.get_arg,
        "runs": runs,
    }
    if args.keep:
        summary["dir"] = str(root)
    size = args.file_size
    out.say()
    out.say(f"single download of {human(size)} from a local uncapped origin")
    rows = []
    for r in runs:
        c, f, s = r["curl"], r["curl_fast"], r["swarmfly"]
        rows.append(
            [
                r["run"], "yes" if r["ok"] else "NO", ">".join(SHORT[w] for w in r["order"]),
                c.get("curl_s"), c.get("sha256sum_s"), r["curl_s"],
                f.get("curl_s"), f.get("openssl_s"), r["curl_fast_s"],
                r["swarmfly_s"], r["ratio"], r["ratio_fast"],
                s["seconds"] and round(size / s["seconds"] / 2**20, 1),
            ]
        )  # fmt: skip
    rows.append(
        ["median", "", "", "", "", summary["curl_s"], "", "", summary["curl_fast_s"],
         summary["swarmfly_s"], summary["ratio"], summary["ratio_fast"],
         summary["swarmfly_s"] and round(size / summary["swarmfly_s"] / 2**20, 1)]
    )  # fmt: skip
    out.say(
        table(
            ["run", "ok", "order", "curl_s", "sha256_s", "curl+sha_s", "curl2_s", "openssl_s",
             "curl+ssl_s", "swarmfly_s", "ratio", "ratio_fast", "swarm_MiB/s"],
            rows,
        )
    )  # fmt: skip
    ratio, ratio_fast = rounded(summary["ratio"]), rounded(summary["ratio_fast"])
    out.say(f"median ratio      swarmfly / (curl + sha256sum):           {ratio}")
    out.say(f"median ratio_fast swarmfly / (curl + openssl dgst -sha256): {ratio_fast}")
    out.say()
    scope = (
        "peak RSS during each get (VmHWM reset before it)"
        if rss_per_run
        else "peak RSS since each service started (VmHWM could not be reset): all runs so far"
    )
    out.say(f"CPU-seconds per GiB per process; {scope}, MiB")
    rows = []
    for label, src in [*((r["run"], r) for r in good), ("median", summary)]:
        rows.append(
            [
                label, *(src["cpu_s_per_gib"][k] for k in KINDS), src["swarm_cpu_s_per_gib"],
                src["curl_cpu_s_per_gib"], src["curl_fast_cpu_s_per_gib"],
                *(src[f"{k}_rss_mib"] for k in SERVICES),
            ]
        )  # fmt: skip
    if good:
        out.say(
            table(
                ["run", "get", "peer", "storage", "sched", "swarm", "curl+sha", "curl+ssl",
                 "peer_rss", "storage_rss", "sched_rss"],
                rows,
            )
        )  # fmt: skip
    for r in runs:
        if r["errors"]:
            out.say(f"run {r['run']} errors: {r['errors']}")
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
