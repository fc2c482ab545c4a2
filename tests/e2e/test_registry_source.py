"""The oci source against a real registry (Debian's docker-registry): Basic and token auth,
blobs by digest, manifests by tag, the registry's own blob URLs through the http source, and
a whole download through a swarm that never writes or logs a credential."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import aiohttp
import pytest

from swarmfly.config import Config
from swarmfly.errors import SwarmflyError
from swarmfly.get import GetRequest, without_socket
from swarmfly.ids import url_digest
from swarmfly.natsserver import NatsServer
from swarmfly.plugins.sources.http import HttpSource
from swarmfly.plugins.sources.oci import OciSource, resolve
from swarmfly.testing import InProcessCluster, check_source, in_process_cluster
from tests.conftest import require_tool
from tests.e2e.conftest import (
    ALICE,
    ALICE_PASSWORD,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    WRONG_PASSWORD,
    Registry,
    basic_auth,
    push_blob,
    push_image,
    sha256_digest,
)

MiB = 1024 * 1024
NAME = "team/app"
BLOB_SIZE = 5 * MiB + 7
"""A few MiB, not a multiple of anything: ranges end inside a chunk."""
ALICE_AUTH = basic_auth(ALICE, ALICE_PASSWORD)
WRONG_AUTH = basic_auth(ALICE, WRONG_PASSWORD)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


class PrivateBlobLeaked(AssertionError):
    """Raised by the test of a known bug only, so that its strict xfail catches nothing else."""


class StaleTag(AssertionError):
    """Raised by the test of a known bug only, so that its strict xfail catches nothing else."""


def secrets_of(*headers: Mapping[str, str]) -> list[str]:
    """The password and every credential string a leak would show."""
    found = [ALICE_PASSWORD, WRONG_PASSWORD]
    for header in headers:
        for value in header.values():
            found += [value, value.split(" ", 1)[-1]]
    return found


def assert_no_secret(text: str, secrets: Iterable[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:6]}…) appears in {where}"


async def read(
    source: OciSource | HttpSource, url: str, headers: Mapping[str, str], start: int = 0
) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(url, headers, start)])


async def pushed_blob(registry: Registry, size: int = BLOB_SIZE) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, await push_blob(registry, NAME, data, await registry.push_auth(NAME))


def missing_digest() -> str:
    return sha256_digest(b"never pushed " + os.urandom(8))


# -- htpasswd: Basic credentials straight to the registry -------------------------------------


async def test_a_blob_with_basic_auth_passes_the_conformance_check(
    htpasswd_registry: Registry,
) -> None:
    data, digest = await pushed_blob(htpasswd_registry)
    url = htpasswd_registry.oci(NAME, digest)
    source = OciSource()
    try:
        await check_source(
            source,
            url,
            data,
            missing_url=htpasswd_registry.oci(NAME, missing_digest()),
            headers=ALICE_AUTH,
        )
        stat = await source.stat(url, ALICE_AUTH)
        assert stat.digest == digest
        assert stat.ranges is True
    finally:
        await source.close()


@pytest.mark.parametrize(
    "headers", [pytest.param({}, id="anonymous"), pytest.param(WRONG_AUTH, id="wrong-password")]
)
async def test_a_blob_without_valid_credentials_fails_cleanly(
    htpasswd_registry: Registry, headers: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _, digest = await pushed_blob(htpasswd_registry, 1024)
    url = htpasswd_registry.oci(NAME, digest)
    source = OciSource()
    try:
        with pytest.raises(SwarmflyError, match="401") as stat_error:
            await source.stat(url, headers)
        with pytest.raises(SwarmflyError, match="401") as fetch_error:
            await read(source, url, headers)
    finally:
        await source.close()
    secrets = secrets_of(ALICE_AUTH, WRONG_AUTH)
    for error in (stat_error.value, fetch_error.value):
        assert error.code == "source_error"
        assert_no_secret(f"{error} {error.message} {error!r}", secrets, "the error")
    assert_no_secret(caplog.text, secrets, "the log")


async def test_the_registry_blob_url_goes_through_the_http_source(
    htpasswd_registry: Registry,
) -> None:
    data, digest = await pushed_blob(htpasswd_registry)
    url = htpasswd_registry.blob_url(NAME, digest)
    assert url_digest(url) == digest
    source = HttpSource()
    try:
        assert await read(source, url, ALICE_AUTH) == data
        await check_source(
            source,
            url,
            data,
            missing_url=htpasswd_registry.blob_url(NAME, missing_digest()),
            headers=ALICE_AUTH,
        )
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("oci", "media_type"),
    [
        pytest.param(True, OCI_MANIFEST, id="oci"),
        pytest.param(False, DOCKER_MANIFEST, id="schema2"),
    ],
)
async def test_a_manifest_by_tag_comes_back_byte_identical(
    htpasswd_registry: Registry, oci: bool, media_type: str
) -> None:
    auth = await htpasswd_registry.push_auth(NAME)
    image = await push_image(htpasswd_registry, NAME, "v1", os.urandom(4096), auth, oci=oci)
    url = htpasswd_registry.oci(NAME, "v1")
    assert url_digest(url) is None
    source = OciSource()
    try:
        stat = await source.stat(url, ALICE_AUTH)
        assert stat.size == len(image.manifest)
        assert stat.digest is None, "a tag names no digest"
        assert await read(source, url, ALICE_AUTH) == image.manifest
    finally:
        await source.close()
    reference = resolve(url)
    assert reference.accept is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(reference.url, headers={**ALICE_AUTH, "Accept": reference.accept}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == media_type
        assert response.headers["Docker-Content-Digest"] == image.digest


# -- token auth: Basic exchanged for a Bearer token ------------------------------------------


async def test_a_token_registry_blob_passes_with_one_cached_token(
    token_registry: Registry,
) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    data, digest = await pushed_blob(token_registry)
    url = token_registry.oci(NAME, digest)
    pushed = len(issuer.issued)
    source = OciSource()
    try:
        await check_source(
            source,
            url,
            data,
            missing_url=token_registry.oci(NAME, missing_digest()),
            headers=ALICE_AUTH,
        )
        for _ in range(3):
            assert (await source.stat(url, ALICE_AUTH)).digest == digest
            assert await read(source, url, ALICE_AUTH, start=BLOB_SIZE - 10) == data[-10:]
        # The registry's own URL form shares the oci source's http client and its tokens.
        assert await read(source.http, token_registry.blob_url(NAME, digest), ALICE_AUTH) == data
    finally:
        await source.close()
    fresh = issuer.issued[pushed:]
    assert len(fresh) == 1, f"{len(fresh)} tokens issued for one repository"
    assert fresh[0].scopes == [f"repository:{NAME}:pull"]


async def test_a_token_registry_refuses_anonymous_and_wrong_credentials(
    token_registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = token_registry.issuer
    assert issuer is not None
    _, digest = await pushed_blob(token_registry, 1024)
    url = token_registry.oci(NAME, digest)
    source = OciSource()
    errors: list[SwarmflyError] = []
    try:
        assert (await source.stat(url, ALICE_AUTH)).size == 1024
        # alice's cached token must not serve anyone else asking through the same source.
        for headers in ({}, WRONG_AUTH):
            with pytest.raises(SwarmflyError, match="401") as stat_error:
                await source.stat(url, headers)
            with pytest.raises(SwarmflyError, match="401") as fetch_error:
                await read(source, url, headers)
            errors += [stat_error.value, fetch_error.value]
    finally:
        await source.close()
    assert issuer.refused >= 2
    secrets = secrets_of(ALICE_AUTH, WRONG_AUTH) + issuer.tokens
    for error in errors:
        assert error.code == "source_error"
        assert_no_secret(f"{error} {error.message} {error!r}", secrets, "the error")
    assert_no_secret(caplog.text, secrets, "the log")


async def test_skopeo_sees_the_manifest_the_oci_source_fetches(
    token_registry: Registry,
) -> None:
    skopeo = require_tool("skopeo")
    auth = await token_registry.push_auth(NAME)
    image = await push_image(token_registry, NAME, "v1", os.urandom(4096), auth)
    process = await asyncio.create_subprocess_exec(
        skopeo, "inspect", "--raw", "--tls-verify=false",
        "--creds", f"{ALICE}:{ALICE_PASSWORD}",
        f"docker://{token_registry.host}/{NAME}:v1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    source = OciSource()
    try:
        fetched = await read(source, token_registry.oci(NAME, "v1"), ALICE_AUTH)
    finally:
        await source.close()
    assert fetched == stdout == image.manifest


# -- through a swarm -------------------------------------------------------------------------


def via_peer(cluster: InProcessCluster) -> Config:
    """A client config that finds the peer service (its state dir) and downloads through it."""
    return dataclasses.replace(cluster.config, state_dir=cluster.config.state_dir / "peer")


def other_host(cluster: InProcessCluster, name: str) -> Config:
    """A client config with no peer service: `get` runs a peer in process, in the swarm."""
    return dataclasses.replace(cluster.config, state_dir=cluster.config.state_dir / name)


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


async def test_a_swarm_download_from_a_token_registry_keeps_every_secret(
    token_registry: Registry,
    nats: NatsServer,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = token_registry.issuer
    assert issuer is not None
    data, digest = await pushed_blob(token_registry)
    output = tmp_path / "out" / "blob.bin"
    root = tmp_path / "cluster"
    async with in_process_cluster(nats.url, prefix, root) as cluster:
        request = GetRequest(
            url=token_registry.oci(NAME, digest), output=output, headers=ALICE_AUTH, timeout=45
        )
        summary = await without_socket.get(via_peer(cluster), request.checked())
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"{cluster.scheduler.http_url}/api/state",
                headers={"Authorization": f"Bearer {cluster.scheduler.api_token}"},
            ) as response,
        ):
            scheduler_state = await response.text()
    assert summary["via"] == "peer"
    assert output.read_bytes() == data
    assert summary["digest"] == digest
    assert summary["content_length"] == len(data)
    assert len(issuer.issued) >= 2, "the swarm read the registry with a token"
    secrets = secrets_of(ALICE_AUTH) + issuer.tokens
    assert_no_secret(repr(summary), secrets, "the summary")
    assert_no_secret(scheduler_state, secrets, "the scheduler's /api/state")
    for path in files_under(root):
        text = path.read_bytes().decode("latin-1")
        assert_no_secret(text, secrets, str(path.relative_to(tmp_path)))
    assert caplog.records, "the services logged nothing at DEBUG"
    for record in caplog.records:
        text = f"{record.getMessage()} {record.exc_text or ''} {record.args!r}"
        assert_no_secret(text, secrets, f"a log record of {record.name}")


@pytest.mark.parametrize("client_host", ["same-host", "other-host"])
async def test_a_private_blob_is_not_served_to_a_client_without_credentials(
    token_registry: Registry, nats: NatsServer, prefix: str, tmp_path: Path, client_host: str
) -> None:
    data, digest = await pushed_blob(token_registry, 1 * MiB)
    url = token_registry.oci(NAME, digest)
    source = OciSource()
    try:
        with pytest.raises(SwarmflyError, match="401"):
            await source.stat(url, {})  # the registry itself refuses an anonymous client
    finally:
        await source.close()
    async with in_process_cluster(nats.url, prefix, tmp_path / "cluster") as cluster:
        alice = GetRequest(url=url, output=tmp_path / "alice.bin", headers=ALICE_AUTH, timeout=30)
        assert (await without_socket.get(via_peer(cluster), alice.checked()))["digest"] == digest
        assert (tmp_path / "alice.bin").read_bytes() == data
        config = via_peer(cluster) if client_host == "same-host" else other_host(cluster, "anon")
        anonymous = GetRequest(url=url, output=tmp_path / "anon.bin", headers={}, timeout=30)
        try:
            summary = await without_socket.get(config, anonymous.checked())
        except SwarmflyError:
            summary = None
    assert not (tmp_path / "anon.bin").exists() or summary is not None, "a failed get left a file"
    if summary is not None:
        raise PrivateBlobLeaked(f"an anonymous client got the blob: {summary}")


# -- wrong digests ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["oci", "registry-url"])
async def test_a_digest_the_registry_lacks_fails_and_leaves_no_output(
    htpasswd_registry: Registry, tmp_path: Path, form: str
) -> None:
    await pushed_blob(htpasswd_registry, 1 * MiB)  # blob A is there, B never was
    other = sha256_digest(os.urandom(1 * MiB))
    url = (
        htpasswd_registry.oci(NAME, other)
        if form == "oci"
        else htpasswd_registry.blob_url(NAME, other)
    )
    output = tmp_path / "out.bin"
    config = Config(state_dir=tmp_path / "state")  # no NATS: an in-process peer reads the origin
    request = GetRequest(url=url, output=output, headers=ALICE_AUTH, timeout=30)
    with pytest.raises(SwarmflyError) as error:
        await without_socket.get(config, request.checked())
    assert error.value.code in ("not_found", "source_error")
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "a partial file was left"


async def test_a_blob_that_is_not_the_digest_asked_for_fails_and_leaves_no_output(
    htpasswd_registry: Registry, tmp_path: Path
) -> None:
    _, digest = await pushed_blob(htpasswd_registry, 1 * MiB)
    output = tmp_path / "out.bin"
    config = Config(state_dir=tmp_path / "state")
    request = GetRequest(
        url=htpasswd_registry.oci(NAME, digest),
        output=output,
        headers=ALICE_AUTH,
        digest=sha256_digest(b"something else"),
        timeout=30,
    )
    with pytest.raises(SwarmflyError) as error:
        await without_socket.get(config, request.checked())
    assert error.value.code == "integrity"
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "a partial file was left"


# -- tags move -------------------------------------------------------------------------------


async def test_a_manifest_by_tag_follows_the_tag_when_it_moves(
    htpasswd_registry: Registry, tmp_path: Path
) -> None:
    auth = await htpasswd_registry.push_auth(NAME)
    config = Config(state_dir=tmp_path / "state")  # the same host (state dir) both times
    url = htpasswd_registry.oci(NAME, "latest")
    manifests = []
    for round_ in range(2):
        image = await push_image(htpasswd_registry, NAME, "latest", os.urandom(4096), auth)
        output = tmp_path / f"manifest-{round_}.json"
        request = GetRequest(url=url, output=output, headers=ALICE_AUTH, timeout=30)
        await without_socket.get(config, request.checked())
        manifests.append((image.manifest, output.read_bytes()))
    (first_pushed, first_got), (second_pushed, second_got) = manifests
    assert first_got == first_pushed
    assert second_pushed != first_pushed
    if second_got != second_pushed:
        raise StaleTag("the second get returned the manifest the tag left")
