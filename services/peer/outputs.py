"""Where ``peer.<host>.download`` over NATS may write: only under ``[peer] output_roots``.

A message on NATS names an output path, and the peer writes it as its own user (often root).
So the path must lie under a directory the operator named, and stay there: no ``..``, and no
symbolic link on the way (each directory is opened with ``O_NOFOLLOW`` below the root, and the
file is created and renamed relative to the last one, so a link swapped in later is not
followed either).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from swarmfly.errors import SwarmflyError

HOW_TO_ALLOW = (
    "set [peer] output_roots (SWARMFLY_PEER_OUTPUT_ROOTS=/dir,...) to the directories it may"
    " write under, or run `swarmfly get` on this host (the local socket writes as its caller)"
)


@dataclass(frozen=True)
class Placement:
    """An output inside a root: the root and the path's parts below it (the last: the file)."""

    root: Path
    parts: tuple[str, ...]

    @property
    def output(self) -> Path:
        return self.root.joinpath(*self.parts)


class OutputRoots:
    def __init__(self, roots: list[str] | tuple[str, ...]) -> None:
        self.roots = tuple(Path(os.path.abspath(root)) for root in roots if root)

    def place(self, text: str) -> Placement:
        """Which root ``text`` lies under, checked lexically; refused with ``forbidden``."""
        if not self.roots:
            raise SwarmflyError(
                "forbidden",
                f"peer.<host>.download over NATS writes no output here: {HOW_TO_ALLOW}",
                path="data.output",
            )
        if "\x00" in text:
            raise SwarmflyError("bad_request", "the output holds a NUL byte", path="data.output")
        path = PurePosixPath(text)
        if not path.is_absolute():
            raise SwarmflyError(
                "bad_request", "the output must be an absolute path", path="data.output"
            )
        if ".." in path.parts:
            raise SwarmflyError(
                "forbidden", "the output's path may not hold '..' components", path="data.output"
            )
        if path in map(PurePosixPath, self.roots):
            raise SwarmflyError("bad_request", "output is a directory", path="data.output")
        for root in self.roots:
            if path.is_relative_to(root):
                parts = path.relative_to(root).parts
                return Placement(root, parts)
        raise SwarmflyError(
            "forbidden",
            f"{text} is not under an output root ([peer] output_roots:"
            f" {', '.join(map(str, self.roots))})",
            path="data.output",
        )

    @staticmethod
    def open_parent(placement: Placement, *, create: bool) -> int | None:
        """The output's directory, opened below the root without following a link; made
        where missing when ``create`` (else None when it does not exist yet). The caller
        closes it. A link on the way, or at the file's own name, is ``forbidden``."""
        try:
            fd = os.open(placement.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise SwarmflyError(
                "bad_request",
                f"the output root {placement.root} cannot be opened: {exc.strerror}",
                path="data.output",
            ) from None
        try:
            for name in placement.parts[:-1]:
                child = _open_dir(fd, name, create=create)
                os.close(fd)
                fd = child
                if fd < 0:
                    return None
            _refuse_odd_file(fd, placement.parts[-1])
        except OSError as exc:  # a name too long, a full disk, no permission: unusable
            os.close(fd)
            raise SwarmflyError(
                "bad_request", f"the output cannot be made: {exc.strerror}", path="data.output"
            ) from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd


def _open_dir(parent: int, name: str, *, create: bool) -> int:
    """``name`` in ``parent``, not through a link; -1 when missing and not to be made."""
    try:
        return _open_no_link(parent, name)
    except FileNotFoundError:
        if not create:
            return -1
    with contextlib.suppress(FileExistsError):  # made meanwhile: opened (and checked) below
        os.mkdir(name, 0o755, dir_fd=parent)
    return _open_no_link(parent, name)


def _open_no_link(parent: int, name: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR and not _is_link(parent, name):
            raise SwarmflyError(
                "bad_request",
                f"the output's path runs through a file at {name!r}",
                path="data.output",
            ) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SwarmflyError(
                "forbidden",
                f"the output's path leaves its root at {name!r} (a symbolic link)",
                path="data.output",
            ) from None
        raise


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode)
    except OSError:
        return False


def _refuse_odd_file(folder: int, name: str) -> None:
    """A link at the output's own name would be replaced, not followed; still, refuse it:
    whoever put it there meant the peer to write somewhere else."""
    try:
        mode = os.lstat(name, dir_fd=folder).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise SwarmflyError(
            "forbidden", f"the output {name!r} is a symbolic link", path="data.output"
        )
    if stat.S_ISDIR(mode):
        raise SwarmflyError("bad_request", "output is a directory", path="data.output")
