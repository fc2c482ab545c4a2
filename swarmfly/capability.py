"""Capabilities: what lets a peer read a task's pieces from another host's upload server.

The scheduler that owns a task signs, with every schedule it sends a child, a token naming the
task, the child and an expiry (Ed25519: an upload server checks it with the schedulers' public
key and no round trip, and a host that can check tokens cannot make them). A piece is served
only against a token for its task that has not expired: whoever merely reaches a port, or is a
cluster member that was never scheduled for the task, reads nothing.

Pure: keys and the current time are passed in.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from swarmfly.errors import SwarmflyError
from swarmfly.ids import NODE_ID, TASK_ID

TOKEN_SECONDS = 900
"""A token's life: a child asks for new parents every second or so, each answer carrying a
fresh token, so this only bounds how long a token that leaked stays good."""
REUSE_SECONDS = 30
"""Tokens minted within the same such window for one child are one token (see ``mint``)."""
MAX_MINTED = 100_000
"""Tokens kept for reuse at most (about 300 bytes each)."""
MAX_TOKEN = 256
_TOKEN = re.compile(r"^v1\.([A-Za-z0-9_-]{1,200})\.([A-Za-z0-9_-]{86})\Z")
_KEY = re.compile(r"^[A-Za-z0-9_-]{43}\Z")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CapabilityError(SwarmflyError):
    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


@dataclass(frozen=True)
class Grant:
    """What a valid token says: this peer may read this task until then."""

    task_id: str
    peer_id: str
    expires: int


class Signer:
    """The schedulers' side: one key the whole cluster's schedulers share."""

    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        self._minted: dict[tuple[str, str, int], str] = {}
        self._minted_expiry = 0

    @classmethod
    def generate(cls) -> Signer:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def seed(self) -> bytes:
        return bytes(self._key)

    @property
    def verify_key(self) -> str:
        """The public half, as heartbeat replies hand it to hosts."""
        return _b64(bytes(self._key.verify_key))

    def mint(self, task_id: str, peer_id: str, now: float, seconds: int = TOKEN_SECONDS) -> str:
        """A token good for ``seconds`` to ``seconds + REUSE_SECONDS``: the expiry is rounded
        up, so every schedule a child gets within that window carries the same token, and a
        signature (a tenth of a decision's cost) is made once per child and window."""
        expires = -(-(int(now) + seconds) // REUSE_SECONDS) * REUSE_SECONDS
        if expires != self._minted_expiry or len(self._minted) >= MAX_MINTED:
            self._minted.clear()
            self._minted_expiry = expires
        key = (task_id, peer_id, seconds)
        token = self._minted.get(key)
        if token is None:
            payload = f"{task_id}:{peer_id}:{expires}".encode()
            signature = self._key.sign(payload).signature
            token = self._minted[key] = f"v1.{_b64(payload)}.{_b64(signature)}"
        return token


def verify_key(text: str) -> nacl.signing.VerifyKey:
    """A public key as heartbeat replies carry it; ValueError when it is not one."""
    if not _KEY.fullmatch(text):
        raise ValueError("not a capability verify key")
    return nacl.signing.VerifyKey(_unb64(text))


def check(
    token: str | None, keys: Iterable[nacl.signing.VerifyKey], task_id: str, now: float
) -> Grant:
    """The grant a token carries, if a known key signed it for ``task_id`` and it has not
    expired; ``CapabilityError`` (code ``forbidden``) otherwise."""
    if not token:
        raise CapabilityError("a capability for the task is required")
    match = _TOKEN.fullmatch(token) if len(token) <= MAX_TOKEN else None
    if match is None:
        raise CapabilityError("malformed capability")
    try:
        payload, signature = _unb64(match[1]), _unb64(match[2])
    except (binascii.Error, ValueError):
        raise CapabilityError("malformed capability") from None
    if not any(_signed(key, payload, signature) for key in keys):
        raise CapabilityError("capability not signed by this cluster's schedulers")
    task, _, rest = payload.decode("ascii", "replace").partition(":")
    peer, _, expires = rest.partition(":")
    if not (TASK_ID.fullmatch(task) and NODE_ID.fullmatch(peer) and expires.isdigit()):
        raise CapabilityError("malformed capability")
    if task != task_id:
        raise CapabilityError("capability is for another task")
    if int(expires) <= now:
        raise CapabilityError("capability expired")
    return Grant(task, peer, int(expires))


def _signed(key: nacl.signing.VerifyKey, payload: bytes, signature: bytes) -> bool:
    try:
        key.verify(payload, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True
