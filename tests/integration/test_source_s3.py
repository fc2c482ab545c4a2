"""The s3 source against a real S3-compatible server (moto_server in its own process, with
IAM authentication on): the conformance kit, stat, bad URLs, refused credentials that never
show up in an error, and a download through a swarm that leaves no secret in logs or on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

import swarmfly.plugins.sources.s3 as s3_plugin
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.natsserver import NatsServer, free_port
from swarmfly.pluginhost import GROUP, Plugins
from swarmfly.plugins.sources.s3 import S3Source
from swarmfly.services.peer.delivery import deliver
from swarmfly.testing import check_source, in_process_cluster

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
BUCKET = "swarmfly-test"
VERSIONED = "swarmfly-versioned"
WRONG_SECRET = "s3cr3t-for-tests"
ALLOW_S3 = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)


def content_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


BIG = content_of(9 * MiB + 12345, 1)
"""Three 4 MiB pieces; uploaded in two parts with a full-object SHA-256 checksum."""
COMPOSITE = content_of(5 * MiB + 10, 2)
"""Uploaded in two parts with a composite SHA-256 (a digest of part digests)."""
OBJECTS = {
    "tiny.bin": b"x",
    "empty.bin": b"",
    "dir/a b?c%.bin": b"a key that needs percent-encoding",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    versions: dict[str, bytes]
    """Version id -> content of ``s3://VERSIONED/doc.txt``."""


