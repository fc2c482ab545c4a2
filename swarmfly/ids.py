"""Task, peer and host ids, and the strict id patterns checked before an id touches a path
(piece arithmetic is ``swarmfly.content``'s)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

TASK_ID = re.compile(r"^[0-9a-f]{64}\Z")
NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})\Z")


@dataclass(frozen=True)
class SignedUrl:
    """A URL format that adds query parameters naming who signed it and until when: they
    differ each time the same object's URL is made, so they are not part of the task."""

    name: str
    markers: tuple[frozenset[str], ...]
    """The format is in use when the query holds every name of one of these sets: a plain
    server may use ``sig`` or ``expires`` for content, so a name alone proves nothing."""
    volatile: frozenset[str]
    path: re.Pattern[str] | None = None
    """When set, only URLs whose path matches use the format."""


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


SIGNED_URLS = (
    SignedUrl(
        "S3 SigV4",
        (_names("x-amz-signature"), _names("x-amz-credential"), _names("x-amz-algorithm")),
        _names(
            "x-amz-algorithm x-amz-credential x-amz-date x-amz-expires x-amz-signedheaders"
            " x-amz-signature x-amz-security-token"
        ),
    ),
    SignedUrl(
        "S3 SigV2",
        (_names("awsaccesskeyid signature"),),
        _names("awsaccesskeyid signature expires x-amz-security-token"),
    ),
    SignedUrl(
        "GCS V4",
        (_names("x-goog-signature"),),
        _names(
            "x-goog-algorithm x-goog-credential x-goog-date x-goog-expires x-goog-signedheaders"
            " x-goog-signature"
        ),
    ),
    SignedUrl(
        "GCS V2",
        (_names("googleaccessid signature"),),
        _names("googleaccessid signature expires"),
    ),
    SignedUrl(
        "Azure SAS",
        (_names("sig sv"),),
        _names(
            "sv ss srt sp se st spr sip sr si sdd sig skoid sktid skt ske sks skv saoid suoid"
            " scid ses"
        ),
    ),
    SignedUrl(
        "containerd mirror",
        (frozenset(),),
        _names("ns"),
        path=re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}\Z"),
    ),
)
"""Query names dropped from a task's URL, per format; names compare case-insensitively.
Response overrides (S3 ``response-*``, Azure ``rsc*``) stay: a caller chose them."""


def _volatile(names: frozenset[str], path: str) -> frozenset[str]:
    """The (lower-case) query names of ``names`` that a signing format in use adds."""
    dropped: set[str] = set()
    for signed in SIGNED_URLS:
        if signed.path is not None and not signed.path.match(path):
            continue
        if any(marker <= names for marker in signed.markers):
            dropped |= signed.volatile
    return frozenset(dropped)


def normalize_url(url: str, filtered: Collection[str] | None = None) -> str:
    """The URL as a task key: scheme and host lower-cased, fragment gone, query sorted, and
    without the parameters a signing format adds (``SIGNED_URLS``), so a re-signed URL is
    the same task while two objects a plain server tells apart by ``?sig=`` are not.

    ``filtered`` (dfget's ``--filtered-query-param``) replaces that default: exactly these
    names are dropped (without case), wherever they appear."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if filtered is None:
        dropped = _volatile(frozenset(k.lower() for k, _ in query), parts.path)
    else:
        dropped = frozenset(name.lower() for name in filtered)
    kept = sorted((k, v) for k, v in query if k.lower() not in dropped)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, urlencode(kept), ""))


def _filter_key(filtered: Collection[str] | None) -> list[str]:
    """A filter of one's own as a task-id input: ``?key=a`` with ``key`` filtered is not the
    task of the plain URL another requester asked for, only of those naming the same list."""
    if filtered is None:
        return []
    return ["filtered:" + "&".join(sorted({name.lower() for name in filtered}))]


def task_id(
    url: str,
    *,
    digest: str | None = None,
    tag: str = "",
    application: str = "",
    piece_length: int | None = None,
    etag: str | None = None,
    shared: bool = False,
    filtered: Collection[str] | None = None,
) -> str:
    """Keyed by the content digest when known, else by the normalised URL, the options and
    the origin's ETag (so content that changed at the origin is a new task, swarm-wide).

    A digest alone is the key only where its content may be ``shared`` across URLs: a
    registry the operator configured stated it for this requester's repository. Elsewhere
    the URL joins it, so naming a digest under a URL of one's own (or with ``--digest``)
    reaches no other origin's task. ``filtered``: the query names dropped from the URL
    instead of the default (``normalize_url``), itself a key input when given."""
    url_key = normalize_url(url, filtered)
    if digest and not shared:
        key = "\x00".join([digest, url_key, *_filter_key(filtered)])
    else:
        key = digest or "\x00".join(
            [url_key, tag, application, str(piece_length or ""), etag or "", *_filter_key(filtered)]
        )
    return hashlib.sha256(key.encode()).hexdigest()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; ``oci://`` reads over https.
    None for a URL with no host or a scheme with no default port."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme.lower() == "oci" else parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return scheme, parts.hostname.lower(), port


def keys_task(task: str, url: str, digest: str, filtered: Collection[str] | None = None) -> bool:
    """Is ``task`` the id of ``digest``'s content at ``url`` (or anywhere)?"""
    return task in (
        task_id(url, digest=digest, filtered=filtered),
        task_id(url, digest=digest, shared=True),
    )


def new_id(prefix: str) -> str:
    """A unique, NATS-token-safe id such as ``peer-3f9a…``."""
    return f"{prefix}-{os.urandom(6).hex()}"


def peer_id(host_id: str, task_id: str) -> str:
    """A host's peer on a task: stable, so a re-registration is the same peer, and derived,
    so a scheduler knows which host alone may speak for it."""
    return "p" + hashlib.sha256(f"{host_id}/{task_id}".encode()).hexdigest()[:24]


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def host_id_of(name: str) -> str:
    """The host id of a DNS name (a Kubernetes node or pod): a subject token, so a dot
    becomes ``_``, which no DNS name holds (distinct names stay distinct); a name past 64
    characters keeps 47 and a hash of the whole."""
    token = name.replace(".", "_")
    if len(token) > 64:
        token = f"{token[:47]}_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    if not _ID.fullmatch(token):
        raise ValueError(f"{name[:80]!r} is not a DNS name swarmfly can use as a host id")
    return token


def default_host_id(state_dir: str) -> str:
    """Stable per (hostname, state dir): several peers on one machine get distinct ids."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
    suffix = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]
    return f"{name}-{suffix}"


_URL_DIGEST = re.compile(r"(?:@|/blobs/)(sha256:[0-9a-f]{64})$")


def url_digest(url: str) -> str | None:
    """The content digest a URL names: an OCI blob (``oci://host/repo@sha256:…`` or a
    registry's ``/v2/<name>/blobs/sha256:…``), so the same blob is one task everywhere."""
    match = _URL_DIGEST.search(url.split("?", 1)[0].split("#", 1)[0])
    return match.group(1) if match else None


def check_digest(digest: str) -> str:
    """The hex part of ``sha256:HEX``; ValueError otherwise."""
    match = DIGEST.fullmatch(digest)
    if not match:
        raise ValueError(f"digest must be sha256:<64 hex>, got {digest[:80]!r}")
    return match.group(1)


def redact_url(url: str) -> str:
    """The URL without userinfo and query: safe to store and log."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        port = parts.port
    except ValueError:  # out of range: left out, not raised where a log line is made
        port = None
    if port:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
