"""Per-host NATS identities for Kubernetes, through nats-server's auth callout, answered by
the schedulers when ``[callout] issuer_seed`` is set (docs/security.md, "Kubernetes").

A DaemonSet cannot hand each node its own NKey: every pod of it gets the same Secret. What
each pod does get is its own bound service-account token, signed by the cluster and naming
the pod's service account, pod and node (Kubernetes 1.30 and later). A peer or storage pod
connects with that token; nats-server asks this service, which checks the token against the
cluster's signing keys (JWKS) and answers with a NATS user whose permissions are that host's
alone: a peer's host id is its node's name, a storage's its pod's. The scheduler and the CLI
keep their NKeys and bypass the callout (``auth_users``).

The account key that signs those users stays with the schedulers, which already hold the
cluster's capability key and hear every host; it never reaches the nodes whose identities
it vouches for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import nkeys
import orjson

from swarmfly.bus import AUTH_CALLOUT, Bus
from swarmfly.config import CalloutConfig, Config
from swarmfly.credentials import inbox_prefix, permissions
from swarmfly.ids import host_id_of

log = logging.getLogger(__name__)

SUBJECT = AUTH_CALLOUT
"""Where nats-server sends each connection's authorization request."""
MAX_TOKEN = 16 * 1024
"""A bound service-account token is about 1 KiB; anything far larger is refused unread."""
MAX_JWKS = 1 << 20
JWKS_REFRESH = 3600.0
"""Keys are fetched again at least this often (the cluster rotates them)."""
JWKS_RETRY = 30.0
"""An unknown key id fetches the keys again, at most this often: a stream of forged tokens
naming made-up key ids does not become a stream of requests to the API server."""
LEEWAY = 30
"""Seconds of clock skew allowed on a token's times."""
ALGORITHMS = ["RS256", "ES256", "ES384", "PS256"]
"""What Kubernetes signs service-account tokens with; never ``none`` or an HMAC."""
HOST_CLAIM = {"peer": "node", "storage": "pod"}
"""Which of the token's ``kubernetes.io`` objects names the host: a peer is one per node (a
DaemonSet), a storage one per pod (a StatefulSet)."""


class Refused(Exception):
    """A connection this service does not let in; the text goes to nats-server's log."""


@dataclass(frozen=True)
class Workload:
    role: str
    host_id: str
    name: str
    """Who the connection is, for nats-server's logs and monitoring (never the token)."""
    expires: int
    """The token's expiry (Unix s): the NATS user ends with it, and the client reconnects
    with the token its kubelet renewed."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"}))


def encode_nats_jwt(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    """A NATS JWT (nats-io/jwt v2): ``jti`` the hash of the claims, signed with the NKey."""
    claims = {**claims, "iss": signer.public_key.decode(), "iat": int(time.time()), "jti": ""}
    digest = hashlib.new("sha512_256", orjson.dumps(claims, option=orjson.OPT_SORT_KEYS))
    claims["jti"] = base64.b32encode(digest.digest()).decode().rstrip("=")
    body = f"{_HEADER}.{_b64(orjson.dumps(claims))}"
    return f"{body}.{_b64(signer.sign(body.encode()))}"


def decode_unverified(token: str) -> dict[str, Any]:
    """The claims of a JWT whose signature this service has no key to check: nats-server's
    request, which only nats-server can publish on SUBJECT (no identity we ship may)."""
    try:
        claims = orjson.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError) as exc:
        raise Refused(f"not a JWT: {exc}") from None
    if not isinstance(claims, dict):
        raise Refused("not a JWT: its claims are not an object")
    return claims


def jwt_permissions(rules: dict[str, Any]) -> dict[str, Any]:
    """The nats-server ``permissions`` block of credentials.permissions, as a user JWT's."""
    out: dict[str, Any] = {"pub": rules["publish"], "sub": rules["subscribe"]}
    responses = rules.get("allow_responses")
    if responses is True:
        out["resp"] = {"max": 1, "ttl": 0}  # nats-server's defaults: one reply, 2 minutes
    elif isinstance(responses, dict):
        hours = float(str(responses["expires"]).removesuffix("h"))
        out["resp"] = {"max": responses["max"], "ttl": int(hours * 3600 * 1e9)}
    return out


