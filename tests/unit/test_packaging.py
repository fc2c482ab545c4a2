"""What `pip install .` (not -e) installs: every package of the tree, with its data files.

The package list in pyproject.toml is explicit (the package-dir mapping puts services/,
plugins/ and contracts/ under the swarmfly namespace); a folder made a package without an
entry there worked in every editable install, tests and CI included, and left `swarmfly up`
from a wheel without ``swarmfly.bus``."""

from __future__ import annotations

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
