"""Benchmark records: a rich table for people, a JSON file for the repository.

A lesson's benchmark builds one :class:`BenchReport`, adds one row per (case, impl):

    report = BenchReport("02_vector_add", "triton_vs_torch", metric="GB/s")
    t = bench(lambda: add(x, y, out))
    report.add({"n": n, "dtype": "float32"}, "triton", t, value=gbps(3 * n * 4, ...))
    report.add({"n": n, "dtype": "float32"}, "torch a+b", t_peer, value=..., peer=True)
    report.print()
    report.save()      # lessons/02_vector_add/results/triton_vs_torch-<gpu>.json

On the lent GPU machine set ``RESULTS_DIR=$OUT`` so the files come back; then copy them
into ``lessons/<lesson>/results/`` and run ``python scripts/update_readmes.py``, which
rewrites each README's block between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
from the JSON (tables in READMEs are never edited by hand).

Rows of the same case are the variants and the peers *measured in the same run*; the
JSON carries the GPU name, the date, the package versions and the machine's measured
ceilings, so a number can always be traced to where it came from.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from common import runtime
from common.timing import Timing

REPO = Path(__file__).resolve().parents[1]

_PACKAGES = ("torch", "triton", "numba", "numba-cuda", "numpy", "cuda-core",
             "cuda-bindings", "cuda-python")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def environment() -> dict:
    """GPU name, driver, versions and date: what every result file starts with."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": runtime.mode(),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
    probe = runtime.probe_gpu()
    if runtime.is_gpu():
        env["gpu"] = probe.name
        env["driver_cuda"] = probe.driver_version
        try:
            import torch
            props = torch.cuda.get_device_properties(0)
            env["sm_count"] = props.multi_processor_count
            env["cuda_runtime"] = torch.version.cuda
        except Exception:  # pragma: no cover - informational only
            pass
    else:
        env["gpu"] = None
    return env


def gpu_slug(name: str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (result file names)."""
    name = name if name is not None else (runtime.probe_gpu().name or "emulation")
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@dataclass
class Row:
    case: dict
    impl: str
    timing: Timing | None
    value: float | None
    peer: bool = False
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"case": self.case, "impl": self.impl, "peer": self.peer,
                "ms": None if self.timing is None else self.timing.median_ms,
                "timing": None if self.timing is None else self.timing.as_dict(),
                "value": self.value, **({"extra": self.extra} if self.extra else {})}


class BenchReport:
    """Rows of one benchmark, printed as a table and saved as JSON."""

    def __init__(self, lesson: str, name: str, metric: str, title: str | None = None,
                 ceilings: dict | None = None):
        self.lesson = lesson
        self.name = name  # one lesson may save several reports: "fwd", "ablation", ...
        self.metric = metric  # unit of `value`, e.g. "GB/s" or "TFLOPS"
        self.title = title or f"{lesson}: {metric}"
        self.ceilings = ceilings
        self.rows: list[Row] = []

    def add(self, case: dict, impl: str, timing: Timing | None, value: float | None = None,
            peer: bool = False, **extra) -> Row:
        row = Row(dict(case), impl, timing, value, peer, extra)
        self.rows.append(row)
        return row

    # -- output ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"lesson": self.lesson, "name": self.name, "title": self.title,
                "metric": self.metric,
                "environment": environment(), "ceilings": self.ceilings,
                "rows": [r.as_dict() for r in self.rows]}

    def save(self, path: Path | str | None = None) -> Path:
        """Write JSON to ``path``, else ``$RESULTS_DIR/``, else ``lessons/<lesson>/results/``,
        as ``<name>-<gpu>.json``."""
        if path is None:
            folder = os.environ.get("RESULTS_DIR") or REPO / "lessons" / self.lesson / "results"
            path = Path(folder) / f"{self.name}-{gpu_slug()}.json"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def print(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        table = Table(title=self.title)
        case_keys: list[str] = []
        for r in self.rows:
            for k in r.case:
                if k not in case_keys:
                    case_keys.append(k)
        for k in case_keys:
            table.add_column(k)
        table.add_column("impl")
        table.add_column("ms", justify="right")
        table.add_column(self.metric, justify="right")
        table.add_column("vs best peer", justify="right")
        for r in self.rows:
            peers = [p.value for p in self.rows if p.peer and p.case == r.case and p.value]
            ratio = (f"{r.value / max(peers):.2f}x" if peers and r.value and not r.peer else "")
            ms = "n/a" if r.timing is None else f"{r.timing.median_ms:.4f}"
            val = "n/a" if r.value is None else f"{r.value:,.1f}"
            name = f"[dim]{r.impl} (peer)[/dim]" if r.peer else r.impl
            table.add_row(*[str(r.case.get(k, "")) for k in case_keys], name, ms, val, ratio)
        console.print(table)
        if runtime.is_emulated():
            console.print("[yellow]Emulation: each kernel ran once for correctness; "
                          "timings are meaningless and shown as n/a.[/yellow]")


# ----------------------------------------------------------------------------------------
# Markdown for READMEs, always generated from a saved JSON file.

def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"
    return str(x)


def markdown_table(data: dict) -> str:
    """A saved report (``BenchReport.to_dict()``) as a Markdown table plus provenance."""
    rows = data["rows"]
    case_keys: list[str] = []
    for r in rows:
        for k in r["case"]:
            if k not in case_keys:
                case_keys.append(k)
    impls: list[str] = []
    for r in rows:
        label = r["impl"] + (" (peer)" if r["peer"] else "")
        if label not in impls:
            impls.append(label)
    metric = data["metric"]
    head = case_keys + [f"{i} [{metric}]" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases: list[dict] = []
    for r in rows:
        if r["case"] not in cases:
            cases.append(r["case"])
    for c in cases:
        vals = {}
        for r in rows:
            if r["case"] == c:
                vals[r["impl"] + (" (peer)" if r["peer"] else "")] = r["value"]
        lines.append("| " + " | ".join([_fmt(c.get(k, "")) for k in case_keys]
                                       + [_fmt(vals.get(i)) for i in impls]) + " |")
    env = data["environment"]
    pk = env.get("packages", {})
    ceil = data.get("ceilings") or {}
    prov = (f"Measured {env['date']} on {env.get('gpu') or 'emulation'}"
            f" (driver CUDA {env.get('driver_cuda', '?')}), torch {pk.get('torch', '?')}, "
            f"triton {pk.get('triton', '?')}, numba-cuda {pk.get('numba-cuda', '?')}")
    if ceil:
        prov += (f"; measured ceilings: copy {ceil.get('copy_gbps', 0):,.0f} GB/s, "
                 f"bf16 matmul {ceil.get('bf16_tflops', 0):,.0f} TFLOPS")
    return "\n".join(lines) + "\n\n" + prov + ". Raw: `results/" + \
        f"{data['name']}-{gpu_slug(env.get('gpu') or 'emulation')}.json`."
