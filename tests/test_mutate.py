"""scripts/mutate.py, the mutation tester: which mutants it makes, that each one is valid
Python that differs from the original only where it says, and that the module file is
restored byte for byte (after a run, after an interrupted run, and by the next run when
a killed one left a mutant behind). No kernel is compiled and no test suite runs here."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("course_mutate", ROOT / "scripts" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["course_mutate"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutate = _load()

KERNELS = '''\
"""A made-up kernel module: one of each thing the mutator knows."""
import math
from numba import cuda
import triton
import triton.language as tl


@triton.jit
def softmax_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(axis=0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=-float("inf"))
    m = tl.max(x, axis=0)
    p = tl.exp(x - m)
    tl.store(out_ptr + offs, tl.minimum(p, 1.0), mask=mask)


@cuda.jit
def tiled(a, out):
    i = cuda.grid(1)
    if i >= a.size:
        return
    cuda.syncthreads()
    out[i] = helper(a[i])


def helper(v):
    return v * 2


def host_only(x):        # not a kernel, not called by one: never mutated
    return x < 0
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    monkeypatch.setattr(mutate, "_backup_dir", lambda: tmp_path / "backup")
    path = tmp_path / "kernels_under_test.py"
    path.write_bytes(KERNELS.encode())
    return path


def test_every_operator_is_produced_where_it_should_be(module):
    ms = mutate.mutants_of(module)
    ops = {m.operator for m in ms}
    assert {"cmp", "index+1", "index-1", "drop-mask", "drop-other", "no-sync", "no-shift",
            "minmax", "0->1"} <= ops
    assert {m.function for m in ms} == {"softmax_kernel", "tiled", "helper"}
    by = {(m.operator, m.old, m.new) for m in ms}
    assert ("cmp", "<", "<=") in by and ("cmp", ">=", ">") in by
    assert ("no-shift", "x - m", "x") in by
    assert ("minmax", "minimum", "maximum") in by
    assert ("no-sync", "cuda.syncthreads()", "pass") in by
    assert ("0->1", "0", "1") in by
    assert [m.id for m in ms] == list(range(1, len(ms) + 1))
    assert not any(m.function == "host_only" for m in ms)
    assert mutate.mutants_of(module, extra=["host_only"])[-1].function == "host_only"


def test_each_mutant_is_valid_python_and_changes_only_its_span(module):
    original = module.read_bytes()
    for m in mutate.mutants_of(module):
        text = m.apply(original)
        ast.parse(text)                        # still compiles
        body, marker = text.rsplit(b"\n" + mutate.MARKER, 1)
        assert body + b"\n" != original
        assert body.startswith(original[:m.start])
        assert (body + b"\n").endswith(original[m.end:])
        assert m.new.encode() in body
    kw = [m for m in mutate.mutants_of(module) if m.operator == "drop-mask"]
    assert all(b"mask=mask" not in m.apply(original)[m.start - 2:m.end + 2] for m in kw)


@pytest.mark.parametrize("outcome", ["passes", "fails", "interrupted"])
def test_the_file_is_restored_byte_for_byte(module, monkeypatch, outcome):
    original = module.read_bytes()
    m = mutate.mutants_of(module)[3]
    seen = {}

    def fake_tests(cmd, timeout):
        seen["during"] = module.read_bytes()
        seen["backup"] = mutate._backup_path(module).read_bytes()
        if outcome == "interrupted":
            raise KeyboardInterrupt
        return mutate.Outcome("survived" if outcome == "passes" else "killed", 0.1)

    monkeypatch.setattr(mutate, "run_tests", fake_tests)
    if outcome == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            mutate.run_mutant(m, ["pytest"], 1)
    else:
        mutate.run_mutant(m, ["pytest"], 1)
    assert seen["during"] == m.apply(original) and seen["backup"] == original
    assert module.read_bytes() == original
    assert not mutate._backup_path(module).exists()


def test_a_leftover_mutant_is_restored_before_anything_runs(module):
    original = module.read_bytes()
    m = mutate.mutants_of(module)[0]
    bak = mutate._backup_path(module)          # what a run killed by SIGKILL leaves behind
    bak.parent.mkdir(parents=True)
    bak.write_bytes(original)
    module.write_bytes(m.apply(original))
    said = mutate.restore_leftovers([module])
    assert module.read_bytes() == original and not bak.exists() and len(said) == 1
    assert mutate.restore_leftovers([module]) == []     # nothing left: nothing done


def test_the_lessons_have_mutants_and_a_test_command():
    lesson = mutate.lesson_dir("02")
    mods = mutate.target_modules(lesson, mutate.load_config(lesson))
    assert {p.stem for p, _ in mods} == {"vector_add_numba", "vector_add_triton"}
    cmd = mutate.pytest_command(lesson, sys.executable, 1)
    assert "-x" in cmd and str(lesson.relative_to(ROOT)) in cmd
    l05 = mutate.lesson_dir("05")
    (path, extra), = mutate.target_modules(l05, mutate.load_config(l05))
    ops = {(m.function, m.operator) for m in mutate.mutants_of(path, extra)}
    assert ("Pipeline.run", "no-sync") in ops
