"""The OCI distribution words that the source, the mirror and preheat all use."""

from __future__ import annotations

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
"""The ``Accept`` of a manifest request: an index or a manifest, OCI's or Docker's."""
