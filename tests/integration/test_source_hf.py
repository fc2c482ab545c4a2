"""The hf source against a local Hugging Face Hub: a real HTTP server speaking the part of the
Hub's API the source uses (revision → commit, resolve, LFS redirects to a CDN on another port,
private repositories), alone and through a swarm of real services."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import Unsatisfiable, byte_range
from swarmfly.natsserver import NatsServer
from swarmfly.origins import OriginPolicy
from swarmfly.plugins import check_source
from swarmfly.plugins.sources.hf import HfFile, HfSource
from swarmfly.testing import FrozenClock, spawn_service
from tests.conftest import FAST_ENV, swarmfly

MiB = 1024 * 1024
LFS_THRESHOLD = 64 * 1024
"""Files at least this long are LFS files: the Hub redirects them to the CDN."""
TOKEN = "hf_secret_" + os.urandom(8).hex()


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[-1][1]}"
    finally:
        await runner.cleanup()


async def send(request: web.Request, data: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """``data`` or the range of it asked for; nothing but headers for HEAD."""
    try:
        span = byte_range(request.headers.get("Range"), len(data))
    except Unsatisfiable:
        raise web.HTTPRequestRangeNotSatisfiable() from None
    status, start, end = 200, 0, len(data)
    if span is not None:
        status, start, end = 206, span.start, span.end
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
    response = web.StreamResponse(status=status, headers={"Accept-Ranges": "bytes", **headers})
    response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        await response.write(data[start:end])
    await response.write_eof()
    return response


@dataclass
class Cdn:
    """Where the Hub sends LFS downloads: blobs by sha256, on a port of their own."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    """Blobs served with one byte flipped (a storage bucket gone bad)."""
    authorizations: list[str | None] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.authorizations.append(request.headers.get("Authorization"))
        sha = request.match_info["sha"]
        data = self.blobs.get(sha)
        if data is None:
            raise web.HTTPNotFound()
        if sha in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return await send(request, data, {"ETag": f'"{sha}"'})


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None
    """A private repository answers only requests bearing this token."""

    def commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = hashlib.sha1(os.urandom(16)).hexdigest()
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha


@dataclass
class Hub:
    """The Hub's API, as much as the hf source uses of it."""

    cdn: Cdn
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    authorizations: list[str | None] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    """The revision of each resolve request."""
    url: str = ""

    def repo(self, name: str, kind: str = "models", token: str | None = None) -> Repo:
        return self.repos.setdefault((kind, name), Repo(token=token))

    def _repo(self, request: web.Request, kind: str) -> Repo:
        self.authorizations.append(request.headers.get("Authorization"))
        info = request.match_info
        repo = self.repos.get((kind, f"{info['owner']}/{info['name']}"))
        if repo is None or (
            repo.token is not None
            and request.headers.get("Authorization") != f"Bearer {repo.token}"
        ):
            raise web.HTTPUnauthorized(headers={"X-Error-Code": "RepoNotFound"})
        return repo

    async def revision(self, request: web.Request) -> web.Response:
        repo = self._repo(request, request.match_info["kind"])
        rev = request.match_info["rev"]
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        return web.json_response({"id": request.match_info["name"], "sha": sha})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request, request.match_info.get("kind", "models"))
        rev = request.match_info["rev"]
        self.resolved.append(rev)
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        data = repo.commits[sha].get(request.match_info["path"])
        if data is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": sha}
        if len(data) < LFS_THRESHOLD:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            return await send(request, data, {**headers, "ETag": f'"{blob}"'})
        digest = hashlib.sha256(data).hexdigest()
        self.cdn.blobs[digest] = data
        raise web.HTTPFound(
            f"{self.cdn.url}/blobs/{digest}",
            headers={**headers, "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))},
        )

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Hub]:
        cdn = web.Application()
        cdn.router.add_get("/blobs/{sha}", self.cdn.handle)
        hub = web.Application()
        hub.router.add_get("/api/{kind}/{owner}/{name}/revision/{rev}", self.revision)
        hub.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        hub.router.add_get("/{kind}/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        async with serving(cdn) as self.cdn.url, serving(hub) as self.url:
            yield self


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    async with Hub(Cdn()).serve() as running:
        yield running


@pytest.fixture
async def source(hub: Hub) -> AsyncIterator[HfSource]:
    made = HfSource(hub.url)
    try:
        yield made
    finally:
        await made.close()


async def read(source: HfSource, url: str, headers: dict[str, str] | None = None) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(url, headers or {})])


