"""A verified file to its output: atomically (the path never holds a partial file), as a
file of its own (a reflink where the filesystem has them, else a copy) or, asked for, a hard
link to the read-only cache file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from swarmfly.placefile import place_file
from swarmfly.services.peer.store import FILE_MODE, StoredTask, copy_range

FICLONE = getattr(fcntl, "FICLONE", 0x40049409)
"""ioctl that makes ``dst`` share ``src``'s blocks copy-on-write (btrfs, XFS, bcachefs)."""


def deliver(
    stored: StoredTask,
    output: Path,
    *,
    umask: int,
    hard_link: bool = False,
    take: bool = False,
    directory: int | None = None,
    overwrite: bool = True,
) -> None:
    """Put the verified file at ``output`` atomically (the path never holds a partial
    file), as a file of its own, mode ``0o666 & ~umask`` (the requester's): a reflink where
    the filesystem has them, else a copy, so nothing done to the output reaches the cache.

    ``hard_link`` (an explicit opt-in, like dfget's --force-hard-link) shares the cache's
    inode instead, made read-only first. ``take`` moves the file out of a store that is about
    to be discarded (the CLI's own peer), copying only across filesystems. ``directory`` is an
    open directory to put ``output.name`` in, instead of ``output``'s parent: a peer writing
    under an output root opened it without following a link out of the root. Without
    ``overwrite`` an existing output is left as it is and refused (``place_file``).
    """
    if directory is None:
        output = output.absolute()
        output.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(output.parent, os.O_RDONLY | os.O_DIRECTORY)
    else:
        folder = os.dup(directory)
    tmp = f".{output.name}.swarmfly-{os.getpid()}-{os.urandom(4).hex()}"
    mode = 0o666 & ~umask
    try:
        if take and _moved(stored.data_path, tmp, folder):
            os.chmod(tmp, mode, dir_fd=folder)
        elif hard_link:
            stored.make_read_only()
            os.link(stored.data_path, tmp, dst_dir_fd=folder)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(tmp, flags, FILE_MODE, dir_fd=folder)
            try:
                os.fchmod(fd, mode)
                copy_into(stored.data_path, fd)
            finally:
                os.close(fd)
        place_file(tmp, output.name, overwrite=overwrite, folder=folder, shown=str(output))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        os.close(folder)


def _moved(source: Path, target: str, folder: int) -> bool:
    try:
        os.rename(source, target, dst_dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    return True


def copy_into(source: Path, fd: int) -> None:
    """``source``'s bytes into the empty file ``fd``: a reflink where the filesystem can,
    else a copy (``copy_range``)."""
    with open(source, "rb") as src:
        try:
            fcntl.ioctl(fd, FICLONE, src.fileno())
            return
        except OSError:
            pass  # no reflinks here (ext4, tmpfs, another filesystem): copy
        copy_range(src.fileno(), fd, 0, os.fstat(src.fileno()).st_size)
