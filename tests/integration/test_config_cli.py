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
        env={"SWARMFLY_PEERS_CONCURRENCY": "4", "SWARMFLY_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    assert (code, out) == (0, "")
    assert err.count("\n") == 1, err
    assert err.rstrip().endswith(
        "WARNING swarmfly.config: SWARMFLY_PEERS_CONCURRENCY is not a swarmfly setting"
        " (did you mean SWARMFLY_PEER_CONCURRENCY?): ignored"
    )
    assert (tmp_path / "f.bin").read_bytes() == data


async def test_a_variable_like_no_setting_is_offered_none(tmp_path: Path) -> None:
    """Beside ``SWARMFLY_`` every name looks like every other: a guess must be close in
    what follows it, or it sends the user to a setting they never meant."""
    code, _, err = await swarmfly(
        "plugins", "--state-dir", str(tmp_path), env={"SWARMFLY_PEERS_X": "1"}
    )
    assert code == 0, err
    assert err.rstrip().endswith(
        "WARNING swarmfly.config: SWARMFLY_PEERS_X is not a swarmfly setting: ignored"
    )
    assert err.count("\n") == 1, err


async def test_a_nats_url_of_another_scheme_is_a_usage_error(tmp_path: Path) -> None:
    started = time.monotonic()
    code, out, err = await swarmfly("status", "--nats", "foo://bar", "--state-dir", str(tmp_path))
    assert time.monotonic() - started < 10, "refused, not tried until the deadline"
    assert (code, out) == (2, "")
    assert err == (
        "swarmfly: --nats: unknown scheme 'foo://'; a NATS URL starts with nats://, tls://,"
        " ws:// or wss://\n"
    )
    code, _, err = await swarmfly(
        "status", "--state-dir", str(tmp_path), env={"SWARMFLY_NATS_SERVERS": "http://a:4222"}
    )
    assert code == 2
    assert err.startswith("swarmfly: SWARMFLY_NATS_SERVERS: unknown scheme 'http://'; ")


LEVELS = "expected DEBUG, INFO, WARNING, ERROR or CRITICAL"
COMMANDS = {
    "get": ["get", "http://127.0.0.1:9/f", "-O", "out"],
    "preheat": ["preheat", "url", "http://127.0.0.1:9/f"],
    "status": ["status"],
    "doctor": ["doctor"],
    "plugins": ["plugins"],
    "peer": ["peer"],
    "up": ["up"],
}


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
async def test_every_command_refuses_a_log_level_naming_where_it_was_given(
    tmp_path: Path, command: list[str]
) -> None:
    state = ("--state-dir", str(tmp_path))
    code, out, err = await swarmfly(*command, *state, env={"SWARMFLY_LOG_LEVEL": "LOUD"})
    assert (code, out) == (2, "")
    assert err == f"swarmfly: SWARMFLY_LOG_LEVEL: {LEVELS}, got 'LOUD'\n"
    config = tmp_path / "cfg" / "a.toml"
    config.parent.mkdir(exist_ok=True)
    config.write_text('log_level = "loud"\n')
    code, out, err = await swarmfly(*command, *state, env={"SWARMFLY_CONFIG": str(config)})
    assert (code, out) == (2, "")
    assert err == f"swarmfly: {config}: log_level: {LEVELS}, got 'loud'\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cluster.json").exists()
