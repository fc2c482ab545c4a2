"""The peer's node init for containerd: make containerd read the chart's ``hosts.toml``.

containerd reads ``<dir>/<registry>/hosts.toml`` only when its CRI registry ``config_path``
names ``<dir>``. The chart's containerd-hosts init container writes those files, then runs
``python -m swarmfly.nodeinit`` to set ``config_path`` in the node's ``config.toml`` when it
is unset (as Dragonfly's dfinit does). :func:`plan` decides, without IO; :func:`main` reads
and replaces the file.

It never overwrites a ``config_path`` that names another directory, never creates a
``config.toml`` (without one containerd runs on its defaults, which a new file would
change), and edits only what it can edit exactly: the new text must parse to the old
configuration plus the one key. containerd reads the file at start only; the chart restarts
it when the operator asked for that (``peer.containerd.restart``) and the file changed.
"""

from __future__ import annotations

import argparse
import copy
import enum
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_TABLES: dict[int, tuple[str, ...]] = {
    1: ("plugins", "cri", "registry"),
    2: ("plugins", "io.containerd.grpc.v1.cri", "registry"),
    3: ("plugins", "io.containerd.cri.v1.images", "registry"),
}
"""The CRI registry table of each config.toml version; a file without ``version`` is 1."""

_HEADER = re.compile(r"^\s*\[(?!\[)(?P<key>[^\]#]+)\]\s*(?:#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")
_EMPTY_CONFIG_PATH = re.compile(r"^(?P<indent>\s*)config_path\s*=\s*(?:\"\"|'')\s*(?:#.*)?$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Verdict(enum.Enum):
    ADDED = "added"
    """``config_path`` was unset: the new text sets it."""
    ALREADY_SET = "already_set"
    """``config_path`` already names the directory: nothing to do."""
    NO_CONFIG = "no_config"
    """No config.toml: containerd runs on its defaults, and the file is not created."""
    OTHER_PATH = "other_path"
    """``config_path`` names other directories: left as it is."""
    MIRRORS = "mirrors"
    """``registry.mirrors`` is set, which containerd refuses beside ``config_path``."""
    UNEDITABLE = "uneditable"
    """Not TOML, a version this does not know, or no exact edit: left as it is."""


WARNINGS = frozenset({Verdict.OTHER_PATH, Verdict.MIRRORS, Verdict.UNEDITABLE})
"""Verdicts after which containerd does not read the directory."""


@dataclass(frozen=True)
class Plan:
    verdict: Verdict
    message: str
    text: str | None = None
    """The new config.toml, for ADDED only."""


def plan(text: str | None, certs_dir: str) -> Plan:
    """What to do with config.toml's ``text`` (None: there is none) so that containerd
    reads ``certs_dir`` (the path on the node)."""
    if text is None:
        return Plan(
            Verdict.NO_CONFIG,
            "no config.toml, so containerd runs on its defaults: containerd 2.x reads"
            " /etc/containerd/certs.d, 1.x no hosts.toml at all; not created (a new file"
            f' would change those defaults): create it with config_path = "{certs_dir}"',
        )
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return Plan(Verdict.UNEDITABLE, f"config.toml is not valid TOML ({exc}): left as it is")
    version = config.get("version", 1)
    known = isinstance(version, int) and not isinstance(version, bool)
    table = REGISTRY_TABLES.get(version) if known else None
    if table is None:
        return Plan(
            Verdict.UNEDITABLE,
            f"config.toml has version = {version!r}, not 1, 2 or 3: left as it is",
        )
    name = dotted(table)
    registry = _table(config, table)
    if registry is None:
        return Plan(Verdict.UNEDITABLE, f"[{name}] is not a table: left as it is")
    current = registry.get("config_path", "")
    if isinstance(current, str) and current:
        wanted = certs_dir.rstrip("/")
        if wanted in (entry.rstrip("/") for entry in current.split(":")):
            return Plan(Verdict.ALREADY_SET, f'config_path = "{current}" already: no change')
        return Plan(
            Verdict.OTHER_PATH,
            f'config_path = "{current}" under [{name}], not {certs_dir}: containerd reads'
            " its hosts.toml files from there, so the chart's are unused; left as it is"
            " (set peer.containerd.certsDir to that directory instead)",
        )
    if registry.get("mirrors"):
        return Plan(
            Verdict.MIRRORS,
            f"[{name}.mirrors] is set, and containerd refuses mirrors beside config_path:"
            f" move them to hosts.toml files under {certs_dir}; left as it is",
        )
    edited = _with_config_path(text, table, certs_dir)
    expected = copy.deepcopy(config)
    target = _table(expected, table)
    assert target is not None  # the same walk found it in config
    target["config_path"] = certs_dir
    if edited is None or _parses_to(edited) != expected:
        return Plan(
            Verdict.UNEDITABLE,
            f"config.toml cannot take config_path without another change: add"
            f' config_path = "{certs_dir}" under [{name}] by hand',
        )
    return Plan(
        Verdict.ADDED,
        f'set config_path = "{certs_dir}" under [{name}]; containerd reads it when it next starts',
        edited,
    )


def _table(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The table at ``path``, made empty in ``config`` where it is missing (as the edit
    would make it); None if something on the way is no table."""
    node: Any = config
    for key in path:
        node = node.setdefault(key, {}) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def dotted(path: tuple[str, ...]) -> str:
    """A table's key as config.toml spells it: ``plugins."io.containerd.grpc.v1.cri".registry``."""
    return ".".join(key if _BARE_KEY.fullmatch(key) else json.dumps(key) for key in path)


def _header_key(line: str) -> tuple[str, ...] | None:
    """The key of a ``[table]`` header line, however it is quoted and spaced."""
    match = _HEADER.match(line)
    if not match:
        return None
    try:
        node: Any = tomllib.loads(f"[{match.group('key')}]")
    except tomllib.TOMLDecodeError:
        return None
    key: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        ((name, node),) = node.items()
        key.append(name)
    return tuple(key)


def _with_config_path(text: str, table: tuple[str, ...], value: str) -> str | None:
    """``text`` with ``config_path = value`` in ``table``: an empty config_path replaced,
    else a line after the table's header, else the table appended."""
    lines = text.splitlines(keepends=True)
    entry = f"config_path = {json.dumps(value)}"
    headers = [i for i, line in enumerate(lines) if _header_key(line) == table]
    if len(headers) > 1:
        return None
    if not headers:
        end = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{end}\n[{dotted(table)}]\n  {entry}\n"
    (start,) = headers
    stop = next(
        (i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines)
    )
    for i in range(start + 1, stop):
        body, newline = _split_newline(lines[i])
        empty = _EMPTY_CONFIG_PATH.match(body)
        if empty:
            lines[i] = f"{empty.group('indent')}{entry}{newline}"
            return "".join(lines)
    header, newline = _split_newline(lines[start])
    lines[start] = header + newline
    indent = header[: len(header) - len(header.lstrip())] + "  "
    lines.insert(start + 1, f"{indent}{entry}{newline}")
    return "".join(lines)


def _split_newline(line: str) -> tuple[str, str]:
    """A line and its line ending (a missing last one becomes a newline)."""
    body = line.rstrip("\r\n")
    return body, line[len(body) :] or "\n"


def _parses_to(text: str) -> dict[str, Any] | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def _replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` at once (a reader sees the old file or the new), with
    the old file's mode."""
    mode = path.stat().st_mode & 0o7777
    temporary = path.with_name(path.name + ".swarmfly")
    with temporary.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    temporary.chmod(mode)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    """0 when config.toml needs no change, was changed, or is left as it is with a warning
    (a peer still serves without containerd); 1 when it cannot be read or written."""
    parser = argparse.ArgumentParser(
        prog="python -m swarmfly.nodeinit",
        description="Set containerd's CRI registry config_path, if unset.",
    )
    parser.add_argument("--config", type=Path, required=True, help="config.toml, as mounted")
    parser.add_argument(
        "--certs-dir", required=True, help="the hosts.toml directory, as containerd sees it"
    )
    parser.add_argument("--changed-file", type=Path, help="created when config.toml was changed")
    args = parser.parse_args(argv)
    config: Path = args.config
    try:
        text: str | None = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = None
    except (OSError, UnicodeDecodeError) as exc:
        print(f"nodeinit: cannot read {config}: {exc}", file=sys.stderr)
        return 1
    decided = plan(text, args.certs_dir)
    if decided.text is not None:
        try:
            _replace(config, decided.text)
            if args.changed_file:
                args.changed_file.touch()
        except OSError as exc:
            print(f"nodeinit: cannot write {config}: {exc}", file=sys.stderr)
            return 1
    warning = "warning: " if decided.verdict in WARNINGS else ""
    print(f"nodeinit: {config}: {warning}{decided.message}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
