"""Per-host identities from Kubernetes service-account tokens (issue #13, DESIGN §9).

A real nats-server runs the authorization `python -m swarmfly.credentials --callout-issuer`
writes: the scheduler and the CLI on NKeys, storage and peers through the auth callout. The
scheduler answers it ([callout]), checking each connection's token against a JWKS file — what
the API server publishes at /openid/v1/jwks — signed here by a key the test makes, with the
claims a bound token of Kubernetes 1.30+ carries. The storage and the peer connect with their
tokens (a file, as the kubelet projects it); a peer's download goes through the seed. An
attacker holding a valid peer token of its own node cannot speak for another node, read its
requests or pass for storage; forged, expired, foreign, unbound and algorithm-confused tokens
are refused at connect.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import nats
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from swarmfly.bus import Bus
from swarmfly.bus import connection as bus_module
from swarmfly.config import CalloutConfig, Config, NatsConfig, nats_client_options
from swarmfly.contracts import Sender, messages
from swarmfly.credentials import inbox_prefix
from swarmfly.credentials import main as write_credentials
from swarmfly.errors import SwarmflyError
from swarmfly.get import GetRequest
from swarmfly.ids import host_id_of, peer_id
from swarmfly.launch import start_peer, start_scheduler, start_storage
from swarmfly.natsserver import NatsServer
from swarmfly.services.scheduler.service import SchedulerService
from swarmfly.testing import Origin, nats_server
from tests.integration.test_host_binding import Attacker, host, hosts_known
from tests.integration.test_nats_permissions import Connection

ISSUER = "https://kubernetes.default.svc.cluster.local"
NAMESPACE = "swarmfly"
ACCOUNTS = {
    role: f"system:serviceaccount:{NAMESPACE}:swarmfly-{role}" for role in ("peer", "storage")
}
NODE, EVIL_NODE, POD = "node-a.example.internal", "node-evil", "swarmfly-storage-0"
PEER, EVIL, SEED = host_id_of(NODE), host_id_of(EVIL_NODE), host_id_of(POD)


@dataclass
class Signer:
    """The cluster's service-account token signer, as the API server is."""

    key: rsa.RSAPrivateKey
    kid: str

    def token(
        self,
        role: str = "peer",
        *,
        node: str | None = NODE,
        pod: str = "swarmfly-peer-x7k2p",
        audience: str = "swarmfly",
        lifetime: int = 3600,
        subject: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> str:
        now = int(time.time())
        bound: dict[str, Any] = {
            "namespace": NAMESPACE,
            "pod": {"name": pod, "uid": "0d5f6c0e"},
            "serviceaccount": {"name": f"swarmfly-{role}", "uid": "7a1b"},
        }
        if node:
            bound["node"] = {"name": node, "uid": "c3e9"}
        claims = {
            "iss": ISSUER,
            "sub": subject or ACCOUNTS[role],
            "aud": [audience],
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + lifetime,
            "jti": os.urandom(8).hex(),
            "kubernetes.io": bound,
        }
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> dict[str, Any]:
        numbers = self.key.public_key().public_numbers()

        def b64(n: int) -> str:
            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid}
        return {"keys": [{**jwk, "n": b64(numbers.n), "e": b64(numbers.e)}]}


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Cluster:
    server: NatsServer
    seeds: dict[str, Path]
    signer: Signer
    folder: Path
    config: Config
    """What the services run with: the schedulers' [callout] among it."""
    scheduler: SchedulerService
    stack: AsyncExitStack

    def nkey_options(self, role: str) -> dict[str, Any]:
        inbox = f"{inbox_prefix(role)}_{PEER}" if role == "client" else inbox_prefix(role)
        return nats_client_options(NatsConfig(nkeys_seed=str(self.seeds[role]), inbox_prefix=inbox))

    def token_options(self, role: str, host_id: str, token: str) -> dict[str, Any]:
        path = self.folder / "tokens" / f"{role}-{host_id}"
        path.parent.mkdir(exist_ok=True)
        path.write_text(token)
        inbox = f"{inbox_prefix(role)}_{host_id}"
        return nats_client_options(NatsConfig(token_file=str(path), inbox_prefix=inbox))

    async def bus(self, name: str, options: dict[str, Any]) -> Bus:
        servers = [self.server.url]
        prefix = self.config.nats.prefix
        connected = await Bus.connect(servers, prefix=prefix, name=name, options=options)
        self.stack.push_async_callback(connected.close)
        return connected


