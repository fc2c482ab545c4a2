"""The one piece bitmap on the wire: which pieces of a task a set holds, in BitTorrent's
bitfield order (the most significant bit of byte 0 is piece 0), ``ceil(piece_count / 8)``
bytes, as unpadded base64url. A child's ``wants`` on the upload server and a peer's pieces in
``scheduler.state`` (the dashboard) are this; ``contracts/common.json#/$defs/piece_bitmap``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from swarmfly.errors import SwarmflyError

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def size(piece_count: int) -> int:
    """Characters of the bitmap of a task of ``piece_count`` pieces."""
    return (((piece_count + 7) // 8) * 4 + 2) // 3


def encode(pieces: Iterable[int], piece_count: int) -> str:
    bitmap = bytearray((piece_count + 7) // 8)
    for number in pieces:
        if 0 <= number < piece_count:
            bitmap[number // 8] |= 0x80 >> (number % 8)
    return base64.urlsafe_b64encode(bytes(bitmap)).rstrip(b"=").decode()


def decode(text: str, piece_count: int) -> set[int]:
    """The inverse of ``encode``; anything but a bitmap of exactly this task's size is a
    bad request."""
    if len(text) > size(piece_count) or not _BASE64URL.fullmatch(text):
        raise SwarmflyError("bad_request", "piece bitmap is not this task's, in base64url")
    try:
        bitmap = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SwarmflyError("bad_request", "piece bitmap is not base64url") from None
    if len(bitmap) != (piece_count + 7) // 8:
        raise SwarmflyError("bad_request", "piece bitmap does not match the task's pieces")
    return {
        index * 8 + bit
        for index, byte in enumerate(bitmap)
        if byte
        for bit in range(8)
        if byte & (0x80 >> bit) and index * 8 + bit < piece_count
    }
