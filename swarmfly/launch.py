"""The composition root: services launched from one Config, each alone against a NATS
(`swarmfly scheduler|storage|peer`), or all of them with an embedded nats-server
(`swarmfly up`); the only module that knows every service's constructor."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import platform
import signal
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from swarmfly import apitoken, contracts, httpserver, lifecycle, telemetry
from swarmfly.bus import Bus
from swarmfly.cluster import connect, servers_of
from swarmfly.config import Config, NatsConfig, nats_client_options
from swarmfly.credentials import (
    Identity,
    ensure_identities,
    write_cluster_record,
    write_server_config,
)
from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import Limits
from swarmfly.natsserver import NatsServer
from swarmfly.origins import OriginPolicy
from swarmfly.pluginhost import Plugins
from swarmfly.services.peer.host import HostSettings, PeerHost
from swarmfly.services.peer.store import private_dir

if TYPE_CHECKING:  # each process imports only the services it runs (below, where it starts them)
    from swarmfly.services.peer.service import PeerService
    from swarmfly.services.proxy.service import ProxyService
    from swarmfly.services.scheduler.service import SchedulerService
    from swarmfly.services.storage.service import StorageService

log = logging.getLogger(__name__)

SERVER_CHECK = 0.5
"""Seconds between `swarmfly up`'s looks at whether its nats-server still runs."""


def http_limits(config: Config) -> Limits:
    h = config.http
    return Limits(h.header_timeout, h.idle_timeout, h.max_connections, h.max_per_address)


def _bound(stack: AsyncExitStack, config: Config) -> None:
    """The ``[http]`` bounds for every server this process starts, until ``stack`` closes."""
    stack.callback(httpserver.use_limits(http_limits(config)))


def load_plugins(config: Config) -> Plugins:
    """Once per process: every service in it shares the loaded plugins (and ``[origins]``)."""
    origins = OriginPolicy(config.origins.allow, config.origins.deny)
    return Plugins.load(config.disable_plugins, origins=origins, settings=config.plugins)


async def start_scheduler(
    stack: AsyncExitStack, config: Config, bus: Bus, plugins: Plugins | None = None
) -> SchedulerService:
    from swarmfly.services.scheduler.service import SchedulerService

    _bound(stack, config)
    plugins = plugins or load_plugins(config)
    service = SchedulerService(config, bus, plugins.evaluator(config.scheduler.evaluator))
    await service.start(stack)
    if config.callout.issuer_seed:
        from swarmfly import callout  # PyJWT and cryptography: 8 MiB no other service needs

        await callout.serve(bus, callout.callout_for(config))
    return service


async def start_storage(
    stack: AsyncExitStack,
    config: Config,
    bus: Bus,
    state_dir: Path,
    servers: list[str],
    plugins: Plugins | None = None,
) -> StorageService:
    from swarmfly.services.storage.service import StorageService

    node = _host(stack, config, bus, "storage", state_dir, servers, plugins)
    service = StorageService(
        node,
        bus,
        copies=config.storage.copies,
        hand_over_seconds=config.storage.handover_timeout,
        hand_over_concurrency=config.storage.handover_concurrency,
    )
    await service.start(stack)
    return service


async def start_peer(
    stack: AsyncExitStack,
    config: Config,
    bus: Bus,
    state_dir: Path,
    servers: list[str],
    plugins: Plugins | None = None,
) -> PeerService:
    from swarmfly.services.peer.service import PeerService

    node = _host(stack, config, bus, "peer", state_dir, servers, plugins)
    service = PeerService(
        node,
        bus,
        default_strategy=config.peer.strategy,
        output_roots=config.peer.output_roots,
        socket=config.peer.socket,
        socket_group=config.peer.socket_group,
    )
    await service.start(stack)
    return service


async def start_proxy(stack: AsyncExitStack, config: Config, node: PeerHost) -> ProxyService:
    """The registry mirror and HTTP proxy in front of ``node`` (in its process, as
    Dragonfly's dfdaemon runs its proxy: blobs stream straight from the node's store)."""
    from swarmfly.services.proxy.service import ProxyService

    proxy = ProxyService(node, config.proxy, http_limits(config))
    await proxy.start(stack)
    return proxy


