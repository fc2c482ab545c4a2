"""One `swarmfly get` is one trace across processes: CLI, peer, scheduler, storage, collected
by an OTLP/HTTP receiver the test runs, with every span's parent inside the trace."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from swarmfly.contracts import Sender
from swarmfly.httpserver import serve_http
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, spawn_service
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
SECRET = "Bearer tr4ce-s3cret"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, str]


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes
                 if a.key == "service.name"), "",
            )  # fmt: skip
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                             span.parent_span_id.hex(),
                             {a.key: str(getattr(a.value, a.value.WhichOneof("value")))
                              for a in span.attributes})
                    )  # fmt: skip
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


async def test_one_get_is_one_trace_across_processes(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/v1/traces", receiver.traces)
    data = os.urandom(6 * MiB)
    async with AsyncExitStack() as stack:
        endpoint = await serve_http(stack, app, "127.0.0.1", 0)
        origin = await stack.enter_async_context(
            Origin(required_headers={"Authorization": SECRET}).serve()
        )
        url = origin.add("traced.bin", data)
        env = {
            **FAST_ENV,
            "SWARMFLY_LOG_LEVEL": "DEBUG",  # the most talkative logs must not leak it either
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        # peer0 (the get's) makes a span per piece; peer1 (the proxied pull's) aggregates.
        piece_spans = {**env, "SWARMFLY_PEER_PIECE_SPANS": "1"}
        blob = os.urandom(5 * MiB)
        blob_digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
        origin.add(f"v2/team/app/blobs/{blob_digest}", blob)
        mirror = ("--proxy-port", "0", "--registry", origin.url)
        services = [
            spawn_service(kind, nats.url, tmp_path / name, "--prefix", prefix, *args, env=environ)
            for kind, name, args, environ in (
                ("scheduler", "scheduler", (), env), ("storage", "storage", (), env),
                ("peer", "peer0", mirror, piece_spans), ("peer", "peer1", mirror, env),
                ("peer", "peer2", mirror, env))
        ]  # fmt: skip
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "swarmfly", "get", url, "-O", str(tmp_path / "out"),
                "--header", f"Authorization: {SECRET}", "--state-dir", str(tmp_path / "peer0"),
                "--nats", nats.url, "--prefix", prefix,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, **env},
            )  # fmt: skip
            _, err = await asyncio.wait_for(process.communicate(), 120)
            assert process.returncode == 0, err
            # One proxied blob pull, joining a trace the client started.
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"{services[3].proxy_url}/v2/team/app/blobs/{blob_digest}",
                    headers={"Authorization": SECRET, "traceparent": CLIENT_TRACEPARENT},
                ) as response,
            ):
                assert response.status == 200
                assert await response.read() == blob
        finally:
            # Stopped off the loop: the receiver on this loop must take their last spans.
            await asyncio.gather(*(asyncio.to_thread(service.stop) for service in services))

    assert [service.process.returncode for service in services] == [0] * 5, "clean exits"
    senders = {
        Sender("seed" if service.kind == "storage" else "normal", service.host_id)
        for service in services[1:]
    }
    get_peer = Sender("normal", services[2].host_id)
    assert all(sender.host_id for sender in senders)
    assert (tmp_path / "out").read_bytes() == data
    root = next(s for s in receiver.spans if s.name == "swarmfly get")
    assert root.parent_id == "" and root.service == "swarmfly-cli"
    trace = [s for s in receiver.spans if s.trace_id == root.trace_id]
    traced = {s.service for s in trace}
    assert {"swarmfly-cli", "swarmfly-peer", "swarmfly-scheduler", "swarmfly-storage"} <= traced
    ids = {s.span_id for s in trace}
    for span in trace:
        assert span.parent_id == "" or span.parent_id in ids, f"orphan span {span.name}"
    names = {s.name for s in trace}
    assert {"process peer.{host_id}.download", "process scheduler.{partition}.register",
            "process storage.{host_id}.seed", "back_to_source", "p2p",
            "download"} <= names  # fmt: skip
    process_spans = [s for s in trace if s.name.startswith("process ")]
    assert all(s.attributes["messaging.system"] == "nats" for s in process_spans)
    # Each registration came under its own host's name, the get's peer's among them.
    registered = [
        s.attributes["messaging.destination.name"]
        for s in process_spans
        if s.name == "process scheduler.{partition}.register"
    ]
    assert all(d.startswith(f"{prefix}.v1.scheduler.") for d in registered), registered
    assert get_peer in {Sender.of(d) for d in registered} <= senders, registered
    pull = [s for s in receiver.spans if s.trace_id == CLIENT_TRACE]
    proxy = next(s for s in pull if s.name == "proxy blob")
    assert proxy.parent_id == CLIENT_SPAN and proxy.service == "swarmfly-peer"
    assert {"swarmfly-peer", "swarmfly-scheduler", "swarmfly-storage"} <= {s.service for s in pull}
    assert {
        "download",
        "process scheduler.{partition}.register",
        "process storage.{host_id}.seed",
    } <= {s.name for s in pull}
    ids = {s.span_id for s in pull} | {CLIENT_SPAN}
    assert all(s.parent_id in ids for s in pull if s is not proxy), "orphans in the pull"
    # Per-piece spans on both ends only where asked for; HTTP conventions on them.
    get_piece = [s for s in trace if s.name == "GET piece"]
    assert get_piece and all(s.service == "swarmfly-peer" for s in get_piece)
    assert all(
        s.attributes["server.address"] == "127.0.0.1"
        and s.attributes["server.port"].isdigit()
        and s.attributes["http.response.status_code"] == "206"
        for s in get_piece
    )
    served = {s.parent_id for s in trace if s.name == "serve piece"}
    assert served and served <= {s.span_id for s in get_piece}
    assert not {"GET piece", "serve piece"} & {s.name for s in pull}, "aggregated by default"
    for span in receiver.spans:
        for value in span.attributes.values():
            assert "tr4ce-s3cret" not in value, f"a secret in span {span.name}"
    assert "tr4ce-s3cret" not in err.decode(errors="replace")
    for path in tmp_path.rglob("*"):  # logs, metadata, anything a service wrote
        if path.is_file() and path.stat().st_size < 4 * MiB:
            assert b"tr4ce-s3cret" not in path.read_bytes(), f"the secret in {path}"
