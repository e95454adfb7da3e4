"""Repository conventions that the lesson loader relies on."""

from collections import Counter

from common.lessons import all_lessons


def test_module_names_are_unique_across_lessons():
    names = Counter(p.stem for lesson in all_lessons() for p in lesson.glob("*.py")
                    if p.stem not in ("main", "conftest"))
    dup = [n for n, c in names.items() if c > 1]
    assert not dup, f"module names must be unique across lessons (sys.path loader): {dup}"


def test_every_lesson_has_main_readme_and_tests():
    for lesson in all_lessons():
        assert (lesson / "README.md").exists(), lesson
        assert list(lesson.glob("test_*.py")), f"{lesson.name} has no tests"
