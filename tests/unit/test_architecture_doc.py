"""docs/architecture.md cannot go stale silently: every path and dotted name it puts in
backticks exists, every link to a local file resolves, and every package under services/ and
swarmfly/ and every module of a service is on the map."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
TEXT = DOC.read_text(encoding="utf-8")
SPANS = re.findall(r"`([^`]+)`", TEXT)
TOP_LEVEL = {p.name for p in ROOT.iterdir() if p.is_dir()}
PATHS = {
    s
    for s in SPANS
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", s)
    and "/" in s
    and (s.split("/")[0] in TOP_LEVEL or s.endswith(".py"))
}
"""Repository paths: a span with a slash that starts at a top-level folder (or names a
module); ``<state dir>/peer.sock`` and ``/v2/…`` are not."""
SUBJECT_PREFIX = "swarmfly.v1."
"""NATS subjects start like Python names; they are not checked here (docs/protocol.md)."""
NAMES = {
    s
    for s in SPANS
    if re.fullmatch(r"swarmfly(\.[A-Za-z_]\w*)+", s) and not s.startswith(SUBJECT_PREFIX)
}


def _resolve(name: str) -> str | None:
    """None when ``name`` imports (its longest importable module, then attributes), else
    what is missing."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        module = ".".join(parts[:end])
        try:
            obj: object = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                continue  # no such module: the rest are attributes
            return f"importing {module} fails: {exc}"  # it exists, what it imports does not
        for i, attr in enumerate(parts[end:], start=end):
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:i])} has no {attr!r}"
            obj = getattr(obj, attr)
        return None
    return "no module of it imports"


def _import_name(path: Path) -> str:
    """``services/peer/host.py`` -> ``swarmfly.services.peer.host`` (pyproject's package-dir)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "swarmfly" else ["swarmfly", *parts])


def _mentioned(path: Path) -> bool:
    """Named by its path (a folder with or without the slash) or by its import name, or by a
    dotted name inside it."""
    rel = path.relative_to(ROOT).as_posix()
    module = _import_name(path)
    return (
        bool({rel, rel + "/"} & PATHS)
        or module in NAMES
        or any(n.startswith(module + ".") for n in NAMES)
    )


def test_the_doc_names_paths_and_dotted_names() -> None:
    """The extraction below finds something: a rewrite that dropped the backticks would
    otherwise pass every other test here."""
    assert "services/peer/upload.py" in PATHS
    assert "swarmfly.services.peer.conductor.Conductor" in NAMES


def test_every_path_it_names_exists() -> None:
    missing = sorted(p for p in PATHS if not (ROOT / p).exists())
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_dotted_name_it_names_resolves() -> None:
    broken = {name: why for name in sorted(NAMES) if (why := _resolve(name)) is not None}
    assert broken == {}, f"docs/architecture.md names what does not exist: {broken}"


def test_every_local_link_resolves() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT)
    local = [link for link in links if "://" not in link]
    missing = sorted(link for link in local if not (DOC.parent / link).exists())
    assert missing == [], f"docs/architecture.md links to files that do not exist: {missing}"


def test_every_package_is_on_the_map() -> None:
    packages = [
        init.parent
        for top in ("services", "swarmfly")
        for init in sorted((ROOT / top).rglob("__init__.py"))
        if "__pycache__" not in init.parts
    ]
    absent = [p.relative_to(ROOT).as_posix() for p in packages if not _mentioned(p)]
    assert absent == [], f"docs/architecture.md does not mention these packages: {absent}"


def test_every_service_module_is_on_the_map() -> None:
    modules = sorted((ROOT / "services").glob("*/*.py"))
    absent = [
        m.relative_to(ROOT).as_posix()
        for m in modules
        if m.name != "__init__.py" and not _mentioned(m)
    ]
    assert absent == [], f"docs/architecture.md does not mention these modules: {absent}"
