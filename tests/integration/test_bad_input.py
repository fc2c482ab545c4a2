"""Every subject the scheduler, storage and peer serve refuses bad bytes with the one error shape
(`bad_request`, NATS micro headers, the failing path) and keeps serving (DESIGN §3, §9); a
scheduler refuses a host speaking for another with `forbidden`."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from jsonschema import Draft202012Validator
from nats import connect as connect_nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from swarmfly import contracts, ids
from swarmfly.bus import MAX_REQUEST_BYTES
from swarmfly.config import Config
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer.service import PeerService
from swarmfly.services.scheduler.service import SchedulerService
from swarmfly.testing import TEST_SENDER, Origin, in_process_cluster, sender_of, subject_tokens

pytestmark = pytest.mark.timeout(120)

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
ROOT = Path(__file__).resolve().parents[2]
ERROR_SCHEMA = json.loads((ROOT / "contracts" / "error.json").read_text(encoding="utf-8"))
CONTRACTS = contracts.registry()
SUBJECTS = sorted(
    n
    for n, c in CONTRACTS.items()
    if c.service in ("scheduler", "storage", "peer") and c.reply is not None  # not an event
)

BAD_IDS = {
    "task_id": "../../etc/passwd",
    "peer_id": "peer a1",
    "host_id": "host.a",
    "download_id": "../dl-1",
    "target": "http://169.254.169.254/",  # peer.{host_id}.reach: a host id, never an address
}
"""An invalid value per id field; a host object's ``id`` gets a dotted one too."""

FILE_DATA = hashlib.sha256(b"bad-input").digest() * 4096  # 128 KiB, one piece
HOST = contracts.Sender("normal", "host-bad-input")
"""The ordinary host the valid requests come from."""
SEED = contracts.Sender("seed", "storage-bad-input")
"""The storage host that registers as a task's source."""
IMPOSTOR = contracts.Sender("normal", "host-impostor")
"""A host that speaks for others: a scheduler takes nothing it says for them."""


# -- the services, once per module -----------------------------------------------------------


@dataclass
class Env:
    nc: NatsClient
    prefix: str
    peer: PeerService
    url: str
    tmp: Path
    hosts: dict[str, str]
    scheduler: SchedulerService

    def subject(self, name: str, sender: contracts.Sender = TEST_SENDER) -> str:
        """The subject of ``name``, sent by ``sender`` where the contract names a sender."""
        tokens = subject_tokens(name, self.hosts, sender=sender)
        subject: str = CONTRACTS[name].subject(self.prefix, **tokens)
        return subject


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("bad-input")
    prefix = f"t{uuid.uuid4().hex[:12]}"

    def roots(config: Config) -> None:
        config.peer.output_roots = [str(tmp)]

    async with (
        Origin().serve() as origin,
        in_process_cluster(nats.url, prefix, tmp, configure=roots) as cluster,
    ):
        url = origin.add("small.bin", FILE_DATA)
        nc = await connect_nats(servers=[nats.url], connect_timeout=3, max_reconnect_attempts=0)
        try:
            yield Env(nc, prefix, cluster.peer, url, tmp, cluster.hosts, cluster.scheduler)
        finally:
            await nc.close()


# -- the bad inputs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    label: str
    data: bytes
    path: str | None = None
    """The exact error.path expected; None when the failure has no single field."""
    names: str | None = None
    """A field the error (path or message) must name."""


def example_fields(name: str) -> dict[str, Any]:
    """Every top-level request field of every example, with a valid value."""
    fields: dict[str, Any] = {}
    for example in CONTRACTS[name].examples:
        for key, value in example["request"].items():
            fields.setdefault(key, value)
    return fields


def first_request(name: str) -> dict[str, Any]:
    request: dict[str, Any] = copy.deepcopy(CONTRACTS[name].examples[0]["request"])
    return request


def wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return "12"
    if isinstance(value, str):
        return 12345
    return "not-an-object-or-array"


