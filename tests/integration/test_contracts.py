"""The contracts hold: examples validate, code speaks only through them, the AsyncAPI document
is current, and the running services answer `$SRV` discovery under them."""

from __future__ import annotations

import ast
import asyncio
import copy
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from nats import connect as connect_nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from referencing import Registry, Resource

from swarmfly import contracts, ids
from swarmfly.bus import Bus
from swarmfly.config import Config, NatsConfig
from swarmfly.content import MAX_PIECE_LENGTH
from swarmfly.contracts import messages
from swarmfly.contracts.asyncapi import document
from swarmfly.contracts.wire import Subject
from swarmfly.launch import start_peer, start_scheduler
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.services.scheduler.service import _speaks_for as speaks_for
from swarmfly.testing import Origin, in_process_cluster, sender_of, subject_tokens

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = ROOT / "contracts"
ASYNCAPI_FILE = ROOT / "docs" / "asyncapi.json"
SERVICES = {"scheduler", "storage", "peer", "proxy"}
REGENERATE = "regenerate with `swarmfly contracts asyncapi > docs/asyncapi.json`"

CONTRACTS = contracts.registry()
NAMES = sorted(CONTRACTS)
SENT = sorted(n for n in NAMES if CONTRACTS[n].sender)


# -- helpers ---------------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def common_registry() -> Registry:
    """common.json under both names a raw subject file can reach it by."""
    common = load(CONTRACTS_DIR / "common.json")
    resource = Resource.from_contents(common)
    return Registry().with_resources([("common.json", resource), (common["$id"], resource)])


def raw_subjects() -> dict[str, dict[str, Any]]:
    files = sorted((CONTRACTS_DIR / "subjects").glob("*.json"))
    return {load(path)["subject"]: load(path) for path in files}


