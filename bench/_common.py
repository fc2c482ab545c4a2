"""Shared parts of the benchmarks: process bookkeeping, origins in their own processes, an
embedded cluster, CPU accounting and output helpers.

Run as a script it is one of the benchmark's origins (``origin`` or ``fileserver``), so the
origin's pacing does not share an interpreter (or a GIL) with the benchmark driver.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmfly.config import parse_size
from swarmfly.natsserver import NatsServer
from swarmfly.testing import ServiceProcess, spawn_service

PY = sys.executable
HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- output ------------------------------------------------------------------------------


class Out:
    """Tables and progress go to stdout, or to stderr when stdout carries the one JSON object."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.stream = sys.stderr if json_mode else sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def progress(self, text: str) -> None:
        print(f"# {text}", file=sys.stderr, flush=True)

    def result(self, obj: dict[str, Any]) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
            sys.stdout.flush()


@contextlib.contextmanager
def workspace(name: str, keep: bool, out: Out) -> Iterator[Path]:
    """A temp folder for one benchmark run, removed at the end unless --keep."""
    root = Path(tempfile.mkdtemp(prefix=f"swarmfly-bench-{name}-"))
    try:
        yield root
    finally:
        if keep:
            out.progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.4g}{unit}"
        n /= 1024
    return str(n)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * MiB):
            hasher.update(block)
    return hasher.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its sha256 hex."""
    hasher = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            hasher.update(block)
            handle.write(block)
            left -= len(block)
    return hasher.hexdigest()


# -- processes ---------------------------------------------------------------------------


class Reaper:
    """Every child the benchmark starts; ``stop_all`` ends them (TERM, then KILL) by pid.

    Children run in their own sessions, so a terminal's Ctrl-C reaches only the driver; the
    driver's ``finally`` (and SIGTERM, turned into SystemExit) then ends them.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=10)

    def stop_all(self, timeout: float = 5.0) -> None:
        with self._lock:
            procs, self._procs = list(reversed(self._procs)), []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)


