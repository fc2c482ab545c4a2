"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright): a piece
map with partial progress mid-download, updates without reload, untrusted data as text."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
import pytest

from swarmfly import ids
from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.contracts import Sender, messages
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.testing import Origin, in_process_cluster
from tests.conftest import require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
MiB = 1024 * 1024
PAYLOAD = '"><img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
ATTACKER = Sender("normal", "xss-host")
TASK_ID = "ee" * 32


def slow_seed(config: Config) -> None:
    config.storage.upload_rate = 2 * MiB  # the download takes a few seconds to watch
    config.scheduler.heartbeat_interval = 0.5


async def test_live_piece_map_in_a_browser(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path, bus: Bus
) -> None:
    chromium = require_tool("chromium")
    from playwright.async_api import async_playwright

    url = origin.add("watch.bin", os.urandom(16 * MiB))
    async with in_process_cluster(nats.url, prefix, tmp_path, configure=slow_seed) as cluster:
        # An attacker-chosen URL reaches the scheduler: it must never become markup.
        partition = str(partition_of(TASK_ID, DEFAULT_PARTITIONS))
        await bus.request(
            messages.REGISTER,
            messages.RegisterRequest(
                task_id=TASK_ID,
                peer_id=ids.peer_id(ATTACKER.host_id, TASK_ID),
                host=messages.Host(id=ATTACKER.host_id, ip="127.0.0.1", port=9, type="normal"),
                source=messages.Source(url=f"http://example.invalid/{PAYLOAD}"),
            ),
            partition=partition,
            sender=ATTACKER.token,
        )
        # Host and peer names are refused by the contract before they could reach the page
        # (a host id that is no subject token can name no sender either).
        register = bus.subject(
            "scheduler.{partition}.register", partition=partition, sender=ATTACKER.token
        )
        body = {
            "task_id": TASK_ID,
            "peer_id": ids.peer_id(ATTACKER.host_id, TASK_ID),
            "host": {"id": PAYLOAD, "ip": "127.0.0.1", "port": 9, "type": "normal"},
            "source": {"url": "http://example.invalid/x"},
        }
        reply = await bus.nc.request(register, orjson.dumps(body), timeout=5)
        assert orjson.loads(reply.data)["error"]["code"] == "bad_request"
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
            )  # fmt: skip
            page = await browser.new_page()
            # Shown the token once, the page keeps it as a cookie for its own requests.
            await page.goto(f"{cluster.scheduler.http_url}/?token={cluster.scheduler.api_token}")
            await page.evaluate("window.loadedOnce = 'yes'")
            download = asyncio.create_task(cluster.peer.node.download(SourceRequest(url)))

            partial = (
                "() => { const have = document.querySelectorAll('.cell.have:not(.seed)').length;"
                " const all = document.querySelectorAll('.task .cell').length;"
                " return have > 0 && have < all / 2; }"
            )
            await page.wait_for_function(partial, timeout=30_000, polling=100)
            shot = Path(os.environ.get("SWARMFLY_SCREENSHOT_DIR", tmp_path)) / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            first = await page.locator(".cell.have:not(.seed)").count()

            await download
            await page.wait_for_function(
                f"() => document.querySelectorAll('.cell.have:not(.seed)').length > {first}",
                timeout=15_000,
            )
            assert await page.evaluate("window.loadedOnce") == "yes", "updated without reload"
            assert await page.evaluate("window.pwned") is None
            assert await page.locator("img").count() == 0
            assert await page.locator("script").count() == 1  # the page's own
            shown = page.locator(".task .url", has_text="window.pwned=2")
            assert await shown.count() == 1, "the URL is shown, as text"
            assert "<script>window.pwned=2</script>" in await shown.inner_text()
            assert await page.locator("text=live").count() == 1
            await browser.close()
