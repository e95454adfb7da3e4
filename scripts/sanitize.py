"""`make sanitize LESSON=NN`: compute-sanitizer memcheck and racecheck on a lesson's kernels.

Runs the lesson's ``main.py`` (every kernel, checked against its reference) under
NVIDIA's compute-sanitizer, at small sizes (``COURSE_SIZES=small``: the tools slow
kernels down 10-100x). memcheck finds out-of-bounds and misaligned accesses; racecheck
finds shared-memory hazards (a missing ``cuda.syncthreads()``). Exit status 1 if either
reports an error. Needs a GPU and compute-sanitizer on the PATH (or in /usr/local/cuda).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import runtime  # noqa: E402
from common.lessons import lesson_dir_from_cli  # noqa: E402

NUMBA_LESSONS = ("01", "02", "03", "04", "05", "06", "07")


def find_sanitizer() -> str | None:
    for cand in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if cand and Path(cand).exists():
            return cand
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lesson", required=False, default="",
                    help=f"a Numba lesson: {', '.join(NUMBA_LESSONS)}")
    ap.add_argument("--tools", default="memcheck,racecheck")
    ap.add_argument("--log", help="write the tools' full output here (default: print it)")
    args = ap.parse_args()
    folder = lesson_dir_from_cli(args.lesson, "make sanitize LESSON=04")
    if folder is None:
        return 2
    if folder.name[:2] not in NUMBA_LESSONS:
        print(f"note: {folder.name} is a Triton lesson; compute-sanitizer works on it too, "
              "but the course checks the Numba lessons' hand-indexed kernels.")
    if runtime.is_emulated():
        print("make sanitize needs a GPU: compute-sanitizer checks real device memory. "
              "Under the simulator, out-of-bounds indexing already raises IndexError.")
        return 0
    tool = find_sanitizer()
    if tool is None:
        print("error: compute-sanitizer not found (it ships with the CUDA toolkit)",
              file=sys.stderr)
        return 2
    env = {**os.environ, "COURSE_SIZES": "small", "PYTHONUNBUFFERED": "1"}
    bad = False
    for name in args.tools.split(","):
        # API errors (a driver call answering "invalid value" to a probe, e.g. asking
        # whether a host pointer is device memory) are not memory bugs in our kernels:
        # report only what the kernels do.
        cmd = [tool, "--tool", name, "--print-limit", "20", "--report-api-errors", "no",
               sys.executable, str(folder / "main.py")]
        print("$", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        report = [ln for ln in r.stdout.splitlines() if ln.startswith("=========")]
        if args.log:
            with open(args.log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n")
        print("\n".join(report[:40] + (["..."] if len(report) > 45 else []) + report[-5:]))
        m = re.search(r"ERROR SUMMARY: (\d+) error", r.stdout)
        errors = int(m.group(1)) if m else -1
        hazards = re.search(r"RACECHECK SUMMARY: (\d+) hazard", r.stdout)
        if hazards:
            errors = max(errors, int(hazards.group(1)))
        print(f"{folder.name} {name}: {'clean' if errors == 0 else f'{errors} error(s)'}"
              f" (exit {r.returncode})")
        if errors != 0 or r.returncode != 0:
            bad = True
            print(r.stderr[-2000:], file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
