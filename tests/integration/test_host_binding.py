"""A member cannot speak for another host (DESIGN §9, issue #13 item 6).

Every host has its own NKey identity, with the per-host permissions `python -m
swarmfly.credentials` writes (what compose ships), on a real nats-server; the scheduler,
storage and peer run on their own identities. An attacker peer with a valid identity of its
own tries to rewrite the seed's address, to pass for a storage host, to make the seed and
the peer leave, and to speak for the peer's peer on a task. Each attempt is refused — by
nats-server where the subject is another host's, by the scheduler where only the body lies —
and the legitimate download still goes through the seed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.micro.request import ERROR_CODE_HEADER

from swarmfly import contracts
from swarmfly.bus import Bus
from swarmfly.config import Config, NatsConfig, nats_client_options
from swarmfly.contracts import Sender, messages
from swarmfly.credentials import inbox_prefix
from swarmfly.credentials import main as write_credentials
from swarmfly.get import GetRequest
from swarmfly.ids import peer_id
from swarmfly.launch import start_peer, start_scheduler, start_storage
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.testing import Origin, nats_server
from tests.integration.test_nats_permissions import Connection

SEED, PEER, EVIL = "bind-seed", "bind-peer", "bind-evil"
IDENTITIES = {
    "scheduler": "scheduler",
    "storage": f"storage:{SEED}",
    "peer": f"peer:{PEER}",
    "evil": f"peer:{EVIL}",
    "client": f"client:{PEER}",
}
"""Who gets an identity, as ROLE[:HOST_ID]: the attacker is an ordinary peer host."""


@dataclass
class Cluster:
    server: NatsServer
    seeds: dict[str, Path]

    def options(self, who: str) -> dict[str, Any]:
        role, _, host = IDENTITIES[who].partition(":")
        inbox = f"{inbox_prefix(role)}_{host}" if host else inbox_prefix(role)
        settings = NatsConfig(nkeys_seed=str(self.seeds[who]), inbox_prefix=inbox)
        return nats_client_options(settings)


@contextmanager
def per_host_nats(folder: Path, prefix: str) -> Iterator[Cluster]:
    seeds = {who: folder / "keys" / f"{who}.nk" for who in IDENTITIES}
    config = folder / "nats" / "auth.conf"
    specs = [f"{spec}={seeds[who]}" for who, spec in IDENTITIES.items()]
    assert write_credentials(["--prefix", prefix, "--server-config", str(config), *specs]) == 0
    with nats_server(folder / "nats", config_file=config) as server:
        yield Cluster(server, seeds)


class Attacker:
    """A raw connection on the attacker's own credentials, keeping what the server refuses."""

    def __init__(self, nc: Client, errors: list[Exception], prefix: str) -> None:
        self.nc, self.errors, self.prefix = nc, errors, prefix

    def subject(self, name: str, sender: Sender, task_id: str | None = None) -> str:
        tokens = {"sender": sender.token}
        if "partition" in contracts.get(name).tokens:
            tokens["partition"] = str(partition_of(task_id or "", DEFAULT_PARTITIONS))
        return contracts.get(name).subject(self.prefix, **tokens)

    async def refused_by_nats(self, name: str, body: dict[str, Any], as_host: Sender) -> bool:
        """Publish under another host's subject: nats-server must answer a violation."""
        subject = self.subject(name, as_host, body.get("task_id"))
        await self.nc.publish(subject, orjson.dumps(body))
        return await Connection(self.nc, self.errors).refused("publish", subject)

    async def answer(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Ask under its own subject (what its permissions allow): the scheduler's error."""
        subject = self.subject(name, Sender("normal", EVIL), body.get("task_id"))
        msg = await self.nc.request(subject, orjson.dumps(body), timeout=5)
        assert msg.headers and msg.headers.get(ERROR_CODE_HEADER) == "403", msg.data[:300]
        error: dict[str, Any] = orjson.loads(msg.data)["error"]
        return error


async def hosts_known(core: Any, host_ids: set[str]) -> None:
    """Hosts heartbeat within a second of starting: wait (bounded) until all are known."""
    for _ in range(100):
        if host_ids <= set(core.hosts):
            return
        await asyncio.sleep(0.05)
    assert host_ids <= set(core.hosts)


def host(host_id: str, host_type: str, port: int) -> dict[str, Any]:
    return {"id": host_id, "ip": "127.0.0.1", "port": port, "type": host_type}


async def test_a_member_cannot_speak_for_another_host(
    tmp_path: Path, prefix: str, origin: Origin
) -> None:
    data = os.urandom(3 * 2**20 + 5)
    url = origin.add("bound.bin", data)
    task_id = "f" * 64
    outputs = tmp_path / "out"
    outputs.mkdir()
    with per_host_nats(tmp_path / "auth", prefix) as cluster:
        config = Config(
            state_dir=tmp_path / "state",
            nats=NatsConfig(servers=[cluster.server.url], prefix=prefix),
        )
        config.peer.host_id, config.storage.host_id = PEER, SEED
        config.peer.listen = config.storage.listen = "127.0.0.1"
        config.peer.output_roots = [str(outputs)]
        servers = [cluster.server.url]
        async with AsyncExitStack() as stack:

            async def bus(who: str) -> Bus:
                connected = await Bus.connect(
                    servers, prefix=prefix, name=f"bind-{who}", options=cluster.options(who)
                )
                stack.push_async_callback(connected.close)
                return connected

            scheduler = await start_scheduler(stack, config, await bus("scheduler"))
            storage = await start_storage(
                stack, config, await bus("storage"), tmp_path / "st", servers
            )
            peer = await start_peer(stack, config, await bus("peer"), tmp_path / "peer", servers)
            seed_address = (storage.node.host().ip, storage.node.host().port)
            await hosts_known(scheduler.core, {SEED, PEER})

            errors: list[Exception] = []

            async def on_error(exc: Exception) -> None:
                errors.append(exc)

            evil_nc = await nats.connect(
                servers, error_cb=on_error, allow_reconnect=False, **cluster.options("evil")
            )
            stack.push_async_callback(evil_nc.close)
            evil = Attacker(evil_nc, errors, prefix)
            trap = host(SEED, "seed", 9)  # where the attacker wants the seed's children to go
            seed_sender, peer_sender = Sender("seed", SEED), Sender("normal", PEER)

            # 1. Under another host's subject, nats-server refuses every message.
            attempts: list[tuple[str, dict[str, Any], Sender]] = [
                ("scheduler.heartbeat", {"host": trap, "uploads": 0}, seed_sender),
                ("scheduler.leave", {"host_id": SEED}, seed_sender),
                ("scheduler.leave", {"host_id": PEER}, peer_sender),
                (
                    "scheduler.{partition}.result",
                    {"task_id": task_id, "peer_id": peer_id(PEER, task_id), "success": False},
                    peer_sender,
                ),
                # Its own id, under the storage type its credentials do not have.
                ("scheduler.heartbeat", {"host": host(EVIL, "seed", 9)}, Sender("seed", EVIL)),
            ]
            for name, body, as_host in attempts:
                assert await evil.refused_by_nats(name, body, as_host), (name, as_host)

            # 2. Under its own subject, the scheduler refuses a body that names another host.
            lies: list[tuple[str, dict[str, Any], str]] = [
                ("scheduler.heartbeat", {"host": trap, "uploads": 0}, f"may not speak for {SEED}"),
                ("scheduler.leave", {"host_id": SEED}, f"may not speak for {SEED}"),
                (
                    "scheduler.heartbeat",
                    {"host": host(EVIL, "seed", 9), "uploads": 0},
                    "a normal host may not speak as a seed one",
                ),
                (
                    "scheduler.{partition}.register",
                    {
                        "task_id": task_id,
                        "peer_id": peer_id(EVIL, task_id),
                        "host": host(EVIL, "seed", 9),
                        "source": {"url": url},
                        "seed": True,
                    },
                    "a normal host may not speak as a seed one",
                ),
                (
                    "scheduler.{partition}.result",
                    {"task_id": task_id, "peer_id": peer_id(PEER, task_id), "success": False},
                    f"is not host {EVIL}'s peer",
                ),
                (
                    "scheduler.{partition}.pieces",
                    {"task_id": task_id, "peer_id": peer_id(SEED, task_id), "pieces": []},
                    f"is not host {EVIL}'s peer",
                ),
            ]
            for name, body, says in lies:
                error = await evil.answer(name, body)
                assert error["code"] == "forbidden", (name, error)
                assert says in error["message"], (name, error)

            # Nothing of it took: the seed is where it was and no host left.
            assert {SEED, PEER} <= set(scheduler.core.hosts)
            assert EVIL not in scheduler.core.seed_hosts()
            seed_host = scheduler.core.hosts[SEED]
            assert (seed_host.ip, seed_host.port) == seed_address

            # 3. The legitimate user: the peer's download goes through the seed.
            request = GetRequest(url=url, output=outputs / "bound.bin", headers={})
            client = await bus("client")
            reply = await client.request(
                messages.DOWNLOAD,
                messages.DownloadRequest.from_dict(request.body(outputs / "bound.bin")),
                timeout=60,
                host_id=PEER,
            )
            assert (outputs / "bound.bin").read_bytes() == data
            assert reply.bytes_p2p == len(data), "the seed read the origin, the peer the seed"
            assert origin.bytes_served - origin.probes == len(data), "the origin was read once"
            assert peer.node.settings.host_id == PEER
