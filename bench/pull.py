"""Pull benchmark: N hosts pull one image through their registry mirrors, against N hosts
pulling it straight from the registry, with the registry's egress capped.

Debian's ``docker-registry`` holds an OCI image (pushed once with skopeo). In front of it sits
a gate: a small reverse proxy in its own process that streams every response through one
token bucket (``--registry-rate``, shared by all connections) and counts the bytes it serves.
Clients and the swarm both talk to the registry only through the gate, so the cap and the
count are the same for both sides. Each run measures, in alternating order:

  direct  N ``skopeo copy docker://GATE/NAME:TAG dir:OUT`` at once
  mirror  the same N copies, each through its own host's peer proxy (a ``registries.conf``
          mirror), on a fresh swarm (scheduler, storage and N peers, new state dirs and a
          new subject prefix) on a shared nats-server

For each side: the wall time until all N copies finished, and the blob bytes the registry
served. time_ratio = mirror_s / direct_s, bytes_ratio = mirror bytes / direct bytes; the
summary is their medians. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import filecmp
import gzip
import hashlib
import io
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    PY,
    Cluster,
    MiB,
    Out,
    Reaper,
    add_env_flag,
    children_cpu,
    cleanup,
    cpu_seconds,
    env_pairs,
    human,
    machine_cpu,
    median,
    sha256_file,
    size_arg,
    start_peers,
    stop_cluster,
    table,
    workspace,
)

from swarmfly.httpheaders import HOP_BY_HOP
from swarmfly.natsserver import NatsServer, free_port
from swarmfly.testing import ServiceProcess, spawn_service

NAME = "bench/app"
TAG = "v1"
USER = "bench"
PASSWORD = "bench-pa55word"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CHUNK = 64 * 1024
"""Bytes the gate passes per token-bucket take: small against the burst, so the cap is even."""
START_TIMEOUT = 30.0
LOG_PATTERNS = {"warnings": r" WARNING ", "errors": r" ERROR "}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3, help="N pulling hosts (default 3)")
    parser.add_argument(
        "--image-mib", type=float, default=48.0, help="image content in MiB (default 48)"
    )
    parser.add_argument("--layers", type=int, default=3, help="layers (default 3)")
    parser.add_argument(
        "--registry-rate",
        type=size_arg,
        default="32MiB",
        help="the registry's egress cap, bytes/s (default 32MiB; 0: unlimited)",
    )
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="per side of a run, seconds (default 300)"
    )
    parser.add_argument(
        "--no-auth", action="store_true", help="an anonymous registry (default: htpasswd)"
    )
    add_env_flag(
        parser, "extra environment for every swarm service, e.g. SWARMFLY_PEER_PER_PARENT=1"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (and logs)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--gate", help=argparse.SUPPRESS)  # internal: run as the gate
    args = parser.parse_args(argv)
    if args.gate:
        return args
    if args.hosts < 1 or args.runs < 1 or args.layers < 1 or args.timeout <= 0:
        parser.error("--hosts, --runs, --layers and --timeout must be positive")
    if args.image_mib * MiB < args.layers:
        parser.error("--image-mib is too small for that many --layers")
    args.env = env_pairs(parser, args.env)
    return args


# -- the gate (its own process) ----------------------------------------------------------

_BLOB = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")


class Tally:
    """What the gate served since the driver last asked. ``who`` is ``swarm`` for swarmfly's
    own requests (aiohttp's User-Agent) and ``client`` for skopeo's, direct or passed through
    a mirror. ``log`` has one row per request, its times in seconds since the last ask:
    ``[start, end, method, who, blob digest or path, status, Range, body bytes]``."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = defaultdict(int)
        self.body_bytes = 0
        self.blobs: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.log: list[list[Any]] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def take(self) -> dict[str, Any]:
        """The tally so far; counting starts again from zero."""
        snapshot = {
            "requests": dict(self.requests),
            "body_bytes": self.body_bytes,
            "blobs": {d: dict(v) for d, v in self.blobs.items()},
            "log": self.log,
        }
        self.requests.clear()
        self.body_bytes = 0
        self.blobs.clear()
        self.log = []
        self.t0 = time.monotonic()
        return snapshot


async def serve_gate(upstream: str, rate: int) -> None:
    import aiohttp
    from aiohttp import web

    from swarmfly.ratelimit import TokenBucket

    bucket = TokenBucket(rate)
    tally = Tally()
    session = aiohttp.ClientSession(
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        connector=aiohttp.TCPConnector(limit=0),
    )

    async def handle(request: web.Request) -> web.StreamResponse:
        who = "swarm" if "aiohttp" in request.headers.get("User-Agent", "") else "client"
        tally.requests[f"{request.method} {who}"] += 1
        blob = _BLOB.match(request.path)
        row = [tally.now(), None, request.method, who, blob[1][7:19] if blob else request.path,
               None, request.headers.get("Range"), 0]  # fmt: skip
        tally.log.append(row)
        try:
            return await forward(request, who, blob[1] if blob else None, row)
        finally:
            row[1] = tally.now()

    async def forward(
        request: web.Request, who: str, blob: str | None, row: list[Any]
    ) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as answer:
            row[5] = answer.status
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for key, value in answer.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, value)
            length = answer.headers.get("Content-Length", "")
            if length.isdigit():
                response.content_length = int(length)
            await response.prepare(request)
            if request.method == "HEAD":
                await response.write_eof()
                return response
            counts = None
            if blob and request.method == "GET" and answer.status in (200, 206):
                counts = tally.blobs[blob]
                counts[f"gets_{who}"] += 1
            try:
                async for chunk in answer.content.iter_chunked(CHUNK):
                    await bucket.take(len(chunk))
                    await response.write(chunk)
                    tally.body_bytes += len(chunk)
                    row[7] += len(chunk)
                    if counts is not None:
                        counts[f"bytes_{who}"] += len(chunk)
            except (ConnectionError, aiohttp.ClientError):
                tally.requests["broken"] += 1
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[-1][1]}", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            print(json.dumps(tally.take()), flush=True)
    finally:
        await session.close()
        await runner.cleanup()


