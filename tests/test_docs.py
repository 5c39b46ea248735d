"""The README and docs/ must work in a fresh clone: every relative link (and image) resolves to
a file inside the repository, never to a path beside it."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def relative_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not t.startswith(EXTERNAL) and not t.startswith("#")]


def test_link_pattern_finds_links():
    # a canary: the pattern must see plain links, images and titled links, or the test below
    # would pass on nothing
    text = '[a](docs/x.md) ![b](docs/img.png) [c](y.md "title") [d](https://e.org) [e](#anchor)'
    assert LINK.findall(text) == ["docs/x.md", "docs/img.png", "y.md", "https://e.org", "#anchor"]


def test_readme_links_method_document():
    assert "docs/method.md" in relative_links(ROOT / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_inside_repository(page):
    bad = []
    for target in relative_links(page):
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if path.startswith("/") or ROOT not in (resolved, *resolved.parents):
            bad.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file)")
    assert not bad, f"{page.name}: broken links: {', '.join(bad)}"
