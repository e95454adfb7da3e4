"""Runtime selection: emulation switches are on before numba/triton load; errors are clear."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import runtime

ROOT = Path(__file__).resolve().parents[1]


def _run(code, **env):
    # a fresh interpreter, without the switches this test process already set
    full = {k: v for k, v in os.environ.items()
            if k not in ("NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)


def test_forced_cpu_switches_simulator_and_interpreter_on():
    r = _run("import common.runtime as rt, os, numba.cuda as c;"
             "print(rt.mode(), os.environ['TRITON_INTERPRET'], c.simulator.__name__ if hasattr(c,'simulator') else c.is_available())",
             COURSE_MODE="cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["emulation", "1"]


def test_unknown_mode_is_one_clear_sentence():
    r = _run("import common.runtime", COURSE_MODE="tpu")
    assert r.returncode != 0 and "is not a mode: use cpu, gpu or auto" in r.stderr


@pytest.mark.skipif(runtime.probe_gpu().available, reason="this machine has a GPU")
def test_forced_gpu_without_gpu_fails_with_a_sentence_not_a_traceback():
    r = _run("from common.cli import lesson_args; lesson_args('demo', argv=['--gpu'])")
    assert r.returncode != 0
    assert "GPU mode was asked for" in r.stderr and "Traceback" not in r.stderr


def test_importing_numba_first_is_refused():
    r = _run("import numba; import common.runtime", COURSE_MODE="cpu")
    assert r.returncode != 0 and "imported before common.runtime" in r.stderr


def test_pick_and_banner_follow_the_mode():
    assert runtime.pick("big", "small") == ("big" if runtime.is_gpu() else "small")
    assert ("GPU mode" in runtime.banner()) == runtime.is_gpu()


def test_unknown_lesson_says_so():
    r = subprocess.run([sys.executable, "scripts/run_lesson.py", "42"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "there is no lesson '42'" in r.stderr
