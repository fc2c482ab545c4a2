"""The contracts off NATS are sound and cannot drift from the code (issue 14, item 2): the
peer HTTP API's OpenAPI document and the local socket's schemas are valid, every schema in
them compiles, every route the upload server registers and every query parameter and header
it reads is documented (and nothing more), and each bound is the code's own constant."""

from __future__ import annotations

import ast
import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from swarmfly import bitmap, bus, capability, contracts, ids, localproto
from swarmfly.contracts.documents import LOCAL_SOCKET, METHODS, PEER_API, resolved
from swarmfly.contracts.schema import Invalid, compile_schema
from swarmfly.services.peer import grants, lending, localsocket, upload
from swarmfly.services.peer.store import TaskStore
from swarmfly.services.peer.upload import UploadServer

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS_DIR = ROOT / "contracts"
UPLOAD_SOURCE = ROOT / "services" / "peer" / "upload.py"
RAW_API: dict[str, Any] = json.loads((CONTRACTS_DIR / PEER_API).read_text(encoding="utf-8"))
RAW_LOCAL: dict[str, Any] = json.loads((CONTRACTS_DIR / LOCAL_SOCKET).read_text(encoding="utf-8"))
API = contracts.peer_openapi()
LIMITS = RAW_API["x-swarmfly-limits"]
TOKEN = API["components"]["securitySchemes"]["capability"]["x-swarmfly-token"]
IMPLICIT_HEAD = "aiohttp answers HEAD on each GET route; HEAD is not part of the API"


def refs_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs_in(item)