def malformed(name: str) -> list[Case]:
    return [
        Case("malformed", b"{not json"),
        Case("truncated", orjson.dumps(first_request(name))[:-1]),
    ]


def array(name: str) -> list[Case]:
    return [
        Case("empty array", b"[]", path="data"),
        Case("array of the example", orjson.dumps([first_request(name)]), path="data"),
    ]


def wrong_types(name: str) -> list[Case]:
    cases = []
    for field, value in example_fields(name).items():
        request = first_request(name)
        request[field] = wrong_type(value)
        cases.append(Case(f"{field} of wrong type", orjson.dumps(request), path=f"data.{field}"))
    request = first_request(name)
    if isinstance(request.get("host"), dict):
        request["host"]["port"] = "40001"
        cases.append(Case("host.port of wrong type", orjson.dumps(request), path="data.host.port"))
    return cases


def missing(name: str) -> list[Case]:
    cases = []
    for field in CONTRACTS[name].request.get("required", []):
        request = first_request(name)
        del request[field]
        cases.append(Case(f"without {field}", orjson.dumps(request), names=field))
    return cases


def oversize(name: str) -> list[Case]:
    request = first_request(name)
    request["padding"] = "x" * (MAX_REQUEST_BYTES + 1024)
    data = orjson.dumps(request)
    assert MAX_REQUEST_BYTES < len(data) < 1024 * 1024
    return [Case("oversize", data)]


def invalid_ids(name: str) -> list[Case]:
    cases = []
    for field, value in example_fields(name).items():
        if field in BAD_IDS:
            for bad in (BAD_IDS[field], f"{value}\n"):  # `$` must not match before a newline
                request = first_request(name)
                request[field] = bad
                cases.append(Case(f"bad {field} {bad!r}", orjson.dumps(request), f"data.{field}"))
        if field == "host" and isinstance(value, dict):
            request = first_request(name)
            request["host"] = {**value, "id": "host.a"}
            cases.append(Case("bad host.id", orjson.dumps(request), path="data.host.id"))
        if field == "source" and isinstance(value, dict):
            request = first_request(name)
            request["source"] = {**value, "digest": "sha256:" + "g" * 64}
            cases.append(
                Case("bad source.digest", orjson.dumps(request), path="data.source.digest")
            )
    assert cases, f"{name} has no id field to spoil"
    return cases


def oddities(name: str) -> list[Case]:
    return [
        Case("empty payload", b""),
        Case("not UTF-8", b'{"task_id": "\xff\xfe"}'),
        Case("null", b"null", path="data"),
        Case("a string", b'"hello"', path="data"),
        Case("deep nesting", b"[" * 5000 + b"]" * 5000),
        Case("NaN", b'{"task_id": NaN}'),
        Case("unknown field", orjson.dumps({**first_request(name), "evil": 1}), names="evil"),
    ]


KINDS: dict[str, Callable[[str], list[Case]]] = {
    "malformed": malformed,
    "array": array,
    "wrong_type": wrong_types,
    "missing": missing,
    "oversize": oversize,
    "invalid_id": invalid_ids,
    "oddities": oddities,
}


def all_cases(name: str) -> list[Case]:
    return [case for kind in KINDS.values() for case in kind(name)]


# -- assertions on what a client sees --------------------------------------------------------


def error_of(msg: Msg, status: str = "400") -> dict[str, Any]:
    """The error body of a reply, after checking the micro headers and the error shape."""
    headers = msg.headers or {}
    assert headers.get(ERROR_CODE_HEADER) == status, (headers, msg.data[:300])
    assert headers.get(ERROR_HEADER)
    body: dict[str, Any] = orjson.loads(msg.data)
    errors = [e.message for e in Draft202012Validator(ERROR_SCHEMA).iter_errors(body)]
    assert errors == [], body
    error: dict[str, Any] = body["error"]
    assert error["status"] == int(status)
    return error


def check_refused(case: Case, msg: Msg) -> None:
    error = error_of(msg)
    assert error["code"] == "bad_request", (case.label, error)
    if case.path is not None:
        assert error.get("path") == case.path, (case.label, error)
    if case.names is not None:
        assert case.names in f"{error.get('path', '')} {error['message']}", (case.label, error)


