"""The metrics an operator alerts on, from services in their own processes: downloads by
result and reason (the basic SLI), ``swarmfly_build_info``, no ``_created`` series, and one
``/healthz`` shape on every service."""

from __future__ import annotations

import asyncio
import os
import platform
from pathlib import Path

import aiohttp
import orjson
import pytest

from swarmfly import __version__
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, spawn_service, swarmfly_get
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.timeout(120)


async def fetch(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def sample(exposition: str, line_start: str) -> float:
    """The value of the one sample whose line starts with ``line_start``, 0 if absent."""
    for line in exposition.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_downloads_are_counted_by_result_and_reason(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    url = origin.add("ok.bin", os.urandom(1024 * 1024))
    services = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=FAST_ENV)
        for kind in ("scheduler", "storage", "peer")
    ]
    try:
        scheduler, storage, peer = services
        cli = ("--prefix", prefix)
        get = [
            asyncio.to_thread(
                swarmfly_get, target, tmp_path / name, tmp_path / "peer", *cli, nats_url=nats.url
            )
            for target, name in ((url, "ok.bin"), (f"{origin.url}/missing.bin", "missing.bin"))
        ]
        ok, missing = await asyncio.gather(*get)
        assert ok.returncode == 0, ok.stderr
        assert orjson.loads(ok.stdout)["via"] == "peer"
        assert missing.returncode == 3, missing.stderr

        status, exposition = await fetch(f"{peer.url}/metrics")
        assert status == 200
        assert (
            sample(exposition, 'swarmfly_peer_downloads_total{reason="none",result="succeeded"}')
            == 1
        )
        assert (
            sample(exposition, 'swarmfly_peer_downloads_total{reason="not_found",result="failed"}')
            == 1
        )
        build = (
            f'swarmfly_build_info{{python="{platform.python_version()}",version="{__version__}"}}'
        )
        assert sample(exposition, build) == 1
        assert "_created" not in exposition, "no _created series"

        for service in (scheduler, storage, peer):
            status, body = await fetch(f"{service.url}/healthz")
            health = orjson.loads(body)
            assert status == 200 and health["ok"] is True, (service.kind, body)
            assert all(isinstance(v, int) for k, v in health.items() if k != "ok"), body
        status, body = await fetch(f"{peer.proxy_url}/healthz")
        assert (status, orjson.loads(body)) == (200, {"ok": True})
    finally:
        for service in services:
            assert service.stop() == 0, service.log()


def test_an_unhealthy_body_has_the_same_shape_with_503() -> None:
    from swarmfly.httpserver import healthz

    response = healthz(False, uploads=3)
    assert response.status == 503
    assert response.body is not None and orjson.loads(bytes(response.body)) == {
        "ok": False,
        "uploads": 3,
    }
