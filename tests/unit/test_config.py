"""Configuration: defaults <- TOML file <- SWARMFLY_* environment <- flags."""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path

import nkeys
import pytest

from swarmfly.config import (
    Config,
    NatsConfig,
    PeerConfig,
    SchedulerConfig,
    StorageConfig,
    load,
    parse_size,
)

MiB = 1024 * 1024


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    return write(
        tmp_path / "custom.toml",
        """
log_level = "DEBUG"

[nats]
servers = ["nats://file:4222"]
prefix = "from-file"

[scheduler]
candidate_parents = 6
host_ttl = 20.0

[peer]
upload_rate = "4MiB"
concurrency = 8
idc = "dc-file"
""",
    )


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = load(env={"SWARMFLY_STATE_DIR": str(tmp_path)})
    assert config.state_dir == tmp_path
    assert config.log_level is None, "each command's own: INFO, a get's WARNING"
    assert config.nats == NatsConfig()
    assert config.scheduler == SchedulerConfig()
    assert config.peer == PeerConfig()
    assert config.storage == StorageConfig()
    assert config.nats.servers == []
    assert config.peer.upload_rate == 0
    assert config.peer.strategy == "rarest-first"


def test_defaults_with_an_empty_environment(tmp_path: Path) -> None:
    config = load({"state_dir": tmp_path}, env={})
    assert config.state_dir == tmp_path
    assert config.peer == PeerConfig()


def test_a_toml_file_overrides_defaults(tmp_path: Path, toml: Path) -> None:
    config = load({"state_dir": tmp_path}, config_file=str(toml), env={})
    assert config.log_level == "DEBUG"
    assert config.nats.servers == ["nats://file:4222"]
    assert config.nats.prefix == "from-file"
    assert config.scheduler.candidate_parents == 6
    assert config.scheduler.host_ttl == 20.0
    assert config.peer.upload_rate == 4 * MiB
    assert config.peer.concurrency == 8
    # Everything not in the file keeps its default.
    assert config.scheduler.seed_timeout == SchedulerConfig().seed_timeout
    assert config.storage == StorageConfig()


def test_the_file_in_the_state_dir_is_read_by_default(tmp_path: Path) -> None:
    write(tmp_path / "swarmfly.toml", '[peer]\nstrategy = "sequential"\n')
    config = load(env={"SWARMFLY_STATE_DIR": str(tmp_path)})
    assert config.peer.strategy == "sequential"


def test_swarmfly_config_names_the_file(tmp_path: Path, toml: Path) -> None:
    config = load(env={"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_CONFIG": str(toml)})
    assert config.scheduler.candidate_parents == 6


def test_the_environment_overrides_the_file(tmp_path: Path, toml: Path) -> None:
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path),
        "SWARMFLY_LOG_LEVEL": "WARNING",
        "SWARMFLY_PEER_UPLOAD_RATE": "8MiB",
        "SWARMFLY_NATS_SERVERS": "nats://a:4222, nats://b:4222",
        "SWARMFLY_SCHEDULER_CANDIDATE_PARENTS": "3",
        "SWARMFLY_SCHEDULER_HOST_TTL": "2.5",
        "SWARMFLY_PEER_ADVERTISE_IP": "10.1.2.3",
    }
    config = load(config_file=str(toml), env=env)
    assert config.log_level == "WARNING"
    assert config.peer.upload_rate == 8388608
    assert config.nats.servers == ["nats://a:4222", "nats://b:4222"]
    assert config.scheduler.candidate_parents == 3
    assert config.scheduler.host_ttl == 2.5
    assert config.peer.advertise_ip == "10.1.2.3"
    # The file still wins over defaults where the environment is silent.
    assert config.peer.concurrency == 8
    assert config.nats.prefix == "from-file"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a,b", ["a", "b"]), ("a", ["a"]), (" a , ,b ", ["a", "b"]), ("", [])],
)
def test_list_settings_from_the_environment(
    tmp_path: Path, value: str, expected: list[str]
) -> None:
    env = {"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_NATS_SERVERS": value}
    assert load(env=env).nats.servers == expected


def test_flags_override_the_environment(tmp_path: Path, toml: Path) -> None:
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path / "from-env"),
        "SWARMFLY_PEER_UPLOAD_RATE": "8MiB",
        "SWARMFLY_NATS_SERVERS": "nats://env:4222",
    }
    flags = {
        "state_dir": str(tmp_path),
        "peer": {"upload_rate": "1MiB", "concurrency": None},
        "nats": {"servers": ["nats://flag:4222"]},
    }
    config = load(flags, config_file=str(toml), env=env)
    assert config.state_dir == tmp_path
    assert config.peer.upload_rate == MiB
    assert config.nats.servers == ["nats://flag:4222"]
    assert config.peer.concurrency == 8  # a None flag is not given