def gate_main(spec: str) -> int:
    params = json.loads(spec)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_gate(params["upstream"], params["rate"]))
    return 0


class Lines(threading.Thread):
    """A child's stdout as a queue of lines, so the driver can wait with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def next(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the child did not answer") from None
        if not line:
            raise RuntimeError("the child exited")
        return line


class GateProcess:
    """The gate in its own process, so its pacing shares no GIL with the driver."""

    def __init__(self, reaper: Reaper, upstream: str, rate: int) -> None:
        spec = json.dumps({"upstream": upstream, "rate": rate})
        self.proc = reaper.add(
            subprocess.Popen(
                [PY, str(Path(__file__).resolve()), "--gate", spec],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
        self.lines = Lines(self.proc)
        self.url = self.lines.next(START_TIMEOUT).strip()
        if not self.url.startswith("http://"):
            raise RuntimeError(f"the gate did not start: {self.url!r}")
        self.host = self.url.removeprefix("http://")

    def take(self) -> dict[str, Any]:
        """What the gate served since the last take."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("take\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.lines.next(10.0)))


# -- the image ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """An OCI image layout on disk: what was pushed, and what every pull must equal."""

    layout: Path
    manifest_digest: str
    blobs: dict[str, Path]
    """Config and layers (not the manifest), by digest."""

    @property
    def size(self) -> int:
        return sum(path.stat().st_size for path in self.blobs.values())

    @property
    def layers(self) -> int:
        return len(self.blobs) - 1


