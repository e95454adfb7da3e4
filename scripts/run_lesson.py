"""`make lesson-NN [ARGS=...]`: run a lesson's main.py with the right interpreter."""

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.lessons import lesson_dir  # noqa: E402  (imports neither numba nor triton)


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: run_lesson.py NN [args for main.py]", file=sys.stderr)
        return 2
    try:
        folder = lesson_dir(sys.argv[1])
    except LookupError as e:
        print(f"error: {e}; it may not exist yet (see the lesson map in README.md)",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(folder / "main.py"), *sys.argv[2:]])


if __name__ == "__main__":
    sys.exit(main())
