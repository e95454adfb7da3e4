"""Mutation testing of one lesson's kernels: does the lesson's test suite notice a bug?

    make mutate LESSON=02                  # every mutant, reports in lessons/02_*/results/
    python scripts/mutate.py 02 --list     # the mutants, nothing run
    python scripts/mutate.py 02 --only 7   # one mutant (or 3,7,12), shows the test output
    python scripts/mutate.py 02 --max 5    # the first five

A *mutant* is the lesson's kernel module with one small, plausible bug in it: a ``<`` that
became ``<=``, an index one off, a ``tl.load`` without its ``mask=``, a ``syncthreads()``
or ``synchronize()`` gone, the max-shift dropped from an ``exp``, ``minimum`` swapped for
``maximum``, a 0 that became 1. For each mutant the module is rewritten **on disk** (so
``@cuda.jit`` and ``@triton.jit`` compile the mutant: tools that patch functions in memory,
like mutmut's trampolines, never reach a JIT-compiled kernel), the lesson's fast tests run
(``pytest -x -q``, ``-m "not slow"``, a timeout), and the file is put back byte for byte.
A mutant is *killed* when a test fails, *survives* when every test passes (the suite
would let that bug through), *timeout* when the tests hang (counted as detected).

What is mutated: the bodies of functions decorated with ``cuda.jit`` / ``triton.jit`` (device
functions too), the module-level functions they call, and host functions named in the
lesson's ``mutation.toml`` (lesson 05: the pipeline's ``run``, whose ``synchronize`` is the
point of the lesson). That file also holds the argument for each surviving mutant that is
*equivalent* (no test can kill it because the program does not change its meaning): the
report prints it beside the survivor. Format::

    [modules.stream_pipeline]
    functions = ["Pipeline.run"]           # host functions to mutate as well

    [modules.matmul_triton]
    tests = "not numba"                    # pytest -k: only tests that can run its code

    [[equivalent]]
    module = "vector_add_numba"
    function = "make_ilp_kernel.add_kernel_ilp"
    operator = "index+1"
    old = "base + (elems_per_thread - 1) * block"   # the source text the mutant replaces
    lines = [78]        # optional, for a change as common as "<": a moved line is not argued
    why = "one sentence: why no output can differ"

Safety: before writing a mutant the original is saved under ``.git/mutate-backup/`` and a
marker line is appended to the mutant; a run that is killed (Ctrl-C, SIGTERM) restores in
its ``finally``, and the next run restores any file it finds with a backup or a marker
(from the backup, else from git's HEAD) before doing anything else.
Bytecode: pytest runs with ``PYTHONDONTWRITEBYTECODE=1`` and the module's cached ``.pyc`` is
deleted, so a mutant of the same size written within the same second is never shadowed
by stale bytecode.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = b"# mutate.py: MUTANT"

SYNC_CALLS = {"synchronize", "syncthreads", "syncthreads_count", "syncthreads_and",
              "syncthreads_or", "syncwarp", "debug_barrier", "barrier", "threadfence",
              "threadfence_block", "threadfence_system"}
EXP_CALLS = {"exp", "exp2", "expf"}
# Calls that make an expression value arithmetic rather than index arithmetic.
VALUE_CALLS = {"load", "dot", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "fma", "float32",
               "float16", "float64", "sum", "max", "min", "maximum", "minimum", "where",
               "abs", "sigmoid", "softmax", "atomic_add"}
SHIFT_NAME = re.compile(r"^(m|mx|m_\w+|max\w*|row_max\w*|\w*_max)$")


# --- finding the mutants --------------------------------------------------------------------
@dataclass
class Mutant:
    id: int
    path: Path          # the module file
    module: str
    function: str       # qualified name of the function it lies in
    operator: str       # cmp, index+1, index-1, drop-mask, drop-other, no-sync, no-shift, minmax, 0->1
    line: int
    col: int
    start: int          # byte offsets of the replaced span in the original file
    end: int
    old: str
    new: str

    @property
    def change(self) -> str:
        return f"{_short(self.old)}  ->  {_short(self.new)}"

    def apply(self, original: bytes) -> bytes:
        body = original[:self.start] + self.new.encode() + original[self.end:]
        if not body.endswith(b"\n"):
            body += b"\n"
        return body + MARKER + f" {self.id} ({self.operator} at line {self.line}); " \
            f"restore: python scripts/mutate.py --restore\n".encode()


def _short(s: str, n: int = 60) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _is_jit(dec: ast.expr) -> bool:
    """cuda.jit, cuda.jit(...), triton.jit, triton.jit(...), jit, numba.cuda.jit(**kw)."""
    if isinstance(dec, ast.Call):
        dec = dec.func
    if isinstance(dec, ast.Attribute):
        return dec.attr == "jit"
    return isinstance(dec, ast.Name) and dec.id == "jit"


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


class _Offsets:
    """(line, utf-8 column) -> byte offset in the file, as the ast module counts them."""

    def __init__(self, src: bytes):
        self.src = src
        self.starts = [0]
        for i, b in enumerate(src):
            if b == 10:
                self.starts.append(i + 1)

    def __call__(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node) -> tuple[int, int]:
        return self(node.lineno, node.col_offset), self(node.end_lineno, node.end_col_offset)

    def text(self, a: int, b: int) -> str:
        return self.src[a:b].decode()


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    """Every function of the module by qualified name (Class.method, outer.inner)."""
    out: dict[str, ast.FunctionDef] = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = child
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def target_functions(tree: ast.Module, extra: list[str] = ()) -> dict[str, ast.FunctionDef]:
    """The kernels, the module-level functions they call (transitively), and ``extra``."""
    funcs = _functions(tree)
    chosen = {q: f for q, f in funcs.items() if any(_is_jit(d) for d in f.decorator_list)}
    for q in extra:
        if q not in funcs:
            raise SystemExit(f"mutation.toml names {q!r}, which is not a function of the module")
        chosen[q] = funcs[q]
    top = {q: f for q, f in funcs.items() if "." not in q}
    todo = list(chosen.values())
    while todo:
        f = todo.pop()
        for n in ast.walk(f):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in top \
                    and n.func.id not in chosen:
                chosen[n.func.id] = top[n.func.id]
                todo.append(top[n.func.id])
    # a kernel nested in a chosen function is mutated once, as itself
    return chosen


def _owned_nodes(fn: ast.FunctionDef):
    """The nodes of ``fn``'s body, not descending into nested functions or decorators."""
    stack = list(fn.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield n
        stack.extend(ast.iter_child_nodes(n))


def _is_value_expr(node: ast.expr) -> bool:
    """True if ``node`` computes data values (floats, loaded data) rather than indices."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, float):
            return True
        if isinstance(n, ast.Subscript):
            return True
        if isinstance(n, ast.Call):
            name = _call_name(n)
            if name in VALUE_CALLS:
                return True
            if name == "to" and any("float" in ast.unparse(a) or "bf" in ast.unparse(a)
                                    for a in n.args):
                return True
    return False


def _shift_name(node: ast.expr) -> str:
    while isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


_CMP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">")}


def mutants_of(path: Path, extra: list[str] = (), first_id: int = 1) -> list[Mutant]:
    src = path.read_bytes()
    tree = ast.parse(src)
    off = _Offsets(src)
    module = path.stem
    found: list[tuple] = []   # (start, end, operator, new, function, line)

    def add(start, end, op, new, fn, line):
        found.append((start, end, op, new, fn, line))

    for qual, fn in target_functions(tree, extra).items():
        parents: dict[int, ast.AST] = {}
        for n in _owned_nodes(fn):
            for c in ast.iter_child_nodes(n):
                parents[id(c)] = n
        for n in _owned_nodes(fn):
            # comparison boundary: < <-> <=, > <-> >=
            if isinstance(n, ast.Compare):
                left = n.left
                for op, right in zip(n.ops, n.comparators):
                    if type(op) in _CMP:
                        old, new = _CMP[type(op)]
                        a = off(left.end_lineno, left.end_col_offset)
                        b = off(right.lineno, right.col_offset)
                        gap = off.text(a, b)
                        m = re.search(re.escape(old) + (r"(?!=)" if len(old) == 1 else ""), gap)
                        if m:
                            add(a + m.start(), a + m.end(), "cmp", new, qual, n.lineno)
                    left = right
            # +1 / -1 on an index: subscripts, and top-level integer arithmetic
            launch = isinstance(parents.get(id(n)), ast.Call) and parents[id(n)].func is n
            if isinstance(n, ast.Subscript) and not isinstance(n.slice, ast.Slice) \
                    and not launch:  # kernel[grid, block](...) is a launch, not an index
                idx = n.slice.elts if isinstance(n.slice, ast.Tuple) else [n.slice]
                for e in idx:
                    if isinstance(e, (ast.Slice, ast.Constant)) or \
                            (isinstance(e, ast.Constant) and e.value is None):
                        continue
                    a, b = off.span(e)
                    for d in ("+", "-"):
                        add(a, b, f"index{d}1", f"({off.text(a, b)}) {d} 1", qual, e.lineno)
            if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult)) \
                    and not isinstance(parents.get(id(n)), (ast.BinOp, ast.Subscript)) \
                    and not _is_value_expr(n):
                a, b = off.span(n)
                for d in ("+", "-"):
                    add(a, b, f"index{d}1", f"({off.text(a, b)}) {d} 1", qual, n.lineno)
            # tl.load / tl.store without mask= or other=
            if isinstance(n, ast.Call) and _call_name(n) in ("load", "store"):
                items = sorted(list(n.args) + list(n.keywords),
                               key=lambda x: (x.lineno, x.col_offset))
                for i, kw in enumerate(items):
                    if isinstance(kw, ast.keyword) and kw.arg in ("mask", "other") and i > 0:
                        prev = items[i - 1]
                        a = off(prev.end_lineno, prev.end_col_offset)
                        b = off(kw.end_lineno, kw.end_col_offset)
                        add(a, b, f"drop-{kw.arg}", "", qual, kw.lineno)
            # a barrier / synchronize statement removed
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) \
                    and _call_name(n.value) in SYNC_CALLS:
                a, b = off.span(n)
                add(a, b, "no-sync", "pass", qual, n.lineno)
            # the max-shift of a softmax dropped: exp(x - m) -> exp(x)
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub):
                p = parents.get(id(n))
                in_exp = isinstance(p, ast.Call) and _call_name(p) in EXP_CALLS
                if in_exp or SHIFT_NAME.match(_shift_name(n.right)):
                    a, b = off.span(n)
                    la, lb = off.span(n.left)
                    add(a, b, "no-shift", off.text(la, lb), qual, n.lineno)
            # minimum <-> maximum, min <-> max
            if isinstance(n, ast.Call):
                f = n.func
                swap = {"minimum": "maximum", "maximum": "minimum", "min": "max", "max": "min"}
                if isinstance(f, ast.Attribute) and f.attr in ("minimum", "maximum"):
                    b = off(f.end_lineno, f.end_col_offset)
                    add(b - len(f.attr), b, "minmax", swap[f.attr], qual, n.lineno)
                elif isinstance(f, ast.Name) and f.id in ("min", "max"):
                    a, b = off.span(f)
                    add(a, b, "minmax", swap[f.id], qual, n.lineno)
            # a constant 0 becomes 1
            if isinstance(n, ast.Constant) and not isinstance(n.value, bool) \
                    and isinstance(n.value, (int, float)) and n.value == 0:
                a, b = off.span(n)
                add(a, b, "0->1", "1.0" if isinstance(n.value, float) else "1", qual, n.lineno)

    out, seen = [], set()
    for start, end, op, new, fn, line in sorted(found, key=lambda t: (t[0], t[1], t[2])):
        if (start, end, new) in seen:
            continue
        line = src.count(b"\n", 0, start) + 1   # the line the change starts on
        seen.add((start, end, new))
        col = start - off.starts[line - 1] if off.starts[line - 1] <= start else 0
        out.append(Mutant(first_id + len(out), path, module, fn, op, line, col, start, end,
                          off.text(start, end), new))
    return out


# --- the lesson, its config, the files ------------------------------------------------------
def lesson_dir(spec: str) -> Path:
    spec = spec.strip()
    hits = sorted(p for p in (ROOT / "lessons").glob(f"{spec.zfill(2)}_*") if p.is_dir()) \
        or sorted(p for p in (ROOT / "lessons").glob(f"{spec}*") if p.is_dir())
    if not hits:
        raise SystemExit(f"there is no lesson {spec!r} under lessons/")
    return hits[0]


def load_config(lesson: Path) -> dict:
    p = lesson / "mutation.toml"
    return tomllib.loads(p.read_text()) if p.exists() else {}


def target_modules(lesson: Path, config: dict) -> list[tuple[Path, list[str]]]:
    """(module file, extra functions) for every module with a kernel or a config entry."""
    mods = config.get("modules", {})
    out = []
    for p in sorted(lesson.glob("*.py")):
        if p.name.startswith("test_") or p.name in ("main.py", "conftest.py"):
            continue
        extra = mods.get(p.stem, {}).get("functions", [])
        if extra or target_functions(ast.parse(p.read_bytes())):
            out.append((p, list(extra)))
    return out


def _backup_dir() -> Path:
    return ROOT / ".git" / "mutate-backup"


def _backup_path(path: Path) -> Path:
    path = path.resolve()
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.relative_to(path.anchor)
    return _backup_dir() / rel.as_posix().replace("/", "__")


def restore_leftovers(paths: list[Path]) -> list[str]:
    """Put back any file a killed run left mutated; say what was done."""
    said = []
    for path in paths:
        bak = _backup_path(path)
        if bak.exists():
            path.write_bytes(bak.read_bytes())
            bak.unlink()
            said.append(f"restored {path} from {bak}")
        elif MARKER in path.read_bytes():
            rel = path.resolve().relative_to(ROOT).as_posix()
            head = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True)
            if head.returncode:
                raise SystemExit(f"{rel} holds a mutant and there is neither a backup nor a "
                                 "committed version: restore it by hand")
            path.write_bytes(head.stdout)
            said.append(f"restored {rel} from git HEAD (it held a mutant, no backup)")
    return said


def _drop_bytecode(path: Path):
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


# --- running --------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str          # killed | survived | timeout | baseline
    seconds: float
    killer: str = ""
    output: str = ""


def pytest_command(lesson: Path, python: str, jobs: int, select: str = "") -> list[str]:
    """The lesson's fast tests; ``select`` (mutation.toml's ``tests`` for a module) is a
    ``-k`` expression that leaves out tests which cannot run the module's code."""
    cmd = [python, "-m", "pytest", str(lesson.relative_to(ROOT)), "-x", "-q",
           "-p", "no:cacheprovider", "-rfE", "--no-header"]
    if select:
        cmd += ["-k", select]
    marks_slow = any("mark.slow" in p.read_text() for p in lesson.glob("test_*.py"))
    if marks_slow:
        cmd += ["-m", "not slow"]
    if jobs > 1:
        cmd += ["-n", str(jobs)]
    return cmd


