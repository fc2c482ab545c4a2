"""The proxy's allow-list: every entry names a host *and* a port (issue 13, item 9)."""

from __future__ import annotations

import pytest

from swarmfly.services.proxy.registry import AllowList


@pytest.mark.parametrize(
    ("entries", "scheme", "host", "port", "allowed"),
    [
        (["127.0.0.1"], "http", "127.0.0.1", None, True),
        (["127.0.0.1"], "http", "127.0.0.1", 80, True),
        (["127.0.0.1"], "http", "127.0.0.1", 4222, False),
        (["http://127.0.0.1:5000"], "http", "127.0.0.1", 5000, True),
        (["http://127.0.0.1:5000"], "http", "127.0.0.1", 5001, False),
        (["http://127.0.0.1:5000"], "http", "127.0.0.1", None, False),
        (["https://registry.example.com"], "http", "registry.example.com", 80, False),
        (["*.example.com"], "http", "cdn.example.com", None, True),
        (["*.example.com"], "http", "cdn.example.com", 8080, False),
        (["*.example.com:*"], "http", "cdn.example.com", 8080, True),
        (["*.example.com"], "http", "example.com.evil.net", None, False),
        (["Mirror.Example.com:8080"], "http", "MIRROR.example.com", 8080, True),
        (["[::1]:8080"], "http", "::1", 8080, True),
        (["[::1]:8080"], "http", "::1", 80, False),
        (["docker.io"], "http", "registry-1.docker.io", None, True),
        ([], "http", "127.0.0.1", None, False),
        (["127.0.0.1"], "ftp", "127.0.0.1", None, False),
    ],
)
def test_requests_match_scheme_host_and_port(
    entries: list[str], scheme: str, host: str, port: int | None, allowed: bool
) -> None:
    assert AllowList(entries).allows(scheme, host, port) is allowed


@pytest.mark.parametrize(
    ("entries", "host", "port", "allowed"),
    [
        (["127.0.0.1"], "127.0.0.1", 443, True),
        (["127.0.0.1"], "127.0.0.1", 4222, False),
        (["127.0.0.1"], "127.0.0.1", 80, False),
        (["http://127.0.0.1:5000"], "127.0.0.1", 5000, True),
        (["http://127.0.0.1:5000"], "127.0.0.1", 4222, False),
        (["https://registry-1.docker.io"], "registry-1.docker.io", 443, True),
        (["https://registry-1.docker.io"], "registry-1.docker.io", 22, False),
        (["auth.docker.io", "*.docker.com"], "production.cloudflare.docker.com", 443, True),
        (["*"], "anything.example", 443, True),
        (["*"], "anything.example", 6379, False),
        (["*:*"], "anything.example", 6379, True),
    ],
)
def test_connect_needs_an_entry_for_that_host_and_port(
    entries: list[str], host: str, port: int, allowed: bool
) -> None:
    assert AllowList(entries).allows_tunnel(host, port) is allowed


@pytest.mark.parametrize(
    "entry", ["ftp://host", "host:0", "host:70000", "host:x", ":80", "http://"]
)
def test_a_malformed_entry_is_refused_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="proxy host"):
        AllowList([entry])