def validator(schema: dict[str, Any], registry: Registry | None = None) -> Draft202012Validator:
    if registry is None:
        return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return Draft202012Validator(
        schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def errors_of(check: Draft202012Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(instance)
    ]


def source_files() -> Iterator[Path]:
    for folder in ("swarmfly", "services", "plugins"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def receiver_name(node: ast.expr) -> str:
    """``nc`` for ``nc.x``, ``self.nc.x`` or ``bus.nc.x``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def resolve_pointer(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[part]
    return node


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from refs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs_in(item)


# -- the contract files ----------------------------------------------------------------------


def test_registry_has_every_subject_file() -> None:
    assert sorted(raw_subjects()) == NAMES
    assert len(NAMES) >= 10


@pytest.mark.parametrize("name", NAMES)
def test_contract_metadata(name: str) -> None:
    contract = CONTRACTS[name]
    assert contract.service in SERVICES
    assert contract.version >= 1
    assert contract.summary.strip()
    assert contract.examples, f"{name} has no example"
    if contract.reply is not None:  # an event is named for what it reports on, not its sender
        assert name.split(".")[0] == contract.service, "a subject is namespaced by its service"


@pytest.mark.parametrize("name", NAMES)
def test_schemas_are_valid_2020_12(name: str) -> None:
    contract = CONTRACTS[name]
    Draft202012Validator.check_schema(contract.request)
    if contract.reply is not None:
        Draft202012Validator.check_schema(contract.reply)
    raw = raw_subjects()[name]
    Draft202012Validator.check_schema(raw["request"])
    if raw.get("reply"):
        Draft202012Validator.check_schema(raw["reply"])


def test_common_and_error_schemas_are_valid_2020_12() -> None:
    Draft202012Validator.check_schema(load(CONTRACTS_DIR / "common.json"))
    Draft202012Validator.check_schema(load(CONTRACTS_DIR / "error.json"))


@pytest.mark.parametrize("name", NAMES)
def test_examples_validate_with_jsonschema(name: str) -> None:
    """The compiled (inlined) schemas the code uses accept every example."""
    contract = CONTRACTS[name]
    request_check = validator(contract.request)
    reply_check = validator(contract.reply) if contract.reply is not None else None
    for number, example in enumerate(contract.examples):
        assert errors_of(request_check, example["request"]) == [], f"example {number} request"
        if reply_check is not None:
            assert "reply" in example, f"example {number} of a request/reply subject has no reply"
            assert errors_of(reply_check, example["reply"]) == [], f"example {number} reply"
        else:
            assert "reply" not in example


@pytest.mark.parametrize("name", NAMES)
def test_examples_validate_against_the_raw_files(name: str) -> None:
    """What a Go or Rust peer reads (the files, `$ref`s into common.json) agrees too."""
    raw = raw_subjects()[name]
    registry = common_registry()
    request_check = validator(raw["request"], registry)
    reply_check = validator(raw["reply"], registry) if raw.get("reply") else None
    for number, example in enumerate(raw["examples"]):
        assert errors_of(request_check, example["request"]) == [], f"example {number} request"
        if reply_check is not None:
            assert errors_of(reply_check, example["reply"]) == [], f"example {number} reply"


@pytest.mark.parametrize("name", NAMES)
def test_examples_pass_the_compiled_validators(name: str) -> None:
    contract = CONTRACTS[name]
    for example in contract.examples:
        contract.validate_request(example["request"])
        if contract.validate_reply is not None:
            contract.validate_reply(example["reply"])


@pytest.mark.parametrize("name", NAMES)
def test_example_tokens_make_a_subject(name: str) -> None:
    """An example's tokens make its subject; where the contract names its sender, the
    example names it too, and it is a sender a scheduler takes the example's body from."""
    contract = CONTRACTS[name]
    for example in contract.examples:
        tokens = dict(example.get("tokens", {}))
        named = tokens.pop(contracts.SENDER, None)
        assert sorted(tokens) == sorted(contract.tokens)
        assert (named is not None) == contract.sender
        if named is not None:
            with pytest.raises(ValueError, match="a sender token is required"):
                contract.subject("swarmfly", **tokens)
            sender = contracts.Sender(*named.split("."))
            assert sender_of(example["request"], default=sender) == sender
            message = messages.SUBJECTS[name].request.from_dict(example["request"])
            speaks_for(  # what the contract's handler checks of its message
                sender,
                getattr(message, "task_id", None),
                getattr(message, "peer_id", None),
                getattr(message, "host", None),
                host_id=getattr(message, "host_id", None),
            )
            subject = contract.subject("swarmfly", **tokens, sender=sender.token)
            assert subject.endswith(f".{sender.host_type}.{sender.host_id}")
            assert contracts.Sender.of(subject) == sender
        else:
            subject = contract.subject("swarmfly", **tokens)
        assert subject.startswith("swarmfly.v1.")
        assert "{" not in subject and " " not in subject
        assert len(subject.split(".")) == len(f"swarmfly.v1.{contract.address}".split("."))


def test_the_sender_contracts_are_the_schedulers_host_messages() -> None:
    assert SENT == [
        "preheat.{job}.progress",  # a preheat's report, published by the host doing it
        "scheduler.heartbeat", "scheduler.leave", "scheduler.{partition}.pieces",
        "scheduler.{partition}.register", "scheduler.{partition}.reschedule",
        "scheduler.{partition}.result", "scheduler.{scheduler}.beat",
        "storage.{host_id}.cached", "storage.{host_id}.import",  # swarmfly cache, by its importer
    ]  # fmt: skip
    for name in NAMES:
        contract = CONTRACTS[name]
        suffix = ".{sender_type}.{sender}" if contract.sender else ""
        assert contract.address == name + suffix
        assert contracts.SENDER not in contract.tokens
        if not contract.sender:
            tokens = dict.fromkeys(contract.tokens, "4")
            with pytest.raises(ValueError, match="names no sender"):
                contract.subject("swarmfly", **tokens, sender="normal.host-a")


@pytest.mark.parametrize("name", SENT)
def test_sender_tokens_name_one_host_of_a_known_type(name: str) -> None:
    contract = CONTRACTS[name]
    tokens = dict.fromkeys(contract.tokens, "4")
    every = contract.subject("swarmfly", every=(contracts.SENDER,), **tokens)
    assert every.endswith(".*.*")
    for bad in ("normal", "admin.host-a", "normal.host.a", "seed.*", "seed.>", "normal."):
        with pytest.raises(ValueError, match=r"invalid (sender host type|subject token)"):
            contract.subject("swarmfly", **tokens, sender=bad)


@pytest.mark.parametrize("name", [n for n in NAMES if CONTRACTS[n].tokens])
def test_subject_tokens_refuse_dots_and_wildcards(name: str) -> None:
    contract = CONTRACTS[name]
    for bad in ("host.a", "*", ">", "a b", ""):
        with pytest.raises(ValueError, match="invalid subject token"):
            contract.subject("swarmfly", **dict.fromkeys(contract.tokens, bad))


@pytest.mark.parametrize("name", NAMES)
def test_inlined_schemas_are_self_contained(name: str) -> None:
    contract = CONTRACTS[name]
    assert list(refs_in(contract.request)) == []
    assert contract.reply is None or list(refs_in(contract.reply)) == []


def test_error_example_validates() -> None:
    schema = load(CONTRACTS_DIR / "error.json")
    check = validator(schema)
    assert schema["examples"]
    for example in schema["examples"]:
        assert errors_of(check, example) == []
        contracts.validate_error()(example)
    assert errors_of(check, {"error": {"code": "nope", "status": 400, "message": "x"}}) != []


# -- the code speaks only through the contracts ----------------------------------------------


def direct_nats_calls(source: str, filename: str) -> list[str]:
    """Calls of ``nc.publish/request/subscribe`` and ``.add_endpoint`` in one module."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, receiver = node.func.attr, receiver_name(node.func.value)
        if attr in ("publish", "request", "subscribe") and receiver in ("nc", "_nc"):
            found.append(f"{filename}:{node.lineno} nc.{attr}(")
        if attr == "add_endpoint":
            found.append(f"{filename}:{node.lineno} .add_endpoint(")
    return found


def test_the_scan_sees_direct_nats_calls() -> None:
    source = (
        "async def f(self, bus, service):\n"
        "    await self.nc.publish('x', b'')\n"
        "    await bus.nc.request('x', b'')\n"
        "    await nc.subscribe('x')\n"
        "    await service.add_endpoint(name='x')\n"
        "    await bus.request(messages.TASK, messages.TaskRequest(task_id='t'))\n"
    )
    assert len(direct_nats_calls(source, "example.py")) == 4


def test_only_the_bus_touches_nats_directly() -> None:
    offenders: list[str] = []
    scanned = 0
    for path in source_files():
        relative = path.relative_to(ROOT).as_posix()
        scanned += 1
        if not relative.startswith("swarmfly/bus/"):
            offenders += direct_nats_calls(path.read_text(encoding="utf-8"), relative)
    assert scanned > 10
    assert offenders == []


def subject_named(node: ast.expr | None) -> str | None:
    """The contract name an expression names: a literal subject name, or ``messages.X`` (or
    ``messages.X.name``), the typed subject generated for it (``messages.X`` where the
    generated module has no such subject: no contract is named so)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, str) and "." in value and " " not in value and "/" not in value:
            return value
        return None
    if isinstance(node, ast.Attribute) and node.attr == "name":
        node = node.value
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "messages"
        and node.attr.isupper()
    ):
        subject = getattr(messages, node.attr, None)
        return subject.name if isinstance(subject, Subject) else f"messages.{node.attr}"
    return None


