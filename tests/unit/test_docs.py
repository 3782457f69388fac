"""The docs point at things that exist: every relative link (and its #anchor) and every file path written in
backticks in README.md and docs/*.md, and every markdown file a module docstring names."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# `bench/sft_tiny.sh`, `automodel_mimo/mimo/model.py`, `data/images.py` (short for automodel_mimo/data/...)
CODE_PATH = re.compile(r"`([\w./-]+/[\w.-]+\.(?:py|md|sh|yaml|yml|toml|json))`")
SEARCHED = (ROOT, ROOT / "automodel_mimo")  # a backticked path may be relative to either


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(md: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in md.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_links_resolve(md):
    broken = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        file = (md.parent / path).resolve() if path else md
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{md.name}: " + "; ".join(broken)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.name)
def test_code_paths_exist(md):
    missing = sorted({p for p in CODE_PATH.findall(md.read_text())
                      if not p.startswith("..") and not any((base / p).exists() for base in SEARCHED)})
    assert not missing, f"{md.name} names files that do not exist: {missing}"


def test_docstrings_name_docs_that_exist():
    """Module docstrings cite docs by file name (e.g. docs/numerics.md); the file must be in the repo."""
    named = re.compile(r"\b([\w/]+\.md)\b")
    missing = [f"{py.relative_to(ROOT)}: {name}"
               for py in [*(ROOT / "automodel_mimo").rglob("*.py"), *(ROOT / "policies").rglob("*.py")]
               for name in named.findall(py.read_text())
               if not (ROOT / name).is_file() and not (ROOT / "docs" / name).is_file()]
    assert not missing, missing
