"""Which listed files `swarmfly get --recursive` writes, and where below its directory: pure.

A listing's names come from the network. Each one that is selected must be a plain relative
path (no ``..``, ``.``, empty or absolute parts, no NUL, control character or backslash, each
part at most ``MAX_PART_BYTES``), and no two may become one path, or a file and a folder,
after Unicode normalisation. One bad name refuses the whole listing before any byte moves:
a download that silently skipped files would look complete.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from swarmfly.errors import SwarmflyError

if TYPE_CHECKING:
    from swarmfly.plugintypes import SourceEntry

DEFAULT_MAX_FILES = 10_000
"""Files a recursive get takes by default: a listing of more is refused, not cut short."""
DEFAULT_JOBS = 4
"""Files downloaded at once by default."""
MAX_JOBS = 64
MAX_PART_BYTES = 255
"""Bytes of one path part: what Linux file systems take (NAME_MAX)."""


@dataclass(frozen=True)
class Planned:
    entry: SourceEntry
    path: PurePosixPath
    """Where the file goes, relative to the output directory."""


def shown(name: str) -> str:
    """A listed name for a message: quoted, escaped, cut short."""
    text = repr(name)
    return text if len(text) <= 120 else f"{text[:117]}…"


def _refuse(name: str, why: str) -> SwarmflyError:
    return SwarmflyError(
        "bad_request", f"the listing names {shown(name)}, {why}: refusing the listing"
    )


def safe_path(name: str) -> PurePosixPath:
    """``name`` as a path that stays below the directory it is joined to, or bad_request."""
    if not name:
        raise _refuse(name, "an empty name")
    if "\x00" in name:
        raise _refuse(name, "which holds a NUL byte")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _refuse(name, "which holds a control character")
    if "\\" in name:
        raise _refuse(name, "which holds a backslash (a path separator elsewhere)")
    if name.startswith("/"):
        raise _refuse(name, "an absolute path, which would be written outside the directory")
    parts = name.split("/")
    if ".." in parts:
        raise _refuse(name, "whose '..' would climb out of the directory")
    if any(part in ("", ".") for part in parts):
        raise _refuse(name, "which has an empty or '.' part")
    for part in parts:
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
            raise _refuse(name, f"which has a part longer than {MAX_PART_BYTES} bytes")
    return PurePosixPath(*parts)


def selected(entries: Iterable[SourceEntry], include: Sequence[str]) -> list[SourceEntry]:
    """The entries whose path matches one of ``include`` (all without any), by path. A glob
    is matched against the whole path below the listed URL; ``*`` crosses ``/``."""
    chosen = [e for e in entries if not include or any(fnmatchcase(e.path, g) for g in include)]
    return sorted(chosen, key=lambda e: e.path)


def plan(entries: Iterable[SourceEntry], include: Sequence[str], max_files: int) -> list[Planned]:
    """The files to write, each with its checked path; bad_request when more than
    ``max_files`` match, none does, or a name is bad (above)."""
    chosen = selected(entries, include)
    if not chosen:
        matching = " matching --include" if include else ""
        raise SwarmflyError("not_found", f"the listing has no file{matching}")
    if len(chosen) > max_files:
        raise SwarmflyError(
            "bad_request",
            f"the listing has {len(chosen)} files, more than --max-files {max_files}: raise"
            " --max-files or narrow it with --include; nothing was downloaded",
        )
    files: dict[str, str] = {}
    """Normalised path -> the name it came from."""
    folders: dict[str, str] = {}
    planned = []
    for entry in chosen:
        path = safe_path(entry.path)
        key = unicodedata.normalize("NFC", str(path))
        other = files.get(key) or folders.get(key)
        if other is not None:
            raise _refuse(entry.path, f"which is the same path as {shown(other)}")
        for parent in PurePosixPath(key).parents:
            if str(parent) in files:
                raise _refuse(entry.path, f"below {shown(files[str(parent)])}, a file")
            if str(parent) != ".":
                folders.setdefault(str(parent), entry.path)
        files[key] = entry.path
        planned.append(Planned(entry, path))
    return planned