_KILLER = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


def run_tests(cmd: list[str], timeout: float) -> Outcome:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return Outcome("timeout", time.perf_counter() - t, "", out.decode(errors="replace"))
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    text = out.decode(errors="replace")
    dt = time.perf_counter() - t
    if proc.returncode == 0:
        return Outcome("survived", dt, "", text)
    if proc.returncode in (3, 4):  # pytest's internal / usage error: the tool, not a test
        raise SystemExit(f"mutate: pytest failed to run (exit {proc.returncode}):\n{text[-3000:]}")
    m = _KILLER.search(text)
    killer = m.group(2) if m else f"pytest exit {proc.returncode} (no test reached: import or " \
                                  "collection error)"
    return Outcome("killed", dt, killer, text)


def run_mutant(m: Mutant, cmd: list[str], timeout: float) -> Outcome:
    original = m.path.read_bytes()
    bak = _backup_path(m.path)
    bak.parent.mkdir(parents=True, exist_ok=True)
    bak.write_bytes(original)
    try:
        m.path.write_bytes(m.apply(original))
        _drop_bytecode(m.path)
        return run_tests(cmd, timeout)
    finally:
        m.path.write_bytes(original)
        _drop_bytecode(m.path)
        bak.unlink(missing_ok=True)


# --- the report -----------------------------------------------------------------------------
def _note_for(m: Mutant, config: dict) -> str:
    """The argument mutation.toml gives for this survivor (matched on module, function,
    operator and the source text replaced, so it survives edits elsewhere in the file)."""
    norm = lambda s: " ".join(str(s).split())  # noqa: E731
    for e in config.get("equivalent", []):
        if e.get("module") == m.module and e.get("function") == m.function \
                and e.get("operator") == m.operator and norm(e.get("old")) == norm(m.old) \
                and e.get("lines", [m.line]).count(m.line):  # optional: a short, common change
            return e["why"]
    return ""