@pytest.fixture
async def cluster(tmp_path: Path, prefix: str) -> AsyncIterator[Cluster]:
    """nats-server with the auth callout, and a scheduler answering it."""
    folder = tmp_path / "auth"
    keys = folder / "keys"
    seeds = {role: keys / f"{role}.nk" for role in ("scheduler", "client")}
    auth = folder / "nats" / "auth.conf"
    specs = [f"scheduler={seeds['scheduler']}", f"client:{PEER}={seeds['client']}"]
    issuer = keys / "issuer.nk"
    argv = ["--prefix", prefix, "--server-config", str(auth), "--callout-issuer", str(issuer)]
    assert write_credentials([*argv, *specs]) == 0
    signer = Signer(rsa_key(), "k8s-key-1")
    jwks = folder / "jwks.json"
    jwks.write_bytes(orjson.dumps(signer.jwks()))
    with nats_server(folder / "nats", config_file=auth) as server:
        config = Config(
            state_dir=tmp_path / "state", nats=NatsConfig(servers=[server.url], prefix=prefix)
        )
        config.callout = CalloutConfig(
            issuer_seed=str(issuer),
            jwks=str(jwks),
            token_issuer=ISSUER,
            peer=[ACCOUNTS["peer"]],
            storage=[ACCOUNTS["storage"]],
        )
        async with AsyncExitStack() as stack:
            scheduler_bus = await Bus.connect(
                [server.url],
                prefix=prefix,
                name="scheduler",
                options=nats_client_options(
                    NatsConfig(nkeys_seed=str(seeds["scheduler"]), inbox_prefix="_INBOX_scheduler")
                ),
            )
            stack.push_async_callback(scheduler_bus.close)
            scheduler = await start_scheduler(stack, config, scheduler_bus)
            yield Cluster(server, seeds, signer, folder, config, scheduler, stack)