def test_urls_name_repository_revision_and_path() -> None:
    assert HfFile.from_url("hf://acme/tiny/config.json") == HfFile(
        "models", "acme/tiny", "main", "config.json"
    )
    assert HfFile.from_url("hf://datasets/acme/squad@refs%2Fpr%2F1/data/train.parquet") == (
        HfFile("datasets", "acme/squad", "refs/pr/1", "data/train.parquet")
    )
    for bad in ("hf://acme/config.json", "hf://acme/tiny/../x", "hf://acme/tiny/x?y=1"):
        with pytest.raises(SwarmflyError, match="hf://") as caught:
            HfFile.from_url(bad)
        assert caught.value.code == "bad_request"


async def test_model_and_dataset_files_pass_the_conformance_kit(hub: Hub, source: HfSource) -> None:
    weights, config = os.urandom(2 * MiB + 3), b'{"hidden_size": 8}'
    hub.repo("acme/tiny").commit({"model.safetensors": weights, "config.json": config})
    hub.repo("acme/squad", kind="datasets").commit({"data/train.bin": weights})
    for url, data in [
        ("hf://acme/tiny/model.safetensors", weights),
        ("hf://acme/tiny/config.json", config),
        ("hf://datasets/acme/squad/data/train.bin", weights),
    ]:
        await check_source(source, url, data, missing_url="hf://acme/tiny/missing.bin")

    lfs = await source.stat("hf://acme/tiny/model.safetensors", {})
    assert lfs.digest == f"sha256:{hashlib.sha256(weights).hexdigest()}", "keyed by its sha256"
    assert (await source.stat("hf://acme/tiny/config.json", {})).digest is None, "a git blob id"


async def test_missing_repository_revision_and_path_are_named(hub: Hub, source: HfSource) -> None:
    hub.repo("acme/tiny").commit({"config.json": b"{}"})
    with pytest.raises(SwarmflyError, match=r"acme/tiny@main has no file 'nope\.json'") as e:
        await source.stat("hf://acme/tiny/nope.json", {})
    assert e.value.code == "not_found"
    with pytest.raises(SwarmflyError, match="model acme/tiny has no revision 'v9'") as e:
        await source.stat("hf://acme/tiny@v9/config.json", {})
    assert e.value.code == "not_found"
    with pytest.raises(SwarmflyError, match="acme/absent is private, gated or missing"):
        await source.stat("hf://acme/absent/config.json", {})


async def test_a_branch_is_read_at_the_commit_it_named_when_resolved(hub: Hub) -> None:
    repo = hub.repo("acme/tiny")
    old, new = os.urandom(MiB), os.urandom(MiB)
    first = repo.commit({"model.bin": old})
    clock = FrozenClock()
    source = HfSource(hub.url, clock=clock)
    try:
        stat = await source.stat("hf://acme/tiny/model.bin", {})
        assert stat.digest == f"sha256:{hashlib.sha256(old).hexdigest()}"
        second = repo.commit({"model.bin": new})  # main moves on mid-download
        assert await read(source, "hf://acme/tiny/model.bin") == old
        assert set(hub.resolved) == {first}, "every request named the commit, not the branch"

        assert await read(source, f"hf://acme/tiny@{second}/model.bin") == new
        clock.advance(120)  # a later download sees the new commit
        assert await read(source, "hf://acme/tiny/model.bin") == new
    finally:
        await source.close()


async def test_the_token_goes_to_the_hub_and_never_to_the_cdn(hub: Hub, tmp_path: Path) -> None:
    weights = os.urandom(MiB)
    hub.repo("acme/private", token=TOKEN).commit({"model.bin": weights, "README.md": b"hi"})
    configured = HfSource(hub.url, token=TOKEN)
    anonymous = HfSource(hub.url)
    try:
        assert await read(configured, "hf://acme/private/model.bin") == weights
        given = {"Authorization": f"Bearer {TOKEN}"}  # swarmfly get --header
        assert await read(anonymous, "hf://acme/private/model.bin", given) == weights
        assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
        assert hub.cdn.authorizations and set(hub.cdn.authorizations) == {None}

        with pytest.raises(SwarmflyError, match=r"private, gated or missing.*token_file") as e:
            await anonymous.stat("hf://acme/private/README.md", {})
        assert e.value.code == "source_error"
        wrong = {"Authorization": "Bearer hf_wrong_secret"}
        with pytest.raises(SwarmflyError, match="the token given may not read it") as e:
            await anonymous.stat("hf://acme/private/README.md", wrong)
        assert "hf_wrong_secret" not in str(e.value)
    finally:
        await configured.close()
        await anonymous.close()


