"""Root conftest: select the runtime before any test module imports numba or triton."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from common import runtime  # noqa: E402  (must come before numba/triton)
from common.lessons import all_lessons  # noqa: E402

for _lesson in all_lessons():
    if str(_lesson) not in sys.path:
        sys.path.insert(1, str(_lesson))


def pytest_report_header(config):
    return runtime.banner()


def pytest_collection_modifyitems(config, items):
    if runtime.is_gpu():
        return
    skip = pytest.mark.skip(reason="needs a GPU: " + runtime.probe_gpu().reason
                            if not runtime.probe_gpu().available
                            else "needs a GPU: emulation forced by COURSE_MODE=cpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
