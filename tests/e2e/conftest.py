"""A real OCI registry (Debian's ``docker-registry``, distribution 2.8) per test, with
htpasswd or token auth, and the helpers that push blobs and images into it.

The token registry trusts a token issuer that runs in the test: it signs RS256 JWTs with the
key of a self-signed certificate that the registry has as its root bundle (the certificate
travels in the ``x5c`` header), grants alice what she asks for, refuses everyone else, and
records every token it issues so tests can count them and look for leaks.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from tests.certs import self_signed_ca
from tests.conftest import require_tool

ALICE = "alice"
ALICE_PASSWORD = "pa55-alice-s3cret"
WRONG_PASSWORD = "wr0ng-pa55-f0r-alice"
SERVICE = "swarmfly-test-registry"
ISSUER = "swarmfly-test-issuer"
TOKEN_TTL = 300
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The ``Authorization`` header a client sends for user:password."""
    credential = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credential}"}


ALICE_BASIC = basic_auth(ALICE, ALICE_PASSWORD)["Authorization"]


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the token issuer ------------------------------------------------------------------------


@dataclass
class IssuedToken:
    token: str
    subject: str
    scopes: list[str]


@dataclass
class TokenIssuer:
    """``GET /token?service=…&scope=repository:NAME:pull[,push]`` with alice's Basic auth."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    url: str = ""
    issued: list[IssuedToken] = field(default_factory=list)
    refused: int = 0

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def tokens(self) -> list[str]:
        return [t.token for t in self.issued]

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + TOKEN_TTL,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return jwt.encode(
            claims, self.key, algorithm="RS256", headers={"x5c": [base64.b64encode(der).decode()]}
        )

    async def handle(self, request: web.Request) -> web.Response:
        if request.query.get("service", SERVICE) != SERVICE:
            raise web.HTTPBadRequest(text="unknown service")
        if request.headers.get("Authorization") != ALICE_BASIC:
            self.refused += 1
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="swarmfly-test-issuer"'},
            )
        scopes = request.query.getall("scope", [])
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if a in ("pull", "push")]
            if kind == "repository" and name and granted:
                access.append({"type": "repository", "name": name, "actions": granted})
        token = self.sign(ALICE, access)
        self.issued.append(IssuedToken(token, ALICE, list(scopes)))
        return web.json_response(
            {"token": token, "expires_in": TOKEN_TTL, "issued_at": _now_rfc3339()}
        )

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[TokenIssuer]:
        app = web.Application()
        app.router.add_get("/token", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{runner.addresses[-1][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()

    async def push_headers(self, name: str) -> dict[str, str]:
        """A Bearer header that may push to and pull from ``name``, as a client gets one."""
        async with (
            aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
            session.get(
                self.realm,
                params={"service": SERVICE, "scope": f"repository:{name}:pull,push"},
                headers=basic_auth(ALICE, ALICE_PASSWORD),
            ) as response,
        ):
            assert response.status == 200, await response.text()
            body = await response.json()
        return {"Authorization": f"Bearer {body['token']}"}


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def self_signed_certificate() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """The issuer's RSA key (for RS256) and the certificate the registry trusts as its root."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, self_signed_ca(key, ISSUER)


# -- the registry ----------------------------------------------------------------------------


@dataclass
class Registry:
    """A running ``docker-registry serve``; ``push_auth(name)`` gives headers that may push."""

    host: str
    """``127.0.0.1:PORT``, as it appears in ``oci+http://`` URLs."""
    root: Path
    log_path: Path
    process: asyncio.subprocess.Process
    issuer: TokenIssuer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def oci(self, name: str, reference: str) -> str:
        """``oci+http://host/name@sha256:…`` for a digest, ``…/name:tag`` for a tag."""
        separator = "@" if reference.startswith("sha256:") else ":"
        return f"oci+http://{self.host}/{name}{separator}{reference}"

    def blob_url(self, name: str, digest: str) -> str:
        """The registry's own URL of a blob."""
        return f"{self.url}/v2/{name}/blobs/{digest}"

    async def push_auth(self, name: str) -> dict[str, str]:
        if self.issuer is not None:
            return await self.issuer.push_headers(name)
        return basic_auth(ALICE, ALICE_PASSWORD)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def registry_config(root: Path, port: int, auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "data")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
        "auth": auth,
    }


async def _answers(url: str) -> bool:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"{url}/v2/") as response,
        ):
            return response.status in (200, 401)
    except (aiohttp.ClientError, TimeoutError):
        return False


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, and SIGKILL after ``STOP_TIMEOUT``: a daemon a test started, its PID only."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)