def moto_server_path() -> str:
    """moto_server beside this interpreter, else on PATH; skip without it, except under CI."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("moto_server")
    if found:
        return found
    if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
        pytest.fail("moto_server is required (SWARMFLY_REQUIRE_E2E=1): pip install 'moto[server]'")
    pytest.skip("moto_server is not installed (pip install 'moto[server]')")


def wait_for(endpoint: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not answer in 30 s")


def populate(endpoint: str) -> S3Server:
    """The objects, then IAM authentication on: moto checks signatures only for keys it
    issued, so the tests sign with a key of an IAM user made here, not a made-up one."""
    import boto3  # moto[server] depends on it

    admin: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="swarmfly")
    iam.put_user_policy(UserName="swarmfly", PolicyName="read-s3", PolicyDocument=ALLOW_S3)
    key = iam.create_access_key(UserName="swarmfly")["AccessKey"]

    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket=BUCKET)
    for name, data in OBJECTS.items():
        s3.put_object(Bucket=BUCKET, Key=name, Body=data)
    for name, data, kind in (("big.bin", BIG, "FULL_OBJECT"), ("composite.bin", COMPOSITE, None)):
        extra = {"ChecksumType": kind} if kind else {}
        upload = s3.create_multipart_upload(
            Bucket=BUCKET, Key=name, ChecksumAlgorithm="SHA256", **extra
        )
        parts = []
        for number, part in enumerate((data[: 5 * MiB], data[5 * MiB :]), 1):
            answer = s3.upload_part(
                Bucket=BUCKET,
                Key=name,
                UploadId=upload["UploadId"],
                PartNumber=number,
                Body=part,
                ChecksumAlgorithm="SHA256",
            )
            parts.append(
                {
                    "PartNumber": number,
                    "ETag": answer["ETag"],
                    "ChecksumSHA256": answer["ChecksumSHA256"],
                }
            )
        s3.complete_multipart_upload(
            Bucket=BUCKET,
            Key=name,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
            **extra,
        )

    s3.create_bucket(Bucket=VERSIONED)
    s3.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    versions = {}
    for data in (b"first version", b"second version"):
        versions[s3.put_object(Bucket=VERSIONED, Key="doc.txt", Body=data)["VersionId"]] = data

    # From here on every request must be signed by a key moto knows.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], versions)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    command = moto_server_path()
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [command, "-H", "127.0.0.1", "-p", str(port)], stdout=output, stderr=output
        )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(endpoint, process, log)
        yield populate(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(autouse=True)
def aws_env(moto: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the standard AWS variables, pointing at moto; no profile or file of the host's."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_ENDPOINT_URL_S3",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
        "AWS_MAX_ATTEMPTS",
        "AWS_RETRY_MODE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
async def source() -> AsyncIterator[S3Source]:
    backend = S3Source()
    try:
        yield backend
    finally:
        await backend.close()


def load_plugins() -> Plugins:
    """The installed plugins, plus this one while its entry point is not installed."""
    installed = {point.name for point in entry_points(group=GROUP)}
    return Plugins.load(extra=[] if "s3" in installed else [("s3", s3_plugin)])


async def read(source: S3Source, url: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(url, {}, start, end)])


def url_of(key: str, bucket: str = BUCKET) -> str:
    return f"s3://{bucket}/{key}"


# -- the backend ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "content"),
    [("big.bin", BIG), ("tiny.bin", OBJECTS["tiny.bin"]), ("empty.bin", OBJECTS["empty.bin"])],
)
async def test_conformance(source: S3Source, key: str, content: bytes) -> None:
    await check_source(source, url_of(key), content, missing_url=url_of("missing"))


async def test_stat(source: S3Source) -> None:
    stat = await source.stat(url_of("tiny.bin"), {})
    assert (stat.size, stat.ranges) == (1, True)
    assert stat.etag == f'"{hashlib.md5(b"x").hexdigest()}"'
    assert stat.digest is None, "no SHA-256 checksum was stored with it"


async def test_digest_only_from_a_full_object_sha256(source: S3Source) -> None:
    full = await source.stat(url_of("big.bin"), {})
    assert full.digest == f"sha256:{hashlib.sha256(BIG).hexdigest()}"
    assert full.size == len(BIG)
    composite = await source.stat(url_of("composite.bin"), {})
    assert composite.digest is None, "a digest of part digests is not the content's"


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3://" + BUCKET,
        f"s3://{BUCKET}/",
        "s3:///key",
        url_of("tiny.bin") + "#part",
        url_of("tiny.bin") + "?acl=1",
        "s3://not a bucket!/key",
    ],
)
async def test_bad_url(source: S3Source, url: str) -> None:
    with pytest.raises(SwarmflyError) as stat_error:
        await source.stat(url, {})
    assert stat_error.value.code == "bad_request"
    with pytest.raises(SwarmflyError) as fetch_error:
        await read(source, url)
    assert fetch_error.value.code == "bad_request"


@pytest.mark.parametrize("url", [url_of("missing"), url_of("key", bucket="no-such-bucket")])
async def test_missing_object_is_not_found(source: S3Source, url: str) -> None:
    with pytest.raises(SwarmflyError, match="s3 answered") as stat_error:
        await source.stat(url, {})
    assert stat_error.value.code == "not_found"
    with pytest.raises(SwarmflyError, match="s3 answered NoSuch") as fetch_error:
        await read(source, url)
    assert fetch_error.value.code == "not_found"


async def test_percent_encoded_key(source: S3Source) -> None:
    assert await read(source, url_of("dir/a%20b%3Fc%25.bin")) == OBJECTS["dir/a b?c%.bin"]


async def test_version_id(source: S3Source, moto: S3Server) -> None:
    for version, content in moto.versions.items():
        url = f"{url_of('doc.txt', VERSIONED)}?versionId={version}"
        assert (await source.stat(url, {})).size == len(content)
        assert await read(source, url) == content


async def test_ranges_past_the_end_fail_the_piece(source: S3Source) -> None:
    with pytest.raises(SwarmflyError, match="s3 sent 1 of 5 bytes"):
        await read(source, url_of("tiny.bin"), 0, 5)
    assert await read(source, url_of("tiny.bin"), 1, 1) == b""


async def test_abandoned_fetches_release_their_connection() -> None:
    backend = S3Source(max_pool_connections=1)
    try:
        for _ in range(3):
            stream = backend.fetch(url_of("big.bin"), {})
            async for _chunk in stream:
                break
            await stream.aclose()
        got = await asyncio.wait_for(read(backend, url_of("big.bin"), 0, 10), 30)
        assert got == BIG[:10]
    finally:
        await backend.close()


async def test_close_then_use_again(source: S3Source) -> None:
    assert await read(source, url_of("tiny.bin")) == b"x"
    await source.close()
    assert await read(source, url_of("tiny.bin")) == b"x"


# -- credentials -----------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["secret", "key_id"])
async def test_refused_credentials_never_show_in_errors(
    moto: S3Server, monkeypatch: pytest.MonkeyPatch, wrong: str
) -> None:
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEYMOTOKNOWS")
    backend = S3Source()
    try:
        with pytest.raises(SwarmflyError, match="s3 answered") as on_stat:
            await backend.stat(url_of("tiny.bin"), {})
        with pytest.raises(SwarmflyError, match="s3 answered") as on_fetch:
            await read(backend, url_of("tiny.bin"))
    finally:
        await backend.close()
    for error in (on_stat.value, on_fetch.value):
        assert error.code == "source_error"
        shown = "".join(traceback.format_exception(error)) + repr(error.to_dict())
        for secret in (moto.secret, WRONG_SECRET, "Signature="):
            assert secret not in shown
    assert on_fetch.value.message in (
        "s3 answered SignatureDoesNotMatch",
        "s3 answered InvalidAccessKeyId",
    )


async def test_no_credentials_is_a_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    backend = S3Source()
    try:
        with pytest.raises(SwarmflyError, match=r"s3: Unable to locate credentials$") as caught:
            await backend.stat(url_of("tiny.bin"), {})
    finally:
        await backend.close()
    assert caught.value.code == "source_error"


async def test_unreachable_endpoint_is_a_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    backend = S3Source()
    refused = f"s3: cannot connect to 127.0.0.1:{port}: Connection refused"
    try:
        with pytest.raises(SwarmflyError, match=f"^source_error: {re.escape(refused)}$") as caught:
            await backend.stat(url_of("tiny.bin"), {})
    finally:
        await backend.close()
    assert caught.value.code == "source_error"


# -- through the plugin host and a swarm -----------------------------------------------------


def test_registered_through_the_plugin_api() -> None:
    plugins = load_plugins()
    assert isinstance(plugins.source_for(url_of("tiny.bin")), S3Source)
    info = next(i for i in plugins.infos if "s3" in i.provides)
    assert info.error is None
    assert info.kinds == ["source"]


async def test_download_through_a_swarm_leaves_no_secret(
    nats: NatsServer,
    prefix: str,
    tmp_path: Path,
    moto: S3Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "state"
    output = tmp_path / "out" / "big.bin"
    async with AsyncExitStack() as stack:
        plugins = load_plugins()
        stack.push_async_callback(plugins.close)
        cluster = await stack.enter_async_context(
            in_process_cluster(nats.url, prefix, state, plugins)
        )
        peer = cluster.peer
        result = await asyncio.wait_for(peer.node.download(SourceRequest(url_of("big.bin"))), 120)
        stored = peer.node.store.open(result.task_id)
        await asyncio.to_thread(lambda: deliver(stored, output, umask=0o022))

    assert output.read_bytes() == BIG
    assert result.digest == f"sha256:{hashlib.sha256(BIG).hexdigest()}"  # S3's full-object checksum
    assert result.content_length == len(BIG)

    secret = moto.secret.encode()
    for folder in (state, nats.store_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), f"the S3 secret is in {path}"
    assert caplog.records, "nothing was logged: the check below would prove nothing"
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert moto.secret not in text, f"the S3 secret is in a {record.name} log line"
        if record.name.startswith("swarmfly"):
            assert moto.key_id not in text and "Signature=" not in text
