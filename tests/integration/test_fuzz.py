"""Fuzzing what the services face from the network: every served subject gets mutated contract
examples and random bytes, the upload server gets hostile paths, queries and ranges, and a
capped, lending seed gets mutated grant polls (``wants``, ``decline``, ``lent``). Each
answer is a valid reply or the one error shape, promptly; nothing leaks from outside the store;
and the services still serve a valid request afterwards (DESIGN §3, §9).

Hypothesis drives plain (sync) tests; the cluster, the origin and the NATS client live on an
event loop in a background thread, and each example runs there with a bounded wait.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import copy
import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_from_bytes

import aiohttp
import nats.errors
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from nats import connect as connect_nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from swarmfly import bitmap, contracts, ids
from swarmfly.bus import MAX_REQUEST_BYTES
from swarmfly.capability import Signer
from swarmfly.content import TaskContent, piece_count
from swarmfly.httpserver import serve_http
from swarmfly.ids import NODE_ID
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer import grants
from swarmfly.services.peer.lending import Lending
from swarmfly.services.peer.service import PeerService
from swarmfly.services.peer.store import StoredTask, TaskStore
from swarmfly.services.peer.upload import UploadServer
from swarmfly.testing import (
    TEST_SENDER,
    Origin,
    capability,
    in_process_cluster,
    sender_of,
    subject_tokens,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

T = TypeVar("T")

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"
ROOT = Path(__file__).resolve().parents[2]
ERROR_VALIDATOR = Draft202012Validator(
    json.loads((ROOT / "contracts" / "error.json").read_text(encoding="utf-8"))
)
CONTRACTS = contracts.registry()
SUBJECTS = sorted(
    n
    for n, c in CONTRACTS.items()
    if c.service in ("scheduler", "storage", "peer") and c.reply is not None  # not an event
)
REPLY_VALIDATORS = {
    name: Draft202012Validator(c.reply) for name, c in CONTRACTS.items() if c.reply is not None
}

FILE_DATA = hashlib.sha256(b"fuzz").digest() * 4096  # 128 KiB: one piece, fetched in a blink
SECRET = b"TOP-SECRET-OUTSIDE-THE-STORE"
BLOB_NAME = "team/app"
BLOB_DIGEST = f"sha256:{hashlib.sha256(FILE_DATA).hexdigest()}"
REQUEST_TIMEOUT = 5.0
"""What a request may take: more is a hang."""
EXAMPLE_TIMEOUT = REQUEST_TIMEOUT + 5
"""What one example may take on the loop thread, request and checks together."""

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BYTES = settings(FUZZ, max_examples=40)
IMPOSTOR = contracts.Sender("normal", "fuzz-impostor")
"""A host that sends what others name as theirs."""
HTTP = settings(FUZZ, max_examples=300)


# -- the services, on a loop thread, once per module -----------------------------------------


@dataclass(repr=False)
class Env:
    """What the fuzzing talks to; ``run`` executes a coroutine on the services' loop."""

    loop: asyncio.AbstractEventLoop
    nc: NatsClient
    session: aiohttp.ClientSession
    prefix: str
    peer: PeerService
    origin: Origin
    url: str
    outputs: Path
    task_id: str
    """A task the peer holds complete: FILE_DATA, fetched once at start-up."""
    hosts: dict[str, str]
    proxy_url: str = ""
    """The peer's registry mirror, whose upstream is ``origin`` (FILE_DATA is a blob there)."""
    auth: dict[str, str] = field(default_factory=dict)
    """A scheduled child's capability for ``task_id``: the fuzzing gets past the door."""

    @property
    def auth_line(self) -> bytes:
        return b"".join(f"{k}: {v}\r\n".encode() for k, v in self.auth.items())

    def __repr__(self) -> str:
        return f"Env(prefix={self.prefix!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints the fixture with each failing example: keep that one line."""
        printer.text(repr(self))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = EXAMPLE_TIMEOUT) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"no answer within {timeout:g}s (a hang)") from None

    def subject(self, name: str, sender: contracts.Sender = TEST_SENDER) -> str:
        """The subject of ``name``, sent by ``sender`` where the contract names a sender."""
        tokens = subject_tokens(name, self.hosts, sender=sender)
        subject: str = CONTRACTS[name].subject(self.prefix, **tokens)
        return subject

    @property
    def upload_url(self) -> str:
        url: str = self.peer.node.upload_url
        return url


