"""Every NATS client option against a real nats-server that demands it.

Each server is configured for one way of authenticating (user/password, token, NKey, a .creds
file in operator mode, mutual TLS); the keys, JWTs and certificates are made here. A swarmfly
bus connects with nothing but swarmfly's own configuration (SWARMFLY_NATS_* variables or the
TOML file), and a wrong secret fails at once with an error that names the setting to check and
holds no secret, in the exception and in the log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from swarmfly.bus import Bus
from swarmfly.cluster import connect
from swarmfly.config import Config, load
from swarmfly.errors import SwarmflyError
from swarmfly.natsserver import NatsServer
from swarmfly.status import gather
from swarmfly.testing import nats_server, spawn_service
from tests.certs import certificate_builder, common_name, self_signed_ca
from tests.conftest import FAST_ENV

PASSWORD = "pw-" + uuid.uuid4().hex
TOKEN = "tok-" + uuid.uuid4().hex


# --- keys, JWTs and certificates --------------------------------------------------------


def new_keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(keys: nkeys.KeyPair) -> str:
    return str(keys.public_key.decode())


def seed(keys: nkeys.KeyPair) -> str:
    return bytes(keys.seed).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nats_jwt(issuer: nkeys.KeyPair, subject: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (v2): ed25519-nkey over ``header.claims``, signed with the issuer's seed."""
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": claims["type"],
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signing_input = f"{header}.{_b64url(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64url(issuer.sign(signing_input.encode()))}"


UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


@dataclass
class Operator:
    """An operator, one account it signed, and a way to issue users of that account."""

    keys: nkeys.KeyPair
    account: nkeys.KeyPair

    @classmethod
    def new(cls) -> Operator:
        return cls(new_keypair(nkeys.PREFIX_BYTE_OPERATOR), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT))

    def server_config(self) -> dict[str, Any]:
        account_jwt = nats_jwt(
            self.keys,
            public(self.account),
            {
                "type": "account",
                "limits": {
                    **UNLIMITED,
                    "imports": -1,
                    "exports": -1,
                    "wildcards": True,
                    "conn": -1,
                    "leaf": -1,
                },
            },
        )
        return {
            "operator": nats_jwt(self.keys, public(self.keys), {"type": "operator"}),
            "resolver": "MEMORY",
            "resolver_preload": {public(self.account): account_jwt},
        }

    def creds(self, path: Path) -> tuple[Path, str]:
        """Write a user's .creds file (as `nsc generate creds` does); returns it and its seed."""
        user = new_keypair(nkeys.PREFIX_BYTE_USER)
        token = nats_jwt(
            self.account, public(user), {"type": "user", "pub": {}, "sub": {}, **UNLIMITED}
        )
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed(user)}\n------END USER NKEY SEED------\n"
        )
        return path, seed(user)


@dataclass
class Authority:
    """A certificate authority that issues server and client certificates into a folder."""

    folder: Path
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def new(cls, folder: Path, name: str = "swarmfly test CA") -> Authority:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self_signed_ca(key, name)
        authority = cls(folder, key, certificate)
        authority.ca_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        return authority

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    def issue(
        self,
        name: str,
        *,
        client: bool = False,
        dns: tuple[str, ...] = (),
        ip: tuple[str, ...] = ("127.0.0.1",),
        passphrase: bytes | None = None,
    ) -> tuple[Path, Path]:
        """A leaf certificate and its key (PEM files ``name.pem``, ``name-key.pem``)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            certificate_builder(common_name(name), key.public_key())
            .issuer_name(self.certificate.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.folder / f"{name}.pem", self.folder / f"{name}-key.pem"
        cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
            )
        )
        return cert_file, key_file


# --- servers and clients ----------------------------------------------------------------


@contextmanager
def server(
    folder: Path, config: dict[str, Any], *, jetstream: bool = False
) -> Iterator[NatsServer]:
    """A real nats-server with ``config`` (JSON is NATS configuration) on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "nats.conf"
    conf.write_text(json.dumps(config))
    with nats_server(folder / "store", jetstream=jetstream, extra_args=["-c", str(conf)]) as nats:
        yield nats


