"""The registry token flow (``WWW-Authenticate: Bearer realm=…,service=…,scope=…``).

An origin that answers 401 with a Bearer challenge gets a token from its realm, with the
client's own credentials (Basic) if it gave any; tokens are cached until they expire, per
realm, service, scope and credential, and never logged.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from swarmfly.errors import SwarmflyError, connect_error_in_words

_PARAM = re.compile(r'(\w+)="([^"]*)"')
DEFAULT_TTL = 60.0
MARGIN = 10.0


@dataclass(frozen=True)
class Challenge:
    realm: str
    service: str
    scope: str


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params = dict(_PARAM.findall(rest))
    realm = params.get("realm", "")
    if urlsplit(realm).scheme not in ("http", "https"):
        return None
    return Challenge(realm, params.get("service", ""), params.get("scope", ""))


class TokenCache:
    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], tuple[str, float]] = {}

    @staticmethod
    def _key(challenge: Challenge, headers: Mapping[str, str]) -> tuple[str, str, str, str, str]:
        credential = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
        basic = credential if credential.lower().startswith("basic ") else ""
        digest = hashlib.sha256(basic.encode()).hexdigest()
        return challenge.realm, challenge.service, challenge.scope, digest, basic

    def forget(self, challenge: Challenge, headers: Mapping[str, str]) -> None:
        """Drop a token the origin refused (rotated or revoked)."""
        self._tokens.pop(self._key(challenge, headers)[:4], None)

    async def token(
        self,
        session: aiohttp.ClientSession,
        challenge: Challenge,
        headers: Mapping[str, str],
    ) -> str:
        """A bearer token for the challenge, fetched with the caller's Basic credentials."""
        *key_parts, basic = self._key(challenge, headers)
        key = (key_parts[0], key_parts[1], key_parts[2], key_parts[3])
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        pairs = (("service", challenge.service), ("scope", challenge.scope))
        params = {name: value for name, value in pairs if value}
        request_headers = {"Authorization": basic} if basic else {}
        try:
            async with session.get(
                challenge.realm, params=params, headers=request_headers, allow_redirects=False
            ) as response:
                if response.status != 200:
                    raise SwarmflyError("source_error", f"token service answered {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            seconds = session.timeout.sock_connect
            words = connect_error_in_words(exc, challenge.realm, seconds=seconds)
            raise SwarmflyError("source_error", f"token service: {words}") from None
        except ValueError:  # the body is not JSON
            raise SwarmflyError("source_error", "token service sent no JSON") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise SwarmflyError("source_error", "token service sent no token")
        try:
            ttl = float(body.get("expires_in", DEFAULT_TTL))
        except (TypeError, ValueError):
            ttl = DEFAULT_TTL
        self._tokens[key] = (token, time.monotonic() + max(1.0, ttl - MARGIN))
        return token
