"""A finished file moved to its output name: replacing what is there only when asked (dfget's
``--overwrite``), else only where nothing is, checked and done in one step so that a file
that appeared after the request was checked is not replaced either. The standard library
only: `swarmfly get` over the local socket loads it (``swarmfly.get.socket_client``)."""

from __future__ import annotations

import errno
import os

from swarmfly.errors import SwarmflyError

NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK})
"""What ``link`` raises on a filesystem without hard links (FAT, some FUSE and SMB mounts)."""


def place_file(
    tmp: str, name: str, *, overwrite: bool, folder: int | None = None, shown: str = ""
) -> None:
    """``tmp`` to ``name`` (both in ``folder``, an open directory, when given), atomically:
    the name holds the old file or the whole new one, never a part. Without ``overwrite``, an
    existing ``name`` is a ``bad_request`` naming it and is left as it was; the new file is
    hard-linked in (``link`` fails where the name exists), since ``rename`` has no such mode
    in Python's standard library. ``tmp`` stays for the caller to remove; ``shown``: the
    output's whole path, for the error (``name`` where not given)."""
    if overwrite:
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
        return
    try:
        os.link(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except FileExistsError:
        raise refused_output(shown or name, "it appeared during the download") from None
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise
        # No hard links here: a check, then a rename; a file made in between is replaced.
        if exists_at(name, folder):
            raise refused_output(shown or name) from None
        os.rename(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)


def refused_output(output: object, when: str = "") -> SwarmflyError:
    """An output that exists, asked for without --overwrite (dfget refuses it too)."""
    why = f" ({when})" if when else ""
    return SwarmflyError(
        "bad_request", f"{output} exists{why}: pass --overwrite to replace it", path="data.output"
    )


def exists_at(name: str, folder: int | None = None) -> bool:
    """Is there anything (a link too) at ``name``, in ``folder`` when given? Not where the
    path cannot be looked at (a file where a folder should be, no permission): writing there
    fails later with words of its own (``swarmfly.get.request.cannot_write``)."""
    try:
        os.lstat(name, dir_fd=folder)
    except OSError:
        return False
    return True
