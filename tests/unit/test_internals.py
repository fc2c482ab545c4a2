"""The private parts of nats-py and aiohttp that swarmfly relies on are still there.

pyproject.toml bounds both from above; before a bound is raised, these fail loudly, naming
what moved, instead of a service misbehaving at run time (a TLS downgrade let through, an
endpoint left subscribed, the proxy's registry errors gone)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_writer import StreamWriter
from nats.aio.client import Client, Srv
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request
from nats.micro.service import Endpoint, Service


def assigns(function: Callable[..., Any], attribute: str) -> bool:
    """Whether ``function``'s source sets ``self.<attribute>`` (annotated or not)."""
    return re.search(rf"self\.{attribute}\s*(:[^=]+)?=", inspect.getsource(function)) is not None


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_nats_client_internals_bus_client_overrides() -> None:
    """natsinternals.TlsRequiringClient refuses a server that offers no TLS from ``_process_info``,
    reading the server it is connecting to from ``_current_server``."""
    assert inspect.iscoroutinefunction(Client._process_info), version("nats-py")
    assert parameters(Client._process_info) == ["self", "info", "initial_connection"]
    assert assigns(Client.__init__, "_current_server")
    assert "uri" in Srv.__dataclass_fields__


def test_nats_micro_internals_bus_uses() -> None:
    """natsinternals removes single endpoints (nats.micro removes them only all at once) and
    answers errors only when the request has a reply subject."""
    assert assigns(Service.__init__, "_endpoints")
    assert inspect.iscoroutinefunction(Endpoint._stop)
    assert parameters(Endpoint._stop) == ["self"]
    assert assigns(Endpoint.__init__, "_subject")
    assert assigns(Request.__init__, "_msg")
    assert (ERROR_HEADER, ERROR_CODE_HEADER) == ("Nats-Service-Error", "Nats-Service-Error-Code")


@pytest.mark.parametrize(
    "keyword",
    ["loop", "access_log", "max_line_size", "max_field_size", "keepalive_timeout"],
)
def test_aiohttp_request_handler_takes_what_the_proxy_passes(keyword: str) -> None:
    """aiohttpinternals.ParserErrors is a web.RequestHandler the proxy makes with these."""
    assert keyword in parameters(web.RequestHandler.__init__), version("aiohttp")


def test_aiohttp_request_handler_internals_the_proxy_overrides() -> None:
    """It answers parser errors from ``handle_error``, swaps ``transport`` for a lingering
    one, and sees ``data_received`` and ``connection_lost`` first."""
    assert parameters(web.RequestHandler.handle_error) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ]
    slots = {
        name for klass in web.RequestHandler.__mro__ for name in getattr(klass, "__slots__", ())
    }
    assert "transport" in slots, "transport stays an assignable slot"
    for method in ("data_received", "connection_lost"):
        assert callable(getattr(web.RequestHandler, method))
    assert hasattr(StreamWriter, "output_size"), "request.writer.output_size"
    assert issubclass(LineTooLong, Exception)


def test_aiohttp_server_is_the_protocol_factory() -> None:
    """httpserver and the proxy hand connections to ``runner.server()``'s protocol."""
    assert parameters(web.Server.__call__) == ["self"]
    assert inspect.signature(web.Server.__call__).return_annotation in (
        web.RequestHandler,
        "RequestHandler",
        "RequestHandler[BaseRequest]",
    )


def test_aiohttp_resolver_the_http_source_wraps() -> None:
    """plugins/sources/http.py guards ThreadedResolver.resolve's answers."""
    assert parameters(aiohttp.ThreadedResolver.resolve) == ["self", "host", "port", "family"]
    assert "host" in ResolveResult.__annotations__


ROOT = Path(__file__).resolve().parents[2]
PRIVATE_USES = {
    "swarmfly/bus/natsinternals.py": (
        r"\._process_info\b", r"\._current_server\b", r"\._endpoints\b", r"\._stop\(",
        r"endpoint\._subject\b", r"\._msg\b",
    ),
    "swarmfly/aiohttpinternals.py": (
        r"web\.RequestHandler\b", r"\boutput_size\b", r"aiohttp\.http_exceptions\b",
    ),
}  # fmt: skip


@pytest.mark.parametrize("home", sorted(PRIVATE_USES))
def test_private_parts_are_used_in_one_module(home: str) -> None:
    """Each library's private parts are used in its internals module only, so the checks
    above cover every use, and a bound is raised by reading one file."""
    patterns = [re.compile(p) for p in PRIVATE_USES[home]]
    assert all(p.search((ROOT / home).read_text(encoding="utf-8")) for p in patterns), home
    elsewhere = [
        f"{path.relative_to(ROOT)}: {pattern.pattern}"
        for folder in ("swarmfly", "services", "plugins")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != home
        for pattern in patterns
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert elsewhere == []
