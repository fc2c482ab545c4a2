"""The [origins] policy: link-local and metadata denied, every resolved address checked."""

from __future__ import annotations

import pytest

from swarmfly.errors import SwarmflyError
from swarmfly.origins import OriginPolicy, Rule, system_resolve


def fixed(answers: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int | None) -> list[str]:
        return answers.get(host, [])

    return resolve


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[fd00:ec2::254]/latest/", "cloud metadata"),
        ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
        ("http://metadata.google.internal./computeMetadata/v1/", "cloud metadata"),
        ("https://169.254.1.2:8443/x", "link-local"),
        ("http://[fe80::1%25eth0]/x", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "cloud metadata"),
        ("oci://169.254.169.254/name@sha256:" + "0" * 64, "cloud metadata"),
    ],
)
async def test_default_denies_metadata_and_link_local(url: str, reason: str) -> None:
    with pytest.raises(SwarmflyError, match=rf"forbidden: .* is not an allowed origin .*{reason}"):
        await OriginPolicy(resolve=fixed({})).check(url)


async def test_default_allows_loopback_private_and_public() -> None:
    policy = OriginPolicy(resolve=fixed({"example.com": ["93.184.215.14"]}))
    for url in ("http://127.0.0.1:8000/x", "http://10.1.2.3/x", "https://example.com/x"):
        await policy.check(url)
    await policy.check("s3://169.254.169.254/key")  # a bucket name, not a host


async def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    policy = OriginPolicy(resolve=fixed({"evil.example": ["93.184.215.14", "169.254.169.254"]}))
    with pytest.raises(SwarmflyError, match=r"evil\.example/ is not an allowed origin"):
        await policy.check("http://user:secret@evil.example/latest/meta-data/?token=x")


async def test_resolve_gives_the_addresses_it_checked() -> None:
    """For a caller that connects to these and no others (one look-up, nothing to rebind)."""
    policy = OriginPolicy(resolve=fixed({"example.com": ["93.184.215.14", "2606:2800::1"]}))
    assert await policy.resolve("https://example.com/x") == ["93.184.215.14", "2606:2800::1"]
    assert await policy.resolve("http://10.1.2.3:80/x") == [], "an IP literal is itself"
    assert await policy.resolve("s3://bucket/key") == []


async def test_the_system_resolver_path_with_localhost() -> None:
    """No DNS records can be added here: ``localhost`` resolves to loopback everywhere."""
    assert await system_resolve("localhost", 80)
    policy = OriginPolicy(deny=["127.0.0.0/8", "::1"])
    with pytest.raises(SwarmflyError, match=r"localhost:8000/ .*deny: 127\.0\.0\.0/8|::1"):
        await policy.check("http://localhost:8000/x")
    with pytest.raises(SwarmflyError, match=r"0\.0\.0\.0"):  # connecting to it reaches loopback
        await policy.check("http://0.0.0.0:8000/x")
    with pytest.raises(SwarmflyError, match="2130706433"):  # inet_aton spelling of 127.0.0.1
        await policy.check("http://2130706433:8000/x")
    await policy.check("http://192.0.2.1/x")


async def test_allow_list_with_names_ports_and_ranges() -> None:
    answers = {"registry.corp": ["10.0.0.5"], "cdn.corp": ["10.9.9.9", "8.8.8.8"]}
    policy = OriginPolicy(
        allow=["*.example.com", "10.0.0.0/8:443", "[2001:db8::/32]:80"],
        deny=["secret.example.com"],
        resolve=fixed(answers),
    )
    await policy.check("https://a.b.example.com/x")
    await policy.check("https://registry.corp/x")  # every address in an allowed range
    await policy.check("http://[2001:db8::1]/x")
    for url, reason in [
        ("http://registry.corp/x", "not in"),  # port 80, the range allows 443 only
        ("https://cdn.corp/x", "not in"),  # one address outside the range
        ("https://example.com/x", "not in"),  # *.example.com is below it only
        ("https://secret.example.com/x", "deny: secret.example.com"),
    ]:
        with pytest.raises(SwarmflyError, match=reason):
            await policy.check(url)


def test_resolver_addresses_are_checked_too() -> None:
    policy = OriginPolicy()
    policy.check_addresses("rebound.example", 80, ["93.184.215.14"])
    with pytest.raises(SwarmflyError, match=r"rebound\.example:80/ .*link-local"):
        policy.check_addresses("rebound.example", 80, ["169.254.10.10"])


@pytest.mark.parametrize("text", ["", "a b", "host:0", "host:99999", "[::1]x", "ex*ample.com"])
def test_entries_that_mean_nothing_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"\[origins\]"):
        Rule.parse(text)