def test_unrelated_swarmfly_variables_are_ignored(tmp_path: Path) -> None:
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path),
        "SWARMFLY_REQUIRE_E2E": "1",
        "SWARMFLY": "x",
        "OTHER_PEER_UPLOAD_RATE": "1",
    }
    assert load(env=env).peer == PeerConfig()


def test_an_unknown_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[peer]\nupload_speed = 1\n")
    message = r"bad\.toml: \[peer\] upload_speed: unknown setting \(did you mean upload_rate\?\)"
    with pytest.raises(ValueError, match=message):
        load({"state_dir": tmp_path}, config_file=str(path), env={})


def test_an_unknown_top_level_key_in_the_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "colour = 'blue'\n")
    with pytest.raises(ValueError, match=r"bad\.toml: colour: unknown setting$"):
        load({"state_dir": tmp_path}, config_file=str(path), env={})


def test_a_section_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "peer = 1\n")
    with pytest.raises(ValueError, match=r"\[peer\] must be a table"):
        load({"state_dir": tmp_path}, config_file=str(path), env={})


def test_unknown_variables_are_warned_about_one_line_each(tmp_path: Path) -> None:
    """The environment is shared with every other program: a variable that is no setting is
    said, naming it and the setting it was likely meant to be, and left alone."""
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path),
        "SWARMFLY_PEER_UPLOAD_SPEED": "1",
        "SWARMFLY_PEERS_CONCURRENCY": "2",
        "SWARMFLY_COLOUR": "blue",
        "SWARMFLY_TRACING": "true",
        "SWARMFLY_REQUIRE_E2E": "1",
        "SWARMFLY_PEERS_X": "1",
        "SWARMFLY_LOGLEVEL": "DEBUG",
    }
    warnings: list[str] = []
    config = load(env=env, warn=warnings.append)
    assert warnings == [
        "SWARMFLY_COLOUR is not a swarmfly setting: ignored",
        "SWARMFLY_LOGLEVEL is not a swarmfly setting (did you mean SWARMFLY_LOG_LEVEL?): ignored",
        "SWARMFLY_PEERS_CONCURRENCY is not a swarmfly setting"
        " (did you mean SWARMFLY_PEER_CONCURRENCY?): ignored",
        # Beside the common SWARMFLY_, PEERS_X is like no setting (SWARMFLY_PEER_IDC was said)
        "SWARMFLY_PEERS_X is not a swarmfly setting: ignored",
        "SWARMFLY_PEER_UPLOAD_SPEED is not a swarmfly setting"
        " (did you mean SWARMFLY_PEER_UPLOAD_RATE?): ignored",
        "SWARMFLY_TRACING is not a swarmfly setting: ignored",
    ]
    assert config.peer == PeerConfig()


def test_an_unknown_flag_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"flags: \[scheduler\] parents: unknown setting"):
        load({"state_dir": tmp_path, "scheduler": {"parents": 2}}, env={})


def test_a_bad_size_in_the_environment_is_an_error(tmp_path: Path) -> None:
    env = {"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_PEER_DOWNLOAD_RATE": "fast"}
    with pytest.raises(ValueError, match="not a size: 'fast'"):
        load(env=env)


def test_nats_options_pass_auth_through(tmp_path: Path) -> None:
    assert Config(state_dir=tmp_path).nats_options() == {}
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path),
        "SWARMFLY_NATS_USER": "u",
        "SWARMFLY_NATS_PASSWORD": "p",
    }
    assert load(env=env).nats_options() == {"user": "u", "password": "p"}
    creds = write(tmp_path / "nats.creds", CREDS)
    env = {"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_NATS_CREDS": str(creds)}
    assert load(env=env).nats_options() == {"user_credentials": str(creds)}
    seed = write(tmp_path / "user.nk", user_seed() + "\n")
    env = {"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_NATS_NKEYS_SEED": str(seed)}
    assert load(env=env).nats_options() == {"nkeys_seed": str(seed)}