def swarmfly_config(
    state: Path, nats: NatsServer, env: dict[str, str], *, scheme: str = "nats"
) -> Config:
    """The configuration a swarmfly process builds from these SWARMFLY_NATS_* variables."""
    url = f"{scheme}://127.0.0.1:{nats.port}"
    return load(env={"SWARMFLY_STATE_DIR": str(state), "SWARMFLY_NATS_SERVERS": url, **env})


async def assert_works(config: Config) -> None:
    """A bus from this configuration connects, and a message goes round through the server."""
    bus = await connect(config, "swarmfly-test")
    try:
        subject = f"{config.nats.prefix}.roundtrip.{uuid.uuid4().hex}"
        subscription = await bus.nc.subscribe(subject)
        await bus.nc.publish(subject, b"ping")
        message = await subscription.next_msg(timeout=5)
        assert message.data == b"ping"
    finally:
        await bus.close()


async def assert_refused(
    config: Config, caplog: pytest.LogCaptureFixture, match: str, secrets: list[str]
) -> None:
    """Connecting fails within seconds with SwarmflyError matching ``match``; no secret is in
    the error or in anything logged."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SwarmflyError, match=match) as raised:
        await asyncio.wait_for(connect(config, "swarmfly-test"), 15)
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    for secret in secrets:
        assert secret not in str(raised.value)
        assert secret not in caplog.text


async def assert_scheduler_answers(
    nats: NatsServer, state: Path, env: dict[str, str], secrets: list[str]
) -> None:
    """`swarmfly scheduler`, configured by the environment alone, answers `swarmfly status`,
    and its log holds none of the secrets."""
    scheduler = spawn_service(
        "scheduler", f"nats://127.0.0.1:{nats.port}", state / "scheduler", env={**FAST_ENV, **env}
    )
    try:
        status = await gather(swarmfly_config(state / "status", nats, env))
        assert [s["name"] for s in status["services"]] == ["scheduler"]
        assert "error" not in status, status
    finally:
        assert scheduler.stop() == 0, scheduler.log()
        if scheduler.process.stdout is not None:
            scheduler.process.stdout.close()
    assert "scheduler" in scheduler.log(), "nothing was logged: the check below proves nothing"
    for secret in secrets:
        assert secret not in scheduler.log()


# --- the tests --------------------------------------------------------------------------


async def test_user_and_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    users = {"authorization": {"users": [{"user": "swarmfly", "password": PASSWORD}]}}
    env = {"SWARMFLY_NATS_USER": "swarmfly", "SWARMFLY_NATS_PASSWORD": PASSWORD}
    with server(tmp_path / "nats", users, jetstream=True) as nats:
        await assert_works(swarmfly_config(tmp_path, nats, env))
        await assert_scheduler_answers(nats, tmp_path, env, [PASSWORD])
        wrong = "wrong-" + PASSWORD
        bad = swarmfly_config(tmp_path, nats, {**env, "SWARMFLY_NATS_PASSWORD": wrong})
        await assert_refused(bad, caplog, "refused user and password", [wrong, PASSWORD])
        # The same, in the URL: the error shows the server without its userinfo.
        in_url = load(
            env={"SWARMFLY_NATS_SERVERS": f"nats://swarmfly:{wrong}@127.0.0.1:{nats.port}"}
        )
        await assert_refused(in_url, caplog, "refused the URL's credentials", [wrong])


async def test_a_service_with_a_wrong_password_exits_saying_why(tmp_path: Path) -> None:
    users = {"authorization": {"users": [{"user": "swarmfly", "password": PASSWORD}]}}
    with server(tmp_path / "nats", users) as nats:
        wrong = "wrong-" + PASSWORD
        env = {**os.environ, "SWARMFLY_NATS_USER": "swarmfly", "SWARMFLY_NATS_PASSWORD": wrong}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmfly", "scheduler", "--nats", nats.url,
            "--state-dir", str(tmp_path / "scheduler"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 6, "the control plane is unreachable"
    assert "swarmfly: NATS" in stderr.decode()
    assert "refused user and password" in stderr.decode()
    assert wrong not in stderr.decode() + stdout.decode()


async def test_token_from_the_toml_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with server(tmp_path / "nats", {"authorization": {"token": TOKEN}}) as nats:
        toml = tmp_path / "swarmfly.toml"
        toml.write_text(f'[nats]\nservers = ["{nats.url}"]\ntoken = "{TOKEN}"\n')
        await assert_works(load(config_file=str(toml), env={}))
        toml.write_text(f'[nats]\nservers = ["{nats.url}"]\ntoken = "not-{TOKEN}"\n')
        bad = load(config_file=str(toml), env={})
        await assert_refused(bad, caplog, "refused the token", [TOKEN])


async def test_nkey_seed_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    user, stranger = new_keypair(nkeys.PREFIX_BYTE_USER), new_keypair(nkeys.PREFIX_BYTE_USER)
    (tmp_path / "user.nk").write_text(seed(user) + "\n")
    (tmp_path / "stranger.nk").write_text(seed(stranger) + "\n")
    config = {"authorization": {"users": [{"nkey": public(user)}]}}
    with server(tmp_path / "nats", config) as nats:
        env = {"SWARMFLY_NATS_NKEYS_SEED": str(tmp_path / "user.nk")}
        await assert_works(swarmfly_config(tmp_path, nats, env))
        env = {"SWARMFLY_NATS_NKEYS_SEED": str(tmp_path / "stranger.nk")}
        bad = swarmfly_config(tmp_path, nats, env)
        await assert_refused(bad, caplog, "refused the NKey seed", [seed(stranger), seed(user)])


async def test_creds_file_in_operator_mode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    operator = Operator.new()
    creds, user_seed = operator.creds(tmp_path / "swarmfly.creds")
    with server(tmp_path / "nats", operator.server_config()) as nats:
        env = {"SWARMFLY_NATS_CREDS": str(creds)}
        await assert_works(swarmfly_config(tmp_path, nats, env))
        await assert_scheduler_answers(nats, tmp_path, env, [user_seed])
        # A user of an account this server's operator never signed.
        stranger, stranger_seed = Operator.new().creds(tmp_path / "stranger.creds")
        bad = swarmfly_config(tmp_path, nats, {"SWARMFLY_NATS_CREDS": str(stranger)})
        await assert_refused(bad, caplog, "refused the creds file", [stranger_seed, user_seed])


def tls_server_config(
    authority: Authority, *, verify: bool, dns: tuple[str, ...] = ()
) -> dict[str, Any]:
    cert, key = authority.issue("server", dns=dns, ip=() if dns else ("127.0.0.1",))
    tls: dict[str, Any] = {"cert_file": str(cert), "key_file": str(key), "timeout": 2}
    if verify:
        tls |= {"ca_file": str(authority.ca_file), "verify": True}
    return {"tls": tls}


async def test_mutual_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    authority = Authority.new(tmp_path / "ca")
    cert, key = authority.issue("swarmfly", client=True, ip=())
    env = {
        "SWARMFLY_NATS_TLS_CA": str(authority.ca_file),
        "SWARMFLY_NATS_TLS_CERT": str(cert),
        "SWARMFLY_NATS_TLS_KEY": str(key),
    }
    with server(tmp_path / "nats", tls_server_config(authority, verify=True)) as nats:
        await assert_works(swarmfly_config(tmp_path, nats, env, scheme="tls"))
        key_text = key.read_text()
        await assert_scheduler_answers(nats, tmp_path, env, [key_text])
        # No client certificate: the server turns the handshake down.
        bad = swarmfly_config(tmp_path, nats, {"SWARMFLY_NATS_TLS_CA": str(authority.ca_file)})
        await assert_refused(bad, caplog, "TLS with NATS .* failed", [key_text])
        # A client certificate from a CA the server does not trust.
        other = Authority.new(tmp_path / "other", "another CA")
        other_cert, other_key = other.issue("intruder", client=True, ip=())
        env_other = {
            **env,
            "SWARMFLY_NATS_TLS_CERT": str(other_cert),
            "SWARMFLY_NATS_TLS_KEY": str(other_key),
        }
        bad = swarmfly_config(tmp_path, nats, env_other)
        await assert_refused(bad, caplog, "TLS with NATS .* failed", [other_key.read_text()])
        # A server certificate from a CA the client does not trust.
        env_wrong_ca = {**env, "SWARMFLY_NATS_TLS_CA": str(other.ca_file)}
        bad = swarmfly_config(tmp_path, nats, env_wrong_ca)
        await assert_refused(bad, caplog, "certificate verify failed", [key_text])


async def test_tls_hostname_names_the_servers_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Servers reached by address whose certificate names them otherwise."""
    authority = Authority.new(tmp_path / "ca")
    config = tls_server_config(authority, verify=False, dns=("nats.swarmfly.test",))
    with server(tmp_path / "nats", config) as nats:
        env = {"SWARMFLY_NATS_TLS_CA": str(authority.ca_file)}
        bad = swarmfly_config(tmp_path, nats, env)
        await assert_refused(bad, caplog, "certificate verify failed", [])
        env["SWARMFLY_NATS_TLS_HOSTNAME"] = "nats.swarmfly.test"
        await assert_works(swarmfly_config(tmp_path, nats, env))