def summary_line(lesson: Path, module: str, results) -> str:
    n = len(results)
    k = sum(o.status == "killed" for _, o in results)
    t = sum(o.status == "timeout" for _, o in results)
    s = sum(o.status == "survived" for _, o in results)
    pct = 100.0 * (k + t) / n if n else 100.0
    secs = sum(o.seconds for _, o in results)
    return (f"{lesson.name}/{module}: {n} mutants, {k} killed, {t} timeout, {s} survived: "
            f"{pct:.0f}% detected ({secs:.0f} s of tests)")


def write_report(lesson: Path, module: str, results, config: dict, cmd: list[str],
                 baseline: Outcome) -> Path:
    out = lesson / "results" / f"mutation-{module}.md"
    out.parent.mkdir(exist_ok=True)
    lines = [f"# Mutation testing: `{module}.py`", "",
             f"Generated by `make mutate LESSON={lesson.name[:2]}` (scripts/mutate.py) on "
             f"{_dt.date.today().isoformat()}, under "
             f"{'emulation' if os.environ.get('COURSE_MODE', 'auto') != 'gpu' else 'GPU'} "
             "mode. Each mutant is one change to the module on disk; the lesson's tests ran "
             "against it:", "",
             f"    python {' '.join(c if ' ' not in c else repr(c) for c in cmd[1:])}", "",
             f"Baseline (no mutant): passed in {baseline.seconds:.1f} s. "
             "Mutant ids are positions in today's file: `--only ID` re-runs one.", "",
             "**" + summary_line(lesson, module, results) + "**", "",
             "| id | line:col | function | operator | change | result | killed by |",
             "|---|---|---|---|---|---|---|"]
    for m, o in results:
        change = m.change.replace("|", "\\|")
        killer = o.killer.replace("|", "\\|")
        lines.append(f"| {m.id} | {m.line}:{m.col} | `{m.function}` | {m.operator} | `{change}` | "
                     f"{o.status} | {killer} |")
    surv = [(m, o) for m, o in results if o.status == "survived"]
    lines += ["", "## Survivors", ""]
    if not surv:
        lines.append("None.")
    for m, o in surv:
        note = " ".join(_note_for(m, config).split())
        lines.append(f"- **{m.id}** line {m.line}:{m.col}, `{m.function}`, `{m.change}`: "
                     + (f"equivalent. {note}" if note else
                        "**not argued**: add a test that kills it, or its reason to "
                        "mutation.toml"))
    out.write_text("\n".join(lines) + "\n")
    return out