def test_the_password_is_not_in_the_repr(tmp_path: Path) -> None:
    env = {
        "SWARMFLY_STATE_DIR": str(tmp_path),
        "SWARMFLY_NATS_PASSWORD": "hunter2",
        "SWARMFLY_NATS_TOKEN": "tok3n",
    }
    text = repr(load(env=env))
    assert "hunter2" not in text and "tok3n" not in text


def user_seed() -> str:
    encoded: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return encoded.decode()


CREDS = (
    "-----BEGIN NATS USER JWT-----\neyJ0.e30.sig\n------END NATS USER JWT------\n\n"
    "-----BEGIN USER NKEY SEED-----\nSUAM\n------END USER NKEY SEED------\n"
)
"""The shape of a .creds file (its content is the server's to check)."""


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_key": "/k.pem"}, r"tls_key needs tls_cert"),
        ({"password": "p"}, r"password needs a user"),
        ({"user": "u", "token": "t"}, r"one way to authenticate, not user and token"),
        ({"token": "t", "creds": "/c"}, r"not token and creds"),
        ({"creds": "/nowhere/nats.creds"}, r"creds: cannot read /nowhere/nats.creds"),
        ({"nkeys_seed": "/nowhere/u.nk"}, r"nkeys_seed: cannot read /nowhere/u.nk"),
        ({"tls_ca": "/nowhere/ca.pem"}, r"tls_ca: cannot load /nowhere/ca.pem"),
        ({"tls_cert": "/nowhere/c.pem"}, r"tls_cert: cannot load /nowhere/c.pem"),
    ],
)
def test_nats_settings_that_cannot_work_are_errors(
    tmp_path: Path, settings: dict[str, str], message: str
) -> None:
    config = load({"state_dir": tmp_path, "nats": settings}, env={})
    with pytest.raises(ValueError, match=message):
        config.nats_options()


def test_nats_files_must_hold_what_they_are_for(tmp_path: Path) -> None:
    """nats-py would loop for ever reading a creds file without a JWT, and go to the server
    with a seed it cannot use; the error names the file, never its content."""
    secret = user_seed()
    not_creds = write(tmp_path / "nats.creds", secret + "\n")
    with pytest.raises(ValueError, match=r"is not a NATS \.creds file") as raised:
        load({"state_dir": tmp_path, "nats": {"creds": str(not_creds)}}, env={}).nats_options()
    assert secret not in str(raised.value)
    account_seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
    for text in (account_seed, "not a seed", CREDS):
        seed = write(tmp_path / "user.nk", text)
        config = load({"state_dir": tmp_path, "nats": {"nkeys_seed": str(seed)}}, env={})
        with pytest.raises(ValueError, match="does not hold an NKey user seed") as raised:
            config.nats_options()
        assert text not in str(raised.value)


def test_tls_hostname_turns_tls_on(tmp_path: Path) -> None:
    config = load({"state_dir": tmp_path, "nats": {"tls_hostname": "nats.example"}}, env={})
    options = config.nats_options()
    assert options["tls_hostname"] == "nats.example"
    assert options["tls"].check_hostname, "certificates are checked, against that name"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        (1.5, 1),
        ("0", 0),
        ("1024", 1024),
        ("10B", 10),
        ("8MiB", 8 * MiB),
        ("8mib", 8 * MiB),
        ("8Mi", 8 * MiB),
        ("8M", 8_000_000),
        ("8MB", 8_000_000),
        ("512k", 512_000),
        ("512KiB", 512 * 1024),
        ("1.5GiB", 3 * 512 * MiB),
        ("2G", 2_000_000_000),
        ("1TiB", 1024**4),
        (" 4 MiB ", 4 * MiB),
    ],
)
def test_parse_size(value: str | int | float, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "fast", "-1", "1PiB", "MiB", "1 2MiB", "0x10"])
def test_parse_size_rejects_non_sizes(value: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(value)


def test_the_documented_configuration_is_a_valid_file(tmp_path: Path) -> None:
    """docs/configuration.md shows every section: its example must load as it stands."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "swarmfly.toml"
    path.write_text(block)
    config = load(config_file=str(path), env={})
    assert config.proxy.port == 65001
    assert config.proxy.registries == ["https://registry-1.docker.io"]
    assert config.peer.strategy == "rarest-first"


def test_the_documented_configuration_shows_every_nats_setting() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    section = block.split("[nats]\n", 1)[1].split("\n[", 1)[0]
    shown = set(re.findall(r"^#? ?(\w+) = ", section, re.MULTILINE))
    assert shown == {f.name for f in fields(NatsConfig)}