class _Random(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        buffer[:size] = os.urandom(size)
        return size


def layer_sizes(total: int, layers: int) -> list[int]:
    """Unequal sizes that add up to ``total``, none a round number of MiB (so no layer is a
    whole number of pieces)."""
    weights = [2 * layers - i for i in range(layers)]
    odd = 4097 if total >= layers * MiB else 0
    sizes = [total * w // sum(weights) + odd * i for i, w in enumerate(weights)]
    sizes[0] += total - sum(sizes)
    return sizes


def build_image(path: Path, total: int, layers: int) -> Image:
    """Gzipped tar layers of random bytes (level 0: random data does not shrink), a config
    and a manifest, as an OCI layout tagged ``TAG``."""
    store = path / "blobs" / "sha256"
    store.mkdir(parents=True)
    blobs: dict[str, Path] = {}
    descriptors, diff_ids = [], []

    def put(source: Path) -> str:
        digest = f"sha256:{sha256_file(source)}"
        target = store / digest.removeprefix("sha256:")
        source.rename(target)
        blobs[digest] = target
        return digest

    for number, size in enumerate(layer_sizes(total, layers)):
        raw, packed = path / "layer.tar", path / "layer.tar.gz"
        with tarfile.open(raw, "w") as tar:
            info = tarfile.TarInfo(f"data/layer{number}.bin")
            info.size = size
            tar.addfile(info, io.BufferedReader(_Random()))
        diff_ids.append(f"sha256:{sha256_file(raw)}")
        with (
            open(raw, "rb") as source,
            open(packed, "wb") as sink,
            gzip.GzipFile(filename="", fileobj=sink, mode="wb", compresslevel=0, mtime=0) as gz,
        ):
            shutil.copyfileobj(source, gz, 4 * MiB)
        raw.unlink()
        size_gz = packed.stat().st_size
        descriptors.append({"mediaType": OCI_LAYER, "digest": put(packed), "size": size_gz})
    config = path / "config.json"
    config.write_text(
        json.dumps(
            {"architecture": "amd64", "os": "linux",
             "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        )
    )  # fmt: skip
    config_size = config.stat().st_size
    config_descriptor = {"mediaType": OCI_CONFIG, "digest": put(config), "size": config_size}
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor,
         "layers": descriptors}
    ).encode()  # fmt: skip
    manifest_digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
    (store / manifest_digest.removeprefix("sha256:")).write_bytes(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": manifest_digest,
        "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": TAG},
    }
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return Image(path, manifest_digest, blobs)


def verify(out: Path, image: Image) -> str | None:
    """None when ``dir:out`` holds the pushed manifest and every blob byte for byte."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return f"{out.name}: no manifest.json"
    if f"sha256:{sha256_file(manifest)}" != image.manifest_digest:
        return f"{out.name}: the manifest differs from the pushed one"
    for digest, pushed in image.blobs.items():
        pulled = out / digest.removeprefix("sha256:")
        if not pulled.is_file():
            return f"{out.name}: blob {digest[:19]} is missing"
        if not filecmp.cmp(pulled, pushed, shallow=False):
            return f"{out.name}: blob {digest[:19]} differs from the pushed one"
    return None


# -- the registry ------------------------------------------------------------------------


def skopeo(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start_registry(reaper: Reaper, root: Path, auth: bool) -> str:
    """``docker-registry serve`` on a free port (three tries: another process may take the
    port between our probe and its bind); returns its ``host:port`` once /v2/ answers."""
    root.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {}
    if auth:
        line = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, check=True, timeout=30
        ).stdout
        (root / "htpasswd").write_bytes(line)
        settings = {"htpasswd": {"realm": "swarmfly-bench", "path": str(root / "htpasswd")}}
    log_path = root / "registry.log"
    for _ in range(3):
        port = free_port()
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
            "auth": settings,
        }
        if not auth:
            del config["auth"]
        (root / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        with open(log_path, "ab") as log:
            proc = reaper.add(
                subprocess.Popen(
                    ["docker-registry", "serve", str(root / "config.yml")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(f"http://127.0.0.1:{port}/v2/"):
                return f"127.0.0.1:{port}"
            time.sleep(0.1)
        reaper.stop(proc)
        if "address already in use" not in log_path.read_text(errors="replace"):
            break
    raise RuntimeError(f"docker-registry did not start; see {log_path}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


def push(image: Image, registry: str, auth: bool) -> None:
    """The layout to the registry itself (not through the gate: setting up is not timed)."""
    creds = ["--dest-creds", f"{USER}:{PASSWORD}"] if auth else []
    done = skopeo(
        "copy", "--dest-tls-verify=false", *creds,
        f"oci:{image.layout}:{TAG}", f"docker://{registry}/{NAME}:{TAG}",
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"skopeo could not push the image: {done.stderr.strip()[-800:]}")


# -- the swarm ---------------------------------------------------------------------------


def start_swarm(
    reaper: Reaper, nats: NatsServer, root: Path, hosts: int, registry_url: str,
    env: dict[str, str],
) -> Cluster:  # fmt: skip
    """Scheduler, storage and ``hosts`` peers, each with its proxy, on fresh state dirs."""
    prefix = f"bench{uuid.uuid4().hex[:10]}"

    def spawn(kind: str, folder: Path, *args: str) -> ServiceProcess:
        service = spawn_service(
            kind, nats.url, folder, "--prefix", prefix, *args, env=env, timeout=60
        )
        reaper.add(service.process)
        return service

    scheduler = spawn("scheduler", root / "scheduler")
    storage = spawn("storage", root / "storage", "--listen", "127.0.0.1")
    dirs = [root / f"host{i}" for i in range(hosts)]
    cluster = Cluster(nats.url, prefix, root, scheduler, storage, peer_dirs=dirs)
    peer_args = ["--listen", "127.0.0.1", "--proxy-port", "0", "--registry", registry_url]
    try:
        cluster.peers = start_peers(spawn, dirs, peer_args)
    except Exception:
        stop_cluster(reaper, cluster)
        raise
    missing = [p.banner for p in cluster.peers if not p.proxy_url]
    if missing:
        stop_cluster(reaper, cluster)
        raise RuntimeError(f"a peer printed no proxy address: {missing}")
    return cluster


# -- one side of a run -------------------------------------------------------------------


def pull_command(folder: Path, gate: str, mirror: str | None, auth: bool) -> list[str]:
    """``skopeo copy`` of the image from the gate into ``folder/out``, through ``mirror``
    when given, configured as a user would: a registries.conf and an auth file."""
    conf = f'[[registry]]\nlocation = "{gate}"\ninsecure = true\n'
    if mirror:
        conf += f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    (folder / "registries.conf").write_text(conf)
    command = ["skopeo", "--registries-conf", str(folder / "registries.conf"), "copy"]
    command += ["--src-tls-verify=false"]
    if auth:
        secret = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        hosts = [gate, *([mirror] if mirror else [])]
        (folder / "auth.json").write_text(
            json.dumps({"auths": {h: {"auth": secret} for h in hosts}})
        )
        command += ["--src-authfile", str(folder / "auth.json")]
    return [*command, f"docker://{gate}/{NAME}:{TAG}", f"dir:{folder / 'out'}"]


def one_pull(command: list[str], t0: float, timeout: float, reaper: Reaper) -> dict[str, Any]:
    proc = reaper.add(
        subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    )
    try:
        _, stderr = proc.communicate(timeout=max(1.0, t0 + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        reaper.stop(proc)
        return {"ok": False, "error": "timeout", "done_s": None}
    done = round(time.monotonic() - t0, 3)
    if proc.returncode != 0:
        return {"ok": False, "error": stderr.strip()[-500:], "done_s": done}
    return {"ok": True, "done_s": done}


def pull_all(
    commands: list[list[str]], timeout: float, reaper: Reaper
) -> tuple[list[dict[str, Any]], float]:
    """Start every pull at once; each one's completion counts from that common start."""
    t0 = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=len(commands))
    try:
        futures = [pool.submit(one_pull, c, t0, timeout, reaper) for c in commands]
        rows = [future.result() for future in futures]
    except BaseException:
        reaper.stop_all()  # ends the pulls, so their threads return at once
        raise
    finally:
        pool.shutdown(wait=True)
    return rows, time.monotonic() - t0