# --- command line ---------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lesson", nargs="?", help="lesson number (02) or folder prefix")
    ap.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    ap.add_argument("--only", help="mutant ids to run, comma-separated (prints test output)")
    ap.add_argument("--max", type=int, help="run at most the first N mutants")
    ap.add_argument("--module", help="only this kernel module (file stem)")
    ap.add_argument("--timeout", type=float, help="seconds per mutant "
                    "(default: 5x the baseline run, at least 60)")
    ap.add_argument("--jobs", "-n", type=int, default=1, help="pytest-xdist workers (default 1)")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs pytest")
    ap.add_argument("--restore", action="store_true",
                    help="only put back files a killed run left mutated, then exit")
    ap.add_argument("--no-report", action="store_true", help="do not write the reports")
    args = ap.parse_args(argv)

    if args.restore and not args.lesson:
        paths = [p for lesson in sorted((ROOT / "lessons").glob("[0-9]*")) for p in
                 lesson.glob("*.py")]
        for s in restore_leftovers(paths) or ["nothing to restore"]:
            print(s)
        return 0
    if not args.lesson:
        ap.error("which lesson? e.g. python scripts/mutate.py 02 (make mutate LESSON=02)")
    lesson = lesson_dir(args.lesson)
    config = load_config(lesson)
    modules = target_modules(lesson, config)
    for s in restore_leftovers([p for p, _ in modules]):
        print("mutate:", s)
    if args.restore:
        return 0
    by_module: dict[str, list[Mutant]] = {}
    next_id = 1
    for path, extra in modules:   # ids count over every module: --module keeps them
        ms = mutants_of(path, extra, next_id)
        next_id += len(ms)
        by_module[path.stem] = ms
    if args.module:
        if args.module not in by_module:
            raise SystemExit(f"{lesson.name} has no kernel module {args.module!r}")
        by_module = {args.module: by_module[args.module]}
        modules = [(p, e) for p, e in modules if p.stem == args.module]
    everything = [m for ms in by_module.values() for m in ms]

    if args.list:
        for m in everything:
            print(f"{m.id:4d}  {m.module}.py:{m.line}:{m.col:<3d} {m.function:<28s} {m.operator:<10s} "
                  f"{m.change}")
        print(f"{len(everything)} mutants in {len(by_module)} module(s) of {lesson.name}")
        return 0

    chosen = everything
    if args.only:
        ids = {int(x) for x in args.only.split(",") if x.strip()}
        chosen = [m for m in everything if m.id in ids]
        if len(chosen) != len(ids):
            raise SystemExit(f"no mutant with id {sorted(ids - {m.id for m in chosen})} "
                             f"(--list shows {len(everything)})")
    if args.max is not None:
        chosen = chosen[:args.max]
    partial = len(chosen) != len(everything)

    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"] +
                           [str(p.relative_to(ROOT)) for p, _ in modules], cwd=ROOT).returncode
    if dirty:
        print("mutate: note: the kernel modules have uncommitted changes; the working copy "
              "is what gets mutated, and restored", file=sys.stderr)

    selects = {p.stem: config.get("modules", {}).get(p.stem, {}).get("tests", "")
               for p, _ in modules}
    cmds = {stem: pytest_command(lesson, args.python, args.jobs, sel)
            for stem, sel in selects.items()}
    cmd = pytest_command(lesson, args.python, args.jobs)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"mutate: baseline: {' '.join(cmd[1:])}", flush=True)
    baseline = run_tests(cmd, timeout=args.timeout or 900)
    if baseline.status != "survived":
        print(baseline.output[-4000:])
        raise SystemExit(f"mutate: the tests fail without any mutant ({baseline.status}); "
                         "fix that first")
    timeout = args.timeout or max(60.0, 5 * baseline.seconds)
    print(f"mutate: baseline passed in {baseline.seconds:.1f} s; {len(chosen)} mutants, "
          f"timeout {timeout:.0f} s each", flush=True)

    t0 = time.perf_counter()
    results: dict[str, list] = {}
    try:
        for m in chosen:
            o = run_mutant(m, cmds[m.module], timeout)
            results.setdefault(m.module, []).append((m, o))
            print(f"{m.id:4d} {o.status:8s} {o.seconds:5.1f}s  {m.module}.py:{m.line} "
                  f"{m.operator:9s} {m.change}  {o.killer}", flush=True)
            if args.only:
                print(o.output[-6000:])
    except KeyboardInterrupt:
        print("\nmutate: interrupted; the module is restored", file=sys.stderr)
        return 130
    total = time.perf_counter() - t0
    print()
    for module, res in results.items():
        print(summary_line(lesson, module, res))
        if not partial and not args.no_report:
            print("  report:", write_report(lesson, module, res, config, cmds[module], baseline)
                  .relative_to(ROOT))
    allres = [r for res in results.values() for r in res]
    detected = sum(o.status != "survived" for _, o in allres)
    print(f"{lesson.name}: {detected}/{len(allres)} detected "
          f"({100.0 * detected / max(1, len(allres)):.0f}%), {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
