"""Docs that cannot drift silently: no line anchors, and every cited name exists.

A line anchor (`flash_attn.py#L123`) is wrong as soon as someone edits the file above the
line, and nothing notices. The docs cite code by name instead, in one of two forms:

- a link whose text is the backticked name and whose target is the file:
  [`_fwd_inner`](../../lessons/08_flash_v2/flash_attn.py)
- prose: `_fwd_inner` in `lessons/08_flash_v2/flash_attn.py` (the path relative to the
  document or to the repository root, with or without backticks).

These tests read every Markdown file in the repository (no imports, no GPU) and check that
each cited name still occurs in the file it is cited in: a renamed or deleted function
fails here, not in a reader's head.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"node_modules", "__pycache__", "build", "dist", "site-packages"}
SOURCE_SUFFIXES = {".py", ".cu", ".cuh", ".h", ".hpp", ".cpp", ".c", ".txt", ".toml",
                   ".cfg", ".sh", ".yaml", ".yml", ".json", ".md"}

LINE_ANCHOR = re.compile(r"#L\d+")
LINK_CITATION = re.compile(r"\[`([^`]+)`\]\(([^)\s#]+)(?:#[^)]*)?\)")
PROSE_CITATION = re.compile(r"`([^`]+)` in `?([A-Za-z0-9_./-]+\.[A-Za-z0-9]+)`?")


def markdown_files() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(dirpath) / f for f in filenames if f.endswith(".md")]
    return sorted(found)


def _resolve(doc: Path, target: str) -> Path | None:
    for base in (doc.parent, ROOT):
        p = (base / target).resolve()
        if p.is_file():
            return p
    return None


def _name_occurs(name: str, text: str) -> bool:
    """`name` occurs in the file: verbatim, or (for `module.func`, `Class.method`) each
    dotted part that is not the file's own module name occurs as a whole word."""
    if name in text:
        return True
    parts = [p for p in name.strip("()").split(".") if p]
    if not parts or not all(re.fullmatch(r"[A-Za-z_]\w*", p) for p in parts):
        return False
    return all(re.search(rf"\b{re.escape(p)}\b", text) for p in parts)


def citations(doc: Path) -> list[tuple[int, str, Path]]:
    """(line number, cited name, resolved file) for every checkable citation in doc."""
    out = []
    for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        for rx in (LINK_CITATION, PROSE_CITATION):
            for name, target in rx.findall(line):
                path = _resolve(doc, target)
                if path is None or path.suffix not in SOURCE_SUFFIXES:
                    continue
                # [`parallel_reduction.py`](parallel_reduction.py): the text is the file itself
                if name.rstrip("/").endswith(path.name) or name.endswith(target):
                    continue
                stem = path.stem + "."   # `module.func`: the module is the file itself
                name = name[len(stem):] if name.startswith(stem) else name
                out.append((lineno, name, path))
    return out


def test_markdown_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert "README.md" in names and "docs/flash_attention/01_theory.md" in names


def test_no_line_anchors_in_docs():
    bad = [f"{doc.relative_to(ROOT)}:{i}: {m.group(0)}"
           for doc in markdown_files()
           for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
           for m in LINE_ANCHOR.finditer(line)]
    assert not bad, ("line anchors go stale with the next edit; cite the function by name "
                     "([`name`](path) or `name` in path):\n" + "\n".join(bad))


def test_cited_names_exist_in_their_files():
    bad, checked = [], 0
    cache: dict[Path, str] = {}
    for doc in markdown_files():
        for lineno, name, path in citations(doc):
            text = cache.setdefault(path, path.read_text(encoding="utf-8", errors="replace"))
            checked += 1
            if not _name_occurs(name, text):
                bad.append(f"{doc.relative_to(ROOT)}:{lineno}: `{name}` not found in "
                           f"{path.relative_to(ROOT)}")
    assert checked >= 20, f"only {checked} citations found: is the pattern still right?"
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_are_for(tmp_path):
    doc = tmp_path / "doc.md"
    code = tmp_path / "kernels.py"
    code.write_text("def real_kernel():\n    pass  # pass 1\n")
    doc.write_text("[`real_kernel`](kernels.py) and [`# pass 1`](kernels.py), "
                   "`kernels.real_kernel` in kernels.py\n"
                   "[`gone_kernel`](kernels.py#L1) and `gone_too` in `kernels.py`\n")
    found = citations(doc)
    missing = [n for _, n, p in found if not _name_occurs(n, p.read_text())]
    assert missing == ["gone_kernel", "gone_too"]
    assert LINE_ANCHOR.search(doc.read_text())
