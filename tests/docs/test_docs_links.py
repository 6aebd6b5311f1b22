"""The README and docs/ stay inside the repository: no web addresses, and every link and
every ``../`` reference names a file or folder that exists in the checkout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_the_docs_pages_are_the_expected_ones() -> None:
    assert {page_id(p) for p in PAGES} >= {
        "README.md", "docs/architecture.md", "docs/write-a-device.md", "docs/peers.md"}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_has_no_web_addresses(page: Path) -> None:
    assert re.findall(r"\b(?:https?|ftp)://\S+", page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_page_links_resolve_inside_the_repository(page: Path) -> None:
    text = page.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)  # [text](target)
    targets += re.findall(r"(?<![\w./])(\.\./[\w./-]+)", text)  # `../somewhere` in prose
    bad = []
    for target in targets:
        where = (page.parent / target).resolve()
        if not where.is_relative_to(ROOT) or not where.exists():
            bad.append(target)
    assert bad == [], f"{page_id(page)} points outside the repository or at nothing"
