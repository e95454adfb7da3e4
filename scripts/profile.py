"""`make profile LESSON=NN`: Nsight Compute on a lesson's main kernel, sections a learner can read.

Runs the lesson's ``main.py`` under ``ncu`` and profiles the first launch of its main
kernel (matched by name) with a small set of sections: SpeedOfLight (achieved memory and
compute throughput as % of peak), Occupancy, LaunchStats (registers, shared memory),
MemoryWorkloadAnalysis (bytes per level, bank conflicts), WarpStateStats (why warps stall).
``--clock-control none`` leaves the GPU's clocks as they are (our machines are shared;
METHOD.md). docs/profiling.md explains how to read the report. nsys is not installed on
our GPU machine: docs/profiling.md shows torch.profiler as the timeline alternative.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import runtime  # noqa: E402
from common.lessons import lesson_dir_from_cli  # noqa: E402

# Each lesson's main kernel: a regular expression on the kernel's name as ncu sees it
# (Numba mangles names, Triton keeps the Python function name).
MAIN_KERNEL = {
    "01": "global_index_kernel",
    "02": "add_kernel",
    "03": "matmul",
    "04": "interleaved_strided",
    "05": "work_kernel",
    "06": "softmax_rows_kernel",
    "07": "flash_v1_kernel",
    "08": "_attn_fwd_kernel",
    "09": "_mla_decode_kernel",
}
SECTIONS = ["SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis",
            "WarpStateStats"]


def find_ncu() -> str | None:
    for cand in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu"):
        if cand and Path(cand).exists():
            return cand
    found = sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu")) if Path("/opt/nvidia").exists() else []
    return str(found[-1]) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lesson", default="")
    ap.add_argument("--kernel", help="regex on the kernel name (default: the lesson's main one)")
    ap.add_argument("--skip", type=int, default=1,
                    help="launches of that kernel to skip first (JIT warm-up)")
    ap.add_argument("--output", help="also save the report (.ncu-rep) here")
    ap.add_argument("main_args", nargs="*", help="passed to main.py (after --)")
    args = ap.parse_args()
    folder = lesson_dir_from_cli(args.lesson, "make profile LESSON=08")
    if folder is None:
        return 2
    if runtime.is_emulated():
        print("make profile needs a GPU: Nsight Compute reads the hardware counters.")
        return 0
    ncu = find_ncu()
    if ncu is None:
        print("error: ncu (Nsight Compute) not found", file=sys.stderr)
        return 2
    kernel = args.kernel or MAIN_KERNEL.get(folder.name[:2], ".")
    cmd = [ncu, "--clock-control", "none", "--kernel-name", f"regex:{kernel}",
           "--launch-skip", str(args.skip), "--launch-count", "1"]
    for s in SECTIONS:
        cmd += ["--section", s]
    if args.output:
        cmd += ["--export", args.output, "--force-overwrite"]
    cmd += [sys.executable, str(folder / "main.py"), *args.main_args]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