def registry_reads(served: dict[str, Any], image: Image) -> dict[str, Any]:
    """The gate's tally of one side, reduced to what the tables show."""
    blobs = served["blobs"]
    by = {who: sum(b.get(f"bytes_{who}", 0) for b in blobs.values()) for who in ("client", "swarm")}
    reads = {
        digest[:19]: {
            "size": path.stat().st_size,
            **{k: v for k, v in blobs.get(digest, {}).items() if v},
        }
        for digest, path in image.blobs.items()
    }
    return {
        "registry_bytes": by["client"] + by["swarm"],
        "registry_bytes_by": by,
        "registry_body_bytes": served["body_bytes"],
        "registry_requests": served["requests"],
        "blob_reads": reads,
        "registry_log": served["log"],
    }


def measure(
    side: str, run_dir: Path, args: argparse.Namespace, image: Image, gate: GateProcess,
    nats: NatsServer, reaper: Reaper, out: Out,
) -> dict[str, Any]:  # fmt: skip
    folder = run_dir / side
    folders = [folder / f"pull{i}" for i in range(args.hosts)]
    for f in folders:
        f.mkdir(parents=True)
    auth = not args.no_auth
    cluster: Cluster | None = None
    result: dict[str, Any] = {}
    try:
        if side == "mirror":
            cluster = start_swarm(reaper, nats, folder / "swarm", args.hosts, gate.url, args.env)
            time.sleep(1.0)  # let start-up CPU (imports, first heartbeats) settle
            mirrors: list[str | None] = [p.proxy_url.removeprefix("http://") for p in cluster.peers]
        else:
            mirrors = [None] * args.hosts
        commands = [
            pull_command(f, gate.host, m, auth) for f, m in zip(folders, mirrors, strict=True)
        ]
        gate.take()  # start from zero
        busy0, child0, gate0 = machine_cpu(), children_cpu(), cpu_seconds(gate.proc.pid)
        swarm0 = cluster.cpu() if cluster is not None else {}
        out.progress(f"{side}: {args.hosts} pulls start now")
        rows, wall = pull_all(commands, args.timeout, reaper)
        busy1, child1, gate1 = machine_cpu(), children_cpu(), cpu_seconds(gate.proc.pid)
        swarm1 = cluster.cpu() if cluster is not None else {}
        result["cpu_seconds"] = {
            "skopeo": round(child1 - child0, 2),
            "gate": round(gate1 - gate0, 2),
            **{kind: round(swarm1[kind] - swarm0[kind], 2) for kind in swarm0},
        }
        if cluster is not None:
            seed = cluster.metrics(cluster.storage)
            result["seed_upload_bytes"] = int(seed.get("swarmfly_peer_upload_bytes", 0))
            result["peer_upload_bytes"] = int(
                sum(cluster.metrics(p).get("swarmfly_peer_upload_bytes", 0) for p in cluster.peers)
            )
    finally:
        stop_cluster(reaper, cluster)
    if cluster is not None:
        result["swarm_log"] = cluster.log_counts(LOG_PATTERNS)
    served = gate.take()  # after the swarm stopped: whatever it read late counts too
    for row, f in zip(rows, folders, strict=True):
        if row["ok"] and (error := verify(f / "out", image)):
            row.update(ok=False, error=error)
        if not args.keep:
            shutil.rmtree(f / "out", ignore_errors=True)
    ok = all(row["ok"] for row in rows)
    cpu_total = busy1[1] - busy0[1]
    result.update(
        ok=ok,
        seconds=round(wall, 3) if ok else None,
        pulls=rows,
        cpu_busy=round((busy1[0] - busy0[0]) / cpu_total, 3) if cpu_total else None,
        **registry_reads(served, image),
    )
    return result