def reply_of(name: str, msg: Msg) -> dict[str, Any]:
    """A successful reply: no error header, and valid under the contract."""
    assert not (msg.headers and ERROR_CODE_HEADER in msg.headers), (msg.headers, msg.data[:300])
    body: dict[str, Any] = orjson.loads(msg.data)
    reply_schema = CONTRACTS[name].reply
    assert reply_schema is not None
    errors = [e.message for e in Draft202012Validator(reply_schema).iter_errors(body)]
    assert errors == [], body
    return body


# -- the tests -------------------------------------------------------------------------------


def test_every_served_subject_is_covered() -> None:
    unserved = sum(c.service == "proxy" or c.reply is None for c in CONTRACTS.values())
    assert len(SUBJECTS) == len(CONTRACTS) - unserved
    expected = {"scheduler.{partition}.register", "storage.{host_id}.seed"}
    assert expected | {"peer.{host_id}.download"} <= set(SUBJECTS)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", SUBJECTS)
async def test_bad_input_is_refused(env: Env, name: str, kind: str) -> None:
    subject = env.subject(name)
    for case in KINDS[kind](name):
        msg = await env.nc.request(subject, case.data, timeout=2)
        check_refused(case, msg)


@pytest.mark.parametrize(
    "name", ["storage.{host_id}.seed", "storage.preheat", "peer.{host_id}.download"]
)
async def test_unsupported_url_scheme_is_refused(env: Env, name: str) -> None:
    for url in ("file:///etc/passwd", "gopher://example.com/x", "/etc/passwd"):
        request = first_request(name)
        request["source"] = {"url": url}
        if name.startswith("peer."):
            request["output"] = str(env.tmp / "never-written")
        msg = await env.nc.request(env.subject(name), orjson.dumps(request), timeout=5)
        assert error_of(msg)["code"] == "bad_request", url
    assert not (env.tmp / "never-written").exists()


async def test_download_refuses_bad_output_and_strategy(env: Env) -> None:
    name = "peer.{host_id}.download"
    base = {"download_id": "dl-bad", "source": {"url": env.url}}
    cases = [
        ({**base, "output": "relative/out.bin"}, "data.output"),
        ({**base, "output": str(env.tmp)}, "data.output"),
        ({**base, "output": str(env.tmp / "o.bin"), "strategy": "no-such-one"}, None),
        ({**base, "output": str(env.tmp / "o.bin"), "strategy": "Bad Strategy"}, "data.strategy"),
        ({**base, "output": str(env.tmp / "o.bin"), "timeout_s": 0}, "data.timeout_s"),
    ]
    for request, path in cases:
        msg = await env.nc.request(env.subject(name), orjson.dumps(request), timeout=10)
        error = error_of(msg)
        assert error["code"] == "bad_request", request
        if path is not None:
            assert error.get("path") == path, (request, error)
    assert not (env.tmp / "o.bin").exists()


async def test_a_dotted_host_id_reaches_no_peer(env: Env) -> None:
    """A host id with dots would be several subject tokens: nothing listens there."""
    subject = f"{env.prefix}.v1.peer.host.a.progress"
    with pytest.raises(NoRespondersError):
        await env.nc.request(subject, orjson.dumps({"download_id": "dl-1"}), timeout=2)


async def test_pieces_out_of_range_are_refused(env: Env) -> None:
    task_id = os.urandom(32).hex()
    content = {"content_length": 5, "piece_length": 16384, "piece_count": 1}
    peer_id = await register_source(env, task_id, content)
    piece = {"number": 1, "digest": hashlib.sha256(b"x").hexdigest()}
    request = {"task_id": task_id, "peer_id": peer_id, "pieces": [piece]}
    subject = env.subject("scheduler.{partition}.pieces", SEED)
    msg = await env.nc.request(subject, orjson.dumps(request), timeout=2)
    error = error_of(msg)
    assert error["code"] == "bad_request"
    assert error.get("path") == "data.pieces"


