"""What `pip install .` (not -e) installs: every package of the tree, with its data files.

The package list in pyproject.toml is explicit (the package-dir mapping puts services/,
plugins/ and contracts/ under the swarmfly namespace); a folder made a package without an
entry there worked in every editable install, tests and CI included, and left `swarmfly up`
from a wheel without ``swarmfly.bus``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
    "setuptools"
]


def packages_in_tree() -> set[str]:
    found: set[str] = set()
    for name, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if "__pycache__" not in relative.parts:
                found.add(".".join((name, *relative.parts)) if relative.parts else name)
    return found


def test_every_package_in_the_tree_is_installed() -> None:
    assert packages_in_tree() - set(SETUPTOOLS["packages"]) == set()
    assert set(SETUPTOOLS["packages"]) - packages_in_tree() == set()


def folder_of(package: str) -> Path:
    mapping: dict[str, str] = SETUPTOOLS["package-dir"]
    prefix = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
    return ROOT / mapping[prefix] / Path(*package[len(prefix) :].split(".")[1:])


def test_every_data_file_beside_the_modules_is_installed() -> None:
    """Files beside the modules (contracts, the dashboard's page, py.typed) that no
    package-data pattern takes would be missing from a wheel."""
    installed = {
        path
        for package, patterns in SETUPTOOLS["package-data"].items()
        for pattern in patterns
        for path in folder_of(package).glob(pattern)
    }
    beside = {
        path
        for folder in SETUPTOOLS["package-dir"].values()
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert sorted(str(p.relative_to(ROOT)) for p in beside - installed) == []


def test_loading_the_plugins_leaves_the_s3_client_unimported() -> None:
    """Every service loads every source plugin at start; botocore is ~8 MiB of each one's
    memory and a fifth of a second of its start, for the few that ever read S3."""
    code = (
        "import sys\n"
        "from swarmfly.pluginhost import Plugins\n"
        "Plugins.load()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('botocore', 'aiobotocore')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]", found.stderr
