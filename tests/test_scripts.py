"""The tools under scripts/: doctor's known-bad combinations, the GPU-only tools under
emulation, and the README blocks generated from result files."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import runtime

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    """A script as a module, without putting scripts/ on sys.path: scripts/profile.py
    would shadow the standard library's `profile` (which cProfile, and so torch.compile,
    imports) for every later test in the process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doctor = _load("doctor")
update_readmes = _load("update_readmes")


def _script(*args):
    env = {**os.environ, "COURSE_MODE": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_doctor_flags_the_known_bad_combinations():
    bad = doctor.known_problems({"numpy": "2.5.2", "numba-cuda": "0.30.4", "triton": "3.6.0"},
                                emulated=True)
    assert len(bad) == 2 and "row_stack" in bad[0] and "interpreter" in bad[1]
    assert doctor.known_problems({"numpy": "2.3.5", "numba-cuda": "0.30.4",
                                  "triton": "3.6.0"}, emulated=True) == []
    # the interpreter problem does not concern a GPU run
    assert len(doctor.known_problems({"numpy": "2.5.2", "numba-cuda": "0.30.4",
                                      "triton": "3.6.0"}, emulated=False)) == 1


@pytest.mark.skipif(runtime.is_gpu(), reason="checks the no-GPU answer")
@pytest.mark.parametrize("script,args", [("bench_all.py", []), ("profile.py", ["--lesson", "08"]),
                                         ("sanitize.py", ["--lesson", "04"])])
def test_gpu_tools_say_why_and_exit_cleanly_without_a_gpu(script, args):
    r = _script(f"scripts/{script}", *args)
    assert r.returncode == 0, r.stderr
    assert "needs a GPU" in r.stdout


@pytest.mark.skipif(runtime.is_gpu(), reason="checks the no-GPU answer")
@pytest.mark.parametrize("script", ["lessons/08_flash_v2/launch_cost.py",
                                    "lessons/09_mla/timeline.py"])
def test_lesson_gpu_probes_say_why_and_exit_cleanly_without_a_gpu(script):
    r = _script(script)
    assert r.returncode == 0, r.stderr
    assert "nothing to do under emulation" in r.stdout


def test_gpu_tools_reject_an_unknown_lesson():
    for script in ("profile.py", "sanitize.py"):
        r = _script(f"scripts/{script}", "--lesson", "42")
        assert r.returncode == 2 and "there is no lesson '42'" in r.stderr


def test_readme_blocks_and_summary_come_from_the_json(tmp_path, monkeypatch):
    lesson = tmp_path / "lessons" / "04_reduction"
    (lesson / "results").mkdir(parents=True)
    (lesson / "main.py").write_text("")
    row = lambda impl, v, peer=False: {"case": {"op": "sum", "n": 268435456}, "impl": impl,  # noqa: E731
                                       "peer": peer, "ms": 1.0, "timing": None, "value": v}
    data = {"lesson": "04_reduction", "name": "reduction_bandwidth", "title": "t",
            "metric": "GB/s", "ceilings": {"copy_gbps": 3000.0},
            "environment": {"date": "2026-11-25 12:00 UTC", "gpu": "NVIDIA H100 80GB HBM3",
                            "packages": {"torch": "2.11.0"}},
            "rows": [row("7 grid-stride", 2900.0), row("1 divergent", 530.0),
                     row("torch.sum", 2969.0, peer=True)]}
    (lesson / "results" / "reduction_bandwidth-h100-80gb-hbm3.json").write_text(json.dumps(data))
    readme = lesson / "README.md"
    readme.write_text("x\n<!-- results:reduction_bandwidth -->\nstale\n"
                      "<!-- /results:reduction_bandwidth -->\ny\n")
    assert update_readmes.render(readme)
    text = readme.read_text()
    assert "stale" not in text and "| sum | 268435456 | 2,900.0 | 530.0 | 2,969.0 |" in text
    top = tmp_path / "README.md"
    top.write_text("<!-- results-summary -->\n<!-- /results-summary -->\n")
    monkeypatch.setattr(update_readmes, "all_lessons", lambda: [lesson])
    assert update_readmes.render_summary(top)
    summary = top.read_text()
    assert "2,900.0 GB/s (7 grid-stride)" in summary and "0.98x" in summary
    assert "97% of copy bandwidth" in summary


def test_summary_ceiling_never_contradicts_the_peer_ratio():
    """Lesson 03's run recorded a bf16 ceiling of 672 TFLOPS (measured before the
    benchmark) while cuBLAS bf16 itself reached 787 in the same run: the summary must say
    92% (= the 0.92x against that peer), not 108% of cuBLAS bf16."""
    row = lambda impl, v, peer=False: {"case": {"size": "8192^3"}, "impl": impl,  # noqa: E731
                                       "peer": peer, "value": v}
    data = {"name": "sweep", "metric": "TFLOPS",
            "ceilings": {"copy_gbps": 3030.7, "bf16_tflops": 672.2},
            "rows": [row("cuBLAS bf16", 787.4, peer=True), row("triton bf16 tma", 726.4),
                     row("triton bf16 pointers", 677.4)]}
    line = update_readmes.summary_row("03_matmul", data, {"size": "8192^3"}, "triton bf16",
                                      "cuBLAS bf16", "bf16")
    assert "| 0.92x | 92% of cuBLAS bf16 8192^3, same run |" in line, line
    # where the same-run peer is slower than the recorded ceiling, the ceiling stands
    data["rows"][0]["value"] = 650.0
    line = update_readmes.summary_row("03_matmul", data, {"size": "8192^3"}, "triton bf16",
                                      "cuBLAS bf16", "bf16")
    assert "| 1.12x | 108% of cuBLAS bf16 8192^3 |" in line, line
    # no recorded ceiling: the same-run device copy is the ceiling; none at all: empty
    assert update_readmes.ceiling_fraction(
        2789.1, [{"impl": "device copy (ceiling)", "peer": True, "value": 3029.0}], {},
        "copy") == "92% of copy bandwidth, same run"
    assert update_readmes.ceiling_fraction(1.0, [], {}, "bf16") == ""
    assert update_readmes.ceiling_fraction(1.0, [], {"bf16_tflops": 2.0}, None) == ""
