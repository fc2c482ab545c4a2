"""`swarmfly doctor`'s ``reach`` check as pure decisions: which address a peer asked to probe
accepts from the schedulers' listing, which peers the doctor asks, and its verdict from
their answers; and where a probe may connect, against a real local HTTP server with names
resolved by a resolver the test controls (a loopback target, DNS rebinding)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from swarmfly.contracts import messages
from swarmfly.doctor import REACH_ASKED, reach_candidates, reach_verdict
from swarmfly.errors import SwarmflyError
from swarmfly.origins import Resolve, system_resolve
from swarmfly.services.peer.reach import Prober, probe_url
from swarmfly.testing import Origin

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


# -- where a probe connects ------------------------------------------------------------------

HEALTHY = b'{"ok": true}'
NAME = "peer-a.test"


@pytest.fixture
async def upload() -> AsyncIterator[Origin]:
    """A real HTTP server on 127.0.0.1 that answers ``/healthz`` as an upload server does."""
    async with Origin().serve() as served:
        served.add("healthz", HEALTHY)
        yield served


def port_of(server: Origin) -> int:
    return int(server.url.rsplit(":", 1)[1])


class Names:
    """A resolver the test controls: each name's answers in turn (the last one repeated),
    and every look-up recorded."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int | None) -> list[str]:
        self.asked.append(host)
        turns = self.answers.get(host, [[]])
        return turns[min(self.asked.count(host), len(turns)) - 1]


def prober(advertised: str, resolve: Resolve | None = None) -> Prober:
    return Prober("b", advertised, resolve or Names({}))


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.3", "0.0.0.0", "[::1]", "[::]", "[::ffff:127.0.0.1]"]
)
async def test_a_loopback_target_is_not_probed_from_another_machine(
    upload: Origin, host: str
) -> None:
    """From a peer that advertises 10.0.0.8 a loopback address would reach a port of its own
    machine: refused before any connection, as a failure to reach the address, in words."""
    port = port_of(upload)
    reply = await prober("10.0.0.8").probe("a", f"http://{host}:{port}", 3.0)
    kind = "an unspecified" if host in ("0.0.0.0", "[::]") else "a loopback"
    assert (reply.ok, reply.status, reply.address) == (False, None, f"http://{host}:{port}")
    assert reply.error == (
        f"{host}:{port} is {kind} address, which other machines cannot reach (b advertises"
        " 10.0.0.8: not probed)"
    )
    assert upload.requests == 0


async def test_a_name_resolving_to_loopback_is_not_probed_from_another_machine(
    upload: Origin,
) -> None:
    names = Names({NAME: [["10.0.0.9", "127.0.0.1"]]})
    reply = await prober("10.0.0.8", names).probe("a", f"http://{NAME}:{port_of(upload)}", 3.0)
    assert (reply.ok, reply.error) == (
        False,
        f"{NAME} resolves to 127.0.0.1, a loopback address, which other machines cannot reach"
        " (b advertises 10.0.0.8: not probed)",
    )
    assert upload.requests == 0


@pytest.mark.parametrize("advertised", ["127.0.0.1", "0.0.0.0", "localhost"])
async def test_on_one_machine_a_loopback_target_is_probed(upload: Origin, advertised: str) -> None:
    """A peer that advertises a loopback address itself runs on the one machine the whole
    cluster is on (`swarmfly up`): there a loopback address is every host's."""
    names = Names({"localhost": [["127.0.0.1", "::1"]]})
    reply = await prober(advertised, names).probe("a", upload.url, 3.0)
    assert (reply.ok, reply.status, reply.error) == (True, 200, None)
    assert upload.requests == 1


async def test_a_name_resolving_to_a_denied_address_is_refused(upload: Origin) -> None:
    names = Names({NAME: [["10.0.0.9", "169.254.169.254"]]})
    port = port_of(upload)
    with pytest.raises(SwarmflyError) as caught:
        await prober("127.0.0.1", names).probe("a", f"http://{NAME}:{port}", 3.0)
    assert (caught.value.code, caught.value.message) == (
        "forbidden",
        f"http://{NAME}:{port}/ is not an allowed origin ([origins] deny: cloud metadata)",
    )
    assert names.asked == [NAME]
    assert upload.requests == 0


async def test_the_connection_goes_to_the_address_checked(upload: Origin) -> None:
    """DNS rebinding: the name answers 127.0.0.1 when checked and the metadata address after.
    It is looked up once and the GET goes to 127.0.0.1, naming the host it was asked for."""
    port = port_of(upload)
    upload.required_headers = {"Host": f"{NAME}:{port}"}  # else the server answers 401
    names = Names({NAME: [["127.0.0.1"], ["169.254.169.254"]]})
    reply = await prober("127.0.0.1", names).probe("a", f"http://{NAME}:{port}", 3.0)
    assert (reply.ok, reply.status, reply.error) == (True, 200, None)
    assert names.asked == [NAME]
    assert upload.requests == 1


async def test_another_spelling_of_loopback_is_loopback(upload: Origin) -> None:
    """``2130706433`` is no IP literal to Python, but the system resolver (inet_aton) makes it
    127.0.0.1: judged by what it resolves to."""
    target = f"http://2130706433:{port_of(upload)}"
    reply = await Prober("b", "10.0.0.8", system_resolve).probe("a", target, 3.0)
    assert (reply.ok, reply.error) == (
        False,
        "2130706433 resolves to 127.0.0.1, a loopback address, which other machines cannot"
        " reach (b advertises 10.0.0.8: not probed)",
    )
    assert upload.requests == 0


async def test_a_name_that_does_not_resolve_is_not_reached(upload: Origin) -> None:
    names = Names({})
    reply = await prober("127.0.0.1", names).probe("a", f"http://{NAME}:{port_of(upload)}", 3.0)
    assert (reply.ok, reply.status, reply.error) == (False, None, f"cannot resolve {NAME}")
    assert names.asked == [NAME]
