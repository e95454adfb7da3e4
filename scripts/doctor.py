"""`make doctor`: what the course will use on this machine, and what is known to break.

Prints GPU or emulation, the driver and GPU name, the package versions, and any
known-bad combination (each one measured, see docs/environment.md). `--short` prints one
line plus problems (what `make test-all` shows first). Exit status 0 unless a required
package is missing.
"""

import argparse
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REQUIRED = ("torch", "triton", "numpy", "numba", "numba-cuda", "cuda-core", "pytest", "rich")
OPTIONAL = ("cuda-bindings", "matplotlib", "pytest-xdist", "nvidia-cuda-nvrtc")


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _vt(v):
    out = []
    for part in (v or "0").split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def known_problems(versions, emulated):
    problems = []
    np_v, nc_v, tr_v = versions.get("numpy"), versions.get("numba-cuda"), versions.get("triton")
    if np_v and nc_v and _vt(np_v) >= (2, 5) and _vt(nc_v) < (0, 31):
        problems.append(
            f"numpy {np_v} with numba-cuda {nc_v}: numba-cuda calls np.row_stack, removed in "
            "numpy 2.5 (NVIDIA/numba-cuda#907). Bridged by common/runtime.py "
            "(np.row_stack = np.vstack); pin numpy<2.5 in fresh installs.")
    if emulated and np_v and tr_v and _vt(np_v) >= (2, 4) and _vt(tr_v) < (3, 7):
        problems.append(
            f"triton {tr_v}'s interpreter with numpy {np_v}: loops bounded by a kernel "
            "argument fail ('only 0-dimensional arrays can be converted to Python "
            "scalars'). Use numpy<2.4 (requirements.txt) or triton>=3.9.")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true")
    args = ap.parse_args()

    from common import runtime  # selects the mode; imports no numba/triton

    versions = {n: _version(n) for n in REQUIRED + OPTIONAL}
    missing = [n for n in REQUIRED if versions[n] is None]
    problems = known_problems(versions, runtime.is_emulated())
    if args.short:
        print(runtime.banner())
    else:
        probe = runtime.probe_gpu()
        print(f"mode:    {runtime.mode()}  ({runtime.banner()})")
        print(f"python:  {sys.version.split()[0]} at {sys.executable}")
        print(f"driver:  {'CUDA ' + probe.driver_version if probe.available else probe.reason}")
        if probe.available:
            print(f"GPU:     {probe.name} (x{probe.device_count})")
        for n in REQUIRED + OPTIONAL:
            print(f"  {n:<18} {versions[n] or 'not installed'}")
    for m in missing:
        print(f"MISSING: {m} is not installed: run `make setup` (or pip install -r "
              "requirements.txt into the interpreter you pass as PYTHON=).")
    for p in problems:
        print(f"KNOWN ISSUE: {p}")
    if not args.short and not missing and not problems:
        print("no known-bad combination found")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
