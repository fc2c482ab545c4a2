"""Single-download benchmark: one large file through swarmfly against curl + sha256sum.

A local, uncapped origin serves a file from disk (aiohttp FileResponse, sendfile, Range).
Each run measures, in alternating order:

  (a) curl -s -o OUT URL ; sha256sum OUT         (wall time of both)
  (b) swarmfly get URL -O OUT2 --json             (embedded cluster: nats-server, scheduler,
                                                   storage and one peer, no rate limits)

Every run uses a fresh URL (``?run=N``), so neither the storage nor the peer has the task
cached. ratio = swarmfly / curl per run; the summary is the median ratio. See bench/README.md.
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
    size_arg,
    start_cluster,
    stop_cluster,
    table,
    workspace,
    write_random_file,
)

from swarmfly.natsserver import NatsServer


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
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and logs)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.file_size < 1:
        parser.error("--runs and --file-size must be positive")
    args.env = env_pairs(parser, args.env)
    return args


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


def measure_curl(curl: str, url: str, output: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    fetched = timed([curl, "-s", "-f", "-o", str(output), url], timeout)
    if not fetched["ok"]:
        return {"ok": False, "error": f"curl: {fetched['error']}", "seconds": None}
    hashed = timed(["sha256sum", str(output)], max(1.0, deadline - time.monotonic()))
    if not hashed["ok"]:
        return {"ok": False, "error": f"sha256sum: {hashed['error']}", "seconds": None}
    return {
        "ok": True,
        "seconds": round(fetched["seconds"] + hashed["seconds"], 3),
        "curl_s": round(fetched["seconds"], 3),
        "sha256sum_s": round(hashed["seconds"], 3),
        "cpu_s": round(fetched["cpu"] + hashed["cpu"], 2),
        "digest": hashed["stdout"].split()[0],
    }


def measure_swarmfly(
    cluster: Cluster, url: str, output: Path, timeout: float, env: dict[str, str]
) -> dict[str, Any]:
    services = {s.kind: s.process.pid for s in cluster.services}
    before = {kind: cpu_seconds(pid) for kind, pid in services.items()}
    command = cluster.get_command(url, output, 0, "--timeout", str(timeout))
    got = timed(command, timeout + 10, env)
    after = {kind: cpu_seconds(pid) for kind, pid in services.items()}
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
    }


def one_run(
    run: int, origin: OriginProcess, cluster: Cluster, curl: str, digest: str,
    args: argparse.Namespace, root: Path, out: Out,
) -> dict[str, Any]:  # fmt: skip
    url = f"{origin.file_url}?run={run}&nonce={uuid.uuid4().hex[:8]}"
    out_curl, out_swarm = root / f"curl-{run}.bin", root / f"swarmfly-{run}.bin"
    order = ["curl", "swarmfly"] if run % 2 == 1 else ["swarmfly", "curl"]
    results: dict[str, dict[str, Any]] = {}
    for which in order:
        os.sync()  # the previous measurement's dirty pages are not this one's to write
        out.progress(f"run {run}: {which}")
        if which == "curl":
            results[which] = measure_curl(curl, url, out_curl, args.timeout)
        else:
            results[which] = measure_swarmfly(cluster, url, out_swarm, args.timeout, args.env)
    c, s = results["curl"], results["swarmfly"]
    errors = [r["error"] for r in (c, s) if not r["ok"]]
    if not errors:
        swarm_digest = subprocess.run(
            ["sha256sum", str(out_swarm)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        s["digest"] = swarm_digest
        if c["digest"] != digest:
            errors.append(f"curl's output digest {c['digest']} is not the origin's {digest}")
        if swarm_digest != c["digest"]:
            errors.append(f"swarmfly's output digest {swarm_digest} differs from curl's")
        # without --digest, get verifies every piece but computes no whole-file digest
        if s["reported_digest"] not in (None, f"sha256:{digest}"):
            errors.append(f"swarmfly reported digest {s['reported_digest']}")
    for path in (out_curl, out_swarm):
        path.unlink(missing_ok=True)
    ok = not errors
    return {
        "run": run,
        "ok": ok,
        "order": order,
        "errors": errors,
        "curl_s": c["seconds"],
        "swarmfly_s": s["seconds"],
        "ratio": round(s["seconds"] / c["seconds"], 3) if ok else None,
        "curl": c,
        "swarmfly": s,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Out(args.json)
    curl = shutil.which("curl")
    if curl is None:
        print("single.py: curl is not installed (apt-get install curl)", file=sys.stderr)
        return 2
    if shutil.which("sha256sum") is None:
        print("single.py: sha256sum is not installed (coreutils)", file=sys.stderr)
        return 2
    reaper = Reaper()
    runs: list[dict[str, Any]] = []
    cluster: Cluster | None = None
    try:
        with workspace("single", args.keep, out) as root, cleanup(reaper):
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
                result = one_run(run, origin, cluster, curl, digest, args, root, out)
                runs.append(result)
                out.progress(
                    f"run {run}: curl+sha256sum {result['curl_s']}s, swarmfly"
                    f" {result['swarmfly_s']}s, ratio {result['ratio']}"
                    + (f" ERRORS {result['errors']}" if result["errors"] else "")
                )
            stop_cluster(reaper, cluster)
            nats.stop()
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    good = [r for r in runs if r["ok"]]
    summary: dict[str, Any] = {
        "benchmark": "single",
        "ok": len(good) == len(runs),
        "file_bytes": args.file_size,
        "runs_requested": args.runs,
        "ratio": median([r["ratio"] for r in good]),
        "curl_s": median([r["curl_s"] for r in good]),
        "swarmfly_s": median([r["swarmfly_s"] for r in good]),
        "env": args.env,
        "runs": runs,
    }
    if args.keep:
        summary["dir"] = str(root)
    f = args.file_size
    out.say()
    out.say(f"single download of {human(f)} from a local uncapped origin")
    rows = []
    for r in runs:
        c, s = r["curl"], r["swarmfly"]
        rows.append(
            [
                r["run"], "yes" if r["ok"] else "NO", " then ".join(r["order"]),
                c.get("curl_s"), c.get("sha256sum_s"), r["curl_s"], r["swarmfly_s"], r["ratio"],
                s["seconds"] and round(f / s["seconds"] / 2**20, 1),
                s.get("cpu_s") and round(sum(s["cpu_s"].values()), 1), c.get("cpu_s"),
            ]
        )  # fmt: skip
    out.say(
        table(
            ["run", "ok", "order", "curl_s", "sha256_s", "curl+sha_s", "swarmfly_s", "ratio",
             "swarm_MiB/s", "swarm_cpu_s", "curl_cpu_s"],
            rows,
        )
    )  # fmt: skip
    out.say(f"median ratio swarmfly / (curl + sha256sum): {summary['ratio']}")
    for r in runs:
        if r["errors"]:
            out.say(f"run {r['run']} errors: {r['errors']}")
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