async def connect_refused(cluster: Cluster, token: str) -> str:
    """Connect with ``token``: the server's refusal (the test fails if it lets it in)."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    with pytest.raises(Exception) as refused:
        nc = await nats.connect(
            cluster.server.url,
            token=token,
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )
        await nc.close()
    return f"{refused.value} {errors}".lower()


def confused_token(signer: Signer) -> str:
    """HS256 keyed with the public key's PEM: the classic algorithm confusion."""
    pem = signer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    good = signer.token()
    header = base64.urlsafe_b64encode(
        orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid})
    ).rstrip(b"=")
    body = good.split(".")[1].encode()
    mac = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
    return (
        f"{header.decode()}.{body.decode()}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    )


async def test_tokens_the_callout_refuses(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    signer = cluster.signer
    unsigned = jwt.encode(
        orjson.loads(jwt.api_jws.base64url_decode(signer.token().split(".")[1])),
        None,
        algorithm="none",
    )
    cases = {
        "no token": "",
        "not a JWT": "hello",
        "forged": signer.token(key=rsa_key()),
        "expired": signer.token(lifetime=-120),
        "another audience": signer.token(audience="https://kubernetes.default.svc"),
        "another service account": signer.token(subject=f"system:serviceaccount:{NAMESPACE}:x"),
        "no node": signer.token(node=None),
        "unsigned": unsigned,
        "algorithm confusion": confused_token(signer),
    }
    for case, token in cases.items():
        refusal = await connect_refused(cluster, token)
        assert "authorization violation" in refusal, (case, refusal)
    oversized = await connect_refused(cluster, "x" * 20_000)  # nats-server stops it first
    assert "maximum control line exceeded" in oversized or "connection lost" in oversized
    assert "no node (a bound token from Kubernetes 1.30 or later is needed)" in caplog.text
    assert "token refused: Signature has expired" in caplog.text
    for token in cases.values():
        assert not token or token not in caplog.text, "no token in the log"


async def test_per_host_identities_through_the_callout(
    cluster: Cluster, tmp_path: Path, prefix: str, origin: Origin
) -> None:
    data = os.urandom(3 * 2**20 + 11)
    url = origin.add("callout.bin", data)
    outputs = tmp_path / "out"
    outputs.mkdir()
    servers = [cluster.server.url]
    config = cluster.config
    config.peer.host_id, config.storage.host_id = NODE, POD  # DNS names, made host ids
    config.peer.listen = config.storage.listen = "127.0.0.1"
    config.peer.output_roots = [str(outputs)]
    signer, scheduler, stack, bus = cluster.signer, cluster.scheduler, cluster.stack, cluster.bus
    storage_token = signer.token("storage", pod=POD)
    storage_bus = await bus("storage", cluster.token_options("storage", SEED, storage_token))
    storage = await start_storage(stack, config, storage_bus, tmp_path / "st", servers)
    peer_bus = await bus("peer", cluster.token_options("peer", PEER, signer.token()))
    peer = await start_peer(stack, config, peer_bus, tmp_path / "peer", servers)
    assert (storage.node.settings.host_id, peer.node.settings.host_id) == (SEED, PEER)
    await hosts_known(scheduler.core, {SEED, PEER})

    # An attacker with its own node's valid peer token.
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    evil_options = cluster.token_options("peer", EVIL, signer.token(node=EVIL_NODE))
    evil_nc = await nats.connect(servers, error_cb=on_error, allow_reconnect=False, **evil_options)
    stack.push_async_callback(evil_nc.close)
    evil = Attacker(evil_nc, errors, prefix)
    task_id = "e" * 64
    attempts: list[tuple[str, dict[str, Any], Sender]] = [
        ("scheduler.heartbeat", {"host": host(SEED, "seed", 9)}, Sender("seed", SEED)),
        ("scheduler.leave", {"host_id": PEER}, Sender("normal", PEER)),
        (
            "scheduler.{partition}.result",
            {"task_id": task_id, "peer_id": peer_id(PEER, task_id), "success": False},
            Sender("normal", PEER),
        ),
        ("scheduler.heartbeat", {"host": host(EVIL, "seed", 9)}, Sender("seed", EVIL)),
    ]
    for name, body, as_host in attempts:
        assert await evil.refused_by_nats(name, body, as_host), (name, as_host)
    watching = Connection(evil_nc, errors)
    for subject in (f"{prefix}.v1.peer.{PEER}.download", f"{prefix}.v1.storage.{SEED}.seed"):
        await evil_nc.subscribe(subject)
        assert await watching.refused("subscription", subject), subject
    # A peer's token naming the storage's pod is still a peer's: no storage subjects.
    posing = cluster.token_options("peer", SEED, signer.token(node=POD, pod=POD))
    poser = await nats.connect(servers, error_cb=on_error, allow_reconnect=False, **posing)
    stack.push_async_callback(poser.close)
    subject = Attacker(poser, errors, prefix).subject("scheduler.heartbeat", Sender("seed", SEED))
    await poser.publish(subject, b"{}")
    assert await Connection(poser, errors).refused("publish", subject)
    assert set(scheduler.core.seed_hosts()) == {SEED}

    # The legitimate user: the peer's download goes through the seed.
    request = GetRequest(url=url, output=outputs / "callout.bin", headers={})
    client = await bus("client", cluster.nkey_options("client"))
    reply = await client.request(
        messages.DOWNLOAD,
        messages.DownloadRequest.from_dict(request.body(outputs / "callout.bin")),
        timeout=60,
        host_id=PEER,
    )
    assert (outputs / "callout.bin").read_bytes() == data
    assert reply.bytes_p2p == len(data), "the seed read the origin, the peer the seed"
    assert origin.bytes_served - origin.probes == len(data), "the origin was read once"


async def test_a_renewed_token_is_read_at_reconnect(
    cluster: Cluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet replaces the projected token before it expires: the connection sees the
    renewed file and reconnects with it, and outlives the first token's session."""
    monkeypatch.setattr(bus_module, "TOKEN_CHECK", 0.2)
    signer = cluster.signer
    options = cluster.token_options("peer", PEER, signer.token(lifetime=-120))
    with pytest.raises(SwarmflyError, match="refused the token"):
        await cluster.bus("stale", options)
    path = cluster.folder / "tokens" / f"peer-{PEER}"
    path.write_text(signer.token(lifetime=3))
    bus = await cluster.bus("renewed", options)
    try:
        await asyncio.sleep(0.5)
        assert bus.nc.stats["reconnects"] == 0, "an unchanged token: no reconnect"
        path.write_text(signer.token())  # the kubelet's renewal
        for _ in range(100):  # bounded
            if bus.nc.stats["reconnects"] >= 1 and bus.nc.is_connected:
                break
            await asyncio.sleep(0.05)
        assert bus.nc.stats["reconnects"] == 1 and bus.nc.is_connected
        await asyncio.sleep(3.5)  # past the first token's expiry
        assert bus.nc.is_connected and bus.nc.stats["reconnects"] == 1
        await bus.nc.flush(timeout=2)  # the server still answers this session
    finally:
        await bus.close()
