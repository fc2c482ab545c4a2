"""`swarmfly cache` (issue 18, item 1; Dragonfly's dfcache) against real services: a
nats-server with the shipped permissions, scheduler, storage instances and peers as their
own processes, the CLI as a user runs it.

A file imported on one host is exported on another with no origin anywhere; stat names the
storage instances that keep it; rm and the TTL make a later export fail with not_found; bad
input is refused with nothing written; and a storage instance refuses an importer's bytes
that do not match their digest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from swarmfly.cache import cache_task_id, reference
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.natsserver import NatsServer
from swarmfly.testing import in_process_cluster
from tests.conftest import swarmfly
from tests.integration.test_swarm import Cluster

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024


async def cache(cluster: Cluster, peer: int, *args: str) -> tuple[int, dict[str, Any], str]:
    """``swarmfly cache ARGS --json`` on a peer's host: exit code, JSON document, stderr."""
    code, out, err = await swarmfly(
        "cache", *args, "--json", "--state-dir", str(cluster.peer_dir(peer)),
        *cluster.get_args(),
    )  # fmt: skip
    return code, json.loads(out) if out.strip() else {}, err


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def test_import_on_one_host_export_on_another(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 123)
    source = tmp_path / "model.bin"
    source.write_bytes(data)
    cluster.start(peers=2)
    cluster.storage2 = cluster.spawn("storage", "storage2")  # type: ignore[attr-defined]
    digest = digest_of(data)

    code, imported, err = await cache(cluster, 0, "import", str(source), "--replicas", "2")
    assert code == 0, err
    assert imported["ok"] is True
    assert imported["digest"] == digest
    assert imported["reference"] == reference(digest) == f"swarmfly:{digest}"
    assert imported["task_id"] == cache_task_id(digest)
    assert imported["content_length"] == len(data)
    storages = {cluster.storage.host_id, cluster.storage2.host_id}  # type: ignore[attr-defined]
    assert set(imported["replicas"]) == storages
    assert imported["expires_at"] > time.time() + 23 * 3600  # the default TTL: a day

    code, stat, err = await cache(cluster, 1, "stat", digest)
    assert code == 0, err
    assert {s["host_id"] for s in stat["storages"]} == storages
    assert stat["content_length"] == len(data)
    assert stat["peer"] is False  # host 1 has not fetched it (yet)

    # Host 1 has never seen the file; no origin exists: the bytes come from the swarm.
    out = tmp_path / "out.bin"
    code, exported, err = await cache(cluster, 1, "export", digest, "-O", str(out))
    assert code == 0, err
    assert out.read_bytes() == data
    assert exported["bytes_origin"] == 0 and exported["bytes_p2p"] == len(data)
    # get takes the reference as any URL, and refuses to overwrite.
    again = tmp_path / "again.bin"
    code, _, err = await swarmfly(
        "get", reference(digest), "-O", str(again), "--state-dir", str(cluster.peer_dir(1)),
        *cluster.get_args(),
    )  # fmt: skip
    assert code == 0, err
    assert again.read_bytes() == data
    code, refused, err = await cache(cluster, 1, "export", digest, "-O", str(out))
    assert code == 2 and refused["error"]["code"] == "bad_request", err
    assert "exists" in refused["error"]["message"]
    # By the task id too.
    by_id = tmp_path / "by-id.bin"
    code, _, err = await cache(cluster, 1, "export", imported["task_id"], "-O", str(by_id))
    assert code == 0, err
    assert by_id.read_bytes() == data

    # Another host removes its own copy; only the importer removes it from storage.
    code, other, err = await cache(cluster, 1, "rm", digest)
    assert code == 0, err
    assert other["removed"] == [] and other["peer"] is True
    assert set(other["refused"]) == storages
    assert "did not import" in err
    code, stat, err = await cache(cluster, 1, "stat", digest)
    assert code == 0 and len(stat["storages"]) == 2 and stat["peer"] is False, err
    code, again_refused, err = await cache(cluster, 1, "rm", digest)
    assert code == 1 and again_refused["error"]["code"] == "forbidden", err

    code, removed, err = await cache(cluster, 0, "rm", f"swarmfly:{digest}")
    assert code == 0, err
    assert set(removed["removed"]) == storages and removed["peer"] is True
    code, gone, err = await cache(cluster, 1, "stat", digest)
    assert code == 3 and gone["error"]["code"] == "not_found", err
    lost = tmp_path / "lost.bin"
    code, failed, err = await cache(cluster, 1, "export", digest, "-O", str(lost))
    assert code == 3, err
    assert failed["error"]["code"] == "not_found"
    assert "not in the swarm's cache" in failed["error"]["message"]
    assert not lost.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lost")] == []


