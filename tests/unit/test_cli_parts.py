"""The CLI's pure parts: flags refused with one line and exit 2, exit statuses per error code,
errors in words, the progress line."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path
from typing import get_args

import orjson
import pytest

from swarmfly.cli import build_parser, main, progress_line, use_recorded_cluster
from swarmfly.cli.parser import COMMANDS
from swarmfly.config import Config, NatsConfig
from swarmfly.errors import EXIT_STATUS, ErrorCode, SwarmflyError, in_words
from tests.conftest import modules_loaded

README = Path(__file__).parents[2] / "README.md"
HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["get", "http://x/f", "-O", "f", "--log-level", "LOUD"], "argument --log-level"),
        (["status", "--connect-timeout", "0"], "above 0"),
        (["status", "--connect-timeout", "nan"], "above 0"),
        (["preheat", "url", "http://x/f", "--connect-timeout", "soon"], "not a number"),
        (["get", "http://x/f", "-O", "f", "--timeout", "-1"], "above 0"),
        (["get", "http://x/f", "-O", "f", "--digest", "abc"], "sha256:<64 hex digits>"),
        (["preheat", "url", "http://x/f", "--digest", "md5:00"], "sha256:<64 hex digits>"),
        (["get", "http://x/f"], "-O/--output"),
        (["get", "http://x/f", "-O", "f", "--download-rate", "100"], "at least 128KiB"),
        (["get", "x/f", "-O", "f"], "'x/f' has no scheme: give the whole URL, such as http://"),
        (["preheat", "url", "f"], "'f' has no scheme"),
    ],
)
def test_a_flag_that_cannot_work_is_a_usage_error_in_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("swarmfly: ") and words in err, err
    assert "usage:" not in err and f"see swarmfly {argv[0]}" in err


def test_a_usage_error_with_json_is_the_json_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", "http://x/f", "-O", "f", "--json", "--digest", "abc"]) == 2
    out, err = capsys.readouterr()
    answer = orjson.loads(out)
    assert answer["ok"] is False
    assert answer["error"]["code"] == "bad_request"
    assert "'abc'" in answer["error"]["message"] and "pattern" not in answer["error"]["message"]
    assert err.startswith("swarmfly: argument --digest")


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error", "critical"])
def test_log_levels_are_taken_in_any_case(level: str) -> None:
    args = build_parser().parse_args(["status", "--log-level", level])
    assert args.log_level == level.upper()


def test_an_upper_case_digest_is_the_same_digest() -> None:
    for what in (["get", "http://x/f", "-O", "f"], ["preheat", "url", "http://x/f"]):
        args = build_parser().parse_args([*what, "--digest", f"SHA256:{HEX.upper()}"])
        assert args.digest == f"sha256:{HEX}"


def test_one_shot_commands_have_a_connect_deadline() -> None:
    for argv in (["get", "http://u", "-O", "o"], ["preheat", "url", "http://u"], ["status"]):
        assert build_parser().parse_args(argv).connect_timeout == 10.0
    args = build_parser().parse_args(["preheat", "image", "r/x:y", "--connect-timeout", "2.5"])
    assert args.connect_timeout == 2.5


def test_every_error_code_has_an_exit_status() -> None:
    assert set(EXIT_STATUS) == set(get_args(ErrorCode))
    assert EXIT_STATUS["bad_request"] == 2, "argparse's"
    branches = ["not_found", "integrity", "timeout", "unavailable", "internal"]
    assert len({EXIT_STATUS[code] for code in branches}) == len(branches)
    assert EXIT_STATUS["source_error"] == EXIT_STATUS["not_found"], "not there / refused"


def test_the_readme_documents_every_exit_status() -> None:
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(n) for n in re.findall(r"^\| (\d+) +\|", section, re.M)}
    assert documented == {0, 130, *EXIT_STATUS.values()}
    for code in EXIT_STATUS:
        assert f"`{code}`" in section, f"{code} is not in the table"


def test_errors_say_the_cause_in_words() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)")
    assert in_words(refused) == "Connection refused"
    unresolved = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert in_words(unresolved) == "Name or service not known"
    assert in_words(TimeoutError()) == "no answer in time"
    assert SwarmflyError("integrity", "x").exit_status == 4


def test_the_progress_line_has_rate_and_eta_and_ends_at_100() -> None:
    half = progress_line(2 * 2**20, 4 * 2**20, elapsed=1.0)
    assert " 50.0% 2.0/4.0 MiB     2.0 MiB/s ETA     1s" in half
    done = progress_line(4 * 2**20, 4 * 2**20, elapsed=2.0)
    assert done.startswith("[" + "#" * 30 + "] 100.0%") and done.endswith("ETA     0s")
    assert progress_line(0, 4 * 2**20, elapsed=0.0).endswith("ETA     ?")
    assert progress_line(3 * 2**20, None, elapsed=1.0).split() == ["3.0", "MiB", "3.0", "MiB/s"]


def test_a_get_through_the_local_peer_loads_no_more_than_it_needs() -> None:
    """16 gets start at once on a host (bench/swarm.py); each one's start-up is CPU the swarm
    waits for. Up to its first byte on the peer's socket, a get loads neither the event loop
    and the network clients of the services nor the typed wire messages."""
    setup = "from swarmfly import cli, config, get\n" + (
        "cli.build_parser('get').parse_args(['get', 'http://x/f', '-O', 'f'])\n"
        "config.load({'state_dir': '/nonexistent'})"
    )
    heavy = ("asyncio", "aiohttp", "nats", "ssl", "opentelemetry", "jsonschema_rs",
             "swarmfly.contracts.messages", "swarmfly.launch", "swarmfly.bus",
             # what a state dir given and no configuration file need not load
             "platformdirs", "tomllib", "difflib")  # fmt: skip
    assert modules_loaded(setup, heavy) == []


def test_a_service_process_loads_only_the_services_it_runs() -> None:
    """Every module is resident in every process: a peer or storage that also loaded the
    scheduler, the proxy and the auth callout's PyJWT and cryptography held some 15 MiB
    more (bench/single.py's peak RSS)."""
    others = ("jwt", "cryptography", "swarmfly.callout",
              "swarmfly.services.scheduler.service", "swarmfly.services.proxy.service",
              "swarmfly.services.storage.service", "swarmfly.services.peer.service")  # fmt: skip
    assert modules_loaded("from swarmfly import launch", others) == []


def test_loading_the_plugins_leaves_the_s3_client_unimported() -> None:
    """Every service loads every source plugin at start; botocore is ~8 MiB of each one's
    memory and a fifth of a second of its start, for the few that ever read S3."""
    setup = "from swarmfly.pluginhost import Plugins; Plugins.load()"
    assert modules_loaded(setup, ("botocore", "aiobotocore")) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["up", "--nats-port", "4222"],
        ["scheduler", "partitions", "8"],
        ["storage", "--upload-rate", "8MiB"],
        ["peer", "--download-rate", "1MiB"],
        ["get", "http://x/f", "-O", "f", "--digest", f"sha256:{HEX}", "-r", "--json"],
        ["preheat", "image", "r/x:y", "--platform", "linux/amd64"],
        ["preheat", "url", "http://x/f"],
        ["cache", "stat", f"sha256:{HEX}"],
        ["status", "--json"],
        ["doctor"],
        ["plugins", "--json"],
        ["contracts", "asyncapi"],
    ],
)
def test_a_command_parses_the_same_with_only_its_own_flags_built(argv: list[str]) -> None:
    """`main` builds only the named command's flags (a get starts a third faster)."""
    alone, whole = build_parser(argv[0]), build_parser()
    assert vars(alone.parse_args(argv)) == vars(whole.parse_args(argv))

    def command_help(parser: argparse.ArgumentParser) -> str:
        (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return str(commands.choices[argv[0]].format_help())

    assert command_help(alone) == command_help(whole)


def test_the_whole_command_line_is_built_for_anything_but_a_command() -> None:
    for first in (None, "--help", "--version", "gte"):
        (commands,) = (
            a for a in build_parser(first)._actions if isinstance(a, argparse._SubParsersAction)
        )
        assert sorted(commands.choices) == sorted(COMMANDS)


@pytest.mark.parametrize(
    ("nats", "recorded"),
    [
        (NatsConfig(), True),
        (NatsConfig(servers=["nats://127.0.0.1:4567"]), True),
        (NatsConfig(servers=["127.0.0.1:4567"]), True),
        (NatsConfig(servers=["NATS://LOCALHOST:4567/"]), True),
        (NatsConfig(servers=["nats://127.0.0.1:4568"]), False),
        (NatsConfig(servers=["nats://127.0.0.1:4567", "nats://other:4567"]), False),
        (NatsConfig(servers=["nats://u:p@127.0.0.1:4567"]), False),
        (NatsConfig(servers=["nats://127.0.0.1:4567"], token_file="/run/token"), False),
        (NatsConfig(user="someone"), False),
    ],
)
def test_the_cluster_up_recorded_is_used_where_its_servers_are_named(
    tmp_path: Path, nats: NatsConfig, recorded: bool
) -> None:
    """Its credentials go with its servers, given or not, and never over credentials given."""
    seed = tmp_path / "credentials" / "client.nk"
    seed.parent.mkdir()
    seed.write_text("SU…\n")
    record = {"nats": ["nats://127.0.0.1:4567"], "client": {"nkeys_seed": str(seed)}}
    (tmp_path / "cluster.json").write_bytes(orjson.dumps(record))
    config = Config(state_dir=tmp_path, nats=nats)
    use_recorded_cluster(config)
    assert (config.nats.nkeys_seed == str(seed)) is recorded
    assert config.nats.servers == (nats.servers or (record["nats"] if recorded else []))
