"""The hf source: files of Hugging Face Hub repositories, read over the Hub's HTTP API as
huggingface_hub reads them.

``hf://OWNER/REPO[@REVISION]/PATH`` names a file of a model repository,
``hf://datasets/OWNER/REPO[@REVISION]/PATH`` one of a dataset (a revision holding ``/``, such
as ``refs/pr/1``, is written ``refs%2Fpr%2F1``). A branch or tag is resolved to its commit
once and kept ``REVISION_TTL`` seconds, so a stat and the fetches after it read one commit;
the file is then ``{endpoint}/{repo}/resolve/{commit}/{path}``, read through the http source
(ranged GETs, every redirect checked against ``[origins]``, credentials kept to the endpoint's
origin: a CDN redirect gets no token). An LFS file's sha256, which the Hub states on the
redirect, is its digest: every piece and the whole file are verified against it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, cast
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import orjson
from yarl import URL

from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.httpheaders import HOP_BY_HOP
from swarmfly.plugins import OriginGuard, SourceEntry, SourceRegistry, SourceStat, hookimpl
from swarmfly.plugins.sources.http import GuardedResolver, HttpSource, origin_of

REVISION_TTL = 60.0
"""How long a branch or tag stays resolved to the commit it named: long enough for one
download's stat and fetches, short enough that a new commit is seen soon."""
MAX_REDIRECTS = 5
RETRIES = 2
MAX_PAGES = 1000
"""Tree pages a listing reads at most (the Hub sends 1000 entries a page)."""
MAX_PAGE_BYTES = 16 * 1024 * 1024
"""Bytes of one tree page at most: a page is JSON held in memory whole."""
MAX_COMMITS = 1024
"""Revisions kept resolved at most; expired ones are dropped beyond that."""
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TOKEN_HINT = (
    "pass a token that may read it: --header 'Authorization: Bearer hf_…' "
    "or [plugins.hf] token_file"
)


@dataclass(frozen=True)
class Settings:
    """``[plugins.hf]`` in swarmfly's configuration file."""

    endpoint: str = "https://huggingface.co"
    """The Hub (or a mirror of its API); the only origin a token is sent to."""
    token_file: str = ""
    """A file holding the Hub token used when a request brings no Authorization header."""


@dataclass(frozen=True)
class HfFile:
    """What an ``hf://`` URL names."""

    kind: str
    """``models`` or ``datasets``, as the Hub's API paths say."""
    repo: str
    revision: str
    path: str

    @classmethod
    def from_url(cls, url: str, *, folder: bool = False) -> HfFile:
        """``folder``: the URL may name a whole repository or a folder in one (a listing's);
        its ``path`` is then ``""`` for the repository's top."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "hf":
            raise SwarmflyError("bad_request", "not an hf:// URL")
        if parts.query or parts.fragment:
            raise SwarmflyError("bad_request", "an hf:// URL has no ?query or #fragment")
        segments = [parts.netloc, *parts.path.split("/")[1:]]
        if folder and len(segments) > 2 and segments[-1] == "":  # a trailing slash
            segments.pop()
        kind = "models"
        if segments[0] == "datasets":
            kind, segments = "datasets", segments[1:]
        if len(segments) < (2 if folder else 3) or not all(segments):
            raise SwarmflyError(
                "bad_request", "an hf:// URL is hf://[datasets/]OWNER/REPO[@REV]/PATH"
            )
        owner, name = segments[0], segments[1]
        revision = "main"
        if "@" in name:
            name, revision = name.split("@", 1)
            revision = unquote(revision)
        if not (_SEGMENT.fullmatch(owner) and _SEGMENT.fullmatch(name)) or not revision:
            raise SwarmflyError("bad_request", "an hf:// URL names OWNER/REPO[@REV]")
        path = unquote("/".join(segments[2:]))
        if (path or not folder) and any(part in ("", ".", "..") for part in path.split("/")):
            raise SwarmflyError("bad_request", "an hf:// path has no empty, . or .. parts")
        return cls(kind, f"{owner}/{name}", revision, path)

    @property
    def shown(self) -> str:
        """For messages: what the user named."""
        return f"{self.kind[:-1]} {self.repo}"

    def revision_url(self, endpoint: str) -> str:
        return f"{endpoint}/api/{self.kind}/{self.repo}/revision/{quote(self.revision, safe='')}"

    def tree_url(self, endpoint: str, commit: str) -> str:
        folder = f"/{quote(self.path)}" if self.path else ""
        return f"{endpoint}/api/{self.kind}/{self.repo}/tree/{commit}{folder}?recursive=true"

    def url_at(self, commit: str, path: str) -> str:
        """The ``hf://`` URL of ``path`` in this repository at ``commit``."""
        kind = "" if self.kind == "models" else f"{self.kind}/"
        return f"hf://{kind}{self.repo}@{commit}/{quote(path)}"

    def resolve_url(self, endpoint: str, commit: str) -> str:
        prefix = "" if self.kind == "models" else f"/{self.kind}"
        return f"{endpoint}{prefix}/{self.repo}/resolve/{commit}/{quote(self.path)}"


