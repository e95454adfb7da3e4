"""Every lesson's main.py runs as `make lesson-NN` runs it, in bounded time.

Under emulation that is the simulator/interpreter path; on a GPU machine it is the GPU
path (what a learner with a GPU gets). The GPU image's triton 3.6 interpreter cannot run
with its numpy 2.5 anyway (docs/environment.md), so forcing --cpu there would only test
a known-broken combination.
"""

import os
import subprocess
import sys

import pytest

from common import runtime
from common.lessons import REPO, all_lessons

TIME_LIMIT_S = 300


@pytest.mark.slow
@pytest.mark.parametrize("lesson", all_lessons(), ids=lambda p: p.name)
def test_main_runs(lesson):
    flag = "--gpu" if runtime.is_gpu() else "--cpu"
    env = {**os.environ, "COURSE_MODE": flag[2:], "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(lesson / "main.py"), flag], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert r.returncode == 0, f"{lesson.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert ("GPU mode" if runtime.is_gpu() else "Emulation mode") in r.stdout
    assert "Traceback" not in r.stderr
