"""The README opens with the two set-up commands, and they work on a fresh machine with only
Python 3.11+: each makes and enters a virtualenv before pip, so an externally managed system
Python (PEP 668, Debian 12) does not refuse them; CI runs the second as `.ci/run` does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def _blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)]


def test_the_readme_opens_with_the_two_commands() -> None:
    first, second = _blocks(README)[:2]
    assert first == VENV + "pip install . && swarmfly up"
    assert second == VENV + "pip install -e '.[test]' && python -m pytest"
    before = README.split("```sh", 1)[0]
    assert before.count("\n\n") <= 3, "the commands come right after the introduction"


def test_the_python_it_names_is_the_one_the_package_requires() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "Python 3.11 or newer" in README


def test_ci_runs_the_test_command_in_a_virtualenv() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in run and ". .venv/bin/activate" in run
    assert "pip install -c constraints.txt -e '.[test]' && python -m pytest" in run


def test_the_quickstart_starts_the_same_way() -> None:
    quickstart = (ROOT / "docs" / "quickstart.md").read_text()
    assert _blocks(quickstart)[0] == VENV + "pip install . && swarmfly up"


def test_the_examples_name_no_placeholder_host() -> None:
    """A new user pastes the first example: it must name a file that exists (checked by hand
    when it was chosen: the tests send nothing beyond loopback)."""
    for text in (README, (ROOT / "docs" / "quickstart.md").read_text()):
        assert "example.com/big.iso" not in text
