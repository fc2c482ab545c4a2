"""The per-role permissions swarmfly ships (swarmfly.credentials), on a real nats-server:
what each role's credentials are refused, and that a download through the swarm still works
with every service on its own credentials, origin credentials reaching nobody but the
services that read them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from swarmfly.bus import Bus
from swarmfly.config import Config, NatsConfig
from swarmfly.contracts import messages
from swarmfly.credentials import Identity, ensure_identities, write_server_config
from swarmfly.errors import SwarmflyError
from swarmfly.get import GetRequest
from swarmfly.launch import connect_as, start_peer, start_scheduler, start_storage
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, connect_role, nats_server, role_settings

PEER, SEED = "perm-peer", "perm-seed"


@dataclass
class Secured:
    server: NatsServer
    identities: dict[str, Identity]
    prefix: str


@contextmanager
def secured_nats(folder: Path, prefix: str) -> Iterator[Secured]:
    """A nats-server with the authorization `swarmfly up` writes, for ``prefix``."""
    identities = ensure_identities(folder)
    hosts = {"storage": SEED, "peer": PEER, "client": PEER}
    config = write_server_config(folder / "nats", identities, prefix, hosts)
    with nats_server(folder / "nats", config_file=config) as server:
        yield Secured(server, identities, prefix)


@dataclass
class Connection:
    """A raw nats-py connection as one role, keeping the errors the server sends it."""

    nc: Client
    errors: list[Exception]

    async def refused(self, action: str, subject: str) -> bool:
        """Whether the server answered a permissions violation for ``subject``."""
        await self.nc.flush(timeout=2)
        needle = f'permissions violation for {action} to "{subject.lower()}"'
        for _ in range(40):  # bounded: the -ERR arrives within one round trip or two
            if any(needle in str(e).lower() for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


@pytest.fixture
async def roles(
    tmp_path: Path, prefix: str
) -> AsyncIterator[tuple[Secured, dict[str, Connection]]]:
    with secured_nats(tmp_path / "secured", prefix) as secured:
        connections: dict[str, Connection] = {}
        try:
            for role, identity in secured.identities.items():
                errors: list[Exception] = []

                async def on_error(exc: Exception, errors: list[Exception] = errors) -> None:
                    errors.append(exc)

                nc = await nats.connect(
                    secured.server.url,
                    nkeys_seed=str(identity.seed_file),
                    inbox_prefix=identity.inbox_prefix,
                    error_cb=on_error,
                    allow_reconnect=False,
                )
                connections[role] = Connection(nc, errors)
            yield secured, connections
        finally:
            for connection in connections.values():
                await connection.nc.close()


async def collect(nc: Client, subject: str) -> list[Msg]:
    seen: list[Msg] = []

    async def keep(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(subject, cb=keep)
    return seen


async def request_answered(nc: Client, subject: str) -> Msg:
    """A request that a responder subscribed a moment ago answers: on a loaded machine
    nats-server has been seen to answer "no responders" once just after the responder's
    flush (CI, 2026-12-03), so that one answer is asked again, a bounded number of times."""
    for _ in range(20):
        try:
            return await nc.request(subject, b"{}", timeout=2)
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nobody answered {subject}")


async def test_the_shipped_config_holds_no_secret(tmp_path: Path, prefix: str) -> None:
    with secured_nats(tmp_path / "s", prefix) as secured:
        text = (tmp_path / "s" / "nats" / "auth.conf").read_text()
        for identity in secured.identities.values():
            assert identity.seed_file.read_text().strip() not in text
            assert identity.public_key in text
            assert identity.seed_file.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "s" / "nats" / "auth.conf").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "s" / "credentials").stat().st_mode & 0o777 == 0o700
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(secured.server.url, allow_reconnect=False, connect_timeout=2)
    again = ensure_identities(tmp_path / "s")
    assert {r: i.public_key for r, i in again.items()} == {
        r: i.public_key for r, i in secured.identities.items()
    }, "kept across restarts"


async def test_a_peer_reads_no_registration_seed_request_or_other_inbox(
    roles: tuple[Secured, dict[str, Connection]], prefix: str
) -> None:
    _, by_role = roles
    peer, storage = by_role["peer"], by_role["storage"]
    p = f"{prefix}.v1"
    forbidden = [
        f"{p}.scheduler.*.register",
        f"{p}.scheduler.>",
        f"{p}.storage.*.seed",
        f"{p}.storage.{SEED}.seed",
        f"{p}.storage.*.fill",  # a forwarded preheat carries the origin's credentials
        f"{p}.peer.other-host.download",
        "_INBOX_scheduler.>",
        "_INBOX_client.>",
        "_INBOX.>",
        ">",
    ]
    seen = [await collect(peer.nc, subject) for subject in forbidden]
    for subject in forbidden:
        assert await peer.refused("subscription", subject), subject
    await peer.nc.publish(f"{p}.storage.{SEED}.fill", b"{}")  # only storage passes preheats on
    assert await peer.refused("publish", f"{p}.storage.{SEED}.fill")
    # swarmfly cache: an import or a removal only as itself, a normal host.
    for other in ("normal.other-host", f"seed.{PEER}"):
        for verb in ("import", "cached"):
            await peer.nc.publish(f"{p}.storage.{SEED}.{verb}.{other}", b"{}")
            assert await peer.refused("publish", f"{p}.storage.{SEED}.{verb}.{other}")
    # What a peer could have read there: a registration with origin credentials, a seed
    # request, a reply to the scheduler.
    secret = b'{"headers": {"Authorization": "Bearer peer-must-not-see"}}'
    await storage.nc.publish(f"{p}.scheduler.3.register", secret)
    await by_role["scheduler"].nc.publish(f"{p}.storage.{SEED}.seed", secret)
    await storage.nc.publish("_INBOX_scheduler.x", secret, reply="")
    await asyncio.sleep(0.3)
    assert all(not s for s in seen), "nothing delivered to the refused subscriptions"
    # Its own subjects it may read.
    own = await collect(peer.nc, f"{p}.peer.{PEER}.>")
    await peer.nc.flush()
    for _ in range(40):  # published again until it arrives: the SUB may still be on its way
        await by_role["client"].nc.publish(f"{p}.peer.{PEER}.progress", b"{}")
        await by_role["client"].nc.flush()
        await asyncio.sleep(0.05)
        if own:
            break
    assert {m.subject for m in own} == {f"{p}.peer.{PEER}.progress"}


async def test_storage_may_not_read_registrations_nor_other_seeds(
    roles: tuple[Secured, dict[str, Connection]], prefix: str
) -> None:
    _, by_role = roles
    storage = by_role["storage"]
    for subject in (
        f"{prefix}.v1.scheduler.0.register",
        f"{prefix}.v1.storage.another-seed.seed",
        f"{prefix}.v1.storage.another-seed.fill",
        f"{prefix}.v1.peer.{PEER}.download",
        "_INBOX_peer.>",
    ):
        await storage.nc.subscribe(subject)
        assert await storage.refused("subscription", subject), subject
    for subject in (f"{prefix}.v1.storage.{SEED}.seed", f"{prefix}.v1.peer.{PEER}.download"):
        await storage.nc.publish(subject, b"{}")
        assert await storage.refused("publish", subject), subject


async def test_the_client_may_not_publish_to_schedulers_nor_read_anything(
    roles: tuple[Secured, dict[str, Connection]], prefix: str
) -> None:
    _, by_role = roles
    client, scheduler = by_role["client"], by_role["scheduler"]

    # What it may do: ask for the cluster's state (and get the answer in its own inbox).
    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    state = await scheduler.nc.subscribe(f"{prefix}.v1.scheduler.state", cb=answer)
    await scheduler.nc.flush()
    reply = await request_answered(client.nc, f"{prefix}.v1.scheduler.state")
    assert reply.data == b'{"ok": true}'
    await state.unsubscribe()

    heard = await collect(scheduler.nc, f"{prefix}.v1.scheduler.>")
    await scheduler.nc.flush()
    for subject in (
        f"{prefix}.v1.scheduler.0.register",
        f"{prefix}.v1.scheduler.heartbeat",
        f"{prefix}.v1.scheduler.leave",
        f"{prefix}.v1.storage.{SEED}.seed",
        f"{prefix}.v1.storage.{SEED}.fill",
        f"{prefix}.v1.peer.other-host.download",
    ):
        await client.nc.publish(subject, b"{}")
        assert await client.refused("publish", subject), subject
    for subject in (f"{prefix}.v1.peer.{PEER}.>", f"{prefix}.v1.storage.preheat", "$SRV.>"):
        await client.nc.subscribe(subject)
        assert await client.refused("subscription", subject), subject
    assert heard == [], "the scheduler heard nothing from the client"


async def test_only_the_client_makes_a_peer_probe(
    roles: tuple[Secured, dict[str, Connection]], prefix: str
) -> None:
    """``peer.<host>.reach`` (swarmfly doctor) makes a peer send an HTTP request: no service
    may ask it. The peer looks up where the target is itself (``scheduler.address``)."""
    _, by_role = roles
    p = f"{prefix}.v1"
    for role in ("peer", "storage", "scheduler"):
        await by_role[role].nc.publish(f"{p}.peer.{PEER}.reach", b"{}")
        assert await by_role[role].refused("publish", f"{p}.peer.{PEER}.reach"), role

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    peer, scheduler = by_role["peer"], by_role["scheduler"]
    asked = await peer.nc.subscribe(f"{p}.peer.{PEER}.reach", cb=answer)
    await peer.nc.flush()
    reply = await request_answered(by_role["client"].nc, f"{p}.peer.{PEER}.reach")
    assert reply.data == b'{"ok": true}'
    await asked.unsubscribe()
    looked_up = await scheduler.nc.subscribe(f"{p}.scheduler.address", cb=answer)
    await scheduler.nc.flush()
    reply = await request_answered(peer.nc, f"{p}.scheduler.address")
    assert reply.data == b'{"ok": true}'
    await looked_up.unsubscribe()
    storage = by_role["storage"]  # it probes nothing, so it looks no host up
    await storage.nc.publish(f"{p}.scheduler.address", b"{}")
    assert await storage.refused("publish", f"{p}.scheduler.address")


async def test_a_download_with_every_service_on_its_own_credentials(
    tmp_path: Path, prefix: str, origin: Origin
) -> None:
    secret = "Bearer " + os.urandom(8).hex()
    origin.required_headers = {"Authorization": secret}
    data = os.urandom(5 * 2**20 + 7)
    url = origin.add("private.bin", data)
    outputs = tmp_path / "out"
    outputs.mkdir()
    with secured_nats(tmp_path / "secured", prefix) as secured:
        config = Config(
            state_dir=tmp_path / "state",
            nats=NatsConfig(servers=[secured.server.url], prefix=prefix),
        )
        config.peer.host_id, config.storage.host_id = PEER, SEED
        config.peer.listen = config.storage.listen = "127.0.0.1"
        config.peer.output_roots = [str(outputs)]
        servers = [secured.server.url]
        async with AsyncExitStack() as stack:
            buses: dict[str, Bus] = {}
            for role in ("scheduler", "storage", "peer", "client"):
                buses[role] = await connect_as(config, secured.identities[role], servers)
                stack.push_async_callback(buses[role].close)
            # A second peer-role connection that tries to listen to everything.
            spy = await connect_as(config, secured.identities["peer"], servers)
            stack.push_async_callback(spy.close)
            overheard: list[bytes] = []

            async def keep(msg: Msg) -> None:
                overheard.append(msg.data)

            for subject in (">", f"{prefix}.v1.>", "_INBOX_client.>", "_INBOX_storage.>"):
                await spy.nc.subscribe(subject, cb=keep)
            await spy.nc.flush()

            await start_scheduler(stack, config, buses["scheduler"])
            await start_storage(stack, config, buses["storage"], tmp_path / "st", servers)
            await start_peer(stack, config, buses["peer"], tmp_path / "peer", servers)
            request = GetRequest(
                url=url, output=outputs / "private.bin", headers={"Authorization": secret}
            )
            reply = await buses["client"].request(
                messages.DOWNLOAD,
                messages.DownloadRequest.from_dict(request.body(outputs / "private.bin")),
                timeout=60,
                host_id=PEER,
            )
            assert (outputs / "private.bin").read_bytes() == data
            assert reply.content_length == len(data)
            assert reply.bytes_p2p == len(data), "the seed read the origin, the peer the seed"
            # No registration, seed request or reply (all carrying the origin's
            # credentials) reached the peer-role connection that asked for everything.
            assert overheard == []
            with pytest.raises(SwarmflyError, match=r"no service answers|did not answer"):
                await buses["client"].request(  # the client may ask only this host's peer
                    messages.DOWNLOAD,
                    messages.DownloadRequest.from_dict(request.body(outputs / "x")),
                    timeout=1,
                    host_id="another-host",
                )


async def test_the_shared_test_server_holds_services_to_the_shipped_permissions(
    nats: NatsServer, prefix: str
) -> None:
    """The session's nats-server is a shipped_nats: every service a test starts there runs
    as its role, so a flow that needed more than the role may do would fail its test."""
    peer = await connect_role(nats.url, prefix, "peer")
    try:
        await peer.nc.subscribe(f"{prefix}.v1.scheduler.>")
        await peer.nc.flush(timeout=2)
        for _ in range(40):  # the -ERR arrives within a round trip or two
            if peer.nc.last_error is not None:
                break
            await asyncio.sleep(0.05)
        assert "permissions violation" in str(peer.nc.last_error).lower()
    finally:
        await peer.close()
    assert role_settings(nats.url, "scheduler")["SWARMFLY_NATS_INBOX_PREFIX"] == "_INBOX_scheduler"