def schemas_of(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON Schema an OpenAPI document holds: components, parameters, bodies, headers."""
    for name, schema in document["components"]["schemas"].items():
        yield f"components.schemas.{name}", schema
    yield "x-swarmfly-token.schema", TOKEN["schema"]
    yield "x-swarmfly-token.payload_schema", TOKEN["payload_schema"]
    for path, item in document["paths"].items():
        for parameter in item.get("parameters", []):
            yield f"{path} {parameter['name']}", parameter["schema"]
        for method in METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            for parameter in operation.get("parameters", []):
                yield f"{method} {path} {parameter['name']}", parameter["schema"]
            for status, response in operation["responses"].items():
                for media, content in response.get("content", {}).items():
                    yield f"{method} {path} {status} {media}", content["schema"]
                for header, spec in response.get("headers", {}).items():
                    yield f"{method} {path} {status} {header}", spec["schema"]


SCHEMAS = dict(schemas_of(API))
ANNOTATIONS = ("$schema", "$id", "title", "description", "examples")


def validating(node: Any) -> Any:
    """A schema without its annotations: what it accepts."""
    if isinstance(node, list):
        return [validating(item) for item in node]
    if not isinstance(node, dict):
        return node
    kept = {k: validating(v) for k, v in node.items() if k not in ANNOTATIONS}
    if isinstance(node.get("properties"), dict):  # property names are not annotations
        kept["properties"] = {k: validating(v) for k, v in node["properties"].items()}
    return kept


# -- the documents are valid ---------------------------------------------------------------


def test_the_openapi_document_has_the_structure_of_3_1() -> None:
    assert RAW_API["openapi"].startswith("3.1.")
    assert RAW_API["info"]["title"] and RAW_API["info"]["version"]
    schemes = RAW_API["components"]["securitySchemes"]
    ids: list[str] = []
    for path, item in RAW_API["paths"].items():
        assert path.startswith("/")
        templated = set(re.findall(r"\{([^}]+)\}", path))
        for method, operation in ((m, item[m]) for m in METHODS if m in item):
            operation = resolved(operation, PEER_API)
            ids.append(operation["operationId"])
            assert operation["summary"] and operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5][0-9]{2}", status), (path, status)
                assert resolved(response, PEER_API)["description"], (path, status)
            parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
            parameters = [resolved(p, PEER_API) for p in parameters]
            assert {p["name"] for p in parameters if p["in"] == "path"} == templated, path
            for parameter in parameters:
                assert parameter["in"] in ("path", "query", "header"), parameter
                assert parameter["in"] != "path" or parameter["required"] is True
                assert parameter["description"], parameter["name"]
            for requirement in operation.get("security", RAW_API["security"]):
                assert set(requirement) <= set(schemes)
    assert len(ids) == len(set(ids)), "operationIds are unique"


@pytest.mark.parametrize(("name", "document"), [(PEER_API, RAW_API), (LOCAL_SOCKET, RAW_LOCAL)])
def test_every_ref_resolves_and_nothing_is_left_unresolved(
    name: str, document: dict[str, Any]
) -> None:
    assert list(refs_in(document)), "the documents share definitions with the NATS contracts"
    assert list(refs_in(resolved(document, name))) == []


@pytest.mark.parametrize("where", sorted(SCHEMAS))
def test_each_openapi_schema_is_valid_2020_12_and_compiles(where: str) -> None:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **SCHEMAS[where]}
    Draft202012Validator.check_schema(schema)
    compile_schema(schema)


def test_the_local_socket_document_is_a_valid_schema_with_compiled_messages() -> None:
    Draft202012Validator.check_schema(RAW_LOCAL)
    document = resolved(RAW_LOCAL, LOCAL_SOCKET)
    Draft202012Validator.check_schema(document)
    compile_schema(document)
    socket = contracts.local_socket()
    assert sorted(socket.messages) == [
        "cache", "cached", "entry", "error", "list", "listed", "progress", "reply", "request"
    ]  # fmt: skip
    clients = [m.name for m in socket.messages.values() if m.sender == "client"]
    assert clients == ["request", "list", "cache"]
    for message in socket.messages.values():
        Draft202012Validator.check_schema(message.schema)
        assert (message.key is None) == (message.sender == "client")


def test_the_local_socket_examples_validate() -> None:
    socket = contracts.local_socket()
    whole = compile_schema(resolved(RAW_LOCAL, LOCAL_SOCKET))
    for example in RAW_LOCAL["examples"]:
        line = example["line"]
        asks = next((k for k in ("list", "cache") if k in line), "request")  # a client's line
        message = socket.messages[asks] if example["from"] == "client" else socket.of(line)
        message.validate(line)
        whole(line)
    with pytest.raises(LookupError, match="no local-socket message"):
        socket.of({"progress": {}, "reply": {}})


def test_the_local_socket_speaks_the_nats_contracts_own_messages() -> None:
    """The request and reply are ``peer.{host_id}.download``'s; progress is ``.progress``'s."""
    download = contracts.get("peer.{host_id}.download")
    progress = contracts.get("peer.{host_id}.progress")
    assert download.reply is not None and progress.reply is not None
    messages = contracts.local_socket().messages
    assert validating(messages["request"].schema) == validating(download.request)
    assert validating(messages["reply"].schema["properties"]["reply"]) == validating(download.reply)
    progress_line = messages["progress"].schema["properties"]["progress"]
    assert validating(progress_line) == validating(progress.reply)
    error = contracts.error_schema()
    assert validating(messages["error"].schema) == validating(error)


def test_the_capability_example_checks_out_with_the_example_key() -> None:
    """A verifier written from the document can be tried on its example."""
    example = TOKEN["example"]
    payload = example["payload"]
    expires = int(payload.rsplit(":", 1)[1])
    grant = capability.check(
        example["token"], [capability.verify_key(example["key"])], payload[:64], expires - 1
    )
    assert f"{grant.task_id}:{grant.peer_id}:{grant.expires}" == payload
    compile_schema(TOKEN["schema"])(example["token"])
    compile_schema(TOKEN["payload_schema"])(payload)
    encoded = example["token"].split(".")[1]
    assert base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode() == payload
    with pytest.raises(capability.CapabilityError, match="capability expired"):
        capability.check(example["token"], [capability.verify_key(example["key"])],
                         payload[:64], expires)  # fmt: skip


def test_a_minted_token_has_the_documented_shape() -> None:
    """For the peer id a scheduler takes: the one derived from the host and the task."""
    signer = capability.Signer.generate()
    task_id = "ab" * 32
    token = signer.mint(task_id, ids.peer_id("a" * 64, task_id), 2e9)
    assert len(token) <= TOKEN["schema"]["maxLength"]
    compile_schema(TOKEN["schema"])(token)
    compile_schema(API["components"]["schemas"]["Capability"])(token)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", signer.verify_key)


def test_a_child_gets_one_token_per_window_and_it_lives_at_least_token_seconds() -> None:
    signer = capability.Signer.generate()
    task_id = "ab" * 32
    window = capability.REUSE_SECONDS
    start = 66_666_666 * window - capability.TOKEN_SECONDS  # expires at a window's start
    first = signer.mint(task_id, "pchild", start + 1)
    assert signer.mint(task_id, "pchild", start + window - 1) == first
    assert signer.mint(task_id, "pother", start + 1) != first
    later = signer.mint(task_id, "pchild", start + window + 1)
    assert later != first
    for now, token in ((start + window - 1, first), (start + window + 1, later)):
        grant = capability.check(token, [capability.verify_key(signer.verify_key)], task_id, now)
        assert now + capability.TOKEN_SECONDS <= grant.expires
        assert grant.expires <= now + capability.TOKEN_SECONDS + window


# -- nothing the code serves or reads is undocumented --------------------------------------


def test_every_route_the_upload_server_registers_is_documented(tmp_path: Path) -> None:
    server = UploadServer(TaskStore(tmp_path / "tasks"))
    served = {(r.method, r.resource.canonical) for r in server.app.router.routes() if r.resource}
    documented = {(o.method, o.path) for o in contracts.peer_api().values()}
    gets = {path for method, path in served if method == "GET"}
    heads = {path for method, path in served if method == "HEAD"}
    assert heads <= gets, IMPLICIT_HEAD
    assert "HEAD is not part of this API" in RAW_API["info"]["description"], IMPLICIT_HEAD
    assert {(m, p) for m, p in served if m != "HEAD"} == documented


def reads_of(tree: ast.AST, mapping: str) -> set[str]:
    """Keys read of ``request.<mapping>``: ``.get("k")``, ``["k"]`` and ``"k" in``."""
    found: set[str] = set()

    def is_mapping(node: ast.expr) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == mapping

    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and is_mapping(node.func.value) and node.args:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and is_mapping(node.value):
            key = node.slice
        elif (
            isinstance(node, ast.Compare)
            and any(isinstance(o, ast.In) for o in node.ops)
            and any(is_mapping(c) for c in node.comparators)
        ):
            key = node.left
        if key is not None:
            assert isinstance(key, ast.Constant) and isinstance(key.value, str), ast.dump(node)
            found.add(key.value)
    return found


def documented(where: str) -> set[str]:
    return {
        name
        for operation in contracts.peer_api().values()
        for (place, name) in operation.parameters
        if place == where
    }


def test_every_query_parameter_the_upload_server_reads_is_documented() -> None:
    tree = ast.parse(UPLOAD_SOURCE.read_text(encoding="utf-8"))
    read = reads_of(tree, "query")
    assert {"since", "wait", "wants", "decline", "peer", "lent", "borrow"} <= read, "the scan finds"
    assert read == documented("query")


def test_every_request_header_the_upload_server_reads_is_documented() -> None:
    """Authorization is the capability security scheme, not a parameter (OpenAPI's rule)."""
    tree = ast.parse(UPLOAD_SOURCE.read_text(encoding="utf-8"))
    read = {name.lower() for name in reads_of(tree, "headers")}
    headers = {name.lower() for name in documented("header")}
    assert read == headers | {"authorization"}
    assert {o.operation_id for o in contracts.peer_api().values() if o.secured} == {
        "pieces",
        "data",
        "lent",
    }


# -- each bound is the code's ------------------------------------------------------------


def test_the_documented_limits_are_the_codes_constants() -> None:
    assert LIMITS == {
        "max_wait_s": upload.MAX_WAIT,
        "grant_lease_s": grants.GRANT_SECONDS,
        "max_lent_said": lending.MAX_SAID,
        "min_send_rate": upload.MIN_SEND_RATE,
        "send_window_s": upload.SEND_WINDOW,
        "retry_after_s": 1,
        "token_max_length": capability.MAX_TOKEN,
        "token_seconds": capability.TOKEN_SECONDS,
        "verify_keys_kept": upload.MAX_KEYS,
        "waiting_per_slot": upload.WAITING_PER_SLOT,
    }
    parameters = contracts.peer_api()["pieces"].parameters
    assert parameters[("query", "wait")]["schema"]["maximum"] == upload.MAX_WAIT
    assert TOKEN["schema"]["maxLength"] == capability.MAX_TOKEN


def test_the_lent_parameter_is_up_to_max_said_numbers() -> None:
    """The server takes exactly these (tests/integration/test_http_contracts.py)."""
    schema = contracts.peer_api()["pieces"].parameters[("query", "lent")]["schema"]
    check = compile_schema(schema)
    most = ",".join(["999999999"] * lending.MAX_SAID)
    check(most)
    assert len(most) == schema["maxLength"]
    for bad in (most + ",1", "1" * 10, ",", "x", "1,,2", ""):
        with pytest.raises(Invalid):
            check(bad)


@pytest.mark.parametrize("piece_count", [0, 1, 7, 8, 9, 100, 32768])
def test_the_wants_bitmap_is_as_documented(piece_count: int) -> None:
    schema = contracts.peer_api()["pieces"].parameters[("query", "wants")]["schema"]
    check = compile_schema(schema)
    pieces = set(range(0, piece_count, 3))
    text = bitmap.encode(pieces, piece_count)
    check(text)
    size = (piece_count + 7) // 8
    assert len(text) == (size * 4 + 2) // 3 <= schema["maxLength"]
    assert bitmap.decode(text, piece_count) == pieces
    if piece_count:
        first = bytearray(size)
        first[0] = 0x80  # the most significant bit of byte 0 is piece 0
        text = base64.urlsafe_b64encode(first).rstrip(b"=").decode()
        assert bitmap.decode(text, piece_count) == {0}
    max_count = contracts.common_defs()["task"]["properties"]["piece_count"]["maximum"]
    assert schema["maxLength"] == bitmap.size(max_count)


def test_one_piece_bitmap_for_the_upload_server_and_the_schedulers_state() -> None:
    """``wants`` and a peer's pieces in ``scheduler.state`` are one encoding, one schema."""
    shared = contracts.common_defs()["piece_bitmap"]
    wants = contracts.peer_api()["pieces"].parameters[("query", "wants")]["schema"]
    assert {k: wants[k] for k in ("maxLength", "pattern")} == {
        k: shared[k] for k in ("maxLength", "pattern")
    }
    state = contracts.get("scheduler.state")
    (example,) = [e["reply"] for e in state.examples if e["request"].get("bitmaps")]
    task = example["tasks"][0]
    for peer in task["peers"]:
        held = bitmap.decode(peer["bitmap"], task["task"]["piece_count"])
        assert len(held) == peer["pieces"]
    assert bitmap.encode({0, 9}, 10) == "gEA", "piece 0 is the top bit of byte 0"
    assert state.validate_reply is not None
    broken = {**task, "peers": [{**task["peers"][0], "bitmap": "0a+b"}]}
    with pytest.raises(contracts.Invalid):
        state.validate_reply({**example, "tasks": [broken]})


def test_the_local_socket_framing_is_the_codes() -> None:
    framing = contracts.local_socket().framing
    assert framing["max_request_bytes"] == min(bus.MAX_REQUEST_BYTES, localproto.MAX_LINE)
    assert framing["request_timeout_s"] == localsocket.REQUEST_TIMEOUT
    assert framing["max_clients"] == localsocket.MAX_CLIENTS
    assert framing["progress_interval_s"] == localproto.PROGRESS_INTERVAL
    assert framing["keepalive_s"] == localproto.KEEPALIVE < localproto.SILENCE
    assert framing["silence_s"] == localproto.SILENCE
    assert framing["max_path_bytes"] == localproto.MAX_SOCKET_PATH
    assert framing["max_descriptors"] == 1
    record = contracts.local_socket().validate_record
    record({"host_id": "host-a", "pid": 1, "upload": "http://127.0.0.1:1", "socket": None})
    with pytest.raises(Invalid):
        record({"host_id": "host-a", "pid": 1, "upload": "http://127.0.0.1:1"})


def test_docs_protocol_points_at_every_contract() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    named = ("subjects", "common.json", "error.json", PEER_API, LOCAL_SOCKET)
    for name in ("docs/asyncapi.json", *(f"contracts/{n}" for n in named)):
        assert name in text, name
