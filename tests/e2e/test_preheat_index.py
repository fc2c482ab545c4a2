"""`swarmfly preheat image` of a multi-platform image, as a user runs it: an OCI index pushed
with skopeo to Debian's docker-registry (htpasswd), credentials from a Docker ``config.json``,
``--platform linux/arm64``; only that platform's blobs are read from the registry, per its
own access log."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from swarmfly import preheat
from swarmfly.natsserver import NatsServer
from swarmfly.testing import in_process_cluster
from tests.e2e.conftest import (
    ALICE,
    ALICE_PASSWORD,
    OCI_MANIFEST,
    WRONG_PASSWORD,
    Registry,
    oci_manifest,
    sha256_digest,
    write_oci_layout,
)
from tests.e2e.test_mirror import blob_gets, run, skopeo

MiB = 1024 * 1024
NAME = "team/multi"
TAG = "v2"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PLATFORMS = {"amd64": (MiB + 3, 300_001), "arm64": (2 * MiB + 5, 200_003)}
"""Layer sizes per architecture: distinct random bytes, so no blob is shared."""

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Platform:
    manifest_digest: str
    blobs: dict[str, int]
    """Digest -> size of the config and the layers."""


def _layer(size: int) -> bytes:
    """A gzipped tar of random bytes (stored: random data does not shrink)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return gzip.compress(raw.getvalue(), compresslevel=0, mtime=0)


def build_index_layout(path: Path) -> dict[str, Platform]:
    """An OCI layout whose tag names an index of one image per platform."""
    blobs: dict[str, bytes] = {}
    platforms: dict[str, Platform] = {}
    entries = []
    for arch, sizes in PLATFORMS.items():
        layers = [_layer(size) for size in sizes]
        config = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(x) for x in layers]},
            }
        ).encode()
        manifest = oci_manifest(config, layers)
        for blob in (config, *layers, manifest):
            blobs[sha256_digest(blob)] = blob
        platforms[arch] = Platform(
            sha256_digest(manifest), {sha256_digest(b): len(b) for b in (config, *layers)}
        )
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(manifest),
                "size": len(manifest),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    write_oci_layout(path, TAG, index, OCI_INDEX, blobs.values())
    return platforms


def docker_config(path: Path, registry: Registry, password: str) -> Path:
    """A Docker ``config.json``, as `docker login` writes it."""
    auth = base64.b64encode(f"{ALICE}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    return path


async def test_preheat_of_an_index_seeds_only_the_platforms_blobs(
    nats: NatsServer, prefix: str, tmp_path: Path, htpasswd_registry: Registry
) -> None:
    platforms = build_index_layout(tmp_path / "layout")
    pushed = skopeo(
        "copy", "--all", "--dest-tls-verify=false", "--dest-creds", f"{ALICE}:{ALICE_PASSWORD}",
        f"oci:{tmp_path / 'layout'}:{TAG}", f"docker://{htpasswd_registry.host}/{NAME}:{TAG}",
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert not blob_gets(htpasswd_registry), "the push read blobs back"
    command = [
        sys.executable, "-m", "swarmfly", "preheat", "image", "--plain-http",
        "--platform", "linux/arm64", "--nats", nats.url, "--prefix", prefix,
        "--state-dir", str(tmp_path / "cli"), f"{htpasswd_registry.host}/{NAME}:{TAG}",
    ]  # fmt: skip
    wrong = docker_config(tmp_path / "wrong.json", htpasswd_registry, WRONG_PASSWORD)
    right = docker_config(tmp_path / "config.json", htpasswd_registry, ALICE_PASSWORD)
    async with in_process_cluster(nats.url, prefix, tmp_path):
        refused = await run([*command, "--auth-file", str(wrong)])
        assert refused.returncode == 3, "refused at the origin"
        assert "401" in refused.stderr and WRONG_PASSWORD not in refused.stderr
        done = await run([*command, "--auth-file", str(right), "--json"])
        assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    arm64, amd64 = platforms["arm64"].blobs, platforms["amd64"].blobs
    assert (summary["tasks"], summary["failed"], summary["cached"]) == (len(arm64), 0, 0)
    assert summary["bytes"] == summary["bytes_origin"] == sum(arm64.values())
    served = blob_gets(htpasswd_registry)
    assert set(served) == set(arm64), "only the arm64 image's config and layers were read"
    for name, size in arm64.items():
        assert size <= sum(served[name]) <= size + 1, "once each (and the seed's 1-byte probe)"
    assert not set(served) & set(amd64)


async def test_preheat_of_an_image_into_every_peer_reads_each_blob_once(
    nats: NatsServer, prefix: str, tmp_path: Path, htpasswd_registry: Registry
) -> None:
    """``--scope all-peers``: the peer downloads each blob through the swarm (storage seeds
    it from the registry), with the caller's credentials; the registry serves each once."""
    platforms = build_index_layout(tmp_path / "layout")
    pushed = skopeo(
        "copy", "--all", "--dest-tls-verify=false", "--dest-creds", f"{ALICE}:{ALICE_PASSWORD}",
        f"oci:{tmp_path / 'layout'}:{TAG}", f"docker://{htpasswd_registry.host}/{NAME}:{TAG}",
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    right = docker_config(tmp_path / "config.json", htpasswd_registry, ALICE_PASSWORD)
    command = [
        sys.executable, "-m", "swarmfly", "preheat", "image", "--plain-http",
        "--platform", "linux/arm64", "--nats", nats.url, "--prefix", prefix,
        "--state-dir", str(tmp_path / "cli"), f"{htpasswd_registry.host}/{NAME}:{TAG}",
        "--auth-file", str(right), "--scope", "all-peers", "--concurrency", "2",
    ]  # fmt: skip
    async with in_process_cluster(nats.url, prefix, tmp_path):
        done = await run([*command, "--json"])
        assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    arm64 = platforms["arm64"].blobs
    assert (summary["scope"], len(summary["hosts"]), summary["failures"]) == ("all-peers", 1, [])
    assert (summary["tasks"], summary["failed"], summary["bytes"]) == (
        len(arm64),
        0,
        sum(arm64.values()),
    )
    for digest in arm64:  # in the peer's cache
        url = f"http://{htpasswd_registry.host}/v2/{NAME}/blobs/{digest}"
        task = preheat.Blob(url, digest).task_id
        assert task and (tmp_path / "peer" / "tasks" / task[:2] / task).is_dir(), digest
    served = blob_gets(htpasswd_registry)
    assert set(served) == set(arm64)
    for name, size in arm64.items():
        assert size <= sum(served[name]) <= size + 2, "once each, and the 1-byte access checks"
