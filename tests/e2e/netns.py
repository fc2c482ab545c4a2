"""Several hosts on one machine: each host a network namespace with its own address.

A switch namespace holds a bridge; every host joins it through a veth pair made inside the
namespaces, so nothing is added to the machine's own namespace and deleting the namespaces
removes everything. Names carry a random tag, so parallel or leftover runs never collide.

``python -m tests.e2e.netns origin FILE HOST PORT`` serves FILE as a counting origin (run it
inside a host with ``ip netns exec``); on SIGTERM it prints what it served as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from swarmfly.testing import Origin

SUBNET = "10.77.0"
"""Private to the test's bridge: it never meets the machine's own routes."""
COMMAND_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parents[2]
FETCH = (
    "import sys, urllib.request as u\n"
    "sys.stdout.write(u.urlopen(sys.argv[1], timeout=3).read().decode())"
)


class NamespacesUnavailable(Exception):
    """This machine does not let the test build its hosts: network namespaces, veth pairs, a
    bridge or a `tc` shaper (a missing kernel module, a sandbox without CAP_NET_ADMIN)."""


def run(*args: str, check: bool = True, cwd: Path | None = None) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False, cwd=cwd
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def build(*args: str) -> None:
    """A step that builds the network: its failure says this machine cannot host the test."""
    try:
        run(*args)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise NamespacesUnavailable(str(exc)) from None


@dataclass(frozen=True)
class Host:
    name: str
    ns: str
    ip: str

    def wrap(self, *args: str) -> list[str]:
        """``args`` as a command run on this host."""
        return ["ip", "netns", "exec", self.ns, *args]

    def python(self, code: str, *args: str) -> str:
        """A few lines of stdlib Python on this host (``-S``: starts in a few ms)."""
        return run(*self.wrap(sys.executable, "-S", "-c", code, *args))

    def fetch(self, url: str) -> bytes:
        """GET ``url`` from this host (monitoring endpoints that only its network reaches)."""
        return self.python(FETCH, url).encode()


@dataclass
class Network:
    """A bridge and the hosts on it; ``close`` kills what runs there and removes it all."""

    tag: str = field(default_factory=lambda: f"sf{uuid.uuid4().hex[:6]}")
    namespaces: list[str] = field(default_factory=list)

    def _add_namespace(self, ns: str) -> None:
        build("ip", "netns", "add", ns)  # on failure, ip removes what it had made
        self.namespaces.append(ns)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def start(self) -> Network:
        self._add_namespace(self.switch)
        build("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        build("ip", "-n", self.switch, "link", "set", "br0", "up")
        return self

    def add(self, name: str, number: int) -> Host:
        """A host ``name`` at ``SUBNET.number``."""
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{number}")
        self._add_namespace(host.ns)
        port = f"v{number}"
        build("ip", "-n", self.switch, "link", "add", port, "type", "veth",
              "peer", "name", "eth0", "netns", host.ns)  # fmt: skip
        build("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        build("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        build("ip", "-n", host.ns, "link", "set", "eth0", "up")
        build("ip", "-n", host.ns, "link", "set", "lo", "up")
        return host

    def shape(self, host: Host, rate: str) -> None:
        """Cap what ``host`` sends (a token bucket on its egress)."""
        build("tc", "-n", host.ns, "qdisc", "add", "dev", "eth0", "root", "tbf",
              "rate", rate, "burst", "64kb", "latency", "50ms")  # fmt: skip

    def sent(self, host: Host) -> int:
        """Bytes ``host`` has sent through its shaper."""
        stats = run("tc", "-n", host.ns, "-s", "qdisc", "show", "dev", "eth0")
        match = re.search(r"Sent (\d+) bytes", stats)
        return int(match.group(1)) if match else 0

    def close(self) -> None:
        """Kill every process still in our namespaces (by pid), then delete them all, each
        one even when another fails; raise at the end naming those left behind."""
        for ns in self.namespaces:
            for pid in self._pids(ns):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    continue
        for ns in reversed(self.namespaces):
            deadline = time.monotonic() + 5
            while self._pids(ns) and time.monotonic() < deadline:
                time.sleep(0.05)
            with contextlib.suppress(subprocess.TimeoutExpired):  # reported below if left
                run("ip", "netns", "del", ns, check=False)
        listed = run("ip", "netns", "list", check=False).split()
        left = [ns for ns in self.namespaces if ns in listed]
        self.namespaces.clear()
        if left:
            raise RuntimeError(f"network namespaces left behind: {', '.join(left)}")

    @staticmethod
    def _pids(ns: str) -> list[str]:
        try:
            return run("ip", "netns", "pids", ns, check=False).split()
        except subprocess.TimeoutExpired:
            return []


def start_process(
    command: list[str], log_path: Path, ready: str, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start ``command`` and wait until its log shows ``ready``."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while ready not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{command[0]} did not start: {tail}")
        time.sleep(0.05)
    return process


@dataclass
class OriginProcess:
    """The counting origin in its own host (``python -m tests.e2e.netns origin``)."""

    process: subprocess.Popen[str]
    url: str

    def stop(self) -> dict[str, int]:
        """Stop it and return what it served: ``bytes_served`` and ``requests``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=10)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        stats: dict[str, int] = json.loads(lines[-1]) if lines else {}
        return stats


def start_origin(host: Host, file: Path, port: int = 8000, timeout: float = 20.0) -> OriginProcess:
    command = host.wrap(sys.executable, "-m", "tests.e2e.netns", "origin", str(file), host.ip)
    process = subprocess.Popen(
        [*command, str(port)],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    stdout = process.stdout
    assert stdout is not None
    banner: list[str] = []
    reader = threading.Thread(target=lambda: banner.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not banner or not banner[0].startswith("origin "):
        process.kill()
        process.wait()
        raise RuntimeError(f"origin did not start: {banner}")
    return OriginProcess(process, banner[0].split()[1])


async def serve_origin(file: Path, host: str, port: int) -> None:
    origin = Origin()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with origin.serve(host, port):
        print(f"origin {origin.add(file.name, file.read_bytes())}", flush=True)
        await stop.wait()
    print(json.dumps({"bytes_served": origin.bytes_served, "requests": origin.requests}))


if __name__ == "__main__":
    if sys.argv[1:2] != ["origin"] or len(sys.argv) != 5:
        sys.exit("usage: python -m tests.e2e.netns origin FILE HOST PORT")
    asyncio.run(serve_origin(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
