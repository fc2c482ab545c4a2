"""`swarmfly doctor`'s ``reach`` check as pure decisions: which address a peer asked to probe
accepts from the schedulers' listing, which peers the doctor asks, and its verdict from
their answers."""

from __future__ import annotations

from typing import Any

import pytest

from swarmfly.contracts import messages
from swarmfly.doctor import REACH_ASKED, reach_candidates, reach_verdict
from swarmfly.errors import SwarmflyError
from swarmfly.services.peer.reach import probe_url

ADDRESS = "http://10.0.0.7:41235"


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("http://10.0.0.7:41235", "http://10.0.0.7:41235/healthz"),
        ("http://10.0.0.7:41235/", "http://10.0.0.7:41235/healthz"),
        ("https://[fd00::7]:443", "https://[fd00::7]:443/healthz"),
    ],
)
def test_an_upload_address_is_probed_at_its_healthz(address: str, url: str) -> None:
    assert probe_url(address) == url


@pytest.mark.parametrize(
    "address",
    [
        "http://10.0.0.7",  # no port: no upload address the schedulers make
        "file:///etc/passwd",
        "gopher://10.0.0.7:70",
        "http://user:secret@10.0.0.7:41235",
        "http://10.0.0.7:41235/admin",
        "http://10.0.0.7:41235?x=1",
        "http://10.0.0.7:41235#x",
        "http://10.0.0.7:99999",
        "10.0.0.7:41235",
        "",
    ],
)
def test_anything_else_is_refused(address: str) -> None:
    with pytest.raises(SwarmflyError) as caught:
        probe_url(address)
    assert caught.value.code == "forbidden"
    assert caught.value.message.endswith("is not an upload address (http(s)://host:port)")


def peer_service(host_id: str, name: str = "peer") -> dict[str, Any]:
    return {"name": name, "metadata": {"host_id": host_id}}


def test_the_doctor_asks_other_live_peers_only() -> None:
    hosts = {
        h: {"id": h, "address": ADDRESS, "seen_s": seen}
        for h, seen in (("me", 0.1), ("b", 0.9), ("c", 0.2), ("seed-1", 0.1), ("d", 0.5),
                        ("e", 0.3))
    }  # fmt: skip
    services = [
        peer_service("me"),
        peer_service("me", "proxy"),
        peer_service("seed-1", "storage"),  # runs no peer service: cannot be asked
        peer_service("gone"),  # not listed by the schedulers: not live
        *(peer_service(h) for h in ("b", "c", "d", "e")),
    ]
    assert REACH_ASKED == 3
    assert reach_candidates("me", hosts, services) == ["c", "e", "d"], "most recently seen"
    assert reach_candidates("me", hosts, services[:4]) == []


def reply(target: str, ok: bool, error: str | None = None) -> messages.ReachReply:
    return messages.ReachReply("asker", target, ADDRESS, ok, 0.01, error=error)


def test_one_host_that_reaches_it_is_enough() -> None:
    refused = "cannot connect to 10.0.0.7:41235: Connection refused"
    check = reach_verdict(ADDRESS, ["b", "c"], [reply("me", True), reply("me", False, refused)])
    assert (check.status, check.message) == (
        "ok",
        f"{ADDRESS} is reached from b; not from c: {refused}",
    )


def test_hosts_that_cannot_reach_it_are_named() -> None:
    refused = "cannot connect to 10.0.0.7:41235: Connection refused"
    late = "10.0.0.7:41235 did not answer in 3s"
    unasked = SwarmflyError("timeout", "swarmfly.v1.peer.d.reach did not answer in 8s")
    answers = [reply("me", False, refused), reply("me", False, late), unasked]
    check = reach_verdict(ADDRESS, ["b", "c", "d"], answers)
    assert (check.status, check.message) == (
        "fail",
        f"other hosts cannot reach this upload server at {ADDRESS}: b: {refused}; c: {late};"
        " d could not probe (swarmfly.v1.peer.d.reach did not answer in 8s)",
    )
    assert [a["host_id"] for a in check.details["asked"]] == ["b", "c", "d"]


def test_no_host_that_could_probe_is_a_warning() -> None:
    gone = SwarmflyError("unavailable", "no service answers swarmfly.v1.peer.b.reach")
    check = reach_verdict(ADDRESS, ["b"], [gone])
    assert (check.status, check.message) == (
        "warn",
        f"no other peer could probe {ADDRESS}: b could not probe (no service answers"
        " swarmfly.v1.peer.b.reach)",
    )
