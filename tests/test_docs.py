"""Every design-document citation in the repository resolves (fast, no server).

Oracle: the headings of the files in docs/. A citation is ``docs/<file>.md §N`` (or ``§N.M``), optionally
with the file name in backticks; further ``§`` numbers later on the same line (``docs/format.md §5.2 and §6``)
refer to the same file. Outside docs/, a ``§`` with no such citation before it on its line is a dangling
reference (e.g. the old "spec §2.6"), and so is any mention of the out-of-repository ``shared/docs``.
Inside docs/, a bare ``§N`` refers to the file itself; old-spec numbers ("spec §2.6" and the old column of
format.md's mapping table) are exempt.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", "node_modules", ".lsgpt_cache"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".pbtxt", ".yaml", ".yml", ".cfg", ".ini", ".pyi"}
TEXT_NAMES = {"Makefile", "Dockerfile"}
THIS = Path(__file__).resolve()

CITATION = re.compile(r"docs/([\w.-]+?\.md)`*\s*§\s*(\d+(?:\.\d+)?)")
SECTION = re.compile(r"§\s*(\d+(?:\.\d+)?)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.M)
OUTSIDE = "shared/" + "docs"  # split so that this file does not cite it


def _repository_files():
    """The files git would commit (tracked, or new and not ignored): scratch copies under ignored folders such
    as results/tmp/ are not the repository's documents. Without git: a walk that skips SKIP_DIRS."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        yield from (ROOT / f for f in out.decode().split("\0") if f and (ROOT / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            yield from (Path(dirpath) / name for name in filenames)


def text_files():
    for p in _repository_files():
        if p.resolve() == THIS:
            continue
        if p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES or p.name.startswith("Dockerfile"):
            try:
                yield p, p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue


@cache
def sections(doc: str) -> frozenset[str]:
    path = DOCS / doc
    return frozenset(HEADING.findall(path.read_text(encoding="utf-8"))) if path.is_file() else frozenset()


def check_line(rel: str, lineno: int, line: str, in_docs: bool) -> list[str]:
    problems = []
    where = f"{rel}:{lineno}"
    cites = [(m.start(), m.end(), m.group(1)) for m in CITATION.finditer(line)]
    for _, _, doc in cites:
        if not (DOCS / doc).is_file():
            problems.append(f"{where}: cites docs/{doc}, which does not exist")
    if in_docs and line.lstrip().startswith("|") and "spec §" in line:
        # format.md's mapping table: the old numbers are history; the last cell holds the new ones
        cells = [c for c in line.strip().strip("|").split("|")]
        line_to_check, offset = cells[-1], line.rindex(cells[-1])
    else:
        line_to_check, offset = line, 0
    for m in SECTION.finditer(line_to_check):
        pos, number = offset + m.start(), m.group(1)
        if line[:pos].endswith("spec ") and in_docs:
            continue  # an old-spec number quoted in docs/
        before = [c for c in cites if c[0] < pos]
        if before:
            doc = before[-1][2]
        elif in_docs:
            doc = rel.split("/", 1)[1]
        else:
            problems.append(f"{where}: '§{number}' without a docs/<file>.md citation: {line.strip()[:120]}")
            continue
        if (DOCS / doc).is_file() and number not in sections(doc):
            problems.append(f"{where}: docs/{doc} has no section {number}: {line.strip()[:120]}")
    if OUTSIDE in line and not in_docs:
        problems.append(f"{where}: cites {OUTSIDE}, which is not in the repository: {line.strip()[:120]}")
    return problems


def test_docs_have_numbered_sections():
    for doc in ("format.md", "platform.md"):
        assert (DOCS / doc).is_file(), f"docs/{doc} missing"
        assert sections(doc), f"docs/{doc} has no numbered headings"


def test_every_citation_resolves():
    problems, n_cites = [], 0
    for path, text in text_files():
        rel = path.relative_to(ROOT).as_posix()
        in_docs = rel.startswith("docs/")
        if "§" not in text and OUTSIDE not in text:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if "§" in line or OUTSIDE in line:
                n_cites += len(CITATION.findall(line))
                problems += check_line(rel, lineno, line, in_docs)
    assert not problems, "unresolved references:\n" + "\n".join(problems)
    assert n_cites > 0, "no docs/<file>.md § citations found: is the scan looking in the right place?"


def test_checker_catches_bad_citations():
    """The checker itself: a bare old citation, a missing file, a missing section, the outside folder."""
    assert check_line("x.py", 1, "# spec §2.6", False)
    assert check_line("x.py", 1, "# docs/nope.md §1", False)
    assert check_line("x.py", 1, "# docs/format.md §99", False)
    assert check_line("x.py", 1, "# docs/format.md §5.2 and §77", False)
    assert check_line("x.py", 1, f"# see {OUTSIDE}/platform.md", False)
    assert not check_line("x.py", 1, "# docs/format.md §5.2 and §6; `docs/platform.md` §1", False)
