"""Configuration values are checked: a wrong type or a value out of range is an error naming
the setting where it was given (the file and its ``[section] key``, the variable, the flag),
never taken for something else; and docs/configuration.md shows every setting there is."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from swarmfly.config import DERIVED, FILE_ONLY, SECTIONS, Config, load

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def from_file(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "swarmfly.toml"
    path.write_text(text)
    return load({"state_dir": tmp_path}, config_file=str(path), env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peer]\nconcurrency = [1]\n", r"\[peer\] concurrency: expected a whole number, got \["),
        ('[peer]\nconcurrency = "abc"\n', r"\[peer\] concurrency: expected a whole number"),
        ('[peer]\nconcurrency = "8"\n', r"\[peer\] concurrency: expected a whole number, got '8'"),
        ("[peer]\nconcurrency = 1.5\n", r"\[peer\] concurrency: expected a whole number"),
        ("[peer]\nconcurrency = true\n", r"\[peer\] concurrency: expected a whole number"),
        ("[peer]\nconcurrency = 0\n", r"\[peer\] concurrency: must be at least 1, got 0"),
        ('[scheduler]\nacyclic = "maybe"\n', r"\[scheduler\] acyclic: expected true or false"),
        ("[scheduler]\nacyclic = 1\n", r"\[scheduler\] acyclic: expected true or false, got 1"),
        ("[scheduler]\nlease = -1\n", r"\[scheduler\] lease: must be above 0 seconds, got -1"),
        ("[scheduler]\nhost_ttl = nan\n", r"\[scheduler\] host_ttl: expected a finite number"),
        ("[peer]\nupload_rate = -5\n", r"\[peer\] upload_rate: must not be negative, got -5"),
        ("[peer]\nupload_rate = true\n", r"\[peer\] upload_rate: expected a size"),
        (
            '[peer]\ndownload_rate = "100"\n',
            r"\[peer\] download_rate: must be 0 \(no limit\) or at least 128KiB, got 100",
        ),
        ("[peer]\ncache_ttl = -1\n", r"\[peer\] cache_ttl: must not be negative"),
        ("[peer]\ncache_high = 1.5\n", r"\[peer\] cache_high: must be a share between 0 and 1"),
        ("[peer]\nupload_port = 70000\n", r"\[peer\] upload_port: must be a port from 0 to 65535"),
        ("[proxy]\nport = -1\n", r"\[proxy\] port: must be a port"),
        ("[peer]\nidc = 5\n", r"\[peer\] idc: expected a string, got 5"),
        ('[nats]\nservers = "nats://a:4222"\n', r"\[nats\] servers: expected a list of strings"),
        ("[nats]\nservers = [4222]\n", r"\[nats\] servers: expected a list of strings"),
        ("state_dir = 1\n", r"swarmfly\.toml: state_dir: expected a path, got 1"),
        ("tracing = true\n", r"swarmfly\.toml: tracing: not a setting; the standard OTEL_\*"),
        ("[peer]\nconcurency = 4\n", r"concurency: unknown setting \(did you mean concurrency\?\)"),
        (
            'log_level = "loud"\n',
            r"swarmfly\.toml: log_level: expected DEBUG, INFO, WARNING, ERROR",
        ),
        ("log_level = 10\n", r"swarmfly\.toml: log_level: expected a string, got 10"),
        (
            '[nats]\nservers = ["nats://a:4222", "foo://b"]\n',
            r"\[nats\] servers: unknown scheme 'foo://'; a NATS URL starts with nats://, tls://",
        ),
        ("[peer]\ncache_low = 0.95\n", r"\[peer\] cache_low \(0\.95\) is above cache_high"),
    ],
)
def test_a_wrong_value_in_the_file_names_the_file_and_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        from_file(tmp_path, text)
    if "above cache_high" not in message:
        assert str(raised.value).startswith(f"{tmp_path / 'swarmfly.toml'}: ")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SWARMFLY_PEER_CONCURRENCY", "abc", "expected a whole number, got 'abc'"),
        ("SWARMFLY_PEER_CONCURRENCY", "-3", "must be at least 1, got -3"),
        ("SWARMFLY_SCHEDULER_ACYCLIC", "maybe", "expected true or false, got 'maybe'"),
        ("SWARMFLY_SCHEDULER_HOST_TTL", "soon", "expected a number, got 'soon'"),
        (
            "SWARMFLY_PEER_DOWNLOAD_RATE",
            "100 MB/s",
            "not a size: '100 MB/s' (bytes, or with a unit: 512k, 100MiB, 1.5GB)",
        ),
        ("SWARMFLY_PROXY_ENABLED", "2", "expected true or false, got '2'"),
        (
            "SWARMFLY_LOG_LEVEL",
            "LOUD",
            "expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'LOUD'",
        ),
        (
            "SWARMFLY_NATS_SERVERS",
            "nats://a:4222,https://user:s3cret@b",
            "unknown scheme 'https://'; a NATS URL starts with nats://, tls://, ws:// or wss://",
        ),
    ],
)
def test_a_wrong_value_in_the_environment_names_the_variable(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{name}: {re.escape(message)}$"):
        load(env={"SWARMFLY_STATE_DIR": str(tmp_path), name: value})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"peer": {"upload_port": 70000}}, "--upload-port: must be a port from 0 to 65535"),
        ({"proxy": {"port": -1}}, "--proxy-port: must be a port from 0 to 65535, got -1"),
        ({"nats": {"servers": "nats://x"}}, None),
        ({"nats": {"servers": ["foo://bar"]}}, "--nats: unknown scheme 'foo://'"),
        ({"log_level": "loud"}, "--log-level: expected DEBUG, INFO"),
    ],
)
def test_a_wrong_value_in_a_flag_names_the_flag(
    tmp_path: Path, flags: dict[str, Any], message: str | None
) -> None:
    if message is None:  # a flag's words are split as a variable's are
        assert load({"state_dir": tmp_path, **flags}, env={}).nats.servers == ["nats://x"]
        return
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        load({"state_dir": tmp_path, **flags}, env={})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("ON", True), ("1", True), ("yes", True), ("false", False), ("0", False)],
)
def test_booleans_from_the_environment(tmp_path: Path, value: str, expected: bool) -> None:
    env = {"SWARMFLY_STATE_DIR": str(tmp_path), "SWARMFLY_SCHEDULER_ACYCLIC": value}
    assert load(env=env).scheduler.acyclic is expected


def test_values_of_the_right_type_are_taken(tmp_path: Path) -> None:
    config = from_file(
        tmp_path,
        "[peer]\npiece_timeout = 5\nupload_rate = 1024\ncache_ttl = 0\n"
        "[proxy]\nport = 0\n[scheduler]\nacyclic = true\n",
    )
    assert config.peer.piece_timeout == 5 and config.peer.upload_rate == 1024
    assert config.peer.cache_ttl == 0 and config.proxy.port == 0 and config.scheduler.acyclic


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(ValueError, match=f"configuration file {missing}: No such file"):
        load({"state_dir": tmp_path}, config_file=str(missing), env={})
    with pytest.raises(ValueError, match=r"swarmfly\.toml is not valid TOML: .*line 1"):
        from_file(tmp_path, "[peer\n")


def documented() -> dict[str | None, set[str]]:
    """The keys the example file in docs/configuration.md shows, set or commented out, by
    section (None: the top level)."""
    block = DOCS.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    shown: dict[str | None, set[str]] = {None: set()}
    section: str | None = None
    for line in block.splitlines():
        if header := re.match(r"^\[(\w+)\]", line):
            section = header.group(1)
            shown.setdefault(section, set())
        elif key := re.match(r"^#? ?(\w+) = ", line):
            shown[section].add(key.group(1))
    return shown


def test_every_setting_is_documented_and_nothing_else() -> None:
    config = Config()
    expected: dict[str | None, set[str]] = {
        None: {f.name for f in dataclasses.fields(config)} - set(SECTIONS) - DERIVED - FILE_ONLY
    }
    for name in SECTIONS:
        expected[name] = {f.name for f in dataclasses.fields(getattr(config, name))}
    assert documented() == expected
    assert "[plugins.<name>]" in DOCS.read_text(), "plugin settings are documented"


def test_log_levels_and_nats_urls_are_taken_as_nats_py_and_logging_read_them(
    tmp_path: Path,
) -> None:
    env = {"SWARMFLY_LOG_LEVEL": "debug", "SWARMFLY_NATS_SERVERS": "TLS://a:4222,b:4222,ws://c"}
    config = load({"state_dir": tmp_path}, env=env)
    assert config.log_level == "DEBUG"
    assert config.nats.servers == ["tls://a:4222", "b:4222", "ws://c"]
