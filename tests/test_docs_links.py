"""The README and docs/ as a reader follows them: every relative link reaches a file of this
repository (and a heading there, when it names one), every docs/ page is linked from the README,
every path the pages name in code spans exists, and the configuration page lists every variable
the job reads. A clone stands alone, so nothing may point outside it."""

import re
from pathlib import Path

import pytest

from job.config import ENV

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)
# a path into the repository in a code span: `job/storage/commit.py`, `k8s/base/`, ...
REPO_PATH = re.compile(r"`((?:job|hack|tests|docs|k8s|cloudrun|\.ci)/[A-Za-z0-9_./-]*)`")
# paths the pages name as ones the reader creates (an operator's own overlay)
YOURS = ("k8s/overlays/mine",)


def prose(page: Path) -> str:
    """The page without its fenced code blocks (a `# comment` there is not a heading)."""
    return FENCE.sub("", page.read_text())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    seen: dict = {}
    found = set()
    for heading in HEADING.findall(prose(page)):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_slug_is_githubs():
    assert slug("IAM: what each identity needs") == "iam-what-each-identity-needs"
    assert slug("HTTP API (`stem-job serve`)") == "http-api-stem-job-serve"
    assert (
        slug("Exit codes, and what each platform does") == "exit-codes-and-what-each-platform-does"
    )


def broken_links(page: Path, root: Path = REPO) -> list:
    """Each relative link of `page` that reaches no file under `root`, or no heading there."""
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(root) or not file.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_named_in_code_exists(page):
    missing = [
        p
        for p in REPO_PATH.findall(page.read_text())
        if not p.startswith(YOURS) and not (REPO / p.rstrip("/")).exists()
    ]
    assert not missing, f"{page.relative_to(REPO)} names paths that do not exist: {missing}"


def test_nothing_points_outside_the_repository():
    for page in PAGES:
        assert "../shared" not in page.read_text(), page


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"the README links no page {unlinked}"


def test_the_configuration_page_lists_every_variable():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| ((?:`[A-Z0-9_]+`(?:, )?)+) \|", text, re.MULTILINE))
    names = {n for cell in documented for n in re.findall(r"`([A-Z0-9_]+)`", cell)}
    missing = sorted(set(ENV) - names)
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_a_broken_link_is_found(tmp_path):
    """The check is not vacuous: a missing page, a missing heading and a way out are reported,
    a heading's anchor and a page's own anchor are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Other\n\n## A heading, with `code`\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Title\n\n```\n# not a heading\n```\n"
        "[ok](../other.md#a-heading-with-code) [self](#title) [web](https://example.com)\n"
        "[gone](missing.md) [nowhere](../other.md#no-such) [code](#not-a-heading)\n"
        "[out](../../outside.md)\n"
    )
    assert [b.split(":")[0] for b in broken_links(page, tmp_path)] == [
        "missing.md",
        "../other.md#no-such",
        "#not-a-heading",
        "../../outside.md",
    ]
