"""The s3 source: ``s3://bucket/key`` read through aiobotocore.

Endpoint, region and credentials come from the standard AWS variables and config files, as
botocore reads them (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_PROFILE``, ``~/.aws/…``), so
an operator configures swarmfly's S3 access exactly as the AWS CLI's; nothing here reads the
environment itself. Errors carry only S3's error code: botocore's messages can quote request
details (an S3 ``SignatureDoesNotMatch`` body holds the string to sign).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiohttp

from swarmfly.errors import SwarmflyError, connect_error_in_words, in_words
from swarmfly.plugins import SourceEntry, SourceRegistry, SourceStat, hookimpl

CHUNK = 256 * 1024
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404"})
_ERROR_CODE = re.compile(r"[A-Za-z0-9.]{1,64}")
MAX_PAGES = 10_000
"""Listing pages read at most (1000 keys each): a server that keeps answering "there is
more" with empty pages must not keep a listing going for ever."""


@dataclass(frozen=True)
class S3Object:
    """Where an ``s3://`` URL points; the key is percent-decoded, so a key holding ``?``,
    ``#`` or ``%`` is written ``%3F``, ``%23``, ``%25``."""

    bucket: str
    key: str
    version_id: str | None = None

    @classmethod
    def from_url(cls, url: str) -> S3Object:
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise SwarmflyError("bad_request", "not an s3:// URL")
        key = unquote(parts.path[1:])
        if not parts.netloc or not key:
            raise SwarmflyError("bad_request", "an S3 URL is s3://BUCKET/KEY")
        if parts.fragment:
            raise SwarmflyError("bad_request", "an S3 URL has no #fragment")
        version_id = None
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name != "versionId" or not value or version_id is not None:
                raise SwarmflyError("bad_request", "an S3 URL takes only ?versionId=ID")
            version_id = value
        return cls(parts.netloc, key, version_id)

    def params(self) -> dict[str, str]:
        params = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id is not None:
            params["VersionId"] = self.version_id
        return params


def prefix_of(url: str) -> tuple[str, str]:
    """The bucket and key prefix an ``s3://BUCKET[/PREFIX]`` listing names; the prefix is a
    folder: ``s3://b/logs`` lists ``logs/…``, not ``logs-old/…``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise SwarmflyError("bad_request", "an S3 prefix is s3://BUCKET/PREFIX/")
    if parts.query or parts.fragment:
        raise SwarmflyError("bad_request", "an S3 prefix has no ?query or #fragment")
    prefix = unquote(parts.path[1:])
    return parts.netloc, prefix if not prefix or prefix.endswith("/") else f"{prefix}/"


def _failures() -> tuple[type[Exception], ...]:
    """What a call of the S3 client raises when S3 fails or cannot be reached. botocore is
    imported here, not with the plugin: every service loads the plugins, few read S3, and
    botocore costs each one about 10 MiB and a fifth of a second at start."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError)


def _fail(exc: Exception, endpoint: str | None = None) -> NoReturn:
    """Turn a botocore failure into a SwarmflyError naming only S3's code or, when S3 could
    not be reached, the endpoint's host and port (no request detail, no chained exception
    that a traceback would print)."""
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = str(error.get("Code", ""))
        code = code if _ERROR_CODE.fullmatch(code) else str(status or "error")
        if code in _NOT_FOUND or status == 404:
            raise SwarmflyError("not_found", f"s3 answered {code}") from None
        raise SwarmflyError("source_error", f"s3 answered {code}") from None
    if isinstance(exc, ParamValidationError):
        raise SwarmflyError("bad_request", "invalid S3 bucket or key") from None
    if isinstance(exc, BotoCoreError) and "endpoint_url" in exc.kwargs:  # not reached
        inner = exc.kwargs.get("error")  # what aiohttp raised, when botocore kept it
        cause = inner if isinstance(inner, BaseException) else exc
        words = connect_error_in_words(cause, str(exc.kwargs["endpoint_url"]))
    elif isinstance(exc, BotoCoreError):  # its own words: no credentials, no region…
        words = in_words(exc)
    else:  # aiohttp's, reading a body
        words = connect_error_in_words(exc, endpoint)
    raise SwarmflyError("source_error", f"s3: {words}") from None


