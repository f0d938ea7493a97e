"""Every relative link in the repository's Markdown points to a file or folder that exists.

Links to http(s), mailto and other schemes and pure #anchors are not checked; a #fragment or
?query is stripped before the path is resolved against the linking file's folder (a leading /
against the repository root). Links inside fenced code blocks and `code spans` are not links.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
# Folders holding no documentation of ours: virtualenvs, VCS data, caches, build output.
SKIPPED_DIRS = {".venv", ".git", "node_modules", "__pycache__", "build", "dist"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); target optionally in <...>, optionally followed by a title.
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\s*\)")
# [label]: target  (reference definitions)
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files() -> list[Path]:
    found = []
    for path in sorted(REPO.rglob("*.md")):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p in SKIPPED_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        found.append(path)
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    result: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = _FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        line = _CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in _INLINE.finditer(line)]
        if (ref := _REFERENCE.match(line)) is not None:
            targets.append(ref.group(1))
        result += [(number, t.removeprefix("<").removesuffix(">")) for t in targets]
    return result


def local_path(target: str) -> str | None:
    """The file part of a relative link; None for external links and pure anchors."""
    if target.startswith(("#", "//")) or _SCHEME.match(target):
        return None
    path = re.split(r"[#?]", target, maxsplit=1)[0]
    return unquote(path) or None


def broken_links(md: Path) -> list[str]:
    broken = []
    for number, target in links(md.read_text(encoding="utf-8")):
        path = local_path(target)
        if path is None:
            continue
        resolved = REPO / path.lstrip("/") if path.startswith("/") else md.parent / path
        if not resolved.exists():
            shown = os.path.relpath(resolved, REPO)
            broken.append(f"{md.relative_to(REPO)}:{number}: {target} -> {shown} does not exist")
    return broken


def test_the_link_finder_skips_code_and_external_links() -> None:
    text = "\n".join([
        "See [a](a.md#part), ![img](img/x.png \"title\") and [b](<b c.md>).",
        "[web](https://example.com) [mail](mailto:x@example.com) [here](#anchor)",
        "`[not](in-a-span.md)`",
        "```sh",
        "[not](in-a-fence.md)",
        "```",
        "[ref]: ../ref.md",
        "[nested [brackets]](n.md?plain=1) [space](d%20e.md)",
    ])
    found = [local_path(t) for _, t in links(text)]
    assert [p for p in found if p] == ["a.md", "img/x.png", "b c.md", "../ref.md", "n.md", "d e.md"]


def test_the_documentation_is_found() -> None:
    names = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert {"README.md", "bench/README.md", "docs/operator-guide.md", "docs/kubernetes.md"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(md: Path) -> None:
    broken = broken_links(md)
    assert not broken, "\n".join(broken)
