"""The proxy's pure parts: routes, the upstream choice, byte ranges, image references."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import Span, Unsatisfiable, byte_range
from swarmfly.preheat import _pick_platform, auth_from_file, parse_image
from swarmfly.services.proxy.registry import RegistryError, Route, Upstreams, route
from swarmfly.services.proxy.responses import attributes

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("path", "method", "expected"),
    [
        ("/v2/", "GET", Route("passthrough")),
        ("/v2", "GET", Route("passthrough")),
        ("/v2/_catalog?n=1", "GET", Route("passthrough")),
        ("/token?service=x&scope=repository:a/b:pull", "GET", Route("passthrough")),
        ("/", "GET", Route("passthrough")),
        ("//v2/x", "GET", Route("passthrough")),
        ("/v2/a/b/c", "GET", Route("passthrough")),
        (f"/v2/team/blobs/app/blobs/{DIGEST}", "GET", Route("blob", "team/blobs/app", DIGEST)),
        ("/v2/a/tags/anything", "GET", Route("passthrough", "a")),
        ("/v2/a/manifests/x?ns=..", "GET", Route("passthrough", "a")),
        (f"/v2/team/app/blobs/{DIGEST}", "GET", Route("blob", "team/app", DIGEST)),
        (f"/v2/team/app/blobs/{DIGEST}?ns=docker.io", "GET", Route("blob", "team/app", DIGEST)),
        (f"/v2/team/app/blobs/{DIGEST}", "HEAD", Route("passthrough", "team/app")),
        ("/v2/a/blobs/sha512:" + "c" * 128, "GET", Route("passthrough", "a")),
        ("/v2/library/alpine/manifests/3.20", "GET", Route("passthrough", "library/alpine")),
        (f"/v2/a.b/c-d/manifests/{DIGEST}", "GET", Route("passthrough", "a.b/c-d")),
        ("/v2/a/blobs/uploads/", "POST", Route("passthrough", "a")),
        ("/v2/a/tags/list", "GET", Route("passthrough", "a")),
    ],
)
def test_routes(path: str, method: str, expected: Route) -> None:
    assert route(path, method) == expected


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/a/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "AB" * 32, "DIGEST_INVALID"),
        ("/v2/a/blobs/nothing", "DIGEST_INVALID"),
        ("/v2/../etc/blobs/" + DIGEST, "NAME_INVALID"),
        ("/v2/a/%2e%2e/blobs/" + DIGEST, "NAME_INVALID"),
        ("/v2/A/manifests/x", "NAME_INVALID"),
        ("/v2/a//b/manifests/x", "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/x", "NAME_INVALID"),
        ("/v2/a/manifests/..%2f", "NAME_INVALID"),
        ("/v2/a/manifests/-x", "MANIFEST_INVALID"),
        ("/v2/a/tags/../x", "NAME_INVALID"),
        ("/v2/a/%252e%252e/manifests/x", "NAME_INVALID"),
        ("/v2/a\\..\\b/manifests/x", "NAME_INVALID"),
        ("/etc/../passwd", "UNSUPPORTED"),
        ("/x/%2E%2e/y", "UNSUPPORTED"),
        ("/x/./y", "UNSUPPORTED"),
        ("*", "UNSUPPORTED"),
        ("/a b", "UNSUPPORTED"),
        ("/caf\u00e9", "UNSUPPORTED"),
    ],
)
def test_bad_paths(path: str, code: str) -> None:
    with pytest.raises(RegistryError) as caught:
        route(path, "GET")
    assert caught.value.code == code
    assert 400 <= caught.value.status < 500
    assert json.loads(caught.value.body())["errors"][0]["code"] == code


def test_upstream_choice() -> None:
    upstreams = Upstreams(["https://registry-1.docker.io", "http://127.0.0.1:5000"])
    assert upstreams.pick(None, None) == "https://registry-1.docker.io"
    assert upstreams.pick(None, "docker.io") == "https://registry-1.docker.io"
    assert upstreams.pick(None, "127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert upstreams.pick("http://127.0.0.1:5000", "docker.io") == "http://127.0.0.1:5000"
    for header, ns in [("https://127.0.0.1:5000", None), ("evil.com", None), (None, "ghcr.io")]:
        with pytest.raises(RegistryError) as caught:
            upstreams.pick(header, ns)
        assert (caught.value.status, caught.value.code) == (403, "DENIED")
    with pytest.raises(RegistryError):
        Upstreams([]).pick(None, None)
    for unparsable in ("[", "http://[::1", "]x["):  # found by the fuzzer: it was a 500
        with pytest.raises(RegistryError) as caught:
            upstreams.pick(unparsable, None)
        assert caught.value.status == 400
    with pytest.raises(ValueError, match="http"):
        Upstreams(["ftp://example.com"])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", Span(0, 10)),
        ("bytes=90-", Span(90, 100)),
        ("bytes=90-500", Span(90, 100)),
        ("bytes=-10", Span(90, 100)),
        ("bytes=-500", Span(0, 100)),
        ("bytes=5-2", None),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_byte_ranges(header: str | None, expected: Span | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        byte_range(header, 100)


def test_image_references() -> None:
    ref = parse_image("registry.example.com:5000/team/app:v1")
    assert (ref.base, ref.name, ref.reference) == (
        "https://registry.example.com:5000",
        "team/app",
        "v1",
    )
    assert parse_image("docker.io/alpine").url("manifests", "latest") == (
        "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    )
    assert parse_image(f"localhost:5000/a@{DIGEST}", plain_http=True).reference == DIGEST
    assert parse_image("http://10.0.0.1:5000/a").base == "http://10.0.0.1:5000"
    for bad in ["alpine", "alpine:3", "registry.example.com/../x", "registry.example.com/A"]:
        with pytest.raises(SwarmflyError):
            parse_image(bad)


def test_auth_files(tmp_path: Path) -> None:
    token = base64.b64encode(b"alice:secret").decode()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": token}}}))
    assert auth_from_file(path, "registry-1.docker.io") == {"Authorization": f"Basic {token}"}
    with pytest.raises(SwarmflyError, match="no credentials"):
        auth_from_file(path, "ghcr.io")
    path.write_text("not json")
    with pytest.raises(SwarmflyError, match="cannot read"):
        auth_from_file(path, "ghcr.io")


def test_platform_choice() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:amd", "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:v7",
                "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
            },
        ]
    }
    assert _pick_platform(index, "linux/amd64") == "sha256:amd"
    assert _pick_platform(index, "linux/arm/v7") == "sha256:v7"
    with pytest.raises(SwarmflyError, match="no manifest"):
        _pick_platform(index, "windows/amd64")


def test_span_attributes_name_host_and_port_never_userinfo() -> None:
    url = "http://alice:s3cret@registry.example:8080/v2/x/blobs/y?X-Amz-Signature=sig"
    assert attributes("GET", url, "/v2/x/blobs/y") == {
        "http.request.method": "GET",
        "url.path": "/v2/x/blobs/y",
        "server.address": "registry.example",
        "server.port": 8080,
    }
    assert attributes("CONNECT", "alice:s3cret@registry.example:443") == {
        "http.request.method": "CONNECT",
        "server.address": "registry.example",
        "server.port": 443,
    }
    assert attributes("GET", "https://registry.example")["server.port"] == 443