def sigterm_as_exit() -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` cleans up."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of a live process in MiB, from /proc (None if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``5 > /proc/PID/clear_refs``); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


def children_cpu() -> float:
    """CPU seconds of reaped children (the `get` and `curl` processes)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def profiled(folder: Path | None, pids: dict[str, int]) -> Iterator[None]:
    """py-spy on each of ``pids`` for the ``with`` block: collapsed stacks (flamegraph.pl's
    input; sort the counts for a flat profile) in FOLDER/NAME-N.txt. Nothing when no FOLDER."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("*-*.txt")), default=0)
    flags = ["--format", "raw", "--rate", "250", "--nonblocking"]
    spies = [
        subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), *flags, "-o", str(folder / f"{name}-{n}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    time.sleep(1.0)  # attached before the block starts
    try:
        yield
    finally:
        for spy in spies:  # py-spy writes its file on SIGINT
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(30)


def http_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


_METRIC = re.compile(r"^(swarmfly_[a-z_]+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for swarmfly_* counters (``_total`` dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match and not match.group(1).endswith("_created"):
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


# -- origins -----------------------------------------------------------------------------


class OriginProcess:
    """A child process serving one file from memory (``swarmfly.testing.Origin``) or from
    disk (aiohttp ``FileResponse``); ``stats()`` asks it for bytes and requests served."""

    def __init__(self, reaper: Reaper, mode: str, path: Path, rate: int = 0) -> None:
        command = [PY, str(HERE / "_common.py"), mode, "--file", str(path), "--rate", str(rate)]
        self.proc = reaper.add(
            subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        assert self.proc.stdout is not None
        line = _readline(self.proc, 60.0)
        if not line.startswith("http://"):
            raise RuntimeError(f"origin did not start: {line!r}")
        self.url = line.strip()
        self.name = path.name
        self.file_url = f"{self.url}/{self.name}"

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(_readline(self.proc, 10.0)))


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not box:
        raise TimeoutError("child did not answer")
    return box[0]


async def _serve_origin(mode: str, path: Path, rate: int) -> None:
    from aiohttp import web

    from swarmfly.testing import Origin

    loop = asyncio.get_running_loop()
    if mode == "origin":
        origin = Origin(rate=rate)
        async with origin.serve() as served:
            served.add(path.name, path.read_bytes())
            print(served.url, flush=True)
            while (await loop.run_in_executor(None, sys.stdin.readline)).strip():
                stats = {"bytes_served": origin.bytes_served, "requests": origin.requests}
                print(json.dumps(stats), flush=True)
        return
    counts = {"bytes_served": 0, "requests": 0}

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] != path.name:
            raise web.HTTPNotFound()
        counts["requests"] += 1
        response = web.FileResponse(path)
        return response

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[-1][1]}", flush=True)
    try:
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            print(json.dumps(counts), flush=True)
    finally:
        await runner.cleanup()


# -- the cluster -------------------------------------------------------------------------


@dataclass
class Cluster:
    """nats-server (shared) + scheduler + storage + peers, each its own process."""

    nats_url: str
    prefix: str
    root: Path
    scheduler: ServiceProcess
    storage: ServiceProcess
    peers: list[ServiceProcess] = field(default_factory=list)
    peer_dirs: list[Path] = field(default_factory=list)

    @property
    def services(self) -> list[ServiceProcess]:
        return [self.scheduler, self.storage, *self.peers]

    def cpu(self) -> dict[str, float]:
        return {
            "scheduler": cpu_seconds(self.scheduler.process.pid),
            "storage": cpu_seconds(self.storage.process.pid),
            "peers": sum(cpu_seconds(p.process.pid) for p in self.peers),
        }

    def state(self) -> Any:
        return http_json(f"{self.scheduler.url}/api/state", headers=self.scheduler.api_auth())

    def metrics(self, service: ServiceProcess) -> dict[str, float]:
        try:
            return metric_values(http_text(f"{service.url}/metrics"))
        except OSError:
            return {}

    def get_command(self, url: str, output: Path, peer: int, *extra: str) -> list[str]:
        return [
            PY, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
            "--state-dir", str(self.peer_dirs[peer]), "--nats", self.nats_url,
            "--prefix", self.prefix, *extra,
        ]  # fmt: skip

    def log_counts(self, patterns: dict[str, str]) -> dict[str, int]:
        """How many log lines across every service match each regular expression."""
        compiled = {name: re.compile(pattern) for name, pattern in patterns.items()}
        counts = dict.fromkeys(patterns, 0)
        for service in self.services:
            for line in service.log().splitlines():
                for name, pattern in compiled.items():
                    if pattern.search(line):
                        counts[name] += 1
        return counts


def add_env_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help=help)


def env_pairs(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE flags as a mapping; anything else is a usage error."""
    try:
        return dict(item.split("=", 1) for item in items)
    except ValueError:
        parser.error("--env takes KEY=VALUE")


def start_peers(
    spawn: Callable[..., ServiceProcess], dirs: list[Path], args: list[str]
) -> list[ServiceProcess]:
    """Peers started a few at a time; the first failure is raised once all have been tried
    (``spawn`` hands each process to a reaper, which stops the ones that did start)."""
    started: list[ServiceProcess] = []
    errors: list[Exception] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(spawn, "peer", d, *args) for d in dirs]:
            try:
                started.append(future.result())
            except Exception as exc:  # collect all, so every started peer is reaped
                errors.append(exc)
    if errors:
        raise errors[0]
    return started


def byte_compiled() -> None:
    """Write swarmfly's byte-code where it is stale, as ``pip install`` does: with
    ``PYTHONDONTWRITEBYTECODE`` set (this machine) an editable install would otherwise compile
    every module from source in every ``swarmfly get``, a start-up no installed copy pays."""
    import swarmfly
    import swarmfly.contracts
    import swarmfly.plugins
    import swarmfly.services

    for package in (swarmfly, swarmfly.services, swarmfly.plugins, swarmfly.contracts):
        for folder in package.__path__:
            compileall.compile_dir(folder, quiet=1)


def start_cluster(
    reaper: Reaper,
    nats: NatsServer,
    root: Path,
    prefix: str,
    *,
    peers: int,
    seed_rate: int = 0,
    peer_rate: int = 0,
    download_rate: int = 0,
    env: dict[str, str] | None = None,
) -> Cluster:
    """Scheduler, storage and ``peers`` peers against ``nats``; peers start in parallel."""
    byte_compiled()
    common = ["--prefix", prefix]

    def spawn(kind: str, folder: Path, *args: str) -> ServiceProcess:
        service = spawn_service(kind, nats.url, folder, *common, *args, env=env, timeout=60)
        reaper.add(service.process)
        return service

    scheduler = spawn("scheduler", root / "scheduler")
    seed_args = ["--upload-rate", str(seed_rate)] if seed_rate else []
    storage = spawn("storage", root / "storage", *seed_args)
    peer_args = ["--upload-rate", str(peer_rate)] if peer_rate else []
    if download_rate:
        peer_args += ["--download-rate", str(download_rate)]
    dirs = [root / f"peer{i:02d}" for i in range(peers)]
    cluster = Cluster(nats.url, prefix, root, scheduler, storage, peer_dirs=dirs)
    cluster.peers = start_peers(spawn, dirs, peer_args)
    return cluster


def stop_cluster(reaper: Reaper, cluster: Cluster | None) -> None:
    if cluster is None:
        return
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: reaper.stop(s.process), reversed(cluster.services)))


@contextlib.contextmanager
def cleanup(reaper: Reaper) -> Iterator[None]:
    sigterm_as_exit()
    try:
        yield
    finally:
        reaper.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description="a benchmark origin (internal)")
    parser.add_argument("mode", choices=["origin", "fileserver"])
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--rate", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_origin(args.mode, args.file, args.rate))


if __name__ == "__main__":
    main()


def add_swarm_flags(parser: argparse.ArgumentParser) -> None:
    """The swarm's shape, the same in swarm.py and simulate.py so that both compare."""
    parser.add_argument("--peers", type=int, default=16, help="N (default 16)")
    parser.add_argument("--file-size", type=size_arg, default="64MiB", help="F (default 64MiB)")
    parser.add_argument("--origin-rate", type=size_arg, default="32MiB", help="u_s, bytes/s")
    parser.add_argument("--peer-upload-rate", type=size_arg, default="8MiB", help="u, bytes/s")
    parser.add_argument("--seed-upload-rate", type=size_arg, default="8MiB", help="u_seed")
    parser.add_argument(
        "--download-rate", type=size_arg, default="0", help="d, bytes/s (0: unlimited)"
    )


def lower_bound(n: int, f: int, u_s: int, u_seed: int, u: int, d: int) -> float:
    """Kurose-Ross: the origin must send F once, the slowest downloader must receive F, and
    N*F bytes must leave some uplink. A rate of 0 means unlimited (that term vanishes)."""
    terms = [f / u_s if u_s else 0.0, f / d if d else 0.0]
    if u_s and u_seed and u:
        terms.append(n * f / (u_s + u_seed + n * u))
    return max(terms)


def seed_bound(n: int, f: int, u_s: int, u_seed: int, u: int, d: int) -> float:
    """The same bound when the origin is read once, by the seed only (origin_ratio 1): every
    byte reaches the peers through the seed's uplink, and only seed and peers upload."""
    terms = [f / u_s if u_s else 0.0, f / d if d else 0.0, f / u_seed if u_seed else 0.0]
    if u_seed and u:
        terms.append(n * f / (u_seed + n * u))
    return max(terms)