def user_claims(workload: Workload, user_nkey: str, prefix: str, account: str) -> dict[str, Any]:
    """The NATS user a workload becomes: its role's permissions under its own host id and
    inbox, as ``python -m swarmfly.credentials`` writes them for compose."""
    hosted = workload.role in HOST_CLAIM
    inbox = f"{inbox_prefix(workload.role)}_{workload.host_id}" if hosted else None
    rules = permissions(workload.role, prefix, workload.host_id if hosted else "*", inbox)
    return {
        "sub": user_nkey,
        "aud": account,
        "name": workload.name,
        "exp": workload.expires,
        "nats": {
            **jwt_permissions(rules),
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        },
    }


class Keys:
    """The cluster's token-signing keys (a JWKS), from a file or an HTTPS URL (the API
    server's ``/openid/v1/jwks``), fetched again on rotation."""

    def __init__(self, settings: CalloutConfig, clock: Callable[[], float] = time.monotonic):
        if not settings.jwks:
            raise ValueError("[callout] jwks: a JWKS file or https:// URL is required")
        self.settings, self.clock = settings, clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -JWKS_REFRESH
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = self.clock()
        stale = now - self._fetched > JWKS_REFRESH
        unknown = (kid or "") not in self._keys and now - self._fetched > JWKS_RETRY
        if stale or unknown:
            async with self._lock:
                if self._fetched < now:
                    await self._load()
                    self._fetched = self.clock()
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            raise Refused(f"token signed with unknown key {kid!r}")
        return found

    async def _load(self) -> None:
        source = str(self.settings.jwks)
        try:
            if source.startswith("https://"):
                raw = await self._fetch(source)
            elif source.startswith("http://"):
                raise ValueError("[callout] jwks: only https:// URLs (or a file)")
            else:
                raw = Path(source).read_bytes()[:MAX_JWKS]
            keyset = jwt.PyJWKSet.from_dict(orjson.loads(raw))
        except (OSError, ValueError, aiohttp.ClientError, jwt.PyJWTError) as exc:
            log.warning("callout: cannot load the JWKS from %s: %s", source, exc)
            return  # the keys held so far stay in use
        self._keys = {str(k.key_id or ""): k for k in keyset.keys}

    async def _fetch(self, url: str) -> bytes:
        context = ssl.create_default_context(cafile=self.settings.jwks_ca)
        headers = {}
        if self.settings.jwks_token_file:
            bearer = Path(self.settings.jwks_token_file).read_text().strip()
            headers["Authorization"] = f"Bearer {bearer}"
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers, ssl=context) as response,
        ):
            response.raise_for_status()
            return await response.content.read(MAX_JWKS)