def _unquote_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.removeprefix("W/")
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def _has_authorization(headers: Mapping[str, str]) -> bool:
    return any(k.lower() == "authorization" for k in headers)


class HfSource:
    schemes: tuple[str, ...] = ("hf",)

    def __init__(
        self,
        endpoint: str = "https://huggingface.co",
        *,
        token: str | None = None,
        guard: OriginGuard | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 30.0,
    ) -> None:
        scheme, _, _ = origin_of(endpoint)
        if scheme not in ("http", "https"):
            raise SwarmflyError("bad_request", "[plugins.hf] endpoint must be an http(s) URL")
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self.guard = guard
        self.http = HttpSource(guard=guard, timeout=timeout)
        """Reads the files: its redirects keep credentials to the endpoint's origin."""
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._commits: dict[tuple[str, str, str], tuple[str, float]] = {}
        """(kind, repo, revision) -> (commit, when it stops being trusted)."""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (
                aiohttp.TCPConnector(resolver=GuardedResolver(self.guard)) if self.guard else None
            )
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auto_decompress=False, connector=connector
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.http.close()

    def _credentials(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The caller's headers, with the configured token when they bring none."""
        out = dict(headers)
        if self._token and not _has_authorization(out):
            out["Authorization"] = f"Bearer {self._token}"
        return out

    async def _hub(
        self, method: str, url: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """One request to the endpoint, redirects not followed; 5xx and connection errors
        tried again ``RETRIES`` times."""
        headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        attempt = 0
        while True:
            if self.guard is not None:
                await self.guard.check(url)
            try:
                response = await self._client().request(
                    method, url, headers=headers, allow_redirects=False
                )
            except ValueError:  # aiohttp refuses e.g. control characters in a header value
                raise SwarmflyError("bad_request", "a request header is not valid HTTP") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt >= RETRIES:
                    words = connect_error_in_words(exc, url, seconds=self._timeout.sock_connect)
                    raise SwarmflyError("source_error", f"the Hub: {words}") from None
            else:
                if response.status < 500 or attempt >= RETRIES:
                    return response
                response.release()
            attempt += 1
            await asyncio.sleep(0.25 * 2 ** (attempt - 1))

    def _fail(
        self, response: aiohttp.ClientResponse, file: HfFile, headers: Mapping[str, str]
    ) -> NoReturn:
        """The Hub's refusal in words naming the repository, revision or path (never a
        credential); the Hub says which with ``X-Error-Code``. A 401/403 is the origin's
        refusal, ``source_error`` (exit 3), as for any origin: ``forbidden`` is the
        cluster's own rules."""
        error = response.headers.get("X-Error-Code", "")
        at = f"{file.shown}@{file.revision}"
        if error == "GatedRepo":
            raise SwarmflyError(
                "source_error", f"{file.shown} is gated: accept its conditions on the Hub and "
                f"{TOKEN_HINT}",
            )  # fmt: skip
        hint = "the token given may not read it" if _has_authorization(headers) else TOKEN_HINT
        if response.status in (401, 403):
            raise SwarmflyError(
                "source_error", f"{file.shown} is private, gated or missing (the Hub answered "
                f"{response.status}): {hint}",
            )  # fmt: skip
        if error in ("RepoNotFound", "RepositoryNotFound"):
            raise SwarmflyError("not_found", f"{file.shown} not found (if it is private, {hint})")
        if error == "RevisionNotFound":
            raise SwarmflyError("not_found", f"{file.shown} has no revision {file.revision!r}")
        if response.status == 404:
            raise SwarmflyError("not_found", f"{at} has no file {file.path!r}")
        raise SwarmflyError("source_error", f"the Hub answered {response.status} for {at}")

    async def commit(self, file: HfFile, headers: Mapping[str, str]) -> str:
        """The commit ``file.revision`` names now, or named less than ``REVISION_TTL`` ago."""
        if _COMMIT.fullmatch(file.revision):
            return file.revision  # a commit never moves
        key = (file.kind, file.repo, file.revision)
        known = self._commits.get(key)
        if known is not None and self._clock() < known[1]:
            return known[0]
        url = file.revision_url(self.endpoint)
        response = await self._hub("GET", url, {**headers, "Accept": "application/json"})
        try:
            if response.status == 404 and not response.headers.get("X-Error-Code"):
                raise SwarmflyError("not_found", f"{file.shown} has no revision {file.revision!r}")
            if response.status != 200:
                self._fail(response, file, headers)
            try:
                sha = orjson.loads(await response.read()).get("sha")
            except (orjson.JSONDecodeError, AttributeError, aiohttp.ClientError):
                sha = None
        finally:
            response.release()
        if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
            raise SwarmflyError("source_error", f"the Hub named no commit for {file.shown}")
        now = self._clock()
        if len(self._commits) >= MAX_COMMITS:
            self._commits = {k: v for k, v in self._commits.items() if v[1] > now}
        self._commits[key] = (sha, now + REVISION_TTL)
        return sha

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        file = HfFile.from_url(url)
        request = self._credentials(headers)
        commit = await self.commit(file, request)
        target = file.resolve_url(self.endpoint, commit)
        origin = origin_of(target)
        for _ in range(MAX_REDIRECTS):  # a renamed repository redirects on the endpoint
            response = await self._hub("HEAD", target, {**request, "Accept-Encoding": "identity"})
            response.release()
            location = response.headers.get("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                target = str(response.url.join(URL(location)))
                if origin_of(target) == origin:
                    continue
                if self.guard is not None:  # refused now rather than on the first piece
                    await self.guard.check(target)
            elif response.status >= 300:
                self._fail(response, file, request)
            return self._stat_of(response, file, commit)
        raise SwarmflyError("source_error", f"too many redirects for {file.shown}")

    @staticmethod
    def _stat_of(response: aiohttp.ClientResponse, file: HfFile, commit: str) -> SourceStat:
        """The Hub's metadata headers, as huggingface_hub reads them: an LFS file's are
        ``X-Linked-*`` on the redirect to its storage, a small file's the plain ones."""
        served = response.headers.get("X-Repo-Commit")
        if served is not None and served != commit:
            raise SwarmflyError(
                "source_error", f"the Hub served commit {served[:12]} of {file.shown}, "
                f"not {commit[:12]}",
            )  # fmt: skip
        linked = _unquote_etag(response.headers.get("X-Linked-Etag"))
        etag = linked or _unquote_etag(response.headers.get("ETag"))
        size_text = response.headers.get("X-Linked-Size") or response.headers.get("Content-Length")
        size = int(size_text) if size_text and size_text.isdigit() else None
        digest = f"sha256:{linked}" if linked and _SHA256.fullmatch(linked) else None
        return SourceStat(size, size is not None, f'"{etag}"' if etag else None, digest)

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        file = HfFile.from_url(url)
        request = self._credentials(headers)
        commit = await self.commit(file, request)
        chunks = self.http.fetch(file.resolve_url(self.endpoint, commit), request, start, end)
        async with aclosing(cast(AsyncGenerator[bytes, None], chunks)) as stream:
            async for chunk in stream:
                yield chunk

    async def entries(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[SourceEntry]:
        """Every file of the repository (or of a folder in it) at the commit its revision
        names now, from the Hub's tree API page by page (``Link: rel="next"``, on the Hub's
        origin only: the token goes with it). Each entry's URL names that commit, so every
        file of one listing comes from one commit."""
        folder = HfFile.from_url(url, folder=True)
        request = self._credentials(headers)
        commit = await self.commit(folder, request)
        page_url: str | None = folder.tree_url(self.endpoint, commit)
        top = f"{folder.path}/" if folder.path else ""
        found = False
        for _ in range(MAX_PAGES):
            if page_url is None:
                break
            response = await self._hub("GET", page_url, {**request, "Accept": "application/json"})
            try:
                if response.status != 200:
                    self._fail(response, folder, request)
                page = await _json_of(response, folder)
                page_url = _next_page(response, self.endpoint, folder)
            finally:
                response.release()
            for item in page:
                entry = _entry_of(item, folder, commit, top)
                if entry is not None:
                    found = True
                    yield entry
        else:
            if page_url is not None:
                raise SwarmflyError(
                    "source_error", f"the Hub listed more than {MAX_PAGES} pages of {folder.shown}"
                )
        if not found:
            where = f"{folder.path!r}" if folder.path else "it"
            raise SwarmflyError(
                "not_found", f"{folder.shown}@{folder.revision}: {where} holds no file"
            )


async def _json_of(response: aiohttp.ClientResponse, folder: HfFile) -> list[object]:
    """A tree page: a JSON list, at most ``MAX_PAGE_BYTES``."""
    body = bytearray()
    try:
        async for chunk in response.content.iter_chunked(256 * 1024):
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                raise SwarmflyError(
                    "source_error", f"a tree page of {folder.shown} exceeds {MAX_PAGE_BYTES} bytes"
                )
        page = orjson.loads(body)
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        page = None
    if not isinstance(page, list):
        raise SwarmflyError("source_error", f"the Hub sent no file list for {folder.shown}")
    return page


def _next_page(response: aiohttp.ClientResponse, endpoint: str, folder: HfFile) -> str | None:
    link = response.links.get("next")
    if link is None:
        return None
    target = str(response.url.join(URL(str(link.get("url", "")))))
    if origin_of(target) != origin_of(endpoint):  # the token must not follow it elsewhere
        raise SwarmflyError("source_error", f"the Hub's next page of {folder.shown} is elsewhere")
    return target


def _entry_of(item: object, folder: HfFile, commit: str, top: str) -> SourceEntry | None:
    """One file of a tree page (directories are left out: their files are listed too)."""
    if not isinstance(item, dict) or item.get("type") != "file":
        return None
    path = item.get("path")
    if not isinstance(path, str) or not path.startswith(top) or len(path) == len(top):
        raise SwarmflyError("source_error", f"the Hub listed a file outside {folder.shown}/{top}")
    size = item.get("size")
    lfs = item.get("lfs")
    oid = lfs.get("oid") if isinstance(lfs, dict) else None
    digest = f"sha256:{oid}" if isinstance(oid, str) and _SHA256.fullmatch(oid) else None
    return SourceEntry(
        path[len(top) :],
        folder.url_at(commit, path),
        size=size if isinstance(size, int) and size >= 0 else None,
        digest=digest,
    )


def _read_token(token_file: str) -> str | None:
    if not token_file:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as exc:
        raise SwarmflyError(
            "bad_request", f"[plugins.hf] token_file {token_file}: {exc.strerror}"
        ) from None
    return token or None


@hookimpl
def swarmfly_settings_class() -> type[Settings]:
    return Settings


@hookimpl
def swarmfly_register_sources(register: SourceRegistry, settings: Settings) -> None:
    token = _read_token(settings.token_file)
    register.add(HfSource(settings.endpoint, token=token, guard=register.origins))
