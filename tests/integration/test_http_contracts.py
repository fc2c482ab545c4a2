"""Real servers answer as contracts/ says (issue 14, item 2): every answer of a real upload
server (a normal peer's holdings, a seed's grant and loan, each error status with its cause)
validates against contracts/http/peer.openapi.json, and every line the real `swarmfly get`
client and a real peer exchange on the local socket against contracts/localsocket.json."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from nacl.signing import VerifyKey

from swarmfly import bitmap, contracts, localproto
from swarmfly.capability import Signer
from swarmfly.config import Config
from swarmfly.contracts.schema import compile_schema
from swarmfly.get import GetRequest, socket_client
from swarmfly.ids import NODE_ID
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer.lending import MAX_SAID, Lending
from swarmfly.services.peer.store import StoredTask
from swarmfly.testing import InProcessCluster, Origin, capability, in_process_cluster
from tests.integration.test_upload_server import PIECE, Upload, content_of, finish, serve

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
API = contracts.peer_openapi()
SCHEMAS = API["components"]["schemas"]
LIMITS = API["x-swarmfly-limits"]
TOKEN = API["components"]["securitySchemes"]["capability"]["x-swarmfly-token"]
LOCAL = contracts.local_socket()


@cache
def compiled(text: str) -> Any:
    """A validator for a schema given as JSON text (schemas are dicts: not hashable)."""
    return compile_schema(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", **json.loads(text)}
    )


def valid(schema: Mapping[str, Any], value: Any) -> Any:
    """``value``, once it is checked against ``schema``."""
    compiled(json.dumps(schema, sort_keys=True))(value)
    return value


def as_typed(schema: Mapping[str, Any], text: str) -> Any:
    """A query string's value as the JSON value its schema describes."""
    kind = schema.get("type")
    if kind == "integer":
        return int(text)
    if kind == "number":
        return float(text)
    return text


def conforming(method: str, target: str, headers: Mapping[str, str]) -> None:
    """A request a child may send: every parameter documented and of its schema."""
    parts = urlsplit(target)
    operation = contracts.peer_operation(method, parts.path)
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        parameter = operation.parameters.get(("query", name))
        assert parameter is not None, f"{name} is no parameter of {operation.operation_id}"
        valid(parameter["schema"], as_typed(parameter["schema"], value))
    for (place, name), parameter in operation.parameters.items():
        if place == "header" and (parameter.get("required") or name in headers):
            valid(parameter["schema"], headers[name])
    if operation.secured:
        scheme, _, token = headers["Authorization"].partition(" ")
        assert scheme.lower() == "bearer"
        valid(TOKEN["schema"], token)


def answered(method: str, target: str, status: int, body: bytes, headers: Mapping[str, str]) -> Any:
    """Check one answer against its operation's documented response; returns the body read
    as that response's media type (JSON, text, or the bytes)."""
    operation = contracts.peer_operation(method, urlsplit(target).path)
    answer = operation.answer(status)
    media_type = headers.get("Content-Type", "").split(";")[0].strip()
    assert media_type == answer.media_type, (target, status, media_type)
    for name, header in answer.headers.items():
        if header.get("required"):
            assert name in {k.lower() for k in headers}, f"{status} without {name}"
        if name in {k.lower() for k in headers}:
            valid(header["schema"], headers[name])
    if media_type == "application/json":
        value = json.loads(body)
    elif media_type.startswith("text/"):
        value = body.decode()
    else:
        assert int(headers["Content-Length"]) == len(body)
        return body
    assert answer.validate is not None
    answer.validate(value)
    if answer.causes:
        assert value in answer.causes, f"{status} {value!r}: a cause the contract does not list"
    return value


async def ask(
    upload: Upload, target: str, headers: Mapping[str, str] | None = None, *, good: bool = True
) -> tuple[int, Any]:
    """GET as a scheduled child would (``Upload.get``), the answer checked against the
    contract; ``good``: the request itself is one the contract allows."""
    shown = dict(headers or {})
    if "Authorization" not in shown and target.startswith("/v1/tasks/"):
        task_id = urlsplit(target).path.split("/")[3]
        peer = dict(parse_qsl(urlsplit(target).query)).get("peer", "")
        shown.update(upload.token(task_id, peer if NODE_ID.match(peer) else "child-1"))
    if good:
        conforming("GET", target, shown)
    status, body, answer_headers = await upload.get(target, shown)
    return status, answered("GET", target, status, body, answer_headers)