def _host(
    stack: AsyncExitStack,
    config: Config,
    bus: Bus,
    kind: Literal["peer", "storage"],
    state_dir: Path,
    servers: list[str],
    plugins: Plugins | None,
) -> PeerHost:
    """A peer or storage host on its state dir, with the process's plugins (or its own)."""
    _bound(stack, config)
    # Private from the start: the store would tighten a new one, saying so in the log of
    # every fresh start.
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings = HostSettings.of(config, kind, state_dir)
    return PeerHost(settings, bus, servers, plugins or _owned_plugins(stack, config))


def _owned_plugins(stack: AsyncExitStack, config: Config) -> Plugins:
    plugins = load_plugins(config)
    stack.push_async_callback(plugins.close)
    return plugins


def _open_files() -> None:
    """Raise the open-file limit, as servers do at start: a connection is a file; and bound
    glibc's malloc arenas, before the first worker thread."""
    soft, hard = httpserver.raise_open_files()
    log.debug("open files: %s of %s", soft, hard)
    _bound_malloc_arenas()


M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter (malloc.h)."""


def _bound_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates an arena of its own (up to eight per core),
    and what piece writes and hashes free in a worker thread stays in its arena: some 20 MiB
    more resident per service while data moves. Two arenas, as the ``MALLOC_ARENA_MAX=2``
    many Python servers run with; nothing where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError) as exc:
        log.debug("malloc arenas left unbounded: %s", exc)


def stop_on_signals() -> asyncio.Event:
    """Set on SIGINT/SIGTERM; installed before a service announces itself, so a signal
    right after the banner still means a clean stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _until_stopped(stop: asyncio.Event, server: NatsServer) -> int | None:
    """Wait for a signal, or for the embedded nats-server to exit: without it every service
    only retries its connection (a warning each time, forever) and every get times out, so
    `up` ends saying why instead. Its exit status when it did, None on a signal."""
    while not stop.is_set():
        if server.process is not None and (status := server.process.poll()) is not None:
            return status
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SERVER_CHECK)
    return None


async def run_service(kind: str, config: Config) -> None:
    """`swarmfly scheduler|storage|peer`: one service against an existing NATS."""
    _open_files()
    contracts.warm()  # at start, not in the first download
    stop = stop_on_signals()
    async with AsyncExitStack() as stack:
        if shutdown := telemetry.setup(kind, config.tracing):
            stack.callback(shutdown)
        servers = servers_of(config)
        if kind != "scheduler" and config.nats.inbox_prefix:  # per host, under a callout
            host = HostSettings.of(
                config, "storage" if kind == "storage" else "peer", config.state_dir
            )
            host_id = host.host_id
            config.nats.inbox_prefix = config.nats.inbox_prefix.replace("{host_id}", host_id)
        bus = await connect(config, f"swarmfly-{kind}", servers)
        stack.push_async_callback(bus.close)
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as start_host's
        services: list[lifecycle.Service] = []
        if kind == "scheduler":
            scheduler = await start_scheduler(stack, config, bus)
            services.append(scheduler)
            print(f"scheduler on NATS {', '.join(servers)}; http {scheduler.http_url}", flush=True)
        elif kind == "storage":
            storage = await start_storage(stack, config, bus, config.state_dir, servers)
            services.append(storage)
            print(f"storage {storage.node.settings.host_id}: {storage.node.upload_url}", flush=True)
        else:
            peer = await start_peer(stack, config, bus, config.state_dir, servers)
            services.append(peer)
            line = f"peer {peer.node.settings.host_id}: {peer.node.upload_url}"
            if config.proxy.enabled:
                proxy = await start_proxy(stack, config, peer.node)
                services.append(proxy)
                line += f"; proxy {proxy.url}"
            print(line, flush=True)
        await stop.wait()
        await lifecycle.drain(services)  # before anything winds down (swarmfly.lifecycle)


