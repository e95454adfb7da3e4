"""Every lesson's main.py runs under emulation, as `make lesson-NN` runs it, in bounded time."""

import os
import subprocess
import sys

import pytest

from common.lessons import REPO, all_lessons

TIME_LIMIT_S = 300


@pytest.mark.slow
@pytest.mark.parametrize("lesson", all_lessons(), ids=lambda p: p.name)
def test_main_runs_under_emulation(lesson):
    env = {**os.environ, "COURSE_MODE": "cpu", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(lesson / "main.py"), "--cpu"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert r.returncode == 0, f"{lesson.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Emulation mode" in r.stdout
    assert "Traceback" not in r.stderr
