"""Every relative link of README.md, BENCHMARKS.md and docs/*.md leads to a file that exists, and every #anchor to a
heading of that file (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """The ids GitHub gives the file's headings: lower case, punctuation but `-` and `_` dropped, spaces as `-`,
    a repeated id numbered `-1`, `-2`, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        m = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def links(path: Path) -> list[str]:
    return [m.group(1) for m in LINK.finditer(prose(path.read_text()))]


def test_the_slugs_are_githubs() -> None:
    page = REPO / "BENCHMARKS.md"
    assert "bf16-on-a-cpu-without-avx-512-issue-32" in anchors(page)
    assert "will-it-fit-the-checks-predictions-for-the-imagenet-recipes-on-8-x-h100-issue-33" in anchors(page)
    assert "will-it-fit" in anchors(REPO / "README.md") and "what-makes-a-runs-identity" in anchors(REPO / "README.md")


def test_the_readme_links_every_docs_page() -> None:
    linked = {(REPO / t.split("#")[0]).resolve() for t in links(REPO / "README.md") if not t.startswith("#")}
    assert {p.resolve() for p in (REPO / "docs").glob("*.md")} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of the repository
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not problems, f"{page.relative_to(REPO)}: " + "; ".join(problems)