@pytest.mark.parametrize("name", ["scheduler.{partition}.register", "scheduler.{partition}.pieces"])
async def test_inconsistent_task_content_is_refused(env: Env, name: str) -> None:
    task_id = os.urandom(32).hex()
    bogus = {"content_length": 5, "piece_length": 16384, "piece_count": 7}
    if name == "scheduler.{partition}.register":
        request = register_body(env, task_id, seed=True)
        request["task"] = bogus
    else:
        peer_id = await register_source(env, task_id)
        request = {"task_id": task_id, "peer_id": peer_id, "task": bogus, "pieces": []}
    msg = await env.nc.request(env.subject(name, SEED), orjson.dumps(request), timeout=2)
    assert error_of(msg)["code"] == "bad_request"


# -- and the services keep serving -----------------------------------------------------------


def register_body(env: Env, task_id: str, *, seed: bool = False) -> dict[str, Any]:
    """A registration of ``HOST``'s peer on the task, or (``seed``) of ``SEED``'s."""
    host = SEED if seed else HOST
    body: dict[str, Any] = {
        "task_id": task_id,
        "peer_id": ids.peer_id(host.host_id, task_id),
        "host": {"id": host.host_id, "ip": "127.0.0.1", "port": 9, "type": host.host_type},
        "source": {"url": env.url},
    }
    if seed:
        # A source itself, so the scheduler triggers no storage seed: only a storage host
        # seeds (an ordinary host asking to is a child).
        body["seed"] = True
    return body


async def register_source(env: Env, task_id: str, content: dict[str, int] | None = None) -> str:
    """Register ``SEED``'s peer as the task's source; returns its peer id."""
    body = register_body(env, task_id, seed=True)
    if content is not None:
        body["task"] = content
    subject = env.subject("scheduler.{partition}.register", SEED)
    msg = await env.nc.request(subject, orjson.dumps(body), timeout=5)
    assert reply_of("scheduler.{partition}.register", msg)["action"] == "back_to_source"
    peer_id: str = body["peer_id"]
    return peer_id