def literal_subjects() -> tuple[dict[str, list[str]], dict[str, str]]:
    """Subject names in code: first args of ``request``/``gather``/``subject``/``contracts.get``
    calls (a name, or the typed ``messages.X``), and the subjects of the ``Endpoint`` list of
    ``add_service`` calls (with the service that serves them)."""
    used: dict[str, list[str]] = {}
    served: dict[str, str] = {}
    for path in source_files():
        relative = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=relative)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0] if node.args else None
            named = subject_named(first)
            if (
                name in ("request", "gather", "subject", "get", "publish", "listen")
                and named is not None
                and (name != "get" or receiver_name(getattr(func, "value", func)) == "contracts")
            ):
                used.setdefault(named, []).append(f"{relative}:{node.lineno}")
            if name == "add_service" and isinstance(func, ast.Attribute):  # Bus.add_service
                service = first.value if isinstance(first, ast.Constant) else ""
                endpoints = [k.value for k in node.keywords if k.arg == "endpoints"]
                endpoints += node.args[3:4]  # add_service(name, version, description, endpoints)
                where = f"{relative}:{node.lineno}"
                assert endpoints and isinstance(endpoints[0], ast.List), where
                for endpoint in endpoints[0].elts:  # Endpoint(messages.X, handler)
                    assert isinstance(endpoint, ast.Call), where
                    called = endpoint.func
                    assert getattr(called, "id", getattr(called, "attr", "")) == "Endpoint", where
                    target = endpoint.args[0] if endpoint.args else None
                    assert isinstance(target, ast.Attribute), where
                    subject = subject_named(target)
                    assert subject is not None, where
                    served[subject] = str(service)
    return used, served


