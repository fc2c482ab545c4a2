"""What one download may touch, as narrow interfaces: its scheduler, its parents' upload
servers, the origin, the host's download budget and the clock.

The conductor sees these and nothing else of the host it runs on (``PeerHost`` provides
them), so the download can be driven by anything that implements them, and the HTTP and
NATS details stay in the adapters here and in the host (``host``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from swarmfly.contracts import messages
from swarmfly.contracts.wire import Rep, Req, Subject
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.metrics import PeerMetrics
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.store import StoredTask

Clock = Callable[[], float]
"""Monotonic seconds (``time.monotonic`` in the service, a frozen clock in tests)."""


class SchedulerLink(Protocol):
    """The task's scheduler, as a download asks it (the host routes each request to the
    task's partition and names the host)."""

    async def request(self, subject: Subject[Req, Rep], message: Req) -> Rep: ...

    def schedulers_answer(self) -> bool:
        """Some scheduler answered lately: one not answering is a partition moving."""
        ...

    async def announce(
        self, stored: StoredTask, *, peer_id: str | None = None, seed: bool = False
    ) -> None:
        """Everything held of the task, told again (a scheduler that lost it)."""
        ...

    def host(self) -> messages.Host: ...


class OriginReader(Protocol):
    """The origin's bytes: the source backend of the task's URL."""

    def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class Offers:
    """A parent's answer to ``/pieces``: its status, and its JSON body when 200."""

    status: int
    data: Any = None


class PieceClient(Protocol):
    """A parent's upload server: what it offers, and a piece's bytes."""

    async def offers(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        """Raises ``SwarmflyError`` (``unavailable``, ``timeout``, ``bad_request``)."""
        ...

    def piece(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        read_timeout: float,
    ) -> contextlib.AbstractAsyncContextManager[tuple[int, AsyncIterator[bytes]]]:
        """The status and the body's chunks of a ranged ``/data`` request. A connection
        that fails or a read that stalls, while opening or while the chunks are read, raises
        ``SwarmflyError`` (``unavailable``, ``timeout``)."""
        ...

    async def hand_back(
        self,
        address: str,
        task_id: str,
        number: int,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        """Give the seed that lent it a piece read from the origin here (``PUT
        /lent/{n}``); raises ``SwarmflyError`` as ``offers`` does."""
        ...


@dataclass(frozen=True)
class DownloadSettings:
    """The host's settings a download follows (``[peer]``)."""

    concurrency: int
    per_parent: int
    piece_timeout: float
    origin_concurrency: int
    lend_pieces: bool = False
    lend_sole: bool = False
    piece_spans: bool = False


@dataclass(frozen=True)
class HostBudget:
    """The host's download rate, shared by the downloads running on it."""

    bucket: TokenBucket
    downloads: Callable[[], int]

    def share(self) -> float:
        """One download's share of the host's rate (0: none set)."""
        return self.bucket.rate / max(1, self.downloads())


@dataclass(frozen=True)
class Links:
    """Everything a download reaches beyond its own task: ``scheduler`` is None on a host
    without a control plane (it reads the origin)."""

    scheduler: SchedulerLink | None
    parents: PieceClient
    settings: DownloadSettings
    budget: HostBudget
    clock: Clock
    metrics: PeerMetrics
    """The host's (a peer's or a storage's own registry)."""


_CHUNK = 256 * 1024


@dataclass(frozen=True)
class HttpPieces:
    """``PieceClient`` over aiohttp; ``session`` gives the host's pool (made on first use)."""

    session: Callable[[], aiohttp.ClientSession]

    async def offers(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        request = self.session().get(
            f"{address}/v1/tasks/{task_id}/pieces",
            params=dict(params),
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        )
        return await _json_answer(request, address, timeout)

    @contextlib.asynccontextmanager
    async def piece(
        self,
        address: str,
        task_id: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        read_timeout: float,
    ) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        try:
            async with self.session().get(
                f"{address}/v1/tasks/{task_id}/data",
                params=dict(params),
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_timeout),
                allow_redirects=False,  # a parent serves, it does not send us elsewhere
            ) as response:
                yield response.status, response.content.iter_chunked(_CHUNK)
        except TimeoutError:
            raise SwarmflyError("timeout", f"{address} stalled") from None
        except aiohttp.ClientError as exc:
            raise SwarmflyError("unavailable", connect_error_in_words(exc, address)) from None

    async def hand_back(
        self,
        address: str,
        task_id: str,
        number: int,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
    ) -> Offers:
        request = self.session().put(
            f"{address}/v1/tasks/{task_id}/lent/{number}",
            data=body,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        )
        return await _json_answer(request, address, timeout)


async def _json_answer(
    request: contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse],
    address: str,
    timeout: float,
) -> Offers:
    """A parent's answer: its status, and its JSON body when 200; its failures in words."""
    try:
        async with request as response:
            if response.status != 200:
                return Offers(response.status)
            return Offers(200, await response.json())
    except TimeoutError:
        raise SwarmflyError("timeout", f"{address} did not answer in {timeout:g}s") from None
    except aiohttp.ContentTypeError:
        raise SwarmflyError("bad_request", f"{address} sent no JSON") from None
    except aiohttp.ClientError as exc:
        raise SwarmflyError("unavailable", connect_error_in_words(exc, address)) from None
    except ValueError:
        raise SwarmflyError("bad_request", f"{address} sent malformed JSON") from None