async def test_tls_is_never_given_up_for_plain_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py would send the password in the clear to a server that offers no TLS."""
    authority = Authority.new(tmp_path / "ca")
    users = {"authorization": {"users": [{"user": "swarmfly", "password": PASSWORD}]}}
    env = {
        "SWARMFLY_NATS_USER": "swarmfly",
        "SWARMFLY_NATS_PASSWORD": PASSWORD,
        "SWARMFLY_NATS_TLS_CA": str(authority.ca_file),
    }
    with server(tmp_path / "nats", users) as nats:
        bad = swarmfly_config(tmp_path, nats, env)
        await assert_refused(bad, caplog, "does not require TLS", [PASSWORD])
        plain = {k: v for k, v in env.items() if k != "SWARMFLY_NATS_TLS_CA"}
        bad = swarmfly_config(tmp_path, nats, plain, scheme="tls")
        await assert_refused(bad, caplog, "does not require TLS", [PASSWORD])
        await assert_works(swarmfly_config(tmp_path, nats, plain))


def test_an_encrypted_client_key_is_a_configuration_error(tmp_path: Path) -> None:
    """OpenSSL would otherwise ask for its passphrase on a terminal a service does not have."""
    authority = Authority.new(tmp_path / "ca")
    cert, key = authority.issue("swarmfly", client=True, passphrase=b"passphrase")
    config = load(
        env={
            "SWARMFLY_STATE_DIR": str(tmp_path),
            "SWARMFLY_NATS_TLS_CERT": str(cert),
            "SWARMFLY_NATS_TLS_KEY": str(key),
        }
    )
    with pytest.raises(ValueError, match=r"\[nats\] tls_key: .* is encrypted"):
        config.nats_options()


async def test_a_bus_without_options_still_connects(tmp_path: Path) -> None:
    """The default: no auth, no TLS, as the embedded server of `swarmfly up` runs."""
    with nats_server(tmp_path / "nats") as nats:
        bus = await Bus.connect([nats.url], prefix="t", name="plain")
        assert bus.nc.is_connected
        await bus.close()