async def _own(
    nats_url: str, tmp: Path, ready: concurrent.futures.Future[Env], stop: asyncio.Event
) -> None:
    """Enter the origin and cluster, hand them out, and leave them in this same task."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        async with (
            Origin().serve() as origin,
            in_process_cluster(
                nats_url,
                prefix,
                tmp,
                configure=lambda c: setattr(c.proxy, "registries", [origin.url]),
            ) as cluster,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as http,
        ):
            url = origin.add("small.bin", FILE_DATA)
            nc = await connect_nats(servers=[nats_url], connect_timeout=3)
            try:
                env = Env(
                    asyncio.get_running_loop(),
                    nc,
                    http,
                    prefix,
                    cluster.peer,
                    origin,
                    url,
                    tmp / "outputs",
                    "",
                    cluster.hosts,
                )
                env.outputs.mkdir()
                origin.add(f"v2/{BLOB_NAME}/blobs/{BLOB_DIGEST}", FILE_DATA)
                env.proxy_url = cluster.proxy.url
                for secret in (tmp / "secret.txt", tmp / "peer" / "secret.txt"):
                    secret.write_bytes(SECRET)
                env.task_id = (await download(env, env.outputs / "first.bin"))["task_id"]
                env.auth = await capability(cluster.buses["peer"], env.task_id)
                ready.set_result(env)
                await stop.wait()
            finally:
                await nc.close()
    except BaseException as exc:
        if not ready.done():
            ready.set_exception(exc)
        raise


async def _cancel_leftovers() -> None:
    """Background work the fuzzing started (seeds of junk tasks) must not outlive the loop."""
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


@pytest.fixture(scope="module")
def env(nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    thread.start()
    ready: concurrent.futures.Future[Env] = concurrent.futures.Future()
    stop = asyncio.Event()
    owner = asyncio.run_coroutine_threadsafe(
        _own(nats.url, tmp_path_factory.mktemp("fuzz"), ready, stop), loop
    )
    try:
        yield ready.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        try:
            owner.result(timeout=30)
        finally:
            asyncio.run_coroutine_threadsafe(_cancel_leftovers(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            assert not thread.is_alive(), "the fuzz loop thread did not stop"
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


# -- what a client sees ----------------------------------------------------------------------


def check_answer(name: str, msg: Msg) -> dict[str, Any]:
    """A valid reply under the contract, or the one error shape with the micro headers; an
    ``internal`` error means the service did not understand its own failure."""
    headers = msg.headers or {}
    body: dict[str, Any] = orjson.loads(msg.data)
    if ERROR_CODE_HEADER in headers:
        assert headers.get(ERROR_HEADER), headers
        errors = [e.message for e in ERROR_VALIDATOR.iter_errors(body)]
        assert errors == [], body
        assert headers[ERROR_CODE_HEADER] == str(body["error"]["status"]), (headers, body)
        assert body["error"]["code"] != "internal", body
    else:
        errors = [e.message for e in REPLY_VALIDATORS[name].iter_errors(body)]
        assert errors == [], body
    return body


def named_sender(data: bytes) -> contracts.Sender:
    """The host a payload names itself as, if it is one a subject can name; else
    ``TEST_SENDER``."""
    try:
        body = orjson.loads(data)
    except ValueError:  # not JSON (orjson's errors are ValueErrors)
        return TEST_SENDER
    sender = sender_of(body) if isinstance(body, dict) else TEST_SENDER
    valid = sender.host_type in contracts.HOST_TYPES
    return sender if valid and contracts.TOKEN_PATTERN.fullmatch(sender.host_id) else TEST_SENDER


async def ask(
    env: Env, name: str, data: bytes, sender: contracts.Sender | None = None
) -> dict[str, Any]:
    """Send ``data`` as ``sender``, by default the host it names: past the sender check."""
    subject = env.subject(name, named_sender(data) if sender is None else sender)
    try:
        msg = await env.nc.request(subject, data, timeout=REQUEST_TIMEOUT)
    except nats.errors.TimeoutError:
        raise AssertionError(f"{name} did not answer in {REQUEST_TIMEOUT:g}s (a hang)") from None
    return check_answer(name, msg)


async def download(env: Env, output: Path) -> dict[str, Any]:
    request = {"download_id": f"dl-{uuid.uuid4().hex[:8]}", "source": {"url": env.url}}
    data = orjson.dumps({**request, "output": str(output), "timeout_s": 30})
    msg = await env.nc.request(env.subject("peer.{host_id}.download"), data, timeout=30)
    reply = check_answer("peer.{host_id}.download", msg)
    assert ERROR_CODE_HEADER not in (msg.headers or {}), reply
    assert output.read_bytes() == FILE_DATA
    return reply


# -- requests: contract examples and schema-valid values, then mutated -----------------------


def long_text() -> st.SearchStrategy[str]:
    return st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(256, 8192))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-1),
    st.floats(),
    st.text(max_size=24),
    st.text(st.characters(min_codepoint=0x80), max_size=24),
    st.sampled_from(["", "..", "../../etc/passwd", "%2e%2e", "\x00", "a.b", "0" * 64, "-1"]),
    long_text(),
)
"""Other JSON types, huge and negative numbers (beyond 64 bits, NaN and infinities too),
unicode (lone surrogates too), long strings and path-like junk."""

JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
KEYS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(sorted({k for c in CONTRACTS.values() for k in c.request["properties"]})),
)
"""New keys: random text, or the name of a field some other contract knows."""

HEADER_NAMES = ["Authorization", "Accept", "Range", "Host", "If-None-Match", "Connection"]

SAFE_URL_PATHS = ["/missing.bin", "/small.bin?x=1"]
BAD_URLS = [
    "http://127.0.0.1:9/unreachable",
    "http://[::1",
    "http://",
    "http:///x",
    "http://127.0.0.1:99999/x",
    "http://user@/x",
    "ftp://example.com/x",
    "HTTP://127.0.0.1:9/x",
    "not a url",
]
"""Invalid, unsupported or unreachable values: none reaches past this machine."""


def from_schema(
    schema: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[Any]:
    """Values valid under the part of JSON Schema the contracts use, arrays kept short;
    ``fields`` draws the named properties from values the services know (more of the
    requests then get past the first lookup)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "propertyNames" in schema:  # source.headers
        names = st.one_of(
            st.sampled_from(HEADER_NAMES),
            st.from_regex(schema["propertyNames"]["pattern"], fullmatch=True),
        )
        values = from_schema(schema["additionalProperties"], fields)
        return st.dictionaries(names, values, max_size=3)
    if kind == "object":
        properties, required = schema.get("properties", {}), schema.get("required", [])
        draws = {k: fields.get(k, from_schema(v, fields)) for k, v in properties.items()}
        return st.fixed_dictionaries(
            {k: draws[k] for k in required},
            optional={k: v for k, v in draws.items() if k not in required},
        )
    if kind == "array":
        items = from_schema(schema["items"], fields)
        return st.lists(items, max_size=min(5, schema.get("maxItems", 5)))
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 8192)
        if "pattern" not in schema:
            return st.text(min_size=low, max_size=min(high, 64))
        return st.from_regex(schema["pattern"], fullmatch=True).filter(
            lambda s: low <= len(s) <= high
        )
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(
            min_value=schema.get("exclusiveMinimum", schema.get("minimum")),
            max_value=schema.get("maximum"),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
        )
    if kind == "boolean":
        return st.booleans()
    raise AssertionError(f"no strategy for the schema {schema}")


