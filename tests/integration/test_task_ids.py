"""dfget's task-id flags: ``--tag`` and ``--application`` make the same URL another task
(unless a digest names the content), and are checked like every input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson

from swarmfly.testing import Origin
from tests.conftest import swarmfly


async def get(url: str, output: Path, state: Path, *flags: str) -> str:
    code, out, err = await swarmfly(
        "get", url, "-O", str(output), "--state-dir", str(state), "--json", *flags
    )
    assert code == 0, err
    summary = orjson.loads(out)
    assert output.read_bytes() == b"tagged " * 100
    task: str = summary["task_id"]
    return task


async def test_tag_and_application_are_task_id_inputs(origin: Origin, tmp_path: Path) -> None:
    data = b"tagged " * 100
    url = origin.add("f.bin", data)
    state = tmp_path / "s"
    plain = await get(url, tmp_path / "a", state)
    first = await get(url, tmp_path / "b", state, "--tag", "team-a")
    assert first != plain
    assert await get(url, tmp_path / "c", state, "--tag", "team-a") == first
    assert await get(url, tmp_path / "d", state, "--tag", "team-b") not in (plain, first)
    assert await get(url, tmp_path / "e", state, "--application", "ci") not in (plain, first)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    named = await get(url, tmp_path / "f", state, "--digest", digest)
    assert await get(url, tmp_path / "g", state, "--digest", digest, "--tag", "x") == named, (
        "a digest names the content: a tag does not split it"
    )


async def test_a_tag_that_is_not_printable_ascii_is_a_usage_error(tmp_path: Path) -> None:
    for bad in ("é", "a" * 257, "tab\there"):
        code, _, err = await swarmfly(
            "get", "http://127.0.0.1:1/f", "-O", str(tmp_path / "x"), "--tag", bad
        )
        assert code == 2, err
        assert "argument --tag: printable ASCII, at most 256 characters" in err
    assert not os.path.exists(tmp_path / "x")
