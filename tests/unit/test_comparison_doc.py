"""docs/comparison.md cannot claim what the repository does not show: every relative link
resolves to a file (and a ``#anchor`` into a markdown file to one of its headings), and every
row of the main table has a swarmfly cell that links to its evidence or says plainly that the
feature is missing ("no" / "not yet")."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "comparison.md"
TEXT = DOC.read_text(encoding="utf-8")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MISSING = re.compile(r"^\W*(no|not yet)\b", re.IGNORECASE)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces made hyphens, a
    repeated heading numbered ``-1``, ``-2``, …; ``#`` lines inside code fences are no
    headings."""
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _local_links() -> list[str]:
    links = LINK.findall(TEXT)
    return [link for link in links if "://" not in link and not link.startswith("mailto:")]


def _main_table() -> list[list[str]]:
    """The cells of each body row of the first table whose header names swarmfly."""
    rows: list[list[str]] = []
    in_table = False
    for line in TEXT.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            in_table = False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not in_table:
            in_table = len(cells) > 1 and cells[1] == "swarmfly"
        elif not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows


def test_the_anchor_rule_matches_headings_the_docs_link_to() -> None:
    text = "## Is it working? `swarmfly doctor`\n```sh\n# not a heading\n```\n## A\n## A\n"
    anchors = _anchors(text)
    assert anchors == {"is-it-working-swarmfly-doctor", "a", "a-1"}


def test_the_doc_has_links_and_a_main_table() -> None:
    assert len(_local_links()) > 20
    assert len(_main_table()) >= 15


def test_every_relative_link_resolves() -> None:
    broken: list[str] = []
    for link in _local_links():
        path, _, anchor = link.partition("#")
        target = (DOC.parent / path).resolve() if path else DOC
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif (
            anchor
            and target.suffix == ".md"
            and anchor not in _anchors(target.read_text(encoding="utf-8"))
        ):
            broken.append(f"{link}: no such heading")
    assert broken == [], f"docs/comparison.md has broken links: {broken}"


def test_every_swarmfly_cell_links_to_evidence_or_says_it_is_missing() -> None:
    rows = _main_table()
    assert all(len(cells) == len(rows[0]) for cells in rows), "every row has every column"
    unbacked = [
        cells[0] for cells in rows if not LINK.search(cells[1]) and not MISSING.match(cells[1])
    ]
    assert unbacked == [], f"swarmfly cells with no link and no 'no'/'not yet': {unbacked}"