async def test_the_hub_and_each_redirect_are_checked_against_origins(hub: Hub) -> None:
    weights = os.urandom(MiB)
    hub.repo("acme/tiny").commit({"model.bin": weights, "config.json": b"{}"})
    cdn_port = hub.cdn.url.rsplit(":", 1)[1]
    no_cdn = HfSource(hub.url, guard=OriginPolicy(deny=[f"127.0.0.1:{cdn_port}"]))
    no_hub = HfSource(hub.url, guard=OriginPolicy(deny=["127.0.0.0/8"]))
    try:
        assert await read(no_cdn, "hf://acme/tiny/config.json") == b"{}", "served by the Hub"
        with pytest.raises(SwarmflyError, match="is not an allowed origin") as e:
            await no_cdn.stat("hf://acme/tiny/model.bin", {})
        assert e.value.code == "forbidden"
        with pytest.raises(SwarmflyError, match="is not an allowed origin"):
            await read(no_cdn, "hf://acme/tiny/model.bin")
        with pytest.raises(SwarmflyError, match="is not an allowed origin"):
            await no_hub.stat("hf://acme/tiny/config.json", {})
    finally:
        await no_cdn.close()
        await no_hub.close()


@pytest.fixture
def cluster_env(hub: Hub, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "swarmfly.toml"
    token_file = tmp_path / "hf-token"
    token_file.write_text(TOKEN + "\n")
    config.write_text(f'[plugins.hf]\nendpoint = "{hub.url}"\ntoken_file = "{token_file}"\n')
    return {**FAST_ENV, "SWARMFLY_CONFIG": str(config)}


async def test_a_repository_downloads_through_a_swarm(
    hub: Hub, cluster_env: dict[str, str], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """20 small files and a 48 MiB LFS file with ``swarmfly get``: a real nats-server, the
    real services, the token from ``[plugins.hf] token_file``; a private repository without
    access, and an LFS file whose CDN serves other bytes, fail with the user's exit codes."""
    small = {f"tokenizer/part-{i:02}.json": os.urandom(1000 + i) for i in range(20)}
    big = os.urandom(48 * MiB)
    llm = hub.repo("acme/llm", token=TOKEN).commit({**small, "model.safetensors": big})
    hub.repo("acme/other", token="hf_someone_elses").commit({"model.bin": os.urandom(1000)})
    broken = os.urandom(2 * MiB)
    hub.repo("acme/broken").commit({"model.bin": broken})
    services = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=cluster_env)
        for kind in ("scheduler", "storage", "peer")
    ]
    common = ("--state-dir", str(tmp_path / "peer"), "--nats", nats.url, "--prefix", prefix)
    out = tmp_path / "out"

    async def get(url: str, name: str) -> tuple[int, str, str]:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return await swarmfly("get", url, "-O", str(target), "--json", *common, env=cluster_env)

    try:
        code, stdout, err = await get("hf://acme/llm/model.safetensors", "model.safetensors")
        assert code == 0, err
        assert orjson.loads(stdout)["via"] == "peer"
        assert (out / "model.safetensors").read_bytes() == big

        gate = asyncio.Semaphore(5)

        async def get_small(name: str) -> tuple[int, str, str]:
            async with gate:
                return await get(f"hf://acme/llm/{name}", name)

        results = await asyncio.gather(*(get_small(name) for name in small))
        assert [code for code, _, _ in results] == [0] * len(small), [e for _, _, e in results]
        for name, data in small.items():
            assert (out / name).read_bytes() == data
        assert hub.cdn.authorizations and set(hub.cdn.authorizations) == {None}
        assert f"Bearer {TOKEN}" in hub.authorizations
        assert set(hub.resolved) == {llm}, "every host read the commit main named"

        code, _, err = await get("hf://acme/other/model.bin", "other.bin")
        assert code == 3, err
        assert "model acme/other is private, gated or missing" in err
        assert TOKEN not in err
        assert not (out / "other.bin").exists()

        hub.cdn.corrupt.add(hashlib.sha256(broken).hexdigest())
        code, _, err = await get("hf://acme/broken/model.bin", "broken.bin")
        assert code == 4, err
        assert not (out / "broken.bin").exists()
        for service in services:
            assert TOKEN not in service.log()
    finally:
        for service in services:
            service.stop()


async def test_a_private_repository_without_a_token_fails_saying_how_to_pass_one(
    hub: Hub, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(1000)
    hub.repo("acme/private", token=TOKEN).commit({"model.bin": data})
    config = tmp_path / "swarmfly.toml"
    config.write_text(f'[plugins.hf]\nendpoint = "{hub.url}"\n')
    env = {**FAST_ENV, "SWARMFLY_CONFIG": str(config)}
    output = tmp_path / "model.bin"
    args = ("get", "hf://acme/private/model.bin", "-O", str(output), "--nats", nats.url)
    args += ("--prefix", prefix, "--state-dir", str(tmp_path / "alone"))
    code, _, err = await swarmfly(*args, env=env)
    assert code == 3, err
    assert "model acme/private is private, gated or missing" in err
    assert "--header 'Authorization: Bearer hf_…' or [plugins.hf] token_file" in err
    assert not output.exists()

    code, _, err = await swarmfly(*args, "--header", f"Authorization: Bearer {TOKEN}", env=env)
    assert code == 0, err
    assert output.read_bytes() == data
