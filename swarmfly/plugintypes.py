"""The types of the plugin API: what a plugin implements and what it is given.

Pure data and protocols, apart from pluggy: the cores (the scheduler's, the download's) use
these and import neither pluggy nor any plugin; the built-in defaults are handed to them.
Plugin authors import them from ``swarmfly.plugins``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from swarmfly.frozen import quick_init

# -- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceStat:
    """What an origin says about a URL before any byte is read."""

    size: int | None
    """Content length in bytes; None when the origin does not say (then it is streamed)."""
    ranges: bool
    """True when ``fetch`` can start at any offset cheaply (parallel range requests)."""
    etag: str | None = None
    digest: str | None = None
    """``sha256:HEX`` when the origin states the content digest (an OCI blob)."""


@runtime_checkable
class Source(Protocol):
    """A source backend: reads origins of some URL schemes.

    Credentials arrive in ``headers`` (``Authorization``) or come from the backend's own
    standard configuration (AWS variables for S3); a backend never logs them and never puts
    them in errors.
    """

    schemes: tuple[str, ...]
    """URL schemes this backend takes, lower case: ``("http", "https")``."""

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        """Size, range support and validators; raise ``SwarmflyError`` (``not_found``,
        ``source_error``, ``bad_request``) with a message that holds no secret."""
        ...

    def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Yield exactly bytes ``[start, end)`` (``end`` None: to the end of the content).

        Yielding fewer or more bytes than asked fails the piece, never the process.
        Cancellation (the consumer stops iterating) must release connections.
        """
        ...

    async def close(self) -> None:
        """Release connection pools at shutdown."""
        ...


@dataclass(frozen=True)
class SourceEntry:
    """One file a ``Lister`` found under a prefix or folder. The origin named it: callers
    treat ``path`` as untrusted (``swarmfly get -r`` refuses one that would leave its
    output directory)."""

    path: str
    """Where the file lies below the listed URL, ``/``-separated, as the origin names it."""
    url: str
    """The file's own URL, for this source's ``stat`` and ``fetch``: what a get downloads."""
    size: int | None = None
    digest: str | None = None
    """``sha256:HEX`` when the listing states it (a Hugging Face LFS file)."""


@runtime_checkable
class Lister(Protocol):
    """An optional capability of a ``Source``: the files under a prefix (``s3://b/p/``) or a
    repository folder, for ``swarmfly get --recursive``. A source that has an ``entries``
    method offers it; callers check with ``isinstance(source, Lister)``."""

    def entries(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[SourceEntry]:
        """Yield every file below ``url``, each once, page by page as the origin answers;
        the caller stops reading when it has enough (close connections in a ``finally``).
        Bound what one origin can make you do (pages, bytes per page); errors as ``stat``'s,
        ``not_found`` for a prefix or folder that holds nothing or does not exist."""
        ...


class OriginGuard(Protocol):
    """Where this process may connect for an origin (``[origins]``, ``swarmfly.origins``).

    A source that connects to hosts its URLs (or an origin's redirects and token realms) name
    asks before every connection; refusals are ``SwarmflyError("forbidden")``.
    """

    async def check(self, url: str) -> None:
        """Refuse ``url`` when its host, or any address the host resolves to, is denied."""
        ...

    def check_addresses(self, host: str, port: int | None, addresses: Sequence[str]) -> None:
        """Refuse the addresses a resolver just gave for ``host`` (they may differ from what
        ``check`` saw); for a source's own resolver."""
        ...


class SourceRegistry(Protocol):
    origins: OriginGuard
    """The process's origin policy, for sources that connect where a URL or redirect says."""

    def add(self, source: Source) -> None:
        """Make ``source`` serve its ``schemes``; a later plugin may not take a scheme that
        an earlier one registered (the conflict is reported by plugin name)."""
        ...


# -- piece-selection strategies ----------------------------------------------------------


@dataclass(frozen=True)
class PieceView:
    """What a strategy sees of one download when a parent has a free slot. Facts a later
    version adds come as new fields: a strategy written today keeps working."""

    candidates: Sequence[int]
    """Pieces that parent holds which nobody fetches yet and whose digest is known."""
    holders: Mapping[int, int]
    """How many of the child's parents hold each piece."""
    first_missing: int
    """The lowest piece not yet verified (what a stream waits for)."""
    piece_count: int
    rng: random.Random
    """Seeded with the peer's id: ties break the same way on a replay."""


Strategy = Callable[[PieceView], list[int]]
"""``strategy(view) -> pieces``: a pure function returning candidates in the order to fetch
them; pieces left out are not fetched now (a look-ahead window)."""


class StrategyRegistry(Protocol):
    def add(self, name: str, strategy: Strategy) -> None:
        """Offer ``strategy`` as ``name`` (``swarmfly get --strategy NAME``, ``peer.strategy``)."""
        ...


# -- parent evaluators -------------------------------------------------------------------


@quick_init
@dataclass(frozen=True, slots=True)
class Candidate:
    """What an evaluator may know of a peer: a parent candidate or the child."""

    peer_id: str
    host_type: str
    """``seed`` for storage instances and peers reading the origin, else ``normal``."""
    finished_pieces: int
    upload_slots: int
    uploads: int
    idc: str
    location: str
    """``country|region|zone``, most general first."""
    mean_cost_ms: float | None
    """Mean time this peer took to serve a piece lately; None before any."""
    useful_pieces: int | None = None
    """For a parent: pieces it holds (or, a seed, will hold) that the child lacks."""


@quick_init
@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the evaluator's calls of one decision share. Facts a later version adds come as
    new fields: an evaluator written today keeps working."""

    child: Candidate
    """The peer the parents are for."""
    total_pieces: int
    """The task's piece count (0 while its size is unknown)."""
    median_cost_ms: float | None
    """The median of the candidates' mean piece costs; None before any piece was timed."""


Evaluator = Callable[[Candidate, Evaluation], float]
"""``evaluate(parent, evaluation) -> score``: higher is better. A pure function; the scheduler
filters unusable parents (dead, blocklisted, corrupt, cycles) before it asks."""


class EvaluatorRegistry(Protocol):
    def add(self, name: str, evaluator: Evaluator) -> None:
        """Offer ``evaluator`` as ``name`` (the scheduler's ``evaluator`` setting)."""
        ...
