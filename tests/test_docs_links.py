"""The documentation's links resolve: README.md stays a short entry page (at most 200 lines) and
every relative link or image in it, in docs/ and in benchmarks/README.md names a file that exists,
and a #fragment into a markdown file names one of its headings (GitHub's anchor for it)."""

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

# [text](target) and ![alt](target); the text may span lines; an optional "title" after the target.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def markdown_files():
    return [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md",
            *sorted((REPO_ROOT / "docs").rglob("*.md"))]


def blank(match):
    """The matched text with every character but newlines blanked (line numbers survive)."""
    return re.sub(r"[^\n]", " ", match.group(0))


def prose(text):
    """The text without code blocks and code spans, which hold no links."""
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def github_anchor(heading):
    """GitHub's anchor for a heading: markup dropped, lower-case, punctuation other than hyphens
    and underscores dropped, each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for heading in HEADING.findall(FENCE.sub(blank, path.read_text())):
        anchor = github_anchor(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def links(path):
    """(line, target) for every link and image in a markdown file."""
    text = prose(path.read_text())
    for match in LINK.finditer(text):
        yield text.count("\n", 0, match.start(1)) + 1, match.group(1)


def broken_links(path, root=REPO_ROOT):
    """'file:line -> target' for each link of ``path`` that does not resolve."""
    broken = []
    for line, target in links(path):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, fragment = target.partition("#")
        where = f"{path.relative_to(root)}:{line} -> {target}"
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(where)
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{where} (no such heading)")
    return broken


def test_readme_is_at_most_200_lines():
    lines = len((REPO_ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, \
        f"README.md has {lines} lines: move sections into docs/ (at most {README_MAX_LINES})"


def test_every_link_in_the_docs_resolves():
    broken = [entry for path in markdown_files() for entry in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_indexes_every_docs_page():
    readme = {target.partition("#")[0] for _, target in links(REPO_ROOT / "README.md")}
    pages = {f"docs/{path.name}" for path in (REPO_ROOT / "docs").glob("*.md")
             if not path.name.startswith(("RESULTS", "HYPERMOE_VS_MOE"))}
    assert pages - readme == set(), "add these pages to README.md's index"


@pytest.mark.parametrize("markdown, expected", [
    ("see [a](missing.md) and [b](README.md)", ["x.md:1 -> missing.md"]),
    ("![plot](\nnone.png)", ["x.md:2 -> none.png"]),
    ("[c](README.md#no-such-heading)", ["x.md:1 -> README.md#no-such-heading (no such heading)"]),
    ("[d](#two-commands) [e](README.md#two-commands) [f](https://x.org/y)", []),
    ("`[g](missing.md)`\n```\n[h](missing.md)\n```", []),
])
def test_a_broken_link_is_reported_with_file_and_line(markdown, expected, tmp_path):
    (tmp_path / "README.md").write_text("# x\n\n## Two commands\n")
    page = tmp_path / "x.md"
    page.write_text(markdown + "\n\n## Two commands\n")
    assert broken_links(page, root=tmp_path) == expected


@pytest.mark.parametrize("heading, anchor", [
    ("Does HyperMoE help? Comparing variants, analysing experts",
     "does-hypermoe-help-comparing-variants-analysing-experts"),
    ("Qwen- and DeepSeek-style MoE layers, and HyperMoE on a pretrained MoE",
     "qwen--and-deepseek-style-moe-layers-and-hypermoe-on-a-pretrained-moe"),
    ("`--moe-type` and the_flags", "--moe-type-and-the_flags"),
])
def test_github_anchor(heading, anchor):
    assert github_anchor(heading) == anchor
