"""`swarmfly get --recursive` against real parts: a moto_server S3 (its own process, IAM auth
on) and a local Hugging Face Hub that also speaks the tree API (paged with ``Link``), the real
CLI in its own process, through real services on a real nats-server and without them.

Every listing is untrusted: each class of name that could write outside ``-O DIR`` is refused
with words that name it, and nothing is written anywhere."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from swarmfly import contracts
from swarmfly.natsserver import NatsServer
from swarmfly.plugins import check_listing
from swarmfly.plugins.sources.hf import HfSource
from swarmfly.plugins.sources.s3 import S3Source
from swarmfly.testing import spawn_service
from tests.conftest import FAST_ENV, swarmfly
from tests.integration.test_source_hf import LFS_THRESHOLD, Cdn, Hub, serving
from tests.integration.test_source_s3 import BUCKET, S3Server, aws_env, moto

__all__ = ["aws_env", "moto"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(240)

LOCAL = contracts.local_socket()

MiB = 1024 * 1024
TREE = {
    "config.json": b'{"layers": 2}',
    "weights/part-0.bin": os.urandom(3 * MiB + 17),
    "weights/part-1.bin": os.urandom(2 * MiB),
    "tokenizer/vocab.txt": os.urandom(5000),
    "a b/c?d%.txt": b"a key that needs percent-encoding",
}


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@dataclass
class TreeHub(Hub):
    """The local Hub, with ``/api/{kind}/{repo}/tree/{rev}[/{path}]?recursive=true`` paged
    ``page_size`` entries at a time; ``listings`` replaces a repository's tree with whatever
    a hostile Hub would send; ``next_elsewhere`` sends the next page's link to another host."""

    page_size: int = 1000
    listings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    next_elsewhere: str | None = None

    def _tree_of(self, files: dict[str, bytes], folder: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        folders = {str(p) for path in files for p in Path(path).parents if str(p) != "."}
        for name in sorted(folders):
            items.append({"type": "directory", "path": name, "oid": "0" * 40, "size": 0})
        for path, data in sorted(files.items()):
            item: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if len(data) >= LFS_THRESHOLD:
                sha = hashlib.sha256(data).hexdigest()
                item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
            items.append(item)
        top = f"{folder}/" if folder else ""
        return [i for i in items if i["path"].startswith(top) and i["path"] != folder]

    async def tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request, request.match_info["kind"])
        info = request.match_info
        rev = info["rev"]
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RevisionNotFound"})
        name = f"{info['owner']}/{info['name']}"
        items = self.listings.get(name) or self._tree_of(repo.commits[sha], info.get("path", ""))
        cursor = int(request.query.get("cursor", "0"))
        page = items[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(items):
            base = self.next_elsewhere or self.url
            query = f"recursive=true&cursor={cursor + self.page_size}"
            headers["Link"] = f'<{base}{request.path}?{query}>; rel="next"'
        return web.Response(
            body=orjson.dumps(page), content_type="application/json", headers=headers
        )

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Hub]:
        cdn = web.Application()
        cdn.router.add_get("/blobs/{sha}", self.cdn.handle)
        hub = web.Application()
        hub.router.add_get("/api/{kind}/{owner}/{name}/revision/{rev}", self.revision)
        hub.router.add_get("/api/{kind}/{owner}/{name}/tree/{rev}", self.tree)
        hub.router.add_get("/api/{kind}/{owner}/{name}/tree/{rev}/{path:.+}", self.tree)
        hub.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        hub.router.add_get("/{kind}/{owner}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        async with serving(cdn) as self.cdn.url, serving(hub) as self.url:
            yield self


@pytest.fixture
async def hub() -> AsyncIterator[TreeHub]:
    async with TreeHub(Cdn()).serve() as running:
        assert isinstance(running, TreeHub)
        yield running


@pytest.fixture
def hf_env(hub: TreeHub, tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "swarmfly.toml"
    config.write_text(f'[plugins.hf]\nendpoint = "{hub.url}"\n')
    return {**FAST_ENV, "SWARMFLY_CONFIG": str(config)}


@pytest.fixture(scope="module")
def tree(moto: S3Server) -> Iterator[str]:
    """``TREE`` under ``s3://BUCKET/tree/``, put with the IAM key moto now insists on."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        region_name="us-east-1",
        aws_access_key_id=moto.key_id,
        aws_secret_access_key=moto.secret,
    )
    for name, data in TREE.items():
        s3.put_object(Bucket=BUCKET, Key=f"tree/{name}", Body=data)
    s3.put_object(Bucket=BUCKET, Key="tree/", Body=b"")  # a console's folder marker
    s3.put_object(Bucket=BUCKET, Key="tree-other/not-below.bin", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key="evil/ok.txt", Body=b"fine")
    s3.put_object(Bucket=BUCKET, Key="evil/../escape.txt", Body=b"out")
    yield f"s3://{BUCKET}/tree/"


def ask_peer(state_dir: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """One request on the peer's local socket, as any client may send it; its lines."""
    record = orjson.loads((state_dir / "peer.json").read_bytes())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(record["socket"])
        conn.sendall(orjson.dumps(request) + b"\n")
        return [orjson.loads(line) for line in conn.makefile("rb")]


async def get_r(url: str, out: Path, *args: str, env: dict[str, str]) -> tuple[int, Any, str]:
    """``swarmfly get -r URL -O OUT --json ARGS``: exit code, its one JSON document, stderr."""
    code, stdout, stderr = await swarmfly(
        "get", "-r", url, "-O", str(out), "--json", "--connect-timeout", "2", *args, env=env
    )
    lines = stdout.splitlines()
    assert len(lines) == 1, f"not one JSON document: {stdout!r} ({stderr})"
    return code, orjson.loads(lines[0]), stderr


async def test_the_s3_and_hf_listings_pass_the_conformance_kit(tree: str, hub: TreeHub) -> None:
    s3 = S3Source()
    try:
        await check_listing(s3, tree, TREE, missing_url=f"s3://{BUCKET}/nothing-here/")
    finally:
        await s3.close()
    hub.page_size = 2  # several pages
    hub.repo("acme/llm").commit({f"sub/{name}": data for name, data in TREE.items()})
    hf = HfSource(hub.url)
    try:
        await check_listing(hf, "hf://acme/llm/sub", TREE, missing_url="hf://acme/llm/none")
        listed = {e.path: e async for e in hf.entries("hf://acme/llm", {})}
        assert sorted(listed) == sorted(f"sub/{name}" for name in TREE)
        big = TREE["weights/part-0.bin"]
        assert (
            listed["sub/weights/part-0.bin"].digest == f"sha256:{hashlib.sha256(big).hexdigest()}"
        )
        assert "@" in listed["sub/config.json"].url, "each file's URL names the listed commit"
    finally:
        await hf.close()


async def test_a_prefix_is_listed_by_the_peer_and_downloaded_through_the_swarm(
    tree: str, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """The CLI's own S3 secret is wrong: the peer lists (over its local socket) and the
    swarm downloads with the services' credentials, each file verified, the layout kept."""
    services = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=FAST_ENV)
        for kind in ("scheduler", "storage", "peer")
    ]
    common = ("--state-dir", str(tmp_path / "peer"), "--nats", nats.url, "--prefix", prefix)
    cli_env = {**FAST_ENV, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    out = tmp_path / "out"
    try:
        code, summary, err = await get_r(tree, out, "--jobs", "2", *common, env=cli_env)
        assert code == 0, err
        assert summary["ok"] is True and summary["listed_by"] == "peer"
        assert files_under(out) == TREE
        assert summary["files"] == summary["written"] == len(TREE)
        assert summary["content_length"] == sum(len(d) for d in TREE.values())
        assert {e["path"] for e in summary["entries"]} == set(TREE)
        assert {e["via"] for e in summary["entries"]} == {"peer"}

        only = tmp_path / "only"
        code, summary, err = await get_r(
            tree, only, "--include", "weights/*", "--include", "*.json", *common, env=cli_env
        )
        assert code == 0, err
        assert sorted(files_under(only)) == [
            "config.json",
            "weights/part-0.bin",
            "weights/part-1.bin",
        ]

        lines = ask_peer(tmp_path / "peer", {"list": {"url": tree, "limit": 10}})
        for line in lines:
            LOCAL.of(line).validate(line)
        assert [next(iter(line)) for line in lines] == ["entry"] * len(TREE) + ["listed"]
        *sent, refused = ask_peer(tmp_path / "peer", {"list": {"url": tree, "limit": 4}})
        assert "lists more than 4 files" in refused["error"]["message"]
        assert len(sent) == 4, "entries already sent, which the error says not to use"
        (refused,) = ask_peer(
            tmp_path / "peer", {"list": {"url": "https://x.example/", "limit": 4}}
        )
        assert refused["error"]["message"].startswith("the https source cannot list a prefix")

        few = tmp_path / "few"
        code, summary, err = await get_r(tree, few, "--max-files", "3", *common, env=cli_env)
        assert code == 2, err
        assert "has 5 files, more than --max-files 3" in err
        assert summary["ok"] is False and summary["error"]["code"] == "bad_request"
        assert not few.exists()
    finally:
        for service in services:
            service.stop()


async def test_an_s3_key_climbing_out_is_refused_before_any_byte(tree: str, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    code, summary, err = await get_r(
        f"s3://{BUCKET}/evil/", out, "--state-dir", str(tmp_path / "cli"), env=FAST_ENV
    )
    assert code == 2, err
    assert "'../escape.txt'" in err and "would climb out of the directory" in err
    assert summary["error"]["code"] == "bad_request"
    assert not out.exists() and not (tmp_path / "deep" / "escape.txt").exists()


async def test_a_repository_downloads_without_a_peer_keeping_its_layout(
    hub: TreeHub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    """No peer runs: the CLI lists with its own plugins, pages of 3, an LFS file verified
    against the sha256 the Hub states; a revision is read at the commit it named."""
    hub.page_size = 3
    commit = hub.repo("acme/llm").commit(TREE)
    out = tmp_path / "llm"
    code, summary, err = await get_r(
        "hf://acme/llm@main", out, "--state-dir", str(tmp_path / "cli"), env=hf_env
    )
    assert code == 0, err
    assert summary["listed_by"] == "in-process"
    assert files_under(out) == TREE
    assert set(hub.resolved) == {commit}
    lfs = next(e for e in summary["entries"] if e["path"] == "weights/part-0.bin")
    assert lfs["digest"] == f"sha256:{hashlib.sha256(TREE['weights/part-0.bin']).hexdigest()}"

    folder = tmp_path / "weights"
    code, summary, err = await get_r(
        "hf://acme/llm/weights/", folder, "--state-dir", str(tmp_path / "cli"), env=hf_env
    )
    assert code == 0, err
    assert sorted(files_under(folder)) == ["part-0.bin", "part-1.bin"]


def listing_of(*paths: str) -> list[dict[str, Any]]:
    return [{"type": "file", "path": p, "size": 4} for p in ("good.bin", *paths)]


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        (["../../escape.txt"], "'../../escape.txt', whose '..' would climb out of the directory"),
        (["/tmp/escape.txt"], "'/tmp/escape.txt', an absolute path"),
        (["..\\escape.txt"], "a backslash"),
        (["nul\x00.txt"], "holds a NUL byte"),
        (["bell\x07.txt"], "holds a control character"),
        (["x" * 300], "a part longer than 255 bytes"),
        (["y" * 2000], "a file of more than 1024 bytes"),
        (["caf\u00e9", "cafe\u0301"], "is the same path as"),
        (["good.bin/inner"], "below 'good.bin', a file"),
    ],
)
async def test_a_hostile_listing_is_refused_and_nothing_is_written(
    hub: TreeHub, hf_env: dict[str, str], tmp_path: Path, paths: list[str], words: str
) -> None:
    hub.repo("acme/evil").commit({"good.bin": b"good"})
    hub.listings["acme/evil"] = listing_of(*paths)
    out = tmp_path / "a" / "out"
    code, summary, err = await get_r(
        "hf://acme/evil", out, "--state-dir", str(tmp_path / "cli"), env=hf_env
    )
    assert code == 2, err
    assert words in err and "refusing" in err
    assert summary == {"ok": False, "error": summary["error"]}
    assert not out.exists() and files_under(tmp_path / "a") == {}
    assert not Path("/tmp/escape.txt").exists()


async def test_a_listing_of_too_many_files_or_pages_elsewhere_is_refused(
    hub: TreeHub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    hub.repo("acme/huge").commit({"good.bin": b"good"})
    hub.listings["acme/huge"] = [
        {"type": "file", "path": f"f/{i}", "size": 1} for i in range(100_001)
    ]
    state = ("--state-dir", str(tmp_path / "cli"))
    code, _, err = await get_r("hf://acme/huge", tmp_path / "huge", *state, env=hf_env)
    assert code == 2, err
    assert "lists more than 100000 files: name a narrower prefix or folder" in err

    hub.page_size = 2
    hub.next_elsewhere = "http://attacker.example"
    hub.repo("acme/llm").commit(TREE)
    code, _, err = await get_r("hf://acme/llm", tmp_path / "llm", *state, env=hf_env)
    assert code == 3, err
    assert "next page of model acme/llm is elsewhere" in err
    assert not (tmp_path / "huge").exists() and not (tmp_path / "llm").exists()


async def test_a_corrupt_file_stops_the_get_and_leaves_no_partial_file(
    hub: TreeHub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    """The CDN serves other bytes for one LFS file: exit 4, the error names it, the summary
    says what was written; that file is not at its path and no temporary file is left."""
    files = {"a/small.txt": b"small", "b/big.bin": os.urandom(2 * MiB), "c/last.txt": b"last"}
    hub.repo("acme/broken").commit(files)
    hub.cdn.corrupt.add(hashlib.sha256(files["b/big.bin"]).hexdigest())
    out = tmp_path / "out"
    code, summary, err = await get_r(
        "hf://acme/broken", out, "--jobs", "1", "--state-dir", str(tmp_path / "cli"), env=hf_env
    )
    assert code == 4, err
    assert "'b/big.bin'" in err and "of 3 files written" in err
    assert summary["ok"] is False and summary["error"]["code"] == "integrity"
    assert summary["files"] == 3 and summary["written"] == 1
    assert [f["path"] for f in summary["failed"]] == ["b/big.bin"]
    assert files_under(out) == {"a/small.txt": b"small"}, "only complete files, nothing else"
