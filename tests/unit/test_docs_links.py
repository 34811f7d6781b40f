"""The docs speak only of what is in the repository: every file they name exists,
and no path leads outside it (issue 10: performance.md pointed to both)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
#: Repository paths as the docs write them: in backticks or as a Markdown link target.
NAMED = re.compile(r"(?:`|\]\()((?:docs|benchmarks|tests|vmig|images)/[\w./-]+?)(?:`|\))")


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_file_a_doc_names_exists(doc):
    missing = []
    for name in NAMED.findall(doc.read_text()):
        path = (doc.parent if name.startswith("images/") else ROOT) / name
        if re.search(r"[<*{]|/[A-Z]+$", name):  # a pattern or a placeholder, not a file
            continue
        if not path.exists():
            missing.append(name)
    assert not missing, f"{doc.name} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_no_doc_points_outside_the_repository(doc):
    text = doc.read_text()
    assert not re.search(r"/work/|\.\./shared|benchmarks/results/", text), \
        f"{doc.name} points outside the repository (or to uncommitted results)"
