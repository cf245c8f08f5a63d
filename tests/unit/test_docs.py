"""The documentation's shape: README.md stays a front door (at most 300 lines), and every
relative Markdown link in README.md, docs/**/*.md and deploy/README.md points at a file
or folder that exists and, for `#anchor` links into Markdown files (the same file
included), at a heading that exists, with GitHub's heading slugs."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
TOPIC_DOCS = ("docs/training.md", "docs/serving.md", "docs/client.md", "docs/operations.md", "docs/bench.md", "deploy/README.md")

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)=[\"']([^\"']+)[\"']", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "deploy" / "README.md"]


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked (numbering kept): links and
    headings inside code are not links or headings."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            out.append("")
        elif fence is not None:
            if m and m.group(1).startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text lower-cased, punctuation other
    than '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes in a Markdown file: heading slugs (repeats get -1, -2,
    ...) and explicit <a name/id> anchors."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        out.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found = []
    for number, line in enumerate(prose_lines(path.read_text(encoding="utf-8")), start=1):
        line = CODE_SPAN.sub("", line)
        found += [(number, target) for target in INLINE_LINK.findall(line)]
        m = REFERENCE_DEF.match(line)
        if m:
            found.append((number, m.group(1)))
    return found


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` that does not resolve, as 'file:line: target: why'."""
    problems = []
    for number, target in links(path):
        if not target or SCHEME.match(target) or target.startswith("//"):
            continue  # absolute URLs are not checked here (no network)
        where, _, anchor = target.partition("#")
        dest = (path.parent / unquote(where)).resolve() if where else path
        why = None
        if not dest.exists():
            why = "no such file"
        elif anchor and dest.is_file() and dest.suffix.lower() == ".md" and unquote(anchor) not in anchors(dest):
            why = f"no heading with anchor #{anchor} in {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}"
        if why:
            problems.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}: {why}")
    return problems


def test_readme_is_a_front_door_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move topic content into docs/ "
        "and measurement history into docs/results/"
    )


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.is_file(), path
    assert broken_links(path) == []


def test_readme_links_every_topic_doc():
    targets = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(ROOT / "README.md") if not SCHEME.match(t)}
    missing = [doc for doc in TOPIC_DOCS if (ROOT / doc).resolve() not in targets]
    assert missing == [], f"README.md does not link {missing}"


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Decoder step: in-process or BLS", "decoder-step-in-process-or-bls"),
        ("Load shedding: keep goodput under overload", "load-shedding-keep-goodput-under-overload"),
        ("Metrics (port 8002, `/metrics`)", "metrics-port-8002-metrics"),
        ("Measuring it: make faults", "measuring-it-make-faults"),
        ("The `captioner` ensemble's DEFAULT_PORTS", "the-captioner-ensembles-default_ports"),
        ("[Scaling](x.md) out", "scaling-out"),
        ("Building for the GPU (TensorRT)", "building-for-the-gpu-tensorrt"),
    ],
)
def test_slug_matches_github(heading, expected):
    assert slug(heading) == expected


def test_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## Part one\n\n## Part one\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n"
        "[ok](other.md#part-one) [ok too](other.md#part-one-1) [self](#doc) [web](https://example.com/x)\n"
        "[gone](missing.md) [bad anchor](other.md#part-two) [bad self](#nowhere)\n"
        "```\n[in code](missing-too.md)\n```\n"
        "`[in a span](missing-three.md)`\n"
        "[ref]: nothing-here.md\n",
        encoding="utf-8",
    )
    problems = broken_links(doc)
    assert [p.split(": ")[1] for p in problems] == ["missing.md", "other.md#part-two", "#nowhere", "nothing-here.md"]
    assert problems[0].endswith("no such file") and "no heading with anchor #part-two" in problems[1]