async def test_the_ttl_expires_an_import(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(MiB + 7)
    source = tmp_path / "short.bin"
    source.write_bytes(data)
    fast_gc = {"SWARMFLY_STORAGE_GC_INTERVAL": "0.5", "SWARMFLY_PEER_GC_INTERVAL": "0.5"}
    cluster.scheduler = cluster.spawn("scheduler", "scheduler")
    cluster.storage = cluster.spawn("storage", "storage", env=fast_gc)
    cluster.peers = [cluster.spawn("peer", f"peer{i}", env=fast_gc) for i in range(2)]
    code, imported, err = await cache(cluster, 0, "import", str(source), "--ttl", "3s")
    assert code == 0, err
    assert imported["expires_at"] <= time.time() + 3
    digest = imported["digest"]

    deadline = time.monotonic() + 30
    while (await cache(cluster, 1, "stat", digest))[0] != 3:
        assert time.monotonic() < deadline, "the import outlived its TTL by 27s"
        await asyncio.sleep(0.5)
    out = tmp_path / "late.bin"
    code, failed, err = await cache(cluster, 1, "export", digest, "-O", str(out))
    assert code == 3 and failed["error"]["code"] == "not_found", err
    assert not out.exists()


async def test_bad_input_is_refused_with_nothing_written(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start(peers=1)
    folder = tmp_path / "folder"
    folder.mkdir()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    good = tmp_path / "good.bin"
    good.write_bytes(os.urandom(4096))
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("import", str(tmp_path / "missing.bin")), 3, "no such file"),
        (("import", str(folder)), 2, "is a directory"),
        (("import", str(empty)), 2, "empty"),
        (("import", str(good), "--ttl", "soon"), 2, "not a duration"),
        (("import", str(good), "--ttl", "0s"), 2, "from 1s to 365d"),
        (("import", str(good), "--ttl", "400d"), 2, "from 1s to 365d"),
        (("import", str(good), "--replicas", "0"), 2, "give 1 or more"),
        (("import", str(good), "--replicas", "2"), 2, "only 1 storage instance runs"),
        (("import", str(good), "--replicas", "17"), 2, "at most 16"),
        (("stat", "sha256:abc"), 2, "no cache id"),
        (("rm", "swarmfly:sha256:" + "g" * 64), 2, "no cache reference"),
        (("export", "nonsense", "-O", str(tmp_path / "x.bin")), 2, "no cache id"),
    ]
    for args, status, words in cases:
        code, document, err = await cache(cluster, 0, *args)
        assert code == status, (args, err)
        assert document["ok"] is False and words in document["error"]["message"], (args, document)
    assert not (tmp_path / "x.bin").exists()
    # Nothing was imported: the refused good file is in no cache.
    code, document, _ = await cache(cluster, 0, "stat", digest_of(good.read_bytes()))
    assert code == 3 and document["error"]["code"] == "not_found"
    tasks = cluster.peer_dir(0) / "tasks"
    assert not tasks.exists() or not any(tasks.glob("??/*"))
    # get: a reference nobody imported is not found, a malformed one refused; nothing written.
    for url, status, words in (
        (reference(digest_of(b"never imported")), 3, "not in the swarm's cache"),
        ("swarmfly:sha256:" + "z" * 64, 2, "no cache reference"),
    ):
        out = tmp_path / "got.bin"
        code, text, err = await swarmfly(
            "get", url, "-O", str(out), "--json", "--state-dir", str(cluster.peer_dir(0)),
            *cluster.get_args(),
        )  # fmt: skip
        assert code == status, (url, err)
        assert words in json.loads(text)["error"]["message"], text
        assert not out.exists()


async def test_without_a_peer_service_cache_says_so(tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 100)
    code, out, err = await swarmfly(
        "cache", "import", str(source), "--json", "--state-dir", str(tmp_path / "none")
    )
    assert code == 6, err
    assert "no peer service runs on this host" in json.loads(out)["error"]["message"]


async def test_storage_refuses_an_importers_forged_bytes(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """The importing peer's upload server serves bytes that are not the file it hashed: the
    storage instance proves the whole file against the digest and keeps nothing of it."""
    data = os.urandom(3 * MiB)
    source = tmp_path / "f.bin"
    source.write_bytes(data)
    async with in_process_cluster(nats.url, prefix, tmp_path / "c") as swarm:
        peer, storage = swarm.peer, swarm.storage

        deadline = time.monotonic() + 10
        while not await peer.imports.fleet():
            assert time.monotonic() < deadline, "the storage instance is not discovered"
            await asyncio.sleep(0.1)
        fd = os.open(source, os.O_RDONLY)
        try:
            stored = await peer.imports.hold(fd, len(data), 60.0)
        finally:
            os.close(fd)
        with open(stored.data_path, "r+b") as handle:  # the cache file changes under it
            handle.seek(MiB + 5)
            handle.write(b"forged!")
        fleet = await peer.imports.fleet()
        with pytest.raises(SwarmflyError, match="do not match") as refused:
            await peer.imports.place(stored, 60.0, 1, fleet, 30.0)
        assert refused.value.code == "integrity"
        assert storage.node.store.get(stored.id) is None
        assert not storage.node.store.path_for(stored.id).exists()
        # Nor does the swarm take the forger's word: no content a getter could adopt, so
        # the reference is not found.
        assert stored.content is not None and stored.content.digest
        with pytest.raises(SwarmflyError, match="not in the swarm's cache"):
            await peer.node.resolve(SourceRequest(reference(stored.content.digest)))
