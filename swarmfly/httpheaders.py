"""HTTP header rules shared by the proxy and the sources that forward a caller's headers."""

from __future__ import annotations

HOP_BY_HOP = frozenset(
    {"connection", "content-length", "keep-alive", "te", "trailer", "transfer-encoding",
     "upgrade", "host", "proxy-authorization", "proxy-connection"}
)  # fmt: skip
"""Headers that belong to one connection: a caller's values would break the request."""