async def valid_request(env: Env, name: str) -> tuple[dict[str, Any], contracts.Sender, float]:
    """The contract's example adapted to live state, the host that may send it, and how long
    to wait for its reply."""
    task_id = os.urandom(32).hex()
    digest = hashlib.sha256(b"hello").hexdigest()
    content = {"content_length": 5, "piece_length": 16384, "piece_count": 1}
    request: dict[str, Any]
    if name in ("scheduler.heartbeat", "scheduler.{scheduler}.beat"):
        request = {"host": env.peer.node.host().to_dict(), "uploads": 0, "peers": 0}
        return request, sender_of(request), 5
    if name == "scheduler.{partition}.register":
        return register_body(env, task_id), HOST, 5
    if name == "scheduler.leave":
        request = {"host_id": "host-leaving", "peer_ids": [ids.peer_id("host-leaving", task_id)]}
        return request, sender_of(request), 5
    if name == "scheduler.{partition}.task":
        return {"task_id": task_id}, TEST_SENDER, 5
    if name == "scheduler.state":
        return {"bitmaps": True, "limit": 5}, TEST_SENDER, 5
    if name == "storage.{host_id}.seed":
        return {"task_id": task_id, "source": {"url": env.url}}, TEST_SENDER, 5
    if name == "storage.preheat":
        return {"source": {"url": env.url}, "timeout_s": 30}, TEST_SENDER, 35
    if name == "storage.{host_id}.fill":
        return {"source": {"url": env.url}, "timeout_s": 30}, SEED, 35
    if name == "peer.{host_id}.progress":
        return {"download_id": "dl-unknown"}, TEST_SENDER, 5
    if name == "storage.{host_id}.cached":
        return {"task_id": task_id}, HOST, 5
    if name == "storage.{host_id}.import":  # a file the peer holds, as its importer
        source = env.tmp / f"import-{uuid.uuid4().hex}.bin"
        source.write_bytes(os.urandom(20000))
        fd = os.open(source, os.O_RDONLY)
        try:
            stored = await env.peer.imports.hold(fd, 20000, 60.0)
        finally:
            os.close(fd)
        assert stored.content is not None and stored.content.digest
        request = {
            "task_id": stored.id,
            "digest": stored.content.digest,
            "content_length": 20000,
            "piece_length": stored.content.piece_length,
            "ttl_s": 60,
        }
        return request, contracts.Sender("normal", env.peer.node.settings.host_id), 30
    if name == "peer.{host_id}.preheat":
        source = {"url": env.url, "digest": f"sha256:{hashlib.sha256(FILE_DATA).hexdigest()}"}
        return {"source": source, "timeout_s": 30}, TEST_SENDER, 35
    if name == "peer.{host_id}.reach":  # the peer probes its own listed upload address
        return {"target": env.peer.node.settings.host_id, "timeout_s": 3}, TEST_SENDER, 10
    if name == "scheduler.address":
        return {"host_id": env.peer.node.settings.host_id}, TEST_SENDER, 5
    if name == "peer.{host_id}.download":
        output = env.tmp / "outputs" / f"{uuid.uuid4().hex}.bin"
        source = {"url": env.url, "digest": f"sha256:{hashlib.sha256(FILE_DATA).hexdigest()}"}
        body = {"download_id": f"dl-{uuid.uuid4().hex[:8]}", "source": source}
        return {**body, "output": str(output), "timeout_s": 60}, TEST_SENDER, 65
    peer_id = await register_source(env, task_id)
    if name == "scheduler.{partition}.reschedule":
        return {"task_id": task_id, "peer_id": peer_id, "blocklist": ["peer-c1"]}, SEED, 5
    pieces = {
        "task_id": task_id,
        "peer_id": peer_id,
        "task": content,
        "pieces": [{"number": 0, "digest": digest, "cost_ms": 3}],
    }
    if name == "scheduler.{partition}.pieces":
        return pieces, SEED, 5
    assert name == "scheduler.{partition}.result", name
    subject = env.subject("scheduler.{partition}.pieces", SEED)
    msg = await env.nc.request(subject, orjson.dumps(pieces), timeout=5)
    reply_of("scheduler.{partition}.pieces", msg)
    return {"task_id": task_id, "peer_id": peer_id, "success": True}, SEED, 5


@pytest.mark.parametrize("name", SUBJECTS)
async def test_service_keeps_serving_after_bad_input(env: Env, name: str) -> None:
    subject = env.subject(name)
    cases = all_cases(name)
    replies = await asyncio.gather(*(env.nc.request(subject, c.data, timeout=5) for c in cases))
    for case, msg in zip(cases, replies, strict=True):
        check_refused(case, msg)
    request, sender, timeout = await valid_request(env, name)
    msg = await env.nc.request(env.subject(name, sender), orjson.dumps(request), timeout=timeout)
    reply = reply_of(name, msg)
    if name == "peer.{host_id}.download":
        assert Path(request["output"]).read_bytes() == FILE_DATA
        assert reply["digest"] == f"sha256:{hashlib.sha256(FILE_DATA).hexdigest()}"
    elif name == "storage.{host_id}.seed":
        assert reply["accepted"] is True
    elif name in ("storage.preheat", "peer.{host_id}.preheat"):
        assert reply["content_length"] == len(FILE_DATA)
    elif name == "scheduler.heartbeat":
        assert reply["ok"] is True
    elif name == "scheduler.{partition}.task":
        assert reply == {"task": None, "offset": 0, "digests": []}
    elif name == "peer.{host_id}.progress":
        assert reply["state"] == "unknown"
    elif name == "storage.{host_id}.import":
        assert reply["held"] is True and reply["digest"] == request["digest"]
    elif name == "storage.{host_id}.cached":
        assert reply["held"] is False
    elif name == "peer.{host_id}.reach":
        assert reply["ok"] is True and reply["address"] == env.peer.node.upload_url, reply
    elif name == "scheduler.address":
        assert reply["known"] is True and reply["address"] == env.peer.node.upload_url, reply


