"""Docs cite only files that exist: README.md and the benchmark docs under bench/.

Published figures point at result files and code paths; a moved or never-committed
file would leave a claim nobody can check, so this fails as soon as a cited path
is missing. Checked: every relative markdown link (and its #anchor when it points
at a markdown heading), every backticked repository path outside code blocks, and
every backticked bench result file named like `<name>-YYYY-MM-DD.json|txt`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "bench").rglob("*.md")])
# Top-level folders of the repository; a backticked `a/b` starting with one of them is a path.
TOP_DIRS = ("bench", "demo", "loraserve", "scripts", "tests", ".ci")
# Made by running things (git-ignored), so absent from a fresh clone yet fine to mention.
GENERATED = ("bench/.cache",)

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_PATHLIKE = re.compile(r"^[\w.\-/]+$")
_RESULT_FILE = re.compile(r"^[\w.\-]+-\d{4}-\d\d-\d\d\.(json|txt)$")


def _prose(text: str) -> str:
    """The text outside fenced code blocks (commands there are examples, not citations)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", _prose(md.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _problems(doc: Path) -> list[str]:
    text = _prose(doc.read_text())
    found: list[str] = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # web links and same-page anchors
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve()
        if not path.exists():
            found.append(f"link {target!r}: {path_part} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            found.append(f"link {target!r}: no heading #{anchor} in {path_part}")
    for span in _CODE_SPAN.findall(text):
        token = span.strip()
        if not _PATHLIKE.match(token):
            continue
        if "/" in token and token.split("/")[0] in TOP_DIRS:
            if not (ROOT / token).exists() and not token.startswith(GENERATED):
                found.append(f"path `{token}` does not exist")
        elif _RESULT_FILE.match(token) and not (ROOT / "bench" / "results" / token).exists():
            found.append(f"result file `{token}` is not in bench/results/")
    return found


def test_docs_are_found() -> None:
    names = {d.relative_to(ROOT).as_posix() for d in DOCS}
    assert {"README.md", "bench/README.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_cited_paths_exist(doc: Path) -> None:
    assert _problems(doc) == []


def test_checker_catches_missing_paths(tmp_path: Path) -> None:
    """The checker itself: a missing link, anchor, path and result file are each reported."""
    (tmp_path / "other.md").write_text("# Real heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[a](missing.md) [b](other.md#real-heading) [c](other.md#nope) [d](https://x.y/z)\n"
        "`loraserve/no_such_module.py` `demo/model` `gone-2026-01-01.json` `$x/y`\n"
        "```\n[e](also-missing.md)\n```\n"
    )
    assert _problems(doc) == [
        "link 'missing.md': missing.md does not exist",
        "link 'other.md#nope': no heading #nope in other.md",
        "path `loraserve/no_such_module.py` does not exist",
        "result file `gone-2026-01-01.json` is not in bench/results/",
    ]