def test_every_subject_named_in_code_has_a_contract() -> None:
    used, served = literal_subjects()
    missing = {name: where for name, where in used.items() if name not in CONTRACTS}
    assert missing == {}
    expected = {"scheduler.{partition}.register", "scheduler.heartbeat", "storage.{host_id}.seed"}
    assert expected <= set(used)
    assert sorted(n for n in served if n not in CONTRACTS) == []


def test_every_contract_is_served_by_its_service() -> None:
    _, served = literal_subjects()
    unserved = {n for n in NAMES if CONTRACTS[n].service == "proxy" or CONTRACTS[n].reply is None}
    assert sorted(served) == sorted(set(NAMES) - unserved)  # an event is published, not served
    for name, service in served.items():
        assert CONTRACTS[name].service == service, name


# -- the AsyncAPI document -------------------------------------------------------------------


def test_asyncapi_document_is_up_to_date() -> None:
    assert ASYNCAPI_FILE.is_file(), REGENERATE
    assert load(ASYNCAPI_FILE) == document(), REGENERATE


def test_asyncapi_file_is_exactly_the_cli_output() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "swarmfly", "contracts", "asyncapi"],
        capture_output=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout == ASYNCAPI_FILE.read_bytes(), REGENERATE


def test_asyncapi_has_one_channel_and_operation_per_contract() -> None:
    doc = load(ASYNCAPI_FILE)
    assert doc["asyncapi"] == "3.0.0"
    channels, operations = doc["channels"], doc["operations"]
    assert len(channels) == len(CONTRACTS) == len(operations)
    by_address = {f"swarmfly.v1.{c.address}": c for c in CONTRACTS.values()}
    addresses = {channel["address"] for channel in channels.values()}
    assert addresses == set(by_address)
    assert {a for a in addresses if a.endswith(".{sender_type}.{sender}")} == {
        f"swarmfly.v1.{name}.{{sender_type}}.{{sender}}" for name in SENT
    }
    for key, channel in channels.items():
        contract = by_address[channel["address"]]
        senders = ["sender", "sender_type"] if contract.sender else []
        assert sorted(channel.get("parameters", {})) == sorted(contract.tokens + senders)
        operation = operations[key]
        assert operation["action"] == "receive"
        assert operation["channel"] == {"$ref": f"#/channels/{key}"}
        assert operation["x-swarmfly-service"] == contract.service
        assert ("reply" in operation) == (contract.reply is not None)


def test_asyncapi_refs_resolve_inside_the_document() -> None:
    doc = load(ASYNCAPI_FILE)
    refs = list(refs_in(doc))
    assert len(refs) >= 3 * len(CONTRACTS)
    for ref in refs:
        assert ref.startswith("#/"), f"{ref} points outside the document"
        target = resolve_pointer(doc, ref)
        assert isinstance(target, dict), ref
        target = resolve_pointer(doc, target["$ref"]) if "$ref" in target else target
        assert target, ref


def test_asyncapi_message_examples_match_their_payloads() -> None:
    doc = load(ASYNCAPI_FILE)
    for key, message in doc["components"]["messages"].items():
        Draft202012Validator.check_schema(message["payload"])
        check = validator(message["payload"])
        for example in message.get("examples", []):
            assert errors_of(check, example["payload"]) == [], key


# -- the running services --------------------------------------------------------------------


async def nats_connect(url: str) -> NatsClient:
    return await connect_nats(servers=[url], connect_timeout=3, max_reconnect_attempts=0)