def _sha256_digest(head: Mapping[str, Any]) -> str | None:
    """``sha256:HEX`` from S3's checksum only when S3 says it covers the whole object: a
    composite (multipart) checksum is a digest of part digests, and some servers (moto) send
    one with no type and no ``-N`` mark. A wrong digest would fail every download."""
    value = head.get("ChecksumSHA256")
    if not isinstance(value, str) or head.get("ChecksumType") != "FULL_OBJECT":
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return f"sha256:{raw.hex()}" if len(raw) == 32 else None


class S3Source:
    schemes: tuple[str, ...] = ("s3",)

    def __init__(self, *, max_pool_connections: int = 32) -> None:
        self.max_pool_connections = max_pool_connections
        self._stack: AsyncExitStack | None = None
        self._client: Any = None  # aiobotocore ships no type stubs
        self._lock = asyncio.Lock()

    async def _s3(self) -> Any:
        """One client, made on first use: it belongs to the event loop running then (there is
        none at registration), and making it resolves credentials, which may call an
        instance-metadata service that start-up must not wait for."""
        async with self._lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                stack = AsyncExitStack()
                config = AioConfig(max_pool_connections=self.max_pool_connections)
                try:
                    self._client = await stack.enter_async_context(
                        get_session().create_client("s3", config=config)
                    )
                except _failures() as exc:
                    _fail(exc)
                self._stack = stack
            return self._client

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        target = S3Object.from_url(url)
        client = await self._s3()
        try:
            head = await client.head_object(**target.params(), ChecksumMode="ENABLED")
        except _failures() as exc:
            _fail(exc, client.meta.endpoint_url)
        return SourceStat(
            size=int(head["ContentLength"]),
            ranges=True,
            etag=head.get("ETag"),
            digest=_sha256_digest(head),
        )

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        target = S3Object.from_url(url)
        if start < 0 or (end is not None and end < start):
            raise SwarmflyError("bad_request", f"invalid byte range [{start}, {end})")
        if end == start:
            return
        params = target.params()
        ranged = start > 0 or end is not None
        if ranged:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        client = await self._s3()
        body: Any = None
        try:
            response = await client.get_object(**params)
            body = response["Body"]
            if ranged and response["ResponseMetadata"]["HTTPStatusCode"] != 206:
                raise SwarmflyError("source_error", "s3 ignored the Range request")
            expected = int(response["ContentLength"]) if end is None else end - start
            received = 0
            async for chunk in body.iter_chunks(CHUNK):
                received += len(chunk)
                if received > expected:
                    raise SwarmflyError("source_error", "s3 sent more bytes than asked")
                yield chunk
            if received != expected:
                raise SwarmflyError("source_error", f"s3 sent {received} of {expected} bytes")
        except _failures() as exc:
            _fail(exc, client.meta.endpoint_url)
        finally:
            if body is not None:
                body.close()  # a body not read to the end holds its pooled connection

    async def entries(self, url: str, headers: Mapping[str, str]) -> AsyncGenerator[SourceEntry]:
        """Every object below the prefix (``ListObjectsV2``, page by page); keys ending in
        ``/`` are folder markers, not files."""
        bucket, prefix = prefix_of(url)
        client = await self._s3()
        params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        found = False
        try:
            for _ in range(MAX_PAGES):
                page = await client.list_objects_v2(**params)
                for item in page.get("Contents", ()):
                    key = item.get("Key")
                    if not isinstance(key, str) or not key.startswith(prefix):
                        raise SwarmflyError("source_error", "s3 listed a key outside the prefix")
                    if key.endswith("/"):
                        continue
                    found = True
                    yield SourceEntry(
                        key[len(prefix) :],
                        f"s3://{bucket}/{quote(key, safe='/')}",
                        size=int(item["Size"]) if isinstance(item.get("Size"), int) else None,
                    )
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not isinstance(token, str):
                    break
                params["ContinuationToken"] = token
            else:
                raise SwarmflyError("source_error", f"s3 listed more than {MAX_PAGES} pages")
        except _failures() as exc:
            _fail(exc, client.meta.endpoint_url)
        if not found:
            raise SwarmflyError("not_found", f"s3://{bucket}/{prefix} holds no object")


@hookimpl
def swarmfly_register_sources(register: SourceRegistry) -> None:
    register.add(S3Source())
