"""Dependencies point one way: plugins and services use the core, never the reverse. A core
that imported a built-in plugin would load pluggy, and a plugin's change would reach into the
scheduler's decisions or the download's without going through the plugin host."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import modules_loaded

ROOT = Path(__file__).resolve().parents[2]
CORES = (
    "swarmfly.services.scheduler.core",
    "swarmfly.services.scheduler.leases",
    "swarmfly.services.peer.pieces",
    "swarmfly.services.peer.swarming",
    "swarmfly.services.peer.phases",
    "swarmfly.services.peer.lending",
    "swarmfly.services.peer.takeover",
    "swarmfly.services.peer.grants",
    "swarmfly.services.peer.admission",
)


def test_the_cores_load_neither_pluggy_nor_any_plugin() -> None:
    setup = "import importlib\n" + "".join(f"importlib.import_module({c!r})\n" for c in CORES)
    assert modules_loaded(setup, ("pluggy", "swarmfly.plugins.")) == []


def _swarmfly_imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return {m for m in modules if m.split(".")[0] == "swarmfly"}


def test_services_and_the_core_import_no_builtin_plugin() -> None:
    """What a service needs of HTTP or OCI (hop-by-hop headers, manifest types) lives in the
    core, where the built-in plugins take it from too."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _swarmfly_imports(path) if m.startswith("swarmfly.plugins")
        )
        for folder in ("services", "swarmfly")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "pluginhost.py"  # the host loads the hooks: its job
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_example_plugin_imports_only_the_curated_api() -> None:
    example = ROOT / "examples" / "swarmfly-file" / "swarmfly_file" / "__init__.py"
    assert _swarmfly_imports(example) == {"swarmfly.plugins"}


def test_docs_plugins_teaches_only_the_curated_import() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    imported = set(re.findall(r"^\s*from (swarmfly[\w.]*) import", text, flags=re.M))
    assert imported == {"swarmfly.plugins"}


def test_the_curated_import_holds_what_an_author_needs() -> None:
    import swarmfly.plugins as api
    from swarmfly import plugintypes
    from swarmfly.testing import check_source

    assert api.check_source is check_source
    public = {n for n in vars(plugintypes) if n[0].isupper() and n not in {"TYPE_CHECKING"}}
    public -= {"AsyncIterator", "Callable", "Mapping", "Sequence", "Protocol"}
    assert public <= set(api.__all__)
    assert {"hookimpl", "SwarmflyError", "check_source"} <= set(api.__all__)
    assert (ROOT / "swarmfly" / "py.typed").exists()


ENVIRONMENT_READERS = {
    "swarmfly/config.py": "every setting and the OTEL_* variables",
    "swarmfly/doctor.py": "the proxy variables a container runtime on this host sees",
    "swarmfly/testing.py": "the environment the test kit hands the processes it starts",
}


def test_the_environment_is_read_in_config_only() -> None:
    """Settings come from config.py (file < environment < flags), passed down; a module
    that read a variable of its own would be a setting no one can find."""
    readers = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("swarmfly", "services", "plugins")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text(encoding="utf-8"))
    )
    assert readers == sorted(ENVIRONMENT_READERS)
