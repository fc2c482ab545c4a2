"""The registry mirror end to end, with real parts only: Debian's docker-registry (htpasswd) as
the upstream, skopeo as the client configured through a ``registries.conf`` mirror exactly as
a user would, and a swarm of separate processes (one scheduler, one storage, three peers each
running its proxy) on a real nats-server.

What the registry served is read from its own access log: every GET of a blob, with the bytes
it sent.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from swarmfly.config import Config
from swarmfly.natsserver import NatsServer
from swarmfly.testing import ServiceProcess, in_process_cluster, spawn_service
from tests.conftest import FAST_ENV, require_tool
from tests.e2e.conftest import (
    ALICE,
    ALICE_PASSWORD,
    OCI_MANIFEST,
    WRONG_PASSWORD,
    Registry,
    basic_auth,
    oci_manifest,
    push_blob,
    sha256_digest,
    write_oci_layout,
)

MiB = 1024 * 1024
NAME = "team/app"
TAG = "v1"
LAYER_SIZES = (20 * MiB, 16 * MiB + 4097, 13 * MiB + 1)
"""Three layers, 49 MiB of tar content: more than one piece each, none a multiple of one."""
HOSTS = 3
_BLOB_GET = re.compile(r'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/1\.1" (\d{3}) (\d+)')

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass(frozen=True)
class Layout:
    """An OCI image layout on disk: what the test pushes and what the pulls must equal."""

    path: Path
    blobs: dict[str, bytes]
    manifest_digest: str


def build_layout(path: Path, sizes: tuple[int, ...] = LAYER_SIZES) -> Layout:
    """An image of gzipped tar layers of random bytes, ``sizes`` long (stored, not
    compressed: random data does not shrink, and level 0 keeps building it fast)."""
    blobs: dict[str, bytes] = {}
    layers: list[bytes] = []
    diff_ids: list[str] = []
    for number, size in enumerate(sizes):
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            info = tarfile.TarInfo(f"data/layer{number}.bin")
            info.size = size
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        raw = tar_bytes.getvalue()
        layer = gzip.compress(raw, compresslevel=0, mtime=0)
        blobs[sha256_digest(layer)] = layer
        layers.append(layer)
        diff_ids.append(sha256_digest(raw))
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    blobs[sha256_digest(config)] = config
    manifest = oci_manifest(config, layers)
    blobs[sha256_digest(manifest)] = manifest
    write_oci_layout(path, TAG, manifest, OCI_MANIFEST, blobs.values())
    return Layout(path, blobs, sha256_digest(manifest))


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("skopeo"), *args], capture_output=True, text=True, timeout=180, check=False
    )


async def run(
    command: list[str], *, stdin: str | None = None, text: bool = True
) -> subprocess.CompletedProcess[Any]:
    """A client command, off the event loop (the swarm's own processes are elsewhere)."""
    return await asyncio.to_thread(
        subprocess.run,
        command,
        input=stdin,
        capture_output=True,
        text=text,
        timeout=120,
        check=False,
    )


def blob_gets(registry: Registry) -> dict[str, list[int]]:
    """Bytes sent by each successful blob GET in the registry's access log."""
    sent: dict[str, list[int]] = defaultdict(list)
    for match in _BLOB_GET.finditer(registry.log()):
        if match[2] in ("200", "206"):
            sent[match[1]].append(int(match[3]))
    return sent


def mirror_conf(path: Path, registry: Registry, proxy_url: str) -> Path:
    """registries.conf sending pulls of the registry to this host's proxy."""
    path.write_text(
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{proxy_url.removeprefix("http://")}"\n'
        "insecure = true\n"
    )
    return path


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return build_layout(tmp_path / "layout")


@pytest.fixture
def pushed(htpasswd_registry: Registry, layout: Layout) -> Registry:
    result = skopeo(
        "copy", "--dest-tls-verify=false", "--dest-creds", f"{ALICE}:{ALICE_PASSWORD}",
        f"oci:{layout.path}:{TAG}", f"docker://{htpasswd_registry.host}/{NAME}:{TAG}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    before = blob_gets(htpasswd_registry)
    assert not any(d in before for d in layout.blobs), "the push itself read blobs back"
    return htpasswd_registry


@pytest.fixture
def swarm(
    nats: NatsServer, prefix: str, tmp_path: Path, pushed: Registry
) -> Iterator[list[ServiceProcess]]:
    """Scheduler, storage and three peers with their proxies: the peers are returned."""
    started: list[ServiceProcess] = []

    def start(kind: str, name: str, *args: str) -> ServiceProcess:
        process = spawn_service(
            kind, nats.url, tmp_path / name, "--prefix", prefix, *args, env=FAST_ENV
        )
        started.append(process)
        return process

    try:
        start("scheduler", "scheduler")
        start("storage", "storage", "--listen", "127.0.0.1")
        mirror = ("--listen", "127.0.0.1", "--proxy-port", "0", "--registry", pushed.url)
        peers = [start("peer", f"host{n}", *mirror) for n in range(HOSTS)]
        assert all(p.proxy_url for p in peers), [p.banner for p in peers]
        yield peers
    finally:
        for process in reversed(started):
            process.stop()


async def pull(
    registry: Registry, proxy_url: str, out: Path, creds: str | None = None
) -> subprocess.CompletedProcess[str]:
    conf = mirror_conf(out.parent / f"{out.name}-registries.conf", registry, proxy_url)
    args = ["--registries-conf", str(conf), "copy", "--src-tls-verify=false"]
    if creds:
        # As a user does: credentials in an auth file, for the registry and its mirror
        # (containers/image looks them up per host it talks to).
        auth = base64.b64encode(creds.encode()).decode()
        hosts = [registry.host, proxy_url.removeprefix("http://")]
        authfile = out.parent / f"{out.name}-auth.json"
        authfile.write_text(json.dumps({"auths": {h: {"auth": auth} for h in hosts}}))
        args += ["--src-authfile", str(authfile)]
    args += [f"docker://{registry.host}/{NAME}:{TAG}", f"dir:{out}"]
    return await asyncio.to_thread(skopeo, *args)


def assert_identical(out: Path, layout: Layout) -> None:
    """Every blob skopeo wrote is byte-identical to the pushed one, the manifest included."""
    manifest = (out / "manifest.json").read_bytes()
    assert sha256_digest(manifest) == layout.manifest_digest
    wanted = json.loads(manifest)
    for blob in [wanted["config"], *wanted["layers"]]:
        got = (out / blob["digest"].removeprefix("sha256:")).read_bytes()
        assert got == layout.blobs[blob["digest"]], f"blob {blob['digest'][:19]} differs"


async def test_three_hosts_pull_through_their_mirrors_and_the_registry_serves_each_blob_once(
    pushed: Registry, layout: Layout, swarm: list[ServiceProcess], tmp_path: Path
) -> None:
    creds = f"{ALICE}:{ALICE_PASSWORD}"
    outs = [tmp_path / f"pull{n}" for n in range(HOSTS)]
    results = await asyncio.gather(
        *(pull(pushed, peer.proxy_url, out, creds) for peer, out in zip(swarm, outs, strict=True))
    )
    for result in results:
        assert result.returncode == 0, result.stderr
    for out in outs:
        assert_identical(out, layout)
    served = blob_gets(pushed)
    for name, data in layout.blobs.items():
        if name == layout.manifest_digest:
            continue
        # The seed's one-byte probe aside, the registry sent each blob once: no more bytes
        # than the blob has, and at least its bytes (someone had to read it).
        total = sum(served.get(name, []))
        readers = [line for p in swarm for line in p.log().splitlines() if "origin" in line]
        assert len(data) <= total <= len(data) + 1, (name[:19], served.get(name), readers)

    # A client without credentials, or with wrong ones, is refused through the mirror even
    # though the blobs now sit in the swarm.
    layer = next(d for d in layout.blobs if len(layout.blobs[d]) > MiB)
    curl = require_tool("curl")
    for user in (None, f"{ALICE}:{WRONG_PASSWORD}"):
        command = [curl, "-s", "-o", os.devnull, "-w", "%{http_code}", "--max-time", "30"]
        if user:
            command += ["-u", user]
        command.append(f"{swarm[0].proxy_url}/v2/{NAME}/blobs/{layer}")
        answer = await run(command)
        assert answer.stdout == "401", answer
        result = await pull(pushed, swarm[1].proxy_url, tmp_path / f"denied-{user}", user)
        assert result.returncode != 0
    # ...while alice, with hers, still gets it from the mirror.
    command = [curl, "-s", "-u", f"{ALICE}:{ALICE_PASSWORD}", "--max-time", "30"]
    command += [f"{swarm[2].proxy_url}/v2/{NAME}/blobs/{layer}"]
    assert (await run(command, text=False)).stdout == layout.blobs[layer]
    assert sum(blob_gets(pushed).get(layer, [])) <= len(layout.blobs[layer]) + 1
    for peer in swarm:
        assert ALICE_PASSWORD not in peer.log() and WRONG_PASSWORD not in peer.log()


async def test_after_a_preheat_the_pulls_read_no_blob_from_the_registry(
    nats: NatsServer,
    prefix: str,
    pushed: Registry,
    layout: Layout,
    swarm: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    preheat = await run(
        [
            sys.executable, "-m", "swarmfly", "preheat", "image", "--json",
            "--nats", nats.url, "--prefix", prefix, "--platform", "linux/amd64",
            "--plain-http", "--username", ALICE, "--password-stdin",
            f"{pushed.host}/{NAME}:{TAG}",
        ],
        stdin=ALICE_PASSWORD + "\n",
    )  # fmt: skip
    assert preheat.returncode == 0, preheat.stderr
    summary = json.loads(preheat.stdout)
    assert summary["tasks"] == len(layout.blobs) - 1  # config and layers, not the manifest
    assert summary["bytes"] == sum(
        len(d) for n, d in layout.blobs.items() if n != layout.manifest_digest
    )
    before = {name: list(sent) for name, sent in blob_gets(pushed).items()}
    outs = [tmp_path / f"pull{n}" for n in range(HOSTS)]
    results = await asyncio.gather(
        *(
            pull(pushed, peer.proxy_url, out, f"{ALICE}:{ALICE_PASSWORD}")
            for peer, out in zip(swarm, outs, strict=True)
        )
    )
    for result, out in zip(results, outs, strict=True):
        assert result.returncode == 0, result.stderr
        assert_identical(out, layout)
    assert blob_gets(pushed) == before, "a pull after the preheat read a blob from the registry"


async def test_bad_requests_get_registry_errors_and_the_mirror_keeps_serving(
    nats: NatsServer, prefix: str, tmp_path: Path, htpasswd_registry: Registry
) -> None:
    """Each refusal as curl sees it: a 4xx with the registry API's JSON error body; then the
    registry's own answers pass through, and a good pull still works."""
    data = os.urandom(3 * MiB)
    layer = await push_blob(htpasswd_registry, NAME, data, basic_auth(ALICE, ALICE_PASSWORD))
    big = tmp_path / "big-header"
    big.write_text(f"X-Big: {'a' * 100 * 1024}\n")
    curl = require_tool("curl")

    def configure(config: Config) -> None:
        config.proxy.registries = [htpasswd_registry.url]

    blob = f"/v2/{NAME}/blobs/{layer}"
    async with in_process_cluster(nats.url, prefix, tmp_path, configure=configure) as cluster:

        async def ask(path: str, *args: str) -> tuple[str, str, bytes]:
            body = tmp_path / "body"
            answer = await run(
                [curl, "-s", "--path-as-is", "-o", str(body), "-w", "%{http_code} %{content_type}",
                 "--max-time", "30", *args, f"{cluster.proxy.url}{path}"]
            )  # fmt: skip
            status, _, content_type = answer.stdout.partition(" ")
            return status, content_type, body.read_bytes()

        for path, args, status, code in [
            (blob, ["-H", "X-Swarmfly-Registry: http://127.0.0.1:1"], "403", "DENIED"),
            (f"{blob}?ns=registry.example.com", [], "403", "DENIED"),
            (f"/v2/{NAME}/blobs/sha256:{'0' * 63}", [], "400", "DIGEST_INVALID"),
            (f"/v2/{NAME}/../../../v2/other/blobs/{layer}", [], "400", "NAME_INVALID"),
            (f"/v2/team/%2e%2e/app/blobs/{layer}", [], "400", "NAME_INVALID"),
            (blob, ["-H", f"@{big}"], "431", "UNSUPPORTED"),
        ]:
            got, content_type, body = await ask(path, *args)
            assert (got, content_type) == (status, "application/json"), (path, body[:200])
            assert [e["code"] for e in json.loads(body)["errors"]] == [code], path
        # The registry's own answers come back as it gave them...
        got, _, body = await ask("/v2/")
        assert got == "401" and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        got, _, body = await ask("/v2/_catalog", "-u", f"{ALICE}:{ALICE_PASSWORD}")
        assert (got, json.loads(body)) == ("200", {"repositories": [NAME]})
        # ...and a good pull still works.
        got, _, body = await ask(blob, "-u", f"{ALICE}:{ALICE_PASSWORD}")
        assert (got, body) == ("200", data)
