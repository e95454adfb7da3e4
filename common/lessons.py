"""Find lessons and load their modules.

Lesson folders start with digits (``08_flash_v2``), so they cannot be Python packages.
The one way to load a lesson's module, used by the tests, the scripts and other lessons:
put the lesson folder on ``sys.path`` and import the module by its name. Module names
are unique across all lessons (``tests/test_layout.py`` enforces it), so two lessons'
modules never shadow each other.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LESSONS = REPO / "lessons"


def all_lessons() -> list[Path]:
    """The lesson folders, in order (``lessons/NN_name`` with a main.py)."""
    if not LESSONS.is_dir():
        return []
    return sorted(p for p in LESSONS.iterdir()
                  if p.is_dir() and re.match(r"^\d\d_", p.name) and (p / "main.py").exists())


def lesson_dir(lesson: str | int) -> Path:
    """``8``, ``"08"`` or ``"08_flash_v2"`` -> the lesson's folder."""
    key = str(lesson)
    if key.isdigit():
        key = f"{int(key):02d}"
    for p in all_lessons():
        if p.name == key or p.name.split("_", 1)[0] == key:
            return p
    known = ", ".join(p.name.split("_", 1)[0] for p in all_lessons())
    raise LookupError(f"there is no lesson {lesson!r} (lessons: {known})")


def lesson_dir_from_cli(lesson: str, example: str) -> Path | None:
    """A script's ``--lesson`` value -> the folder, or None after saying on stderr what is
    wrong (none given: ``example`` shows how; no such lesson: the ones there are)."""
    if not lesson:
        print(f"error: say which lesson: {example}", file=sys.stderr)
        return None
    try:
        return lesson_dir(lesson)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def import_lesson_module(lesson: str | int, module: str):
    """Import ``module`` from a lesson's folder, e.g. ``("08", "flash_attn")``."""
    folder = str(lesson_dir(lesson))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(module)
