"""`make bench [LESSON=NN]`: every lesson's benchmark, its raw results, plots and README tables.

On a GPU: runs ``main.py --bench`` of each lesson (each writes its JSON and plots under
``lessons/NN_name/results/``, or under ``$RESULTS_DIR`` when set), then rewrites every
README's results blocks and the top-level summary from those files
(``scripts/update_readmes.py``). Without a GPU it says so and exits 0: emulated timings
would measure the simulator, not the kernels.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import runtime  # noqa: E402
from common.lessons import all_lessons, lesson_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lesson", help="one lesson (e.g. 08); default: all")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per lesson")
    args = ap.parse_args()

    print(runtime.banner())
    if runtime.is_emulated():
        print("make bench needs a GPU: under emulation timings measure the simulator. "
              "Nothing was run; the committed results stay as they are.")
        return 0
    try:
        lessons = [lesson_dir(args.lesson)] if args.lesson else all_lessons()
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    failed = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("benchmarks", total=len(lessons))
        for lesson in lessons:
            progress.update(task, description=f"{lesson.name} --bench")
            t0 = time.time()
            r = subprocess.run([sys.executable, str(lesson / "main.py"), "--bench"],
                               cwd=REPO, timeout=args.timeout)
            status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
            progress.console.print(f"{lesson.name}: {status} in {time.time() - t0:.0f} s")
            if r.returncode != 0:
                failed.append(lesson.name)
            progress.advance(task)
    subprocess.run([sys.executable, str(REPO / "scripts" / "update_readmes.py")], cwd=REPO)
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