def one_run(
    run: int, args: argparse.Namespace, root: Path, image: Image, gate: GateProcess,
    nats: NatsServer, reaper: Reaper, out: Out,
) -> dict[str, Any]:  # fmt: skip
    order = ["direct", "mirror"] if run % 2 == 1 else ["mirror", "direct"]
    sides: dict[str, dict[str, Any]] = {}
    for side in order:
        os.sync()  # the previous side's dirty pages are not this one's to write
        out.progress(f"run {run}: {side}")
        sides[side] = measure(side, root / f"run{run}", args, image, gate, nats, reaper, out)
    d, m = sides["direct"], sides["mirror"]
    ok = d["ok"] and m["ok"]
    return {
        "run": run,
        "ok": ok,
        "order": order,
        "errors": [
            f"{side} pull {i}: {row['error']}"
            for side in order
            for i, row in enumerate(sides[side]["pulls"])
            if not row["ok"]
        ],
        "direct_s": d["seconds"],
        "mirror_s": m["seconds"],
        "direct_registry_bytes": d["registry_bytes"],
        "mirror_registry_bytes": m["registry_bytes"],
        "time_ratio": round(m["seconds"] / d["seconds"], 3) if ok else None,
        "bytes_ratio": round(m["registry_bytes"] / d["registry_bytes"], 4)
        if ok and d["registry_bytes"]
        else None,
        "direct": d,
        "mirror": m,
    }


# -- the report --------------------------------------------------------------------------