def url_values(env: Env) -> st.SearchStrategy[Any]:
    safe = [env.url] + [env.origin.url + p for p in SAFE_URL_PATHS]
    return st.one_of(st.sampled_from(safe + BAD_URLS), JUNK)


def output_values(env: Env) -> st.SearchStrategy[Any]:
    name = st.text(max_size=300).map(lambda s: s.replace("/", "_"))
    odd = [str(env.outputs), str(env.outputs) + "/", str(env.outputs / "first.bin" / "x")]
    return st.one_of(
        name.map(lambda s: str(env.outputs / s)),
        st.sampled_from([*odd, "relative/out.bin"]),
        JUNK,
    )


def sanitise(env: Env, node: Any) -> Any:
    """Keep junk from reaching the world: a ``url`` naming a scheme that is not our origin's
    or one of the bad ones, or an absolute ``output`` outside our folder, is replaced."""

    def ours(url: str) -> bool:  # our origin, or a bad URL that reaches nothing
        return url.startswith(env.origin.url + "/") or url in BAD_URLS

    if isinstance(node, list):
        return [sanitise(env, item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "url" and isinstance(value, str) and ":" in value and not ours(value):
            value = env.url
        if key == "output" and isinstance(value, str) and value.startswith("/"):
            inside = os.path.normpath(value).startswith(f"{env.outputs}{os.sep}")
            value = value if inside else str(env.outputs / "o.bin")
        out[key] = sanitise(env, value)
    return out


def bases(env: Env, name: str) -> list[dict[str, Any]]:
    """The contract's example requests, pointed at our origin and our output folder."""
    found = []
    for example in CONTRACTS[name].examples:
        request = copy.deepcopy(example["request"])
        if isinstance(request.get("source"), dict):
            request["source"]["url"] = env.url
        if "output" in request:
            request["output"] = str(env.outputs / "example.bin")
            request["timeout_s"] = 4
        found.append(request)
    return found


def slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree, so any value at any depth can be mutated."""
    found: list[tuple[Any, Any]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        found.append((node, key))
        if isinstance(value, dict | list):
            found.extend(slots(value))
    return found


def values_for(env: Env, key: Any) -> st.SearchStrategy[Any]:
    if key == "url":
        return url_values(env)
    if key == "output":
        return output_values(env)
    return JUNK


def own_peer(request: dict[str, Any]) -> dict[str, Any]:
    """The request with its ``peer_id`` the one of the host it names on its task: what a
    scheduler takes from that host, until a mutation spoils it."""
    if isinstance(request.get("task_id"), str) and "peer_id" in request:
        request["peer_id"] = ids.peer_id(sender_of(request).host_id, request["task_id"])
    return request


@st.composite
def mutated(draw: st.DrawFn, env: Env, name: str) -> bytes:
    """A contract example or a schema-valid request, with up to four values dropped, added
    or replaced anywhere in it, serialised with or without escapes."""
    known = {
        "url": st.sampled_from([env.url, *(env.origin.url + p for p in SAFE_URL_PATHS)]),
        "strategy": st.sampled_from(sorted(env.peer.node.plugins.strategies)),
        "host_id": st.just(env.peer.node.settings.host_id),
    }
    valid = from_schema(CONTRACTS[name].request, known)
    root: list[Any] = [own_peer(sanitise(env, draw(st.sampled_from(bases(env, name)) | valid)))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3, 4]))):
        container, key = draw(st.sampled_from(slots(root)))
        operation = draw(st.sampled_from(["drop", "add", "replace", "replace"]))
        if operation == "drop" and container is not root:
            del container[key]
        elif operation == "add":
            dicts = [c for c, _ in slots(root) if isinstance(c, dict)]
            target = draw(st.sampled_from(dicts)) if dicts else {}
            new_key = draw(KEYS)
            target[new_key] = draw(values_for(env, new_key))
        else:
            container[key] = draw(values_for(env, key))
    request = sanitise(env, root[0])
    text = json.dumps(request, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


RANDOM_BYTES = st.one_of(
    st.binary(max_size=4096),
    JUNK.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
    st.integers(MAX_REQUEST_BYTES - 8, MAX_REQUEST_BYTES + 8).map(lambda n: b"{" + b" " * n),
)
"""Random bytes, random JSON documents, and payloads right around the size limit."""


# -- the subjects ----------------------------------------------------------------------------


def test_every_served_subject_is_fuzzed() -> None:
    unserved = sum(c.service == "proxy" or c.reply is None for c in CONTRACTS.values())
    assert len(SUBJECTS) == len(CONTRACTS) - unserved
    expected = {"scheduler.heartbeat", "storage.{host_id}.seed", "peer.{host_id}.download"}
    assert expected <= set(SUBJECTS)


@pytest.mark.parametrize("name", SUBJECTS)
@FUZZ
@given(data=st.data())
def test_mutated_requests_get_a_valid_answer(env: Env, name: str, data: st.DataObject) -> None:
    payload = data.draw(mutated(env, name), label="payload")
    # Mostly as the host the payload names; now and then as another (``forbidden``, often).
    sender = data.draw(st.sampled_from([None, None, None, IMPOSTOR]), label="sender")
    body = env.run(ask(env, name, payload, sender))
    event(body["error"]["code"] if "error" in body else "reply")


@pytest.mark.parametrize("name", SUBJECTS)
@BYTES
@given(payload=RANDOM_BYTES)
def test_random_bytes_get_the_error_shape(env: Env, name: str, payload: bytes) -> None:
    body = env.run(ask(env, name, payload))
    event(body["error"]["code"] if "error" in body else "reply")
    if "error" in body:
        assert body["error"]["code"] == "bad_request", body


def test_services_still_answer_after_fuzzing(env: Env) -> None:
    async def check() -> None:
        heartbeat = {"host": env.peer.node.host().to_dict(), "uploads": 0, "peers": 0}
        reply = await ask(env, "scheduler.heartbeat", orjson.dumps(heartbeat))
        assert reply["ok"] is True
        task = {"task_id": os.urandom(32).hex()}
        reply = await ask(env, "scheduler.{partition}.task", orjson.dumps(task))
        assert reply == {"task": None, "offset": 0, "digests": []}
        reply = await ask(env, "peer.{host_id}.progress", b'{"download_id": "dl-none"}')
        assert reply["state"] == "unknown"
        seed = {"task_id": os.urandom(32).hex(), "source": {"url": env.url}}
        assert (await ask(env, "storage.{host_id}.seed", orjson.dumps(seed)))["accepted"] is True
        reply = await download(env, env.outputs / "after.bin")
        assert reply["task_id"] == env.task_id

    env.run(check(), timeout=40)


# -- the upload server -----------------------------------------------------------------------


async def raw_get(url: str, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """One GET sent byte for byte: no client normalises ``..`` or escapes."""
    status, answer = await raw_request(url, b"GET", target, headers)
    return status, answer.partition(b"\r\n\r\n")[2]


def no_crlf(text: str) -> str:
    """CR and LF would end the request line: that tests our framing, not the server."""
    return text.replace("\r", "").replace("\n", "")


def printable(text: str | None) -> str | None:
    """What an HTTP client library agrees to send as a header value."""
    return None if text is None else "".join(c for c in text if " " <= c <= "~")


def task_ids(env: Env) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(env.task_id),
        st.sampled_from(["..", "%2e%2e", "%2E%2e%2f", "..%2F..%2F", "%2F", "", ".", "%00"]),
        st.just(env.task_id.upper()),
        st.builds(lambda a, b: a + b, st.just(env.task_id), st.text(max_size=8)),
        st.text(max_size=40),
        st.text(st.characters(min_codepoint=0x80), max_size=20),
        long_text(),
    ).map(no_crlf)


NUMBERS = st.one_of(
    st.integers().map(str),
    st.integers(16, 5000).map(lambda n: "9" * n),
    st.floats().map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "1e309", "0x10", " 1", "1_000", "٣"]),
    st.text(max_size=12),
)


def targets(env: Env) -> st.SearchStrategy[bytes]:
    segments = st.lists(task_ids(env), min_size=1, max_size=3).map("/".join)
    resource = st.one_of(st.sampled_from(["pieces", "data", "", "..", "data/.."]), st.text())
    query = st.one_of(
        st.just(""),
        st.builds(
            lambda since, wait: f"?since={since}&wait={wait}",
            NUMBERS.map(lambda s: quote(s, safe="")),
            NUMBERS.map(lambda s: quote(s, safe="")),
        ),
        st.text().map(lambda s: "?" + s),
    )
    path = st.builds(lambda s, r, q: f"/v1/tasks/{s}/{r}{q}", segments, resource, query)
    odd = st.sampled_from(["/../../../../secret.txt", "//etc/passwd", "/v1/tasks", "*", "/"])
    return st.one_of(path, odd, st.text().map(lambda s: "/" + s)).map(
        lambda s: no_crlf(s).replace(" ", "%20").encode("utf-8", "surrogatepass")
    )


def ranges(size: int) -> st.SearchStrategy[str | None]:
    positions = st.one_of(
        st.integers(0, size + 1), st.integers(0, 10**16), st.integers(max_value=-1)
    )
    return st.one_of(
        st.none(),
        st.builds(lambda a, b: f"bytes={a}-{b}", positions, positions),
        st.builds(lambda a, b: f"bytes={max(a, b)}-{min(a, b)}", positions, positions),
        st.builds(lambda a: f"bytes={a}-", positions),
        st.builds(lambda a: f"bytes=-{a}", positions),
        st.text(max_size=40).map(no_crlf),
        st.text(max_size=20).map(lambda s: "bytes=" + no_crlf(s)),
    )


def check_http(env: Env, status: int, body: bytes, range_header: str | None) -> None:
    assert status < 500 or status == 503, (status, body[:200])
    assert SECRET not in body
    assert b"root:" not in body
    if status == 206:
        assert range_header is not None
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", range_header)
        assert match, range_header
        first, last = int(match.group(1)), int(match.group(2))
        assert body == FILE_DATA[first : last + 1], (range_header, len(body))
    elif status != 200:
        assert FILE_DATA[:64] not in body


@HTTP
@given(data=st.data())
def test_hostile_paths_never_leave_the_store(env: Env, data: st.DataObject) -> None:
    target = data.draw(targets(env), label="target")
    range_header = data.draw(ranges(len(FILE_DATA)), label="range")
    extra = b"" if range_header is None else f"Range: {range_header}\r\n".encode()
    status, body = env.run(raw_get(env.upload_url, target, extra + env.auth_line))
    event(str(status))
    check_http(env, status, body, range_header)


@HTTP
@given(data=st.data())
def test_hostile_queries_and_ranges_get_a_clean_answer(env: Env, data: st.DataObject) -> None:
    resource = data.draw(st.sampled_from(["pieces", "data"]), label="resource")
    query = data.draw(st.dictionaries(st.sampled_from(["since", "wait", "x"]), NUMBERS))
    range_header = data.draw(ranges(len(FILE_DATA)).map(printable), label="range")

    async def get() -> tuple[int, bytes]:
        url = f"{env.upload_url}/v1/tasks/{env.task_id}/{resource}"
        headers = {} if range_header is None else {"Range": range_header}
        async with env.session.get(url, params=query, headers=headers | env.auth) as response:
            return response.status, await response.read()

    status, body = env.run(get())
    event(str(status))
    check_http(env, status, body, range_header)
    if resource == "pieces" and status == 200:
        state = orjson.loads(body)
        assert (state["piece_count"], state["complete"], state["pieces"]) == (1, True, [0])


def test_upload_server_still_serves_after_fuzzing(env: Env) -> None:
    target = f"/v1/tasks/{env.task_id}/data".encode()
    status, body = env.run(
        raw_get(env.upload_url, target, b"Range: bytes=100-4195\r\n" + env.auth_line)
    )
    assert (status, body) == (206, FILE_DATA[100:4196])


# -- a capped seed: grants, lending and the parameters children send it ------------------------

SEED_PIECE = 4096
SEED_PIECES = 203
"""Not a multiple of 8: the wanted bitmap's last byte has spare bits."""
SEED_DONE = 120
"""The seed has read pieces 0-119 so far (it reads from the first up, and lends from the
last down): it grants those, and lends the others while its uplink is full."""
SEED_DATA = hashlib.sha256(b"seed").digest() * ((SEED_PIECES * SEED_PIECE - 3000) // 32)
SEED_ETAG = '"fuzz-etag"'
SEED_WAITS = st.sampled_from(["0", "0.02", "0.05", "-1", "nan"])
"""Valid waits (what a child sends), kept short: a poll with no grant to give waits them out."""
GRANT_REPLY = {"version", "piece_count", "complete", "pieces", "origin", "etag"}


@dataclass(repr=False)
class Seed:
    """A seed mid-fetch: its upload rate capped (grants), lending on (a ``Lending``)."""

    url: str
    server: UploadServer
    task: StoredTask
    auth: dict[str, str]
    """A scheduled child's capability for ``task``."""

    def __repr__(self) -> str:
        return "Seed()"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def pieces_url(self) -> str:
        return f"{self.url}/v1/tasks/{self.task.id}/pieces"


async def _start_seed(stack: AsyncExitStack, root: Path) -> Seed:
    store = TaskStore(root / "tasks")
    stack.callback(store.close)
    task = store.open(hashlib.sha256(b"fuzz-seed").hexdigest(), "http://origin.invalid/s.bin")
    count = piece_count(len(SEED_DATA), SEED_PIECE)
    assert count == SEED_PIECES
    task.set_content(TaskContent(len(SEED_DATA), SEED_PIECE, count, digest_of(SEED_DATA)))
    assert task.content is not None
    for number in range(SEED_DONE):
        offset, size = task.content.piece(number)
        task.mark_done(number, task.write_piece(number, SEED_DATA[offset : offset + size], None))
    # A short lease: lent pieces come back into play during the run, so lending goes on.
    task.lending = Lending(count, etag=SEED_ETAG, lease=1.0)
    server = UploadServer(store, rate=1024 * 1024, superseed=True)
    assert server.superseed and server.capacity == 2
    signer = Signer.generate()
    server.trust([signer.verify_key])
    auth = {"Authorization": f"Bearer {signer.mint(task.id, 'fuzz-child', time.time())}"}
    url = await serve_http(stack, server.app, "127.0.0.1", 0)
    return Seed(url, server, task, auth)


@pytest.fixture(scope="module")
def seed(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    stack = AsyncExitStack()
    started = env.run(_start_seed(stack, tmp_path_factory.mktemp("seed")))
    try:
        yield started
    finally:
        env.run(stack.aclose())


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@st.composite
def wants_values(draw: st.DrawFn, broken: bool) -> tuple[str | None, set[int] | None]:
    """The ``wants`` bitmap and the set it says: absent or valid, or (``broken``) mutated
    with the set unknown (None)."""
    numbers = st.sets(st.integers(0, SEED_PIECES - 1))
    wanted = draw(numbers)
    text = bitmap.encode(wanted, SEED_PIECES)
    if not broken:
        kind = draw(st.sampled_from(["absent", "valid", "valid", "spare"]))
        if kind == "absent":
            return None, None
        if kind == "spare":  # the bits past the last piece set: ignored, not an error
            raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            raw[-1] |= 0xFF >> (SEED_PIECES % 8)
            text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        return text, wanted
    operation = draw(
        st.sampled_from(
            ["replace", "insert", "delete", "truncate", "extend", "pad", "standard",
             "other-size", "random", "bytes"]
        )
    )  # fmt: skip
    where = draw(st.integers(0, max(0, len(text) - 1)))
    char = draw(st.one_of(st.sampled_from("+/=.%~ \t-_A"), st.characters()))
    if operation == "replace":
        text = text[:where] + char + text[where + 1 :]
    elif operation == "insert":
        text = text[:where] + char + text[where:]
    elif operation == "delete":
        text = text[:where] + text[where + 1 :]
    elif operation == "truncate":
        text = text[:where]
    elif operation == "extend":
        text += draw(st.text("ABCDEFabcdef0123456789-_", min_size=1, max_size=40))
    elif operation == "pad":
        text += draw(st.sampled_from(["=", "==", "===", "%3D"]))
    elif operation == "standard":
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        text = base64.b64encode(bytes(b | 0xFB for b in decoded)).decode()  # "+" and "/"
    elif operation == "other-size":
        size = draw(st.sampled_from([0, 1, 7, 8, 195, 200, 202, 204, 208, 216, 4096]))
        text = bitmap.encode(wanted, size)
    elif operation == "random":
        text = draw(st.one_of(st.text(max_size=60), long_text()))
    else:
        text = base64.urlsafe_b64encode(draw(st.binary(max_size=64))).decode()
    return text, None


ABSENT: st.SearchStrategy[str | None] = st.none()
LENT_NUMBERS = st.integers(0, SEED_PIECES + 8).map(str)
QUERY_VALUES: dict[str, tuple[st.SearchStrategy[str | None], st.SearchStrategy[str | None]]] = {
    "decline": (ABSENT | st.integers(-1, SEED_PIECES + 8).map(str), NUMBERS),
    "lent": (
        ABSENT | st.lists(LENT_NUMBERS, min_size=1, max_size=64).map(",".join),
        st.one_of(
            st.lists(LENT_NUMBERS, min_size=65, max_size=80).map(",".join),
            st.lists(NUMBERS, min_size=1, max_size=4).map(",".join),
            st.sampled_from(["", ",", "1,,2", "-1", "1,-2", "9" * 10, "²", "٣", "1²", "0x1"]),
            st.text(max_size=40),
            long_text(),
        ),
    ),
    "since": (ABSENT | st.integers(-1, 10**6).map(str), NUMBERS),
    "peer": (
        ABSENT | st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"),
        st.one_of(
            st.sampled_from(["", "a b", "a.b", "x" * 65, "../x", "p\n"]),
            st.text(max_size=80).filter(lambda s: not NODE_ID.match(s)),
        ),
    ),
}
"""Per parameter: values a child sends (or none), and values no child would send."""


def check_grant(status: int, body: bytes, wanted: set[int] | None, valid: bool) -> None:
    """A valid grant poll reply, or a 400 that says which parameter is wrong."""
    assert status in (200, 400), (status, body[:300])
    if valid:
        assert status == 200, body[:300]
    if status == 400:
        text = body.decode("utf-8", "replace").lower()
        assert any(w in text for w in ("bitmap", "decline", "lent", "since", "wait", "peer")), text
        return
    answer = orjson.loads(body)
    assert set(answer) <= GRANT_REPLY and isinstance(answer["version"], int), answer
    assert (answer["piece_count"], answer["complete"]) == (SEED_PIECES, False), answer
    granted, lent = answer["pieces"], answer.get("origin", [])
    assert len(granted) + len(lent) <= 1, answer
    assert set(granted) <= set(range(SEED_DONE)), "only verified pieces are granted"
    assert set(lent) <= set(range(SEED_DONE, SEED_PIECES)), "only unread pieces are lent"
    if lent:
        assert answer["etag"] == SEED_ETAG, answer
    if wanted is not None:
        assert set(granted) | set(lent) <= wanted, (answer, "not among the wanted")
    event("granted" if granted else "lent" if lent else "nothing")


@HTTP
@given(data=st.data())
def test_a_capped_seed_answers_hostile_grant_polls_cleanly(
    env: Env, seed: Seed, data: st.DataObject
) -> None:
    # Up to two parameters drawn from what no child sends (or mutated), the others as a child
    # sends them: a grant reply or a 400 naming a parameter; with none broken, a grant reply.
    broken = data.draw(st.sets(st.sampled_from(["wants", *QUERY_VALUES]), max_size=2))
    wants, wanted = data.draw(wants_values("wants" in broken), label="wants")
    query = {"wait": data.draw(SEED_WAITS, label="wait")}
    if wants is not None:
        query["wants"] = wants
    for name, (good, bad) in QUERY_VALUES.items():
        value = data.draw(bad if name in broken else good, label=name)
        if value is not None:
            query[name] = value
    valid = not broken

    async def poll() -> tuple[int, bytes]:
        async with env.session.get(seed.pieces_url, params=query, headers=seed.auth) as response:
            return response.status, await response.read()

    status, body = env.run(poll())
    check_grant(status, body, wanted, valid)


@BYTES
@given(
    values=st.lists(
        st.tuples(st.sampled_from(["wants", "decline", "lent", "since", "peer", "x"]), st.binary()),
        max_size=5,
    ),
    raw=st.binary(max_size=200),
)
def test_a_capped_seed_answers_random_query_bytes_cleanly(
    env: Env, seed: Seed, values: list[tuple[str, bytes]], raw: bytes
) -> None:
    """Random bytes as the parameters (percent-encoded: any byte), and as the whole query
    (sent as they are, but for what would end the request line)."""
    encoded = "&".join(f"{k}={quote_from_bytes(v, safe='')}" for k, v in values)
    for query in (encoded, no_crlf(raw.decode("latin-1")).replace(" ", "%20").replace("#", "")):
        target = f"/v1/tasks/{seed.task.id}/pieces?wait=0&{query}".encode("latin-1")
        auth = "".join(f"{k}: {v}\r\n" for k, v in seed.auth.items()).encode()
        status, body = env.run(raw_get(seed.url, target, auth))
        assert status in (200, 400), (status, body[:300])
        if status == 200:
            check_grant(status, body, None, False)


def test_a_capped_seed_still_grants_and_serves_after_fuzzing(env: Env, seed: Seed) -> None:
    async def check() -> None:
        await asyncio.sleep(grants.GRANT_SECONDS + 0.1)  # the fuzzing's grants lapse
        wanted = set(range(SEED_PIECES))
        params = {"wants": bitmap.encode(wanted, SEED_PIECES), "wait": "2"}
        async with env.session.get(seed.pieces_url, params=params, headers=seed.auth) as response:
            assert response.status == 200
            answer = await response.json()
        assert len(answer["pieces"]) == 1, answer
        for number in answer["pieces"]:  # take the grant: the bytes are the seed's
            offset, size = number * SEED_PIECE, SEED_PIECE
            url = f"{seed.url}/v1/tasks/{seed.task.id}/data"
            headers = {"Range": f"bytes={offset}-{offset + size - 1}", **seed.auth}
            async with env.session.get(url, headers=headers) as response:
                assert response.status == 206, await response.text()
                assert await response.read() == SEED_DATA[offset : offset + size]
        # The client may hold the last byte before the server's handler has returned: the
        # slot must come free promptly, not necessarily before the read returns.
        await wait_until(lambda: seed.server.load == 0, timeout=2, interval=0.01)

    env.run(check(), timeout=EXAMPLE_TIMEOUT + 5)


# -- the proxy ---------------------------------------------------------------------------------


def proxy_targets() -> st.SearchStrategy[bytes]:
    names = st.one_of(
        st.just(BLOB_NAME),
        st.sampled_from(
            ["..", "%2e%2e", "team/../..", "Team/App", "a//b", "a/./b", "_", "a" * 300]
        ),
        st.text(max_size=30),
    )
    references = st.one_of(
        st.just(BLOB_DIGEST),
        st.just("sha256:" + "0" * 64),
        st.sampled_from(["sha256:", "sha256:zz", "sha512:" + "a" * 128, "latest", "../x", "%00"]),
        st.text(max_size=80),
    )
    kinds = st.sampled_from(["blobs", "manifests", "tags", "referrers", "blobs/uploads", "x"])
    query = st.one_of(
        st.just(""),
        st.sampled_from(["?ns=evil.example.com", "?ns=", "?ns=%00", "?n=1&ns=a&ns=b"]),
        st.text(max_size=20).map(lambda s: "?" + quote(s, safe="=&")),
    )
    registry_path = st.builds(
        lambda n, k, r, q: f"/v2/{n}/{k}/{r}{q}", names, kinds, references, query
    )
    odd = st.sampled_from(
        ["/v2/", "/v2", "/v2/_catalog", "/healthz", "/", "*", "/../../secret.txt",
         "http://evil.example.com/x", "http://127.0.0.1:1/", "//v2/x"]
    )  # fmt: skip
    return st.one_of(registry_path, odd, st.text().map(lambda s: "/" + s)).map(
        lambda s: no_crlf(s).replace(" ", "%20").encode("utf-8", "surrogatepass")
    )


def proxy_headers() -> st.SearchStrategy[bytes]:
    values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    header = st.one_of(
        st.builds(lambda v: f"Range: {v}", ranges(len(FILE_DATA)).map(lambda r: r or "")),
        st.builds(lambda v: f"X-Swarmfly-Registry: {v}", values),
        st.builds(lambda v: f"Authorization: {v}", values),
        st.builds(lambda v: f"Accept: {v}", values),
        st.just("X-Big: " + "a" * 20_000),
    )
    return st.lists(header, max_size=3).map(lambda hs: "".join(h + "\r\n" for h in hs).encode())


async def raw_request(url: str, method: bytes, target: bytes, headers: bytes) -> tuple[int, bytes]:
    match = re.match(r"^http://([0-9.]+):(\d+)$", url)
    assert match
    reader, writer = await asyncio.open_connection(match.group(1), int(match.group(2)))
    try:
        writer.write(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        writer.write(headers + b"\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    head, _, body = rest.partition(b"\r\n\r\n")
    if not status_line:  # a blob cut because it failed verification: nothing else may do that
        raise AssertionError(f"connection closed without an answer to {target[:80]!r}")
    return int(status_line.split()[1]), head + b"\r\n\r\n" + body


@HTTP
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"DELETE", b"PUT"]),
    target=proxy_targets(),
    headers=proxy_headers(),
)
def test_the_proxy_answers_hostile_requests_cleanly(
    env: Env, method: bytes, target: bytes, headers: bytes
) -> None:
    status, answer = env.run(raw_request(env.proxy_url, method, target, headers))
    event(str(status))
    assert status < 500 or status in (502, 503, 504), answer[:300]
    assert SECRET not in answer
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"application/json" in head.lower() and status >= 400 and body:
        errors = orjson.loads(body)
        assert "errors" in errors or "status" in errors, body[:200]
    if status in (200, 206) and method == b"GET" and BLOB_DIGEST.encode() in target:
        assert body in FILE_DATA or FILE_DATA in body or not body


def test_the_proxy_still_serves_after_fuzzing(env: Env) -> None:
    target = f"/v2/{BLOB_NAME}/blobs/{BLOB_DIGEST}".encode()
    status, answer = env.run(raw_request(env.proxy_url, b"GET", target, b""))
    assert status == 200
    assert answer.endswith(FILE_DATA)


# -- what the fuzzing found once, kept as regression tests ------------------------------------

DOWNLOAD = "peer.{host_id}.download"


def download_body(source: dict[str, Any], output: Path | str) -> bytes:
    request = {"download_id": f"dl-{uuid.uuid4().hex[:8]}", "source": source}
    return orjson.dumps({**request, "output": str(output), "timeout_s": 4})


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("storage.{host_id}.seed", "http://[::1"),
        (DOWNLOAD, "http://[::1"),
        (DOWNLOAD, "http://127.0.0.1:99999/x"),
    ],
)
def test_an_unparseable_url_is_a_bad_request(env: Env, name: str, url: str) -> None:
    if name == DOWNLOAD:
        data = download_body({"url": url}, env.outputs / "never.bin")
    else:
        data = orjson.dumps({"task_id": os.urandom(32).hex(), "source": {"url": url}})
    body = env.run(ask(env, name, data))
    assert body["error"]["code"] == "bad_request", body


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "\x00", "\x1f"])
def test_a_control_character_in_a_header_is_a_bad_request(env: Env, value: str) -> None:
    source = {"url": env.url, "headers": {"Authorization": value}}
    body = env.run(ask(env, DOWNLOAD, download_body(source, env.outputs / "never.bin")))
    assert body["error"]["code"] == "bad_request", body


@pytest.mark.parametrize("name", ["a\x00b", "x" * 256, "first.bin/x"])
def test_an_unusable_output_is_a_bad_request(env: Env, name: str) -> None:
    data = download_body({"url": env.url}, f"{env.outputs}/{name}")
    body = env.run(ask(env, DOWNLOAD, data))
    assert body["error"]["code"] == "bad_request", body


@pytest.mark.parametrize("header", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
def test_a_framing_header_does_not_stall_the_download(env: Env, header: tuple[str, str]) -> None:
    url = env.origin.add(f"framing-{header[0]}.bin", FILE_DATA[:1000])
    source = {"url": url, "headers": dict([header])}
    request = orjson.loads(download_body(source, env.outputs / f"{header[0]}.bin"))
    body = env.run(ask(env, DOWNLOAD, orjson.dumps({**request, "timeout_s": 2})))
    assert "error" not in body or body["error"]["code"] == "bad_request", body