class Verifier:
    """Which workload a service-account token belongs to, or Refused."""

    def __init__(self, settings: CalloutConfig, keys: Keys):
        if not settings.token_issuer:
            raise ValueError("[callout] token_issuer: the cluster's service-account issuer")
        self.settings, self.keys = settings, keys
        self.roles = {
            subject: role
            for role in ("scheduler", "storage", "peer")
            for subject in getattr(settings, role)
        }
        if not self.roles:
            raise ValueError("[callout] names no service account (peer, storage, scheduler)")

    async def workload(self, token: str) -> Workload:
        if not token:
            raise Refused("no token")
        if len(token) > MAX_TOKEN:
            raise Refused(f"token longer than {MAX_TOKEN} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Refused(f"not a JWT: {exc}") from None
        key = await self.keys.key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self.settings.audience,
                issuer=self.settings.token_issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Refused(f"token refused: {exc}") from None
        subject = str(claims["sub"])
        role = self.roles.get(subject)
        if role is None:
            raise Refused(f"{subject} is not a swarmfly service account")
        name = subject
        host_id = "*"
        if role in HOST_CLAIM:
            bound = claims.get("kubernetes.io")
            held = bound.get(HOST_CLAIM[role]) if isinstance(bound, dict) else None
            host_name = held.get("name") if isinstance(held, dict) else None
            if not isinstance(host_name, str) or not host_name:
                raise Refused(
                    f"the token of {subject} names no {HOST_CLAIM[role]}"
                    " (a bound token from Kubernetes 1.30 or later is needed)"
                )
            try:
                host_id = host_id_of(host_name)
            except ValueError as exc:
                raise Refused(str(exc)) from None
            name = f"{role}:{host_id}"
        return Workload(role, host_id, name, int(claims["exp"]))


class Callout:
    """Answers nats-server's authorization requests: a user JWT for a verified workload, an
    error (the connection refused) for anything else."""

    def __init__(
        self, verifier: Verifier, signer: nkeys.KeyPair, prefix: str, account: str
    ) -> None:
        self.verifier, self.signer, self.prefix, self.account = verifier, signer, prefix, account

    async def answer(self, request: bytes) -> bytes:
        claims = decode_unverified(request.decode(errors="replace"))
        nats_claims = claims.get("nats")
        if not isinstance(nats_claims, dict):
            raise Refused("not an authorization request")
        user_nkey = str(nats_claims.get("user_nkey", ""))
        server = nats_claims.get("server_id")
        server_id = str(server.get("id", "")) if isinstance(server, dict) else ""
        if not user_nkey or not server_id:
            raise Refused("an authorization request without user_nkey or server_id")
        response: dict[str, Any] = {
            "sub": user_nkey,
            "aud": server_id,
            "nats": {"type": "authorization_response", "version": 2},
        }
        options = nats_claims.get("connect_opts")
        token = options.get("auth_token") if isinstance(options, dict) else None
        try:
            workload = await self.verifier.workload(token if isinstance(token, str) else "")
        except Refused as exc:
            response["nats"]["error"] = str(exc)
            client = nats_claims.get("client_info")
            host = client.get("host") if isinstance(client, dict) else "?"
            log.warning("callout: refused a connection from %s: %s", host, exc)
        else:
            user = user_claims(workload, user_nkey, self.prefix, self.account)
            response["nats"]["jwt"] = encode_nats_jwt(user, self.signer)
            log.info("callout: %s connected", workload.name)
        return encode_nats_jwt(response, self.signer).encode()


def callout_for(config: Config) -> Callout:
    """The callout of ``[callout]``; ValueError naming the setting that cannot work."""
    settings = config.callout
    if not settings.issuer_seed:
        raise ValueError("[callout] issuer_seed: the account NKey seed (SA…) file is required")
    where = settings.issuer_seed
    try:
        seed = Path(where).expanduser().read_bytes().strip()
        signer = nkeys.from_seed(bytearray(seed))
    except OSError as exc:
        raise ValueError(f"[callout] issuer_seed: {exc.strerror}: {where}") from None
    except (nkeys.NkeysError, ValueError):
        raise ValueError(f"[callout] issuer_seed: {where} holds no NKey seed") from None
    if not signer.public_key.startswith(b"A"):
        raise ValueError("[callout] issuer_seed: an account seed (SA…) is needed, not a user's")
    verifier = Verifier(settings, Keys(settings))
    return Callout(verifier, signer, config.nats.prefix, settings.account)


QUEUE = "swarmfly-callout"
"""Every scheduler subscribes; each request goes to one of them."""


async def serve(bus: Bus, callout: Callout) -> None:
    async def answer(request: bytes) -> bytes | None:
        try:
            return await callout.answer(request)
        except Refused as exc:  # not even a request to answer
            log.warning("callout: ignored a message on %s: %s", SUBJECT, exc)
            return None

    await bus.answer_auth_callout(answer, queue=QUEUE)