def report(
    args: argparse.Namespace, image: Image, runs: list[dict[str, Any]], out: Out
) -> dict[str, Any]:
    good = [r for r in runs if r["ok"]]
    size, rate = image.size, args.registry_rate

    def med(key: str, digits: int = 4) -> float | None:
        values = [r[key] for r in good if r[key] is not None]
        return round(v, digits) if (v := median(values)) is not None else None

    keys = ("direct_s", "mirror_s", "direct_registry_bytes", "mirror_registry_bytes",
            "time_ratio", "bytes_ratio")  # fmt: skip
    summary: dict[str, Any] = {
        "benchmark": "pull",
        "ok": len(good) == len(runs),
        "hosts": args.hosts,
        "layers": image.layers,
        "image_bytes": size,
        "registry_rate": rate,
        "auth": not args.no_auth,
        "env": args.env,
        "runs_requested": args.runs,
        "bound_direct_s": round(args.hosts * size / rate, 3) if rate else None,
        "bound_mirror_s": round(size / rate, 3) if rate else None,
        "direct_s": med("direct_s"),
        "mirror_s": med("mirror_s"),
        "direct_registry_bytes": med("direct_registry_bytes", 0),
        "mirror_registry_bytes": med("mirror_registry_bytes", 0),
        "time_ratio": med("time_ratio"),
        "bytes_ratio": med("bytes_ratio"),
        "per_run": {key: [r[key] for r in runs] for key in keys},
        "runs": runs,
    }
    rate_text = f"{human(rate)}/s" if rate else "unlimited"
    out.say()
    out.say(
        f"pull: {args.hosts} hosts, one image of {image.layers} layers, {human(size)} of blobs; "
        f"registry egress {rate_text}{'' if args.no_auth else ', htpasswd'}"
    )
    if rate:
        out.say(
            f"registry-bound: direct {summary['bound_direct_s']}s ({args.hosts} x image), "
            f"mirror {summary['bound_mirror_s']}s (1 x image)"
        )
    if args.env:
        out.say(f"service environment: {args.env}")
    rows = [
        [
            r["run"], "yes" if r["ok"] else "NO", r["order"][0],
            r["direct_s"], r["mirror_s"], r["time_ratio"],
            round(r["direct_registry_bytes"] / size, 3),
            round(r["mirror_registry_bytes"] / size, 3), r["bytes_ratio"],
            round(r["mirror"]["registry_bytes_by"]["client"] / size, 3),
            round(r["mirror"].get("seed_upload_bytes", 0) / size, 2),
            round(r["mirror"].get("peer_upload_bytes", 0) / size, 2),
            r["direct"]["cpu_busy"], r["mirror"]["cpu_busy"],
        ]
        for r in runs
    ]  # fmt: skip
    out.say(
        table(
            ["run", "ok", "first", "direct_s", "mirror_s", "time_ratio", "direct_reg/I",
             "mirror_reg/I", "bytes_ratio", "mirror_bypass/I", "seed_up/I", "peers_up/I",
             "busy_d", "busy_m"],
            rows,
        )
    )  # fmt: skip
    out.say(
        f"median: direct_s {summary['direct_s']}, mirror_s {summary['mirror_s']}, "
        f"time_ratio {summary['time_ratio']}, bytes_ratio {summary['bytes_ratio']} "
        f"(1/{args.hosts} = {1 / args.hosts:.3f} is the registry read once)"
    )
    for r in runs:
        for error in r["errors"]:
            out.say(f"run {r['run']}: {error}")
        reads = r["mirror"]["blob_reads"]
        over = [d for d, v in reads.items() if _read_bytes(v) > v["size"] + 1]
        if over:
            text = ", ".join(f"{d} {_read_bytes(reads[d]) / reads[d]['size']:.2f}x" for d in over)
            out.say(f"run {r['run']}: the mirror side read blobs more than once: {text}")
    return summary


def _read_bytes(counts: dict[str, int]) -> int:
    return counts.get("bytes_client", 0) + counts.get("bytes_swarm", 0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gate:
        return gate_main(args.gate)
    out = Out(args.json)
    for tool in ("skopeo", "docker-registry", *([] if args.no_auth else ["htpasswd"])):
        if shutil.which(tool) is None:
            print(f"pull.py: {tool} is not installed", file=sys.stderr)
            return 2
    reaper = Reaper()
    runs: list[dict[str, Any]] = []
    try:
        with workspace("pull", args.keep, out) as root, cleanup(reaper):
            total = int(args.image_mib * MiB)
            out.progress(f"building an image of {args.layers} layers, {human(total)}")
            image = build_image(root / "layout", total, args.layers)
            registry = start_registry(reaper, root / "registry", not args.no_auth)
            push(image, registry, not args.no_auth)
            gate = GateProcess(reaper, f"http://{registry}", args.registry_rate)
            nats = NatsServer(root / "nats").start()
            assert nats.process is not None
            reaper.add(nats.process)
            out.progress(f"registry {registry}, gate {gate.url}, nats {nats.url}")
            for run in range(1, args.runs + 1):
                result = one_run(run, args, root, image, gate, nats, reaper, out)
                runs.append(result)
                out.progress(
                    f"run {run}: ok={result['ok']} direct_s={result['direct_s']} "
                    f"mirror_s={result['mirror_s']} time_ratio={result['time_ratio']} "
                    f"bytes_ratio={result['bytes_ratio']}"
                )
            nats.stop()
            summary = report(args, image, runs, out)
            if args.keep:
                summary["dir"] = str(root)
    except KeyboardInterrupt:
        out.progress("interrupted")
        return 130
    out.result(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
