"""The documentation's links and the paper tables' wording.

`mkdocs build --strict` (CI) checks the links between pages under docs/ and that every page is in
the nav; it never reads README.md, which lives outside docs/. These tests check the README's
relative links (file and #anchor), the docs' links too (so a checkout without mkdocs still catches
a broken one), that mkdocs.yml's nav names every page, and that the tables in benchmarks/tables/
name no machine's paths and say nothing about who looked for what.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are not links
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets outside code, minus web addresses and mail links."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return [target for target in LINK.findall(prose) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (mkdocs' default) gives a heading."""
    text = INLINE_CODE.sub(lambda match: match.group(0)[1:-1], heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path.read_text()):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{target}: no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_of_the_readme_resolves():
    links = relative_links((ROOT / "README.md").read_text())
    assert any(link.startswith("docs/") for link in links)  # the README points into docs/
    assert broken_links(ROOT / "README.md") == []


@pytest.mark.parametrize("page", sorted((ROOT / "docs").rglob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_the_docs_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Real heading\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#real-heading) [gone](c.md) [bad](b.md#other) `[code](x.md)` "
                    "[web](https://example.org/x.md)\n```\n[fenced](y.md)\n```\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#other: no heading with anchor #other"]


def test_the_mkdocs_nav_names_every_page():
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md")}
    assert pages - nav == set(), "pages missing from mkdocs.yml's nav"
    assert nav - pages == set(), "nav entries with no page"


MACHINE_PATH = re.compile(r"(?<![\w.])(?:/(?:work|tmp|home|root|Users|mnt|scratch|opt|var|private|data)/"
                          r"|~/|[A-Za-z]:\\)")
WHO_LOOKED = re.compile(r"this (?:session|work|machine)|could (?:not )?search|searched|we (?:found|read)",
                        re.I)


def table_problems(text: str) -> list[str]:
    return [f"{kind}: {match.group(0)!r}" for kind, pattern in (("machine path", MACHINE_PATH),
                                                              ("who looked", WHO_LOOKED))
            for match in pattern.finditer(text)]


@pytest.mark.parametrize("table", sorted((ROOT / "benchmarks" / "tables").glob("*.toml")), ids=lambda p: p.stem)
def test_paper_tables_name_no_machine_paths_and_no_searchers(table):
    assert table_problems(table.read_text()) == []


def test_the_table_check_finds_paths_and_searchers():
    text = ('note = "copied from /work/shared/REFERENCE.md; not found in this session"\n'
            'env = "D4RL/antmaze/large-diverse-v1"  # a dataset id, not a path\n'
            'cache = "~/.minari/datasets"\n')
    assert table_problems(text) == ["machine path: '/work/'", "machine path: '~/'", "who looked: 'this session'"]