@asynccontextmanager
async def run_registry(
    root: Path, auth: dict[str, Any], issuer: TokenIssuer | None = None
) -> AsyncIterator[Registry]:
    """Start the registry on a free port and wait until ``/v2/`` answers (a few tries, since
    another process may take the port between our probe and the registry's bind)."""
    binary = require_tool("docker-registry")
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "registry.log"
    for _ in range(3):
        port = free_port()
        config_path = root / "config.yml"
        # JSON is YAML: no YAML writer needed.
        config_path.write_text(json.dumps(registry_config(root, port, auth), indent=2))
        with open(log_path, "ab") as log:
            process = await asyncio.create_subprocess_exec(
                binary, "serve", str(config_path),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        registry = Registry(f"127.0.0.1:{port}", root, log_path, process, issuer)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while process.returncode is None and time.monotonic() < deadline:
                if await _answers(registry.url):
                    yield registry
                    return
                await asyncio.sleep(0.1)
        finally:
            await stop_process(process)
        if "address already in use" not in registry.log():
            break
    pytest.fail(f"docker-registry did not start; its log:\n{registry.log()[-4000:]}")


@asynccontextmanager
async def run_htpasswd_registry(root: Path) -> AsyncIterator[Registry]:
    """A registry that takes alice's Basic credentials (bcrypt htpasswd) and nobody else's."""
    tool = require_tool("htpasswd")
    root.mkdir(parents=True)
    made = await asyncio.create_subprocess_exec(
        tool, "-Bbn", ALICE, ALICE_PASSWORD,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    line, errors = await asyncio.wait_for(made.communicate(), 30)
    assert made.returncode == 0, errors.decode()
    htpasswd = root / "htpasswd"
    htpasswd.write_bytes(line)
    auth = {"htpasswd": {"realm": "swarmfly-test-realm", "path": str(htpasswd)}}
    async with run_registry(root, auth) as registry:
        yield registry


@pytest.fixture
async def htpasswd_registry(tmp_path: Path) -> AsyncIterator[Registry]:
    async with run_htpasswd_registry(tmp_path / "registry") as registry:
        yield registry


@pytest.fixture
async def token_issuer() -> AsyncIterator[TokenIssuer]:
    key, certificate = await asyncio.to_thread(self_signed_certificate)
    async with TokenIssuer(key, certificate).serve() as issuer:
        yield issuer


@pytest.fixture
async def token_registry(tmp_path: Path, token_issuer: TokenIssuer) -> AsyncIterator[Registry]:
    """A registry that wants Bearer tokens from ``token_issuer`` (only alice gets one)."""
    root = tmp_path / "registry"
    root.mkdir()
    bundle = root / "issuer.pem"
    bundle.write_bytes(token_issuer.certificate_pem())
    auth = {
        "token": {
            "realm": token_issuer.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(bundle),
        }
    }
    async with run_registry(root, auth, token_issuer) as registry:
        yield registry


# -- pushing ---------------------------------------------------------------------------------


async def push_blob(registry: Registry, name: str, data: bytes, auth: Mapping[str, str]) -> str:
    """Upload ``data`` monolithically (POST an upload, PUT it with its digest)."""
    digest = sha256_digest(data)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session:
        async with session.post(
            f"{registry.url}/v2/{name}/blobs/uploads/", headers=dict(auth)
        ) as response:
            assert response.status == 202, f"{response.status} {await response.text()}"
            location = response.headers["Location"]
        target = response.url.join(URL(location)).update_query(digest=digest)
        headers = {**auth, "Content-Type": "application/octet-stream"}
        async with session.put(target, data=data, headers=headers) as response:
            assert response.status == 201, f"{response.status} {await response.text()}"
            assert response.headers.get("Docker-Content-Digest") == digest
    return digest


async def push_manifest(
    registry: Registry,
    name: str,
    tag: str,
    manifest: bytes,
    media_type: str,
    auth: Mapping[str, str],
) -> str:
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.put(
            f"{registry.url}/v2/{name}/manifests/{tag}",
            data=manifest,
            headers={**auth, "Content-Type": media_type},
        ) as response,
    ):
        assert response.status == 201, f"{response.status} {await response.text()}"
        digest: str = response.headers["Docker-Content-Digest"]
    assert digest == sha256_digest(manifest)
    return digest


@dataclass(frozen=True)
class Image:
    manifest: bytes
    media_type: str
    digest: str
    config_digest: str
    layer_digest: str


async def push_image(
    registry: Registry,
    name: str,
    tag: str,
    layer: bytes,
    auth: Mapping[str, str],
    *,
    oci: bool = True,
) -> Image:
    """A one-layer image (config blob, layer blob, manifest) under ``tag``."""
    layer_digest = await push_blob(registry, name, layer, auth)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = await push_blob(registry, name, config, auth)
    kinds = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
    if not oci:
        kinds = (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    media_type, config_type, layer_type = kinds
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": layer_type, "digest": layer_digest, "size": len(layer)}],
        },
        indent=3,  # not the registry's own formatting: the bytes must come back untouched
    ).encode()
    digest = await push_manifest(registry, name, tag, manifest, media_type, auth)
    return Image(manifest, media_type, digest, config_digest, layer_digest)


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    """An OCI content descriptor of ``data``."""
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


def oci_manifest(config: bytes, layers: list[bytes]) -> bytes:
    """An OCI image manifest of a config and gzip layers, as skopeo pushes it."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
        }
    ).encode()


def write_oci_layout(
    path: Path, tag: str, top: bytes, media_type: str, blobs: Iterable[bytes]
) -> None:
    """An OCI image layout at ``path``, as skopeo reads ``oci:PATH:TAG``: ``blobs`` and ``top``
    (a manifest or an index, of ``media_type``; among ``blobs`` or not) under ``blobs/sha256``,
    and ``tag`` naming ``top`` in ``index.json``."""
    for name, data in {sha256_digest(blob): blob for blob in (*blobs, top)}.items():
        target = path / "blobs" / "sha256" / name.removeprefix("sha256:")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entry = {
        "mediaType": media_type,
        "digest": sha256_digest(top),
        "size": len(top),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