def containerd_hint(proxy_url: str) -> list[str]:
    """How to point containerd at this proxy (docs/runtimes.md has the other runtimes)."""
    return [
        "pull images through the swarm with containerd: in"
        ' /etc/containerd/certs.d/_default/hosts.toml (config_path = "/etc/containerd/certs.d";'
        " docs/runtimes.md has CRI-O, Docker and k3s)",
        f'  [host."{proxy_url}"]',
        '    capabilities = ["pull", "resolve"]',
    ]


async def connect_as(config: Config, identity: Identity, servers: list[str]) -> Bus:
    """A connection with ``identity``'s NKey and inbox prefix, whatever ``[nats]`` says about
    authenticating: the embedded server knows only the identities it was started with."""
    settings = NatsConfig(
        prefix=config.nats.prefix,
        nkeys_seed=str(identity.seed_file),
        inbox_prefix=identity.inbox_prefix,
    )
    return await Bus.connect(
        servers,
        prefix=config.nats.prefix,
        name=f"swarmfly-{identity.role}",
        options=nats_client_options(settings),
    )


async def run_up(config: Config, nats_port: int = 0) -> None:
    """`swarmfly up`: an embedded nats-server with JetStream and every service in one process,
    each service on its own role's credentials (swarmfly.credentials)."""
    state = config.state_dir
    private_dir(state)
    _open_files()
    contracts.warm()  # at start, not in the first download
    stop = stop_on_signals()
    async with AsyncExitStack() as stack:
        if shutdown := telemetry.setup("up", config.tracing):
            stack.callback(shutdown)
        identities = ensure_identities(state)
        hosts = {
            "storage": HostSettings.of(config, "storage", state / "storage").host_id,
            "peer": HostSettings.of(config, "peer", state).host_id,
        }
        hosts["client"] = hosts["peer"]  # the CLI asks this host's peer only
        auth = write_server_config(state / "nats", identities, config.nats.prefix, hosts)
        server = NatsServer(state / "nats", port=nats_port, config_file=auth).start()
        stack.push_async_callback(server.astop)
        servers = [server.url]
        cluster_file = write_cluster_record(state, servers, identities["client"])
        stack.callback(lambda: cluster_file.unlink(missing_ok=True))
        buses = []
        for name in ("scheduler", "storage", "peer"):
            bus = await connect_as(config, identities[name], servers)
            stack.push_async_callback(bus.close)
            buses.append(bus)
        plugins = _owned_plugins(stack, config)
        scheduler = await start_scheduler(stack, config, buses[0], plugins)
        storage = await start_storage(stack, config, buses[1], state / "storage", servers, plugins)
        peer = await start_peer(stack, config, buses[2], state, servers, plugins)
        proxy = await start_proxy(stack, config, peer.node) if config.proxy.enabled else None
        print(
            "\n".join(
                [
                    "swarmfly is up",
                    f"  nats       {server.url}  (JetStream, data in {state / 'nats'};"
                    f" per-role credentials in {state / 'credentials'})",
                    f"  scheduler  {scheduler.http_url}  (metrics {scheduler.http_url}/metrics;"
                    f" dashboard and /api/state with the token in"
                    f" {config.scheduler.api_token_file or state / apitoken.FILE}:"
                    f" open {scheduler.http_url}/?token=… once)",
                    f"  storage    {storage.node.upload_url}  ({storage.node.settings.host_id})",
                    f"  peer       {peer.node.upload_url}  ({peer.node.settings.host_id},"
                    f" metrics {peer.node.upload_url}/metrics)",
                    *(
                        [
                            f"  proxy      {proxy.url}  (registry mirror and HTTP proxy,"
                            f" metrics {proxy.url}/metrics)"
                        ]
                        if proxy
                        else []
                    ),
                    f"  state dir  {state}",
                    "",
                    "download through the swarm:  swarmfly get URL -O PATH",
                    *(containerd_hint(proxy.url) if proxy else []),
                    "stop with Ctrl-C",
                ]
            ),
            flush=True,
        )
        exited = await _until_stopped(stop, server)
        await lifecycle.drain([scheduler, storage, peer, *([proxy] if proxy else [])])
    if exited is not None:
        raise SwarmflyError(
            "unavailable",
            f"the embedded nats-server exited (status {exited}), so no service could reach"
            " another: swarmfly up stopped; run it again",
        )