# -- and a host speaks only for itself -------------------------------------------------------


SENDER_SUBJECTS = [
    n
    for n in SUBJECTS
    if CONTRACTS[n].sender
    and {"host", "host_id", "peer_id"} & set(CONTRACTS[n].request["properties"])
]
"""Where the body names a host or peer too. A body that names none (swarmfly cache's
``storage.{host_id}.import``, ``.cached``) is its sender's alone, and nats-server lets a host
publish only under its own (test_nats_permissions)."""


def impostures(
    request: dict[str, Any], sender: contracts.Sender
) -> list[tuple[contracts.Sender, dict[str, Any], str]]:
    """(the subject's sender, the body, what the refusal says) for ``request``, which is
    ``sender``'s: sent by another host, or naming another host's peer or host type."""
    if "host" in request or "host_id" in request:
        message = f"host {IMPOSTOR.host_id} may not speak for {sender.host_id}"
    else:
        message = f"peer {request['peer_id']} is not host {IMPOSTOR.host_id}'s peer"
    found = [(IMPOSTOR, request, message)]
    if "host" in request:
        if "peer_id" in request:
            other = ids.peer_id(IMPOSTOR.host_id, request["task_id"])
            message = f"peer {other} is not host {sender.host_id}'s peer"
            found.append((sender, {**request, "peer_id": other}, message))
        kind = "seed" if sender.host_type == "normal" else "normal"
        message = f"a {kind} host may not speak as a {sender.host_type} one"
        found.append((contracts.Sender(kind, sender.host_id), request, message))
    return found


@pytest.mark.parametrize("name", SENDER_SUBJECTS)
async def test_a_host_cannot_speak_for_another(env: Env, name: str) -> None:
    """Another host's sender token on a body (or the host's own on another's peer, or on
    another host type) gets ``forbidden``; the scheduler then takes the host's own."""
    request, sender, timeout = await valid_request(env, name)
    assert sender_of(request, sender) == sender
    for impostor, body, message in impostures(request, sender):
        msg = await env.nc.request(env.subject(name, impostor), orjson.dumps(body), timeout=5)
        error = error_of(msg, "403")
        assert error["code"] == "forbidden", (impostor, body, error)
        assert message in error["message"], (impostor, body, error)
    assert IMPOSTOR.host_id not in env.scheduler.core.hosts, "nothing it said was taken"
    msg = await env.nc.request(env.subject(name, sender), orjson.dumps(request), timeout=timeout)
    reply_of(name, msg)


# -- what a hostile field name can do to the error reply -------------------------------------


SOURCE_SUBJECTS = [n for n in SUBJECTS if "source" in CONTRACTS[n].request.get("required", [])]


def with_headers(name: str, headers: dict[str, Any]) -> bytes:
    request = first_request(name)
    request["source"] = {"url": "http://127.0.0.1:9/x", "headers": headers}
    return orjson.dumps(request)


@pytest.mark.parametrize("name", SOURCE_SUBJECTS)
async def test_a_field_name_cannot_forge_error_headers(env: Env, name: str) -> None:
    forged = "X\rNats-Service-Error-Code: 200\r\n\r\nNats-Service-Error-Code: 200"
    msg = await env.nc.request(env.subject(name), with_headers(name, {forged: 5}), timeout=2)
    error = error_of(msg)
    assert error["code"] == "bad_request"
    assert list(msg.headers or {}) == [ERROR_HEADER, ERROR_CODE_HEADER]


@pytest.mark.parametrize("name", SOURCE_SUBJECTS)
async def test_a_long_field_name_keeps_the_error_shape(env: Env, name: str) -> None:
    msg = await env.nc.request(env.subject(name), with_headers(name, {"A" * 5000: 5}), timeout=2)
    assert error_of(msg)["code"] == "bad_request"