def holdings(value: Any) -> Any:
    return valid(SCHEMAS["Holdings"], value)


def grant(value: Any) -> Any:
    return valid(SCHEMAS["Grant"], value)


# -- the pieces answer ---------------------------------------------------------------------


async def test_a_peers_holdings_answer_and_long_poll_as_documented(tmp_path: Path) -> None:
    async with serve(tmp_path) as peer:
        data = content_of(3 * PIECE, b"holdings")
        task = peer.put(data, {0})
        base = f"/v1/tasks/{task.id}/pieces"
        status, first = await ask(peer, f"{base}?since=-1&wait=0")
        assert status == 200
        assert holdings(first) == {
            "version": first["version"], "piece_count": 3, "complete": False, "pieces": [0],
        }  # fmt: skip

        # Held while nothing changes, answered when a piece is verified.
        started = time.monotonic()
        waiting = asyncio.create_task(ask(peer, f"{base}?since={first['version']}&wait=5"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        finish(task, data, 2)
        _, news = await waiting
        assert holdings(news)["pieces"] == [0, 2] and news["version"] > first["version"]
        assert time.monotonic() - started < 3

        # Nothing new: the wait runs out, the same holdings come back.
        _, same = await ask(peer, f"{base}?since={news['version']}&wait=0.3")
        assert same == news

        # Complete: at once, whatever the wait (clamped to 30 s: never longer).
        finish(task, data, 1)
        started = time.monotonic()
        _, done = await ask(peer, f"{base}?since=-1&wait=30")
        assert holdings(done)["complete"] and done["pieces"] == [0, 1, 2]
        for clamped in ("-3", "nan", "1e9"):
            status, _ = await ask(peer, f"{base}?wait={clamped}", good=False)
            assert status == 200
        assert time.monotonic() - started < 2


async def test_a_seeds_grants_as_documented(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=8 * MiB, superseed=True, lease=0.5) as seed:
        data = content_of(4 * PIECE, b"grants")
        task = seed.put(data, {0, 1, 2, 3})
        base = f"/v1/tasks/{task.id}/pieces"
        wants = bitmap.encode({1, 3}, 4)
        _, granted = await ask(seed, f"{base}?since=-1&wait=1&wants={wants}&peer=child-1")
        assert grant(granted)["pieces"] == [1] and not granted["complete"]

        # The grant is taken: the bytes of that piece.
        target = f"/v1/tasks/{task.id}/data"
        status, body = await ask(seed, target, {"Range": f"bytes={PIECE}-{2 * PIECE - 1}"})
        assert (status, body) == (206, data[PIECE : 2 * PIECE])

        # One granted and declined: its place is free for the next grant at once.
        _, second = await ask(seed, f"{base}?wait=1&wants={wants}")
        assert grant(second)["pieces"] == [3]
        _, third = await ask(seed, f"{base}?wait=1&wants={wants}&decline=3")
        assert grant(third)["pieces"] == [3] and third["version"] > second["version"]

        # Nothing it wants: an empty answer once the wait runs out.
        _, nothing = await ask(seed, f"{base}?wait=0.3&wants={bitmap.encode(set(), 4)}")
        assert grant(nothing)["pieces"] == [] and "origin" not in nothing


async def test_a_seeds_loan_answers_as_documented(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        task = seed.put(content_of(8 * PIECE, b"loans"), {0, 1})
        task.lending = Lending(8, etag='"v1"', limit=1, window=1)
        every = bitmap.encode(set(range(8)), 8)
        base = f"/v1/tasks/{task.id}/pieces"
        # Two grants fill the one slot's places; the third child is lent a piece.
        answers = await asyncio.gather(
            *(ask(seed, f"{base}?since=-1&wait=0.5&wants={every}&peer=child-{n}")
              for n in range(3))
        )  # fmt: skip
        loans = [grant(a) for _, a in answers if "origin" in a]
        assert loans == [{**loans[0], "pieces": [], "origin": [7], "etag": '"v1"'}]

        # The child says it read it: a full list of MAX_SAID numbers is taken...
        most = ",".join(["7", *["999999999"] * (MAX_SAID - 1)])
        status, said = await ask(seed, f"{base}?wait=0&lent={most}")
        assert status == 200 and grant(said)
        assert task.lending.delivered == {7}
        # ...and anything past the documented pattern refused, as documented.
        for bad in (most + ",1", "1" * 10, ",", "x", "1,,2"):
            status, cause = await ask(seed, f"{base}?wait=0&lent={bad}", good=False)
            assert (status, cause) == (400, "lent must be up to 64 piece numbers"), bad


# -- every error, with its cause -------------------------------------------------------------


@dataclass
class Case:
    target: str
    """A path and query; {task} and {other} are filled in."""
    status: int
    cause: str
    headers: dict[str, str] = field(default_factory=dict)
    superseed: bool = False


UNKNOWN = hashlib.sha256(b"never stored").hexdigest()
BAD_IDS = ["xyz", "A" * 64, "0" * 63, "g" * 64]
ERRORS = {
    **{f"pieces: task id {t}": Case(f"/v1/tasks/{t}/pieces", 400, "invalid task id")
       for t in BAD_IDS},
    **{f"data: task id {t}": Case(f"/v1/tasks/{t}/data", 400, "invalid task id",
                                  {"Range": "bytes=0-0"}) for t in BAD_IDS},
    "since not a number": Case("/v1/tasks/{task}/pieces?since=1.5", 400,
                               "since and wait must be numbers"),
    "wait not a number": Case("/v1/tasks/{task}/pieces?wait=soon", 400,
                              "since and wait must be numbers"),
    "wants too long": Case("/v1/tasks/{task}/pieces?wants=AAAAAAAA", 400,
                           "piece bitmap is not this task's, in base64url", superseed=True),
    "wants padded": Case("/v1/tasks/{task}/pieces?wants=AA%3D%3D", 400,
                         "piece bitmap is not this task's, in base64url", superseed=True),
    "wants undecodable": Case("/v1/tasks/{task}/pieces?wants=A", 400,
                              "piece bitmap is not base64url", superseed=True),
    "wants of another size": Case("/v1/tasks/{task}/pieces?wants=", 400,
                                  "piece bitmap does not match the task's pieces",
                                  superseed=True),
    "decline not a number": Case("/v1/tasks/{task}/pieces?decline=x", 400,
                                 "decline must be a piece number", superseed=True),
    "peer not an id": Case("/v1/tasks/{task}/pieces?peer=a.b", 400,
                           "peer must be a peer id", superseed=True),
    "borrow not 0 or 1": Case("/v1/tasks/{task}/pieces?borrow=yes", 400,
                              "borrow must be 0 or 1", superseed=True),
    "no Range": Case("/v1/tasks/{task}/data", 400, "a Range of verified pieces is required"),
    **{f"Range {r}": Case("/v1/tasks/{task}/data", 400, "a Range of verified pieces is required",
                          {"Range": r})
       for r in ("bytes=0-", "bytes=-5", "bytes=0-1,3-4", "BYTES=0-1", "items=0-1")},
    "across two pieces": Case("/v1/tasks/{task}/data", 416, "a range must lie within one piece",
                              {"Range": f"bytes={PIECE - 1}-{PIECE}"}),
    "a piece not verified": Case("/v1/tasks/{task}/data", 416,
                                 "range not within verified pieces",
                                 {"Range": f"bytes={PIECE}-{PIECE + 9}"}),
    "past the end": Case("/v1/tasks/{task}/data", 416, "range not within verified pieces",
                         {"Range": f"bytes={2 * PIECE}-{2 * PIECE}"}),
    "last before first": Case("/v1/tasks/{task}/data", 416, "range not within verified pieces",
                              {"Range": "bytes=10-5"}),
    **{f"{r}: unknown task": Case(f"/v1/tasks/{UNKNOWN}/{r}", 404, "unknown task",
                                  {"Range": "bytes=0-0"}) for r in ("pieces", "data")},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_each_error_is_a_documented_status_with_a_documented_cause(
    tmp_path: Path, name: str
) -> None:
    case = ERRORS[name]
    async with serve(tmp_path, superseed=case.superseed) as upload:
        task = upload.put(content_of(2 * PIECE, b"errors"), {0})
        target = case.target.format(task=task.id)
        status, cause = await ask(upload, target, case.headers, good=False)
        assert (status, cause) == (case.status, case.cause)


@pytest.mark.parametrize("resource", ["pieces", "data"])
async def test_each_capability_refusal_is_a_documented_403(tmp_path: Path, resource: str) -> None:
    async with serve(tmp_path) as upload:
        task = upload.put(content_of(PIECE, b"private"), {0})
        other = upload.put(content_of(PIECE, b"other"), {0})
        forger = Signer.generate()
        refusals = {
            "a capability for the task is required": ["", "Basic Zm9vOmJhcg=="],
            "malformed capability": ["Bearer v1.abc.def", "Bearer  " + upload.token(task.id)
                                     ["Authorization"][7:], "Bearer v1." + "A" * 300],
            "capability not signed by this cluster's schedulers":
                [f"Bearer {forger.mint(task.id, 'child-1', time.time())}"],
            "capability is for another task": [upload.token(other.id)["Authorization"]],
            "capability expired": [f"Bearer {upload.signer.mint(task.id, 'c', 0, 60)}"],
        }  # fmt: skip
        target = f"/v1/tasks/{task.id}/{resource}"
        for cause, shown in refusals.items():
            for auth in shown:
                headers = {"Range": "bytes=0-9", "Authorization": auth}
                assert await ask(upload, target, headers, good=False) == (403, cause), auth
        # Before the task is looked up: an unknown task is refused alike.
        unknown = f"/v1/tasks/{UNKNOWN}/{resource}"
        assert (await ask(upload, unknown, {"Authorization": ""}, good=False))[0] == 403
        # The scheme word in any case.
        bearer = "bearer " + upload.token(task.id)["Authorization"][7:]
        status, _ = await ask(upload, target, {"Range": "bytes=0-9", "Authorization": bearer})
        assert status in (200, 206)


@pytest.mark.parametrize("resource", ["pieces", "data"])
async def test_a_host_that_knows_no_key_yet_answers_a_documented_503(
    tmp_path: Path, resource: str
) -> None:
    async with serve(tmp_path) as upload:
        task = upload.put(content_of(PIECE, b"early"), {0})
        keys = dict(upload.server.verify_keys)
        upload.server.verify_keys.clear()
        target = f"/v1/tasks/{task.id}/{resource}"
        status, cause = await ask(upload, target, {"Range": "bytes=0-9"})
        assert (status, cause) == (503, "no scheduler key known yet")
        upload.server.trust(keys)
        assert (await ask(upload, target, {"Range": "bytes=0-9"}))[0] in (200, 206)


async def test_a_parent_with_no_free_place_answers_a_documented_503(tmp_path: Path) -> None:
    """Grants hold the places (one slot: two places): a request without one is turned away."""
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        data = content_of(3 * PIECE, b"busy")
        task = seed.put(data, {0, 1, 2})
        base = f"/v1/tasks/{task.id}"
        answers = await asyncio.gather(*(ask(seed, f"{base}/pieces?wait=1") for _ in range(2)))
        assert sorted(a["pieces"] for _, a in answers) == [[0], [1]]
        ranged = {"Range": f"bytes={2 * PIECE}-{3 * PIECE - 1}"}
        assert await ask(seed, f"{base}/data", ranged) == (503, "no free upload slot")
        status, body = await ask(seed, f"{base}/data", {"Range": f"bytes=0-{PIECE - 1}"})
        assert (status, body) == (206, data[:PIECE])  # a granted piece has its place


async def test_health_metrics_and_what_the_api_does_not_serve(tmp_path: Path) -> None:
    async with serve(tmp_path) as upload:
        status, health = await ask(upload, "/healthz")
        assert (status, health) == (200, {"ok": True, "uploads": 0})
        status, text = await ask(upload, "/metrics")
        assert status == 200 and "# TYPE" in text
        async with upload.session.get(f"{upload.url}/v1/nothing") as response:
            assert (response.status, await response.text()) == (404, "404: Not Found")
        async with upload.session.post(f"{upload.url}/healthz") as response:
            assert (response.status, await response.text()) == (405, "405: Method Not Allowed")
        for text in ("`404: Not Found`", "`405: Method Not Allowed`"):
            assert text in API["info"]["description"]


# -- a real cluster: real capabilities, the real client on the local socket ----------------


@dataclass
class Running:
    cluster: InProcessCluster
    origin: Origin
    data: bytes
    url: str
    root: Path


@pytest.fixture(scope="module")
async def running(nats: NatsServer) -> AsyncIterator[Running]:
    """Scheduler, a seed that grants (its uplink capped) and a peer; an origin slow enough that
    a download shows progress."""
    root = Path(tempfile.mkdtemp(prefix="swarmfly-httpc-"))  # short: the socket's path

    def configure(config: Config) -> None:
        config.storage.upload_rate = 256 * MiB

    data = os.urandom(2 * MiB + 12345)
    origin = Origin(rate=2 * MiB)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        async with (
            origin.serve() as served,
            in_process_cluster(nats.url, prefix, root, configure=configure) as cluster,
        ):
            yield Running(cluster, served, data, served.add("slow.bin", data), root)
    finally:
        await asyncio.to_thread(shutil.rmtree, root, ignore_errors=True)


class Tap:
    """A Unix socket between the real client and the real peer: it passes every byte on (the
    descriptor too) and keeps the lines each side sent."""

    def __init__(self, path: Path, upstream: str) -> None:
        self.path, self.upstream = path, upstream
        self.sent: list[bytes] = []
        self.descriptors: list[int] = []
        self.answered: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(30)
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        conn, _ = self._listener.accept()
        with conn, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
            conn.settimeout(30)
            peer.settimeout(30)
            peer.connect(self.upstream)
            request, fds = b"", []
            while b"\n" not in request:
                chunk, received, _, _ = socket.recv_fds(conn, 1 << 20, 4)
                fds += received
                if not chunk:
                    break
                request += chunk
            self.sent.append(request)
            self.descriptors.append(len(fds))
            try:
                socket.send_fds(peer, [request], fds)
            finally:
                for fd in fds:
                    os.close(fd)  # the peer holds its own copy now
            with peer.makefile("rb") as lines:
                for line in lines:
                    self.answered.append(line)
                    conn.sendall(line)

    def close(self) -> None:
        self._thread.join(30)
        self._listener.close()


def lines_of(raw: list[bytes]) -> Iterator[Any]:
    for line in raw:
        assert line.endswith(b"\n") and line.count(b"\n") == 1, line[:80]
        yield json.loads(line)


async def test_the_local_socket_and_a_real_swarm_speak_as_documented(running: Running) -> None:
    cluster, data = running.cluster, running.data
    peer_dir = cluster.peer.node.settings.state_dir
    record = json.loads((peer_dir / localproto.PEER_FILE).read_bytes())
    LOCAL.validate_record(record)

    # The real client, through the tap, into a file of its own.
    tap = Tap(running.root / "tap.sock", record["socket"])
    output = running.root / "out" / "slow.bin"
    request = GetRequest(url=running.url, output=output, headers={})
    try:
        summary = await asyncio.to_thread(
            socket_client.get, peer_dir, request.checked(), None, str(tap.path)
        )
    finally:
        await asyncio.to_thread(tap.close)
    assert summary is not None and output.read_bytes() == data

    [sent] = list(lines_of(tap.sent))
    assert tap.descriptors == [LOCAL.framing["max_descriptors"]]
    LOCAL.messages["request"].validate(sent)
    assert len(tap.sent[0]) <= LOCAL.framing["max_request_bytes"]
    lines = list(lines_of(tap.answered))
    kinds = [LOCAL.of(line).name for line in lines]
    assert kinds[-1] == "reply" and set(kinds[:-1]) == {"progress"}, kinds
    for line in lines:
        LOCAL.of(line).validate(line)
    reply = lines[-1]["reply"]
    assert reply["output"] == str(output) and reply["content_length"] == len(data)
    task_id = reply["task_id"]

    # A capability the real scheduler signed, checked as the document says to.
    auth = await capability(cluster.buses["peer"], task_id)
    token = auth["Authorization"].removeprefix("Bearer ")
    valid(TOKEN["schema"], token)
    version, encoded, signature = token.split(".")
    payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    valid(TOKEN["payload_schema"], payload.decode("ascii"))
    named_task, peer_id, expires = payload.decode().split(":")
    assert (version, named_task) == ("v1", task_id)
    assert abs(int(expires) - time.time() - LIMITS["token_seconds"]) < 60
    keys = list(cluster.peer.node.upload.verify_keys)
    assert 1 <= len(keys) <= LIMITS["verify_keys_kept"]
    raw_signature = base64.urlsafe_b64decode(signature + "==")
    VerifyKey(base64.urlsafe_b64decode(keys[-1] + "=")).verify(payload, raw_signature)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def get(base: str, target: str, headers: dict[str, str]) -> tuple[int, Any]:
            shown = {**auth, **headers}
            conforming("GET", target, shown)
            async with session.get(base + target, headers=shown) as response:
                body = await response.read()
                return response.status, answered(
                    "GET", target, response.status, body, response.headers
                )

        # The peer that downloaded: its holdings, complete.
        peer_url = cluster.peer.node.upload_url
        status, held = await get(peer_url, f"/v1/tasks/{task_id}/pieces?since=-1&wait=10", {})
        assert status == 200 and holdings(held)["complete"]
        assert held["pieces"] == list(range(held["piece_count"]))

        # The seed, its uplink capped: a grant of a piece wanted, then its bytes.
        seed_url = cluster.storage.node.upload_url
        count = held["piece_count"]
        wants = bitmap.encode({count - 1}, count)
        query = f"?since=-1&wait=2&wants={wants}&peer={peer_id}"
        status, granted = await get(seed_url, f"/v1/tasks/{task_id}/pieces{query}", {})
        assert status == 200 and grant(granted)["pieces"] == [count - 1]
        first = (count - 1) * MiB  # pieces of this size are 1 MiB, the smallest
        ranged = {"Range": f"bytes={first}-{len(data) - 1}"}
        status, body = await get(seed_url, f"/v1/tasks/{task_id}/data", ranged)
        assert (status, body) == (206, data[first:])


def raw_exchange(path: str, line: bytes, fds: list[int]) -> list[bytes]:
    """One request as any client could send it; every line the peer answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(15)
        conn.connect(path)
        if fds:
            socket.send_fds(conn, [line], fds)
        else:
            conn.sendall(line)
        with conn.makefile("rb") as lines:
            return list(lines)


async def test_the_local_socket_refuses_as_documented(running: Running) -> None:
    """Each refusal is one error line, then the peer hangs up; nothing is downloaded."""
    peer_dir = running.cluster.peer.node.settings.state_dir
    path = json.loads((peer_dir / localproto.PEER_FILE).read_bytes())["socket"]
    good = {"download_id": "dl-refused", "source": {"url": running.url},
            "output": str(running.root / "refused.bin")}  # fmt: skip
    requests_before = running.origin.requests
    empty = running.root / "empty"
    full = running.root / "full"
    full.write_bytes(b"already here")
    empty.touch()
    with open(empty, "wb") as a, open(empty, "wb") as b, open(full, "ab") as c:
        cases = {
            "not JSON": (b"not json\n", [], None),
            "not an object": (b"[1, 2]\n", [], "data"),
            "no source": (json.dumps({"download_id": "d", "output": "/x"}).encode() + b"\n",
                          [], None),
            "two descriptors": (json.dumps(good).encode() + b"\n",
                                [a.fileno(), b.fileno()], None),
            "a file not empty": (json.dumps(good).encode() + b"\n", [c.fileno()],
                                 "data.output"),
            "a descriptor with hard_link": (json.dumps({**good, "hard_link": True}).encode()
                                            + b"\n", [a.fileno()], "data.output"),
            "a line too long": (json.dumps({**good, "x": "y" * (300 * 1024)}).encode() + b"\n",
                                [], None),
        }  # fmt: skip
        for name, (line, fds, error_path) in cases.items():
            answer = await asyncio.to_thread(raw_exchange, path, line, fds)
            assert len(answer) == 1, (name, answer)
            [error] = lines_of(answer)
            message = LOCAL.of(error)
            assert message.name == "error", name
            message.validate(error)
            assert error["error"]["code"] == "bad_request", (name, error)
            if error_path is not None:
                assert error["error"].get("path") == error_path, (name, error)
    assert running.origin.requests == requests_before
    assert not (running.root / "refused.bin").exists()


# -- a lent piece handed back --------------------------------------------------------------


async def hand_back(
    upload: Upload, task: StoredTask, number: str, body: bytes, peer: str = "child-1"
) -> tuple[int, Any]:
    """PUT a lent piece as a leaving child would, the answer checked against the contract."""
    target = f"/v1/tasks/{task.id}/lent/{number}"
    headers = upload.token(task.id, peer)
    conforming("PUT", target, headers)
    async with upload.session.put(upload.url + target, data=body, headers=headers) as response:
        status, raw, answer_headers = response.status, await response.read(), response.headers
    return status, answered("PUT", target, status, raw, answer_headers)


async def test_a_lent_piece_handed_back_as_documented(tmp_path: Path) -> None:
    async with serve(tmp_path, rate=8 * MiB, superseed=True) as seed:
        data = content_of(8 * PIECE, b"handed back")
        task = seed.put(data, {0, 1})
        piece = {n: data[n * PIECE : (n + 1) * PIECE] for n in range(8)}
        # Not lending the task (yet): nothing is taken, whoever asks.
        assert await hand_back(seed, task, "7", piece[7]) == (200, {"taken": False})

        async def take_back(
            into: StoredTask, number: int, child: str, chunks: AsyncIterator[bytes]
        ) -> bool:
            """As the seed's download takes it: written as it comes, checked, marked."""
            writer = into.writer(number)
            assert writer is not None
            try:
                async for chunk in chunks:
                    writer.write([chunk])
                digest = writer.finish(into.digests[number])
            finally:
                writer.close()
            into.mark_done(number, digest)
            return True

        seed.server.take_back = take_back
        task.lending = Lending(8, etag='"v1"')
        task.lending.lent_to.update({7: "child-1", 6: "child-2", 5: "child-1"})
        task.lending.pending.update({7: 1e18, 6: 1e18, 5: 1e18})

        assert await hand_back(seed, task, "7", piece[7]) == (200, {"taken": True})
        assert 7 in task.done and task.read(7 * PIECE, PIECE) == piece[7]
        assert await hand_back(seed, task, "7", piece[7]) == (200, {"taken": False})  # held

        refused = await hand_back(seed, task, "6", piece[6])
        assert refused == (403, "the piece was not lent to this child")
        for bad in ("x", "8", "1" * 10, "-1"):
            assert (await hand_back(seed, task, bad, piece[5]))[0] == 400, bad
        assert await hand_back(seed, task, "8", piece[5]) == (400, "not a piece of the task")
        short = await hand_back(seed, task, "5", piece[5][:-1])
        assert short == (400, "the body must be the whole piece")
        # A forged body: the digest the scheduler knows of the piece refutes it; nothing kept.
        task.digests[5] = hashlib.sha256(piece[5]).hexdigest()
        forged = await hand_back(seed, task, "5", bytes(len(piece[5])))
        assert forged == (422, "the piece does not match")
        assert 5 not in task.done
        assert await hand_back(seed, task, "5", piece[5]) == (200, {"taken": True})