async def collect(
    nc: NatsClient, subject: str, payload: bytes = b"", wait: float = 0.75
) -> list[Any]:
    """Every reply to one request within ``wait`` seconds (many services answer $SRV)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, payload, reply=inbox)
    await nc.flush()
    replies: list[Any] = []
    deadline = asyncio.get_running_loop().time() + wait
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        try:
            replies.append(await sub.next_msg(timeout=left))
        except NatsTimeoutError:
            break
    await sub.unsubscribe()
    return replies


@pytest.mark.timeout(60)
async def test_srv_ping_and_info_find_every_service(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster:
        nc = await nats_connect(nats.url)
        try:
            pings = [json.loads(m.data) for m in await collect(nc, "$SRV.PING")]
            ours: dict[str, dict[str, Any]] = {}
            for ping in pings:
                assert ping["type"] == "io.nats.micro.v1.ping_response"
                reply = await nc.request(f"$SRV.INFO.{ping['name']}.{ping['id']}", b"", timeout=2)
                info = json.loads(reply.data)
                endpoints = info["endpoints"]
                if (
                    endpoints and all(e["subject"].startswith(f"{prefix}.") for e in endpoints)
                ) or info["metadata"].get("prefix") == prefix:  # the proxy has no endpoint
                    ours[info["name"]] = info
        finally:
            await nc.close()
    assert sorted(ours) == ["peer", "proxy", "scheduler", "storage"]
    hosts = cluster.hosts
    assert ours["peer"]["metadata"]["host_id"] == hosts["peer"]
    assert ours.pop("proxy")["metadata"]["url"] == cluster.proxy.url
    for service, info in ours.items():
        assert info["endpoints"], service
        subjects: dict[str, set[str]] = {}
        for endpoint in info["endpoints"]:
            contract = CONTRACTS[endpoint["metadata"]["contract"]]
            assert contract.service == service
            subjects.setdefault(contract.name, set()).add(endpoint["subject"])
        for name, found in subjects.items():
            contract, tokens = CONTRACTS[name], subject_tokens(name, hosts)
            # A lone scheduler holds every partition: one subscription for all of them; and
            # a contract that names its sender is served for every sender.
            every = tuple(t for t in tokens if t in ("partition", contracts.SENDER))
            mine = {t: v for t, v in tokens.items() if t not in every}
            assert found == {contract.subject(prefix, every=every, **mine)}, name
            assert all(s.endswith(".*.*") for s in found) == contract.sender, name
    served = {e["metadata"]["contract"] for info in ours.values() for e in info["endpoints"]}
    assert served == {
        n for n in NAMES if CONTRACTS[n].service != "proxy" and CONTRACTS[n].reply is not None
    }


class WireClient:
    """A NATS client on a blocking socket. While it waits, this process's event loop is frozen,
    so nothing queued by the services here (such as their SUBs) can reach the server."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buffer = b""
        assert self._line().startswith(b"INFO ")
        options = {"verbose": False, "headers": True, "no_responders": True, "protocol": 1}
        self.sock.sendall(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
        self.sock.sendall(b"SUB _INBOX.wire 1\r\n")
        assert self.until_pong() == []

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("nats-server closed the connection")
        self.buffer += data

    def _frame(self) -> tuple[bytes, bytes] | None:
        """The next (headers, payload) on the inbox, or None for a PONG."""
        while True:
            kind, *fields = self._line().split()
            if kind == b"PONG":
                return None
            if kind == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif kind in (b"MSG", b"HMSG"):
                total = int(fields[-1])
                header_size = int(fields[-2]) if kind == b"HMSG" else 0
                while len(self.buffer) < total + 2:
                    self._fill()
                body, self.buffer = self.buffer[:total], self.buffer[total + 2 :]
                return body[:header_size], body[header_size:]
            else:
                assert kind == b"INFO", kind  # the server's news about itself

    def until_pong(self) -> list[tuple[bytes, bytes]]:
        """PING, then every message the server sends before its PONG."""
        self.sock.sendall(b"PING\r\n")
        messages = []
        while (frame := self._frame()) is not None:
            messages.append(frame)
        return messages

    def request(self, subject: str, payload: bytes) -> list[tuple[bytes, bytes]]:
        """Publish a request and return what the server answered before it took the next
        command: a `no responders` status if nothing listened when the request arrived."""
        self.sock.sendall(f"PUB {subject} _INBOX.wire {len(payload)}\r\n".encode())
        self.sock.sendall(payload + b"\r\n")
        return self.until_pong()

    async def reply(self) -> tuple[bytes, bytes]:
        frame = await asyncio.to_thread(self._frame)
        assert frame is not None
        return frame

    def close(self) -> None:
        self.sock.close()


@pytest.mark.timeout(60)
async def test_a_started_service_answers_at_once(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """What `swarmfly up` promises when it prints its banner: the services are serving."""
    config = Config(state_dir=tmp_path, nats=NatsConfig(servers=[nats.url], prefix=prefix))
    config.peer.listen = "127.0.0.1"
    client = WireClient(nats.url)
    try:
        async with AsyncExitStack() as stack:
            bus = await Bus.connect([nats.url], prefix=prefix, name="test-peer")
            stack.push_async_callback(bus.close)
            peer = await start_peer(stack, config, bus, tmp_path / "peer", [nats.url])
            contract = CONTRACTS["peer.{host_id}.progress"]
            subject = contract.subject(prefix, host_id=peer.node.settings.host_id)
            early = client.request(subject, b'{"download_id": "dl-1"}')
            assert [h for h, _ in early if h.startswith(b"NATS/1.0 503")] == [], "no responders"
            _, payload = await client.reply()
    finally:
        client.close()
    assert json.loads(payload)["state"] == "unknown"


@pytest.mark.timeout(120)
async def test_every_subject_used_in_a_download_has_a_contract(
    nats: NatsServer, prefix: str, bus: Bus, origin: Origin, tmp_path: Path
) -> None:
    data = bytes(range(256)) * 4096 * 3  # 3 MiB: one piece
    url = origin.add("blob.bin", data)
    output = tmp_path / "out" / "blob.bin"
    async with in_process_cluster(nats.url, prefix, tmp_path / "cluster") as cluster:
        reply = await bus.request(
            messages.DOWNLOAD,
            messages.DownloadRequest(
                download_id="dl-contracts",
                source=messages.Source(
                    url=url, digest=f"sha256:{hashlib.sha256(data).hexdigest()}"
                ),
                output=str(output),
            ),
            timeout=60,
            host_id=cluster.peer.node.settings.host_id,
        )
        used = {name: set(b.used) for name, b in cluster.buses.items()}
    assert output.read_bytes() == data
    assert reply.digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
    used["client"] = set(bus.used)
    for who, names in used.items():
        assert names, f"{who} used no subject"
        assert sorted(n for n in names if n not in CONTRACTS) == [], who
    everything = set().union(*used.values())
    expected = {"peer.{host_id}.download", "scheduler.{partition}.register", "scheduler.heartbeat"}
    assert expected <= everything


# -- the contracts' limits fit the transport -------------------------------------------------


@asynccontextmanager
async def running_scheduler(nats_url: str, prefix: str, state: Path) -> AsyncIterator[Bus]:
    """A scheduler alone, and a client bus to talk to it."""
    config = Config(state_dir=state, nats=NatsConfig(servers=[nats_url], prefix=prefix))
    async with AsyncExitStack() as stack:
        for name in ("scheduler", "client"):
            bus = await Bus.connect([nats_url], prefix=prefix, name=f"test-{name}")
            stack.push_async_callback(bus.close)
            if name == "scheduler":
                await start_scheduler(stack, config, bus)
        yield bus


SEED = contracts.Sender("seed", "storage-limits")
"""The storage host the tests of the limits speak as."""


async def register_seed(bus: Bus, task_id: str, content: dict[str, int]) -> None:
    reply = await bus.request(
        messages.REGISTER,
        messages.RegisterRequest(
            task_id=task_id,
            peer_id=ids.peer_id(SEED.host_id, task_id),
            host=messages.Host(
                id=SEED.host_id,
                ip="127.0.0.1",
                port=9,
                type=SEED.host_type,
            ),
            source=messages.Source(url="http://127.0.0.1:9/big.iso"),
            task=messages.TaskContent.from_dict(content),
            seed=True,
        ),
        partition=task_partition(task_id),
        sender=SEED.token,
    )
    assert reply.action == "back_to_source"


def task_partition(task_id: str) -> str:
    return str(partition_of(task_id, DEFAULT_PARTITIONS))


def digest_of(number: int) -> str:
    return hashlib.sha256(number.to_bytes(4, "big")).hexdigest()


@pytest.mark.timeout(60)
async def test_a_full_batch_of_piece_reports_is_accepted(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    batch = CONTRACTS["scheduler.{partition}.pieces"].request["properties"]["pieces"]["maxItems"]
    length = 4 * 1024 * 1024
    content = {"content_length": batch * length, "piece_length": length, "piece_count": batch}
    task_id = hashlib.sha256(b"a full batch").hexdigest()
    # as announce sends them
    pieces = [messages.PieceReport(number=n, digest=digest_of(n)) for n in range(batch)]
    seed_peer = ids.peer_id(SEED.host_id, task_id)
    async with running_scheduler(nats.url, prefix, tmp_path) as bus:
        await register_seed(bus, task_id, content)
        reply = await bus.request(
            messages.PIECES,
            messages.PiecesRequest(task_id=task_id, peer_id=seed_peer, pieces=pieces),
            partition=task_partition(task_id),
            sender=SEED.token,
        )
    assert reply.to_dict() == {"ok": True}


@pytest.mark.timeout(60)
async def test_task_info_of_the_largest_task_is_answered(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    length, count = 64 * 1024 * 1024, 16384
    content = {"content_length": length * count, "piece_length": length, "piece_count": count}
    common = contracts.common_defs()
    assert content["content_length"] == common["task"]["properties"]["content_length"]["maximum"]
    task_id = hashlib.sha256(b"the largest task").hexdigest()
    seed_peer = ids.peer_id(SEED.host_id, task_id)
    async with running_scheduler(nats.url, prefix, tmp_path) as bus:
        await register_seed(bus, task_id, content)
        for start in range(0, count, 1024):
            pieces = [
                messages.PieceReport(number=n, digest=digest_of(n))
                for n in range(start, start + 1024)
            ]
            await bus.request(
                messages.PIECES,
                messages.PiecesRequest(task_id=task_id, peer_id=seed_peer, pieces=pieces),
                partition=task_partition(task_id),
                sender=SEED.token,
            )
        digests: list[str | None] = []
        while len(digests) < count:  # paged, as a peer reads them
            reply = await bus.request(
                messages.TASK,
                messages.TaskRequest(task_id=task_id, offset=len(digests)),
                partition=task_partition(task_id),
            )
            assert reply.task == messages.TaskContent.from_dict(content)
            assert reply.offset == len(digests)
            assert reply.digests, "a page is never empty before the end"
            digests += reply.digests
    assert digests == [digest_of(n) for n in range(count)]


# -- sizes the code cannot handle are refused by the running services ------------------------

BAD_PIECE_LENGTHS = [MAX_PIECE_LENGTH + 1, 1024 * 1024 * 1024]
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


def refusal(msg: Msg) -> dict[str, Any]:
    """The error a client sees, after checking it has the one error shape."""
    assert (msg.headers or {}).get(ERROR_CODE_HEADER) == "400", (msg.headers, msg.data[:300])
    body = json.loads(msg.data)
    contracts.validate_error()(body)
    error: dict[str, Any] = body["error"]
    return error


def piece_length_requests(piece_length: int, output: Path) -> Iterator[tuple[str, Any, str]]:
    """(subject name, request, field) for every request that carries a piece length: each a
    contract's example, but for that piece length."""
    for name in NAMES:
        properties = CONTRACTS[name].request["properties"]
        if "source" in properties:
            request = copy.deepcopy(CONTRACTS[name].examples[0]["request"])
            request["source"]["piece_length"] = piece_length
            if "output" in properties:
                request["output"] = str(output)
            yield name, request, "data.source.piece_length"
        if "task" in properties:
            request = copy.deepcopy(CONTRACTS[name].examples[0]["request"])
            request["task"] = {"content_length": 1, "piece_length": piece_length, "piece_count": 1}
            yield name, request, "data.task.piece_length"


@pytest.mark.timeout(60)
async def test_a_piece_length_beyond_the_codes_maximum_is_refused(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Every service that takes a piece length refuses one the code cannot handle before it
    does anything: no origin read, no output."""
    output = tmp_path / "out" / "never.bin"
    async with in_process_cluster(nats.url, prefix, tmp_path / "cluster") as cluster:
        nc = await nats_connect(nats.url)
        try:
            sent = []
            for piece_length in BAD_PIECE_LENGTHS:
                for name, request, field in piece_length_requests(piece_length, output):
                    tokens = subject_tokens(name, cluster.hosts, sender=sender_of(request))
                    subject = CONTRACTS[name].subject(prefix, **tokens)
                    msg = await nc.request(subject, json.dumps(request).encode(), timeout=5)
                    error = refusal(msg)
                    assert (error["code"], error.get("path")) == ("bad_request", field), name
                    sent.append(name)
        finally:
            await nc.close()
    assert {
        "scheduler.{partition}.register", "scheduler.{partition}.pieces",
        "storage.{host_id}.seed", "storage.preheat", "peer.{host_id}.download",
    } <= set(sent)  # fmt: skip
    assert not output.exists()


def seed_register(content: dict[str, int], pieces: list[int]) -> dict[str, Any]:
    """A seed's re-registration with every piece it holds, and the longest URL there is."""
    task_id = hashlib.sha256(json.dumps([content, len(pieces)]).encode()).hexdigest()
    url_length = common_source()["properties"]["url"]["maxLength"]
    return {
        "task_id": task_id,
        "peer_id": ids.peer_id(SEED.host_id, task_id),
        "host": {"id": SEED.host_id, "ip": "127.0.0.1", "port": 9, "type": SEED.host_type},
        "source": {"url": "http://127.0.0.1:9/".ljust(url_length, "a")},
        "pieces": pieces,
        "task": content,
        "seed": True,
    }


@pytest.mark.timeout(60)
async def test_the_largest_piece_length_and_piece_count_are_accepted(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Up to the bounds the scheduler takes a task: a seed's content in 64 MiB pieces, and a
    re-registration listing every piece of the largest piece count; one more is refused."""
    count = common_task()["properties"]["piece_count"]["maximum"]
    small = contracts.common_defs()["piece_length"]["minimum"]
    one = {"content_length": MAX_PIECE_LENGTH, "piece_length": MAX_PIECE_LENGTH, "piece_count": 1}
    many = {"content_length": count * small, "piece_length": small, "piece_count": count}
    more = {"content_length": (count + 1) * small, "piece_length": small, "piece_count": count + 1}
    cases = [
        (seed_register(one, [0]), None),
        (seed_register(many, list(range(count))), None),
        (seed_register(many, list(range(count + 1))), "data.pieces"),
        (seed_register(more, []), "data.task.piece_count"),
    ]
    register = CONTRACTS["scheduler.{partition}.register"]
    async with running_scheduler(nats.url, prefix, tmp_path):
        nc = await nats_connect(nats.url)
        try:
            for body, refused in cases:
                subject = register.subject(
                    prefix, partition=task_partition(body["task_id"]), sender=SEED.token
                )
                msg = await nc.request(subject, json.dumps(body).encode(), timeout=5)
                if refused is None:
                    assert not (msg.headers and ERROR_CODE_HEADER in msg.headers), msg.data[:300]
                    assert json.loads(msg.data)["action"] == "back_to_source"
                else:
                    error = refusal(msg)
                    assert (error["code"], error.get("path")) == ("bad_request", refused)
        finally:
            await nc.close()


def common_task() -> dict[str, Any]:
    schema: dict[str, Any] = contracts.common_defs()["task"]
    return schema


def common_source() -> dict[str, Any]:
    schema: dict[str, Any] = contracts.common_defs()["source"]
    return schema


def test_piece_length_in_the_files_is_bounded_by_the_codes_maximum() -> None:
    """What a Go or Rust peer reads names the code's maximum, once: every piece length in the
    files refers to common.json's, so the two can never drift apart again."""
    common = load(CONTRACTS_DIR / "common.json")["$defs"]
    assert common["piece_length"]["maximum"] == MAX_PIECE_LENGTH
    places = [
        node["properties"]["piece_length"]
        for node in walk([common, *raw_subjects().values()])
        if isinstance(node, dict) and "piece_length" in node.get("properties", {})
    ]
    assert len(places) >= 2  # a source's and a task's
    assert all(place == {"$ref": "common.json#/$defs/piece_length"} for place in places)


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)
