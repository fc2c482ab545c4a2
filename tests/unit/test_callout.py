"""swarmfly.callout's parts: host ids of DNS names, the user JWT's permissions, the JWKS
over HTTPS with the API server's bearer token, and settings that cannot work."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import nkeys
import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from swarmfly import credentials
from swarmfly.callout import (
    JWKS_RETRY,
    Keys,
    Refused,
    callout_for,
    decode_unverified,
    encode_nats_jwt,
    jwt_permissions,
)
from swarmfly.config import CalloutConfig, Config
from swarmfly.ids import host_id_of
from tests.certs import certificate_builder, common_name, self_signed_ca
from tests.integration.test_callout import Signer, rsa_key


def test_host_ids_of_dns_names() -> None:
    assert host_id_of("node-1") == "node-1"
    assert host_id_of("ip-10-0-1-2.eu-west-1.compute.internal") == (
        "ip-10-0-1-2_eu-west-1_compute_internal"
    )
    long = "n" * 60 + ".example.com"
    assert len(host_id_of(long)) == 64 and host_id_of(long) != host_id_of(long + "x")
    for bad in ("", "node a", "node*", "a>b"):
        with pytest.raises(ValueError, match="not a DNS name"):
            host_id_of(bad)


@pytest.mark.parametrize("role", ["scheduler", "storage", "peer"])
def test_user_jwt_permissions_are_the_roles(role: str) -> None:
    rules = credentials.permissions(role, "swarmfly", "host-1", "_INBOX_x")
    converted = jwt_permissions(rules)
    assert converted["pub"] == rules["publish"] and converted["sub"] == rules["subscribe"]
    responses = rules["allow_responses"]
    if responses is True:
        assert converted["resp"] == {"max": 1, "ttl": 0}
    else:
        assert converted["resp"] == {"max": responses["max"], "ttl": 6 * 3600 * 10**9}


def test_nats_jwts_are_signed_by_the_issuer() -> None:
    issuer = nkeys.from_seed(
        bytearray(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))
    )
    token = encode_nats_jwt({"sub": "UABC", "nats": {"type": "user", "version": 2}}, issuer)
    header, body, signature = token.split(".")
    assert orjson.loads(base64.urlsafe_b64decode(header + "==")) == {
        "typ": "JWT",
        "alg": "ed25519-nkey",
    }
    assert issuer.verify(f"{header}.{body}".encode(), base64.urlsafe_b64decode(signature + "=="))
    claims = decode_unverified(token)
    assert claims["iss"] == issuer.public_key.decode() and claims["sub"] == "UABC"
    jti = claims.pop("jti")
    digest = hashlib.new(
        "sha512_256", orjson.dumps({**claims, "jti": ""}, option=orjson.OPT_SORT_KEYS)
    )
    assert jti == base64.b32encode(digest.digest()).decode().rstrip("=")
    with pytest.raises(Refused):
        decode_unverified("no-dots")


def _seed(folder: Path, kind: int) -> str:
    path = folder / f"seed-{kind}.nk"
    path.write_bytes(nkeys.encode_seed(os.urandom(32), kind))
    return str(path)


def _complete(folder: Path) -> Config:
    config = Config()
    config.callout = CalloutConfig(
        issuer_seed=_seed(folder, nkeys.PREFIX_BYTE_ACCOUNT),
        jwks=str(folder / "jwks.json"),
        token_issuer="https://k8s",
        peer=["system:serviceaccount:ns:peer"],
    )
    return config


def test_settings_that_cannot_work(tmp_path: Path) -> None:
    callout_for(_complete(tmp_path))
    broken = {
        "issuer_seed": (str(tmp_path / "missing.nk"), "No such file"),
        "jwks": (None, "JWKS file or https:// URL is required"),
        "token_issuer": (None, "the cluster's service-account issuer"),
        "peer": ([], "names no service account"),
    }
    for name, (value, says) in broken.items():
        config = _complete(tmp_path)
        setattr(config.callout, name, value)
        with pytest.raises(ValueError, match=says):
            callout_for(config)
    config.callout.issuer_seed = _seed(tmp_path, nkeys.PREFIX_BYTE_USER)
    with pytest.raises(ValueError, match="an account seed"):
        callout_for(config)
    (tmp_path / "junk.nk").write_text("not a seed")
    config.callout.issuer_seed = str(tmp_path / "junk.nk")
    with pytest.raises(ValueError, match="holds no NKey seed"):
        callout_for(config)


class ApiServer:
    """The API server's /openid/v1/jwks over HTTPS, answering only its bearer token."""

    def __init__(self, folder: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        ca = self_signed_ca(key, "test-ca")
        cert = (
            certificate_builder(common_name("kubernetes"), key.public_key())
            .issuer_name(ca.subject)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        self.ca = folder / "ca.crt"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        (folder / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / "tls.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
        self.bearer = folder / "token"
        self.bearer.write_text("api-token\n")
        self.signer = Signer(rsa_key(), "key-1")
        self.fetches = 0

    async def jwks(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer api-token":
            raise web.HTTPUnauthorized()
        self.fetches += 1
        return web.json_response(self.signer.jwks())


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, str]]:
    server = ApiServer(tmp_path)
    app = web.Application()
    app.router.add_get("/openid/v1/jwks", server.jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"https://127.0.0.1:{port}/openid/v1/jwks"
    finally:
        await runner.cleanup()


async def test_keys_over_https_with_rotation_bounded(api: tuple[ApiServer, str]) -> None:
    server, url = api
    now = [0.0]
    settings = CalloutConfig(jwks=url, jwks_ca=str(server.ca), jwks_token_file=str(server.bearer))
    keys = Keys(settings, clock=lambda: now[0])
    assert (await keys.key("key-1")).key_id == "key-1"
    assert server.fetches == 1
    for _ in range(50):  # made-up key ids do not become requests to the API server
        with pytest.raises(Refused, match="unknown key"):
            await keys.key("made-up")
    assert server.fetches == 1
    server.signer = Signer(rsa_key(), "key-2")  # the cluster rotates its key
    now[0] += JWKS_RETRY + 1
    assert (await keys.key("key-2")).key_id == "key-2"
    assert server.fetches == 2

    wrong = CalloutConfig(jwks=url, jwks_ca=str(server.ca))  # no bearer token: 401
    with pytest.raises(Refused, match="unknown key"):
        await Keys(wrong).key("key-1")
    plain = CalloutConfig(jwks=url.replace("https", "http"))
    with pytest.raises(Refused, match="unknown key"):
        await Keys(plain).key("key-1")
