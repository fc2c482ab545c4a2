"""``peer.<host>.download`` over NATS writes only under ``[peer] output_roots`` (issue 13,
item 4): a cluster member cannot make the peer (often root) write where it likes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats import connect as connect_nats

from swarmfly import contracts
from swarmfly.config import Config
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster, subject_tokens

pytestmark = pytest.mark.timeout(120)

DATA = b"output roots " * 10000

Ask = Any


@asynccontextmanager
async def peer(nats: NatsServer, root: Path, roots: list[str]) -> AsyncIterator[Ask]:
    prefix = f"t{uuid.uuid4().hex[:12]}"

    def configure(config: Config) -> None:
        config.peer.output_roots = roots

    async with in_process_cluster(nats.url, prefix, root, configure=configure) as cluster:
        nc = await connect_nats(servers=[nats.url], connect_timeout=3, max_reconnect_attempts=0)
        name = "peer.{host_id}.download"
        subject = contracts.get(name).subject(prefix, **subject_tokens(name, cluster.hosts))

        async def ask(url: str, output: str) -> dict[str, Any]:
            request = {"download_id": f"dl-{uuid.uuid4().hex[:8]}", "source": {"url": url}}
            msg = await nc.request(subject, orjson.dumps({**request, "output": output}), 40)
            body: dict[str, Any] = orjson.loads(msg.data)
            return body

        try:
            yield ask
        finally:
            await nc.close()


async def test_with_no_output_roots_nothing_is_written_anywhere(
    nats: NatsServer, tmp_path: Path
) -> None:
    origin = Origin()
    async with origin.serve() as served, peer(nats, tmp_path / "cluster", []) as ask:
        url = served.add("f.bin", DATA)
        for output in (tmp_path / "mine.bin", Path("/etc/swarmfly-attack"), Path("/root/x")):
            body = await ask(url, str(output))
            assert body["error"]["code"] == "forbidden", body
            assert "[peer] output_roots" in body["error"]["message"]
            assert not output.exists()
        assert origin.requests == 0, "nothing is fetched for a refused output"


async def test_outputs_inside_a_root_work_and_escapes_are_refused(
    nats: NatsServer, tmp_path: Path
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)  # a directory link inside the root, pointing out
    (outside / "victim").write_bytes(b"keep me")
    (root / "file-link").symlink_to(outside / "victim")
    async with Origin().serve() as served, peer(nats, tmp_path / "cluster", [str(root)]) as ask:
        url = served.add("f.bin", DATA)
        reply = await ask(url, str(root / "new" / "dir" / "f.bin"))
        assert reply["content_length"] == len(DATA), reply
        assert (root / "new" / "dir" / "f.bin").read_bytes() == DATA
        for output, words in [
            (f"{root}/../outside/dotdot.bin", "'..'"),
            (f"{root}/new/../../outside/dotdot.bin", "'..'"),
            (str(root / "link" / "through.bin"), "leaves its root at 'link'"),
            (str(root / "link" / "deeper" / "through.bin"), "leaves its root at 'link'"),
            (str(root / "file-link"), "is a symbolic link"),
            (str(outside / "direct.bin"), "is not under an output root"),
            (f"{root}-sibling/x.bin", "is not under an output root"),
        ]:
            body = await ask(url, output)
            assert body["error"]["code"] == "forbidden", (output, body)
            assert words in body["error"]["message"], (output, body)
        assert sorted(p.name for p in outside.iterdir()) == ["victim"]
        assert (outside / "victim").read_bytes() == b"keep me"
        assert not (tmp_path / "root-sibling").exists()
