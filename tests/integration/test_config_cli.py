"""Configuration mistakes as a user meets them through the CLI: one line naming the setting
where it was given, the usage exit status (2), before anything starts; a variable that is no
setting is said once, and the command goes on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson
import pytest

from swarmfly.testing import Origin
from tests.conftest import swarmfly

pytestmark = pytest.mark.timeout(60)


async def test_swarmfly_up_with_a_wrong_type_in_its_file_says_where(tmp_path: Path) -> None:
    config = tmp_path / "swarmfly.toml"
    config.write_text('[peer]\nconcurrency = [1]\n[scheduler]\nacyclic = "maybe"\n')
    started = time.monotonic()
    code, out, err = await swarmfly("up", "--config", str(config), "--state-dir", str(tmp_path))
    assert time.monotonic() - started < 10, "refused before anything started"
    assert (code, out) == (2, "")
    assert err == f"swarmfly: {config}: [peer] concurrency: expected a whole number, got [1]\n"
    assert not (tmp_path / "cluster.json").exists()


async def test_get_with_a_wrong_variable_names_it_and_reads_nothing(
    origin: Origin, tmp_path: Path
) -> None:
    url = origin.add("f.bin", b"x" * 1024)
    get = ("get", url, "-O", str(tmp_path / "f.bin"), "--state-dir", str(tmp_path / "s"))
    code, out, err = await swarmfly(*get, "--json", env={"SWARMFLY_PEER_CONCURRENCY": "abc"})
    assert code == 2
    assert err == "swarmfly: SWARMFLY_PEER_CONCURRENCY: expected a whole number, got 'abc'\n"
    assert orjson.loads(out)["error"] == {
        "code": "bad_request",
        "status": 400,
        "message": "SWARMFLY_PEER_CONCURRENCY: expected a whole number, got 'abc'",
    }
    assert origin.bytes_served == 0 and not (tmp_path / "f.bin").exists()


async def test_a_flag_out_of_range_is_named(tmp_path: Path) -> None:
    code, _, err = await swarmfly(
        "peer", "--nats", "nats://127.0.0.1:9", "--upload-port", "70000",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 2
    assert err == "swarmfly: --upload-port: must be a port from 0 to 65535, got 70000\n"


async def test_a_missing_configuration_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    code, _, err = await swarmfly("status", "--config", str(missing), "--state-dir", str(tmp_path))
    assert code == 2
    assert err == f"swarmfly: configuration file {missing}: No such file or directory\n"


async def test_a_misspelt_section_is_warned_about_once_and_the_get_goes_on(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(64 * 1024)
    url = origin.add("f.bin", data)
    code, out, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "f.bin"), "--state-dir", str(tmp_path / "s"),
        env={"SWARMFLY_PEERS_CONCURRENCY": "4"},
    )  # fmt: skip
    assert (code, out) == (0, "")
    assert err.count("\n") == 1, err
    assert err.rstrip().endswith(
        "WARNING swarmfly.config: SWARMFLY_PEERS_CONCURRENCY is not a swarmfly setting"
        " (did you mean SWARMFLY_PEER_CONCURRENCY?): ignored"
    )
    assert (tmp_path / "f.bin").read_bytes() == data
