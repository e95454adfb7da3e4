"""The command line every lesson's ``main.py`` shares.

    python lessons/NN_name/main.py            # run each kernel, check it, print a table
    python lessons/NN_name/main.py --bench    # benchmark against the peers (GPU only)
    python lessons/NN_name/main.py --cpu      # force emulation even with a GPU

``lesson_args`` parses the command line *before* anything imports numba or triton,
selects the runtime, and prints the one line that says where the code runs. So a
``main.py`` starts with::

    import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from common.cli import lesson_args
    args = lesson_args(__doc__)
    ...  # now import the kernels
"""

from __future__ import annotations

import argparse
import os
import sys


def lesson_args(description: str | None, add_arguments=None, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true",
                      help="force emulation (Numba CUDA simulator + Triton interpreter)")
    mode.add_argument("--gpu", action="store_true", help="require a GPU; fail if none")
    parser.add_argument("--bench", action="store_true",
                        help="benchmark against the peers (GPU only), save results JSON")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)

    if args.cpu:
        os.environ["COURSE_MODE"] = "cpu"
    elif args.gpu:
        os.environ["COURSE_MODE"] = "gpu"
    try:
        from common import runtime  # its first import selects the mode from COURSE_MODE
        runtime.select()
    except RuntimeError as e:  # RuntimeSelectionError: one sentence, no traceback
        sys.exit(f"error: {e}")
    print(runtime.banner())
    if args.bench and runtime.is_emulated():
        print("--bench needs a GPU: under emulation every CUDA thread is a Python thread, "
              "so timings would measure the simulator, not the kernel. Nothing to do.")
        sys.exit(0)
    return args
