"""Root conftest: select the runtime before any test module imports numba or triton."""

import os
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


# hypothesis (property tests of lessons 06-09): few, reproducible examples under emulation
# (the simulator and the interpreter are slow; CI must draw the same cases every run), more
# on a GPU. A test may ask for a fraction of the profile's examples, never a fixed count.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("cpu", max_examples=6, deadline=None, derandomize=True,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=60, deadline=None, derandomize=True,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gpu" if runtime.is_gpu() else "cpu")


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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "triton_unchecked: run without the interpreter's bounds check "
        "(common/triton_bounds.py)")


@pytest.fixture(autouse=True)
def triton_bounds_check(request):
    """Under emulation, every Triton launch in a test is bounds-checked: an active lane of a
    tl.load/tl.store outside every tensor argument fails the test (the interpreter itself
    neither faults nor warns; see common/triton_bounds.py). Opt out per test with
    @pytest.mark.triton_unchecked, or for a whole run with COURSE_TRITON_BOUNDS=0."""
    if runtime.is_gpu() or "triton_unchecked" in request.keywords \
            or "triton" not in sys.modules or os.environ.get("COURSE_TRITON_BOUNDS") == "0":
        yield
        return
    from common import triton_bounds
    with triton_bounds.checked():
        yield
